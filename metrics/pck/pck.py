"""PCK (Percentage of Correct Keypoints) as a local `evaluate` metric, scored as the official CAPE code scores MP-100.

Load it offline with ``evaluate.load("./metrics/pck")`` (Hub metrics need the network).
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_CITATION = """\
@inproceedings{xu2022pose,
  title={Pose for Everything: Towards Category-Agnostic Pose Estimation},
  author={Xu, Lumin and Jin, Sheng and Zeng, Wang and Liu, Wentao and Qian, Chen and Ouyang, Wanli and Luo, Ping and Wang, Xiaogang},
  booktitle={ECCV},
  year={2022}
}
"""

_DESCRIPTION = """\
PCK@t as the official category-agnostic pose estimation code computes it on MP-100 (POMNet's
Pose-for-Everything, CapeFormer and PoseAnything share it; mmpose's `keypoint_pck_accuracy` per pair):

* the unit is a support-query *pair*; a keypoint is valid when the caller flags it visible (in the
  official protocol: visible in the query AND in every support shot);
* a valid keypoint is correct when ||prediction - reference|| / normalizer, stored in float32 as
  mmpose stores it, is strictly below t (the normalizer is the query bbox's max(w, h));
* each pair scores the share of its valid keypoints that are correct, a pair without any valid
  keypoint scores 0, and `pck` is the mean over pairs;
* `pck_ci95` is a 95% percentile bootstrap interval of `pck` (pairs resampled with replacement,
  numpy, seeded: the same seed and number of pairs resample the same pairs for every method).

Extras, labelled as such and never the headline: `pck_per_category` (mean over each category's
pairs), `pck_category_mean` (their mean), `pck_per_category_pooled` (valid keypoints pooled within
each category, then averaged over categories) and `pck_pooled` (all valid keypoints pooled).
"""

_KWARGS_DESCRIPTION = """
Args (one entry per keypoint):
    predictions (`list` of `[x, y]`): predicted keypoint positions.
    references (`list` of `[x, y]`): ground-truth positions, same coordinate frame.
    normalizers (`list` of `float`): max(w, h) of the query bbox, in that frame; > 0.
    visible (`list` of `int`/`bool`): 1 if the keypoint counts (official: visible in the query and every shot).
    category_ids (`list` of `int`): category of the query instance.
    pair_ids (`list` of `int`): the support-query pair the keypoint belongs to (all keypoints of a pair,
        valid or not, share it; a pair whose keypoints are all invisible scores 0).
    threshold (`float`, default 0.2): the PCK threshold t.
    bootstrap_samples (`int`, default 1000): resamples of the pairs for `pck_ci95`.
    bootstrap_seed (`int`, default 0): seed of the resampling.
Returns:
    pck (`float`): mean over pairs of the per-pair accuracy (the official figure).
    pck_ci95 (`list[float]`): [2.5th, 97.5th] percentile of the bootstrap means.
    num_pairs (`int`), num_pairs_without_valid_keypoint (`int`), num_keypoints (`int`, valid ones),
    num_categories (`int`).
    pck_per_pair (`list[float]`): each pair's accuracy, in the order of its first `pair_ids` value.
    pck_per_category (`dict[int, float]`), pck_category_mean, pck_per_category_pooled, pck_pooled
        (`float`): the labelled extras (see the description).
Raises:
    ValueError: mismatched lengths, NaN/inf coordinates or normalizers, normalizer <= 0 for a valid
        keypoint, threshold <= 0, bootstrap_samples < 1, or no keypoint at all.
Examples:
    >>> pck = evaluate.load("./metrics/pck")
    >>> pck.compute(predictions=[[0, 0], [10, 0], [0, 0]], references=[[0, 0], [0, 0], [0, 0]],
    ...             normalizers=[100, 100, 100], visible=[1, 1, 0], category_ids=[1, 1, 1],
    ...             pair_ids=[0, 0, 1])["pck"]
    0.5
"""

def bootstrap_interval(per_pair: np.ndarray, samples: int = 1000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the mean of `per_pair`, resampling its entries with replacement."""
    rng = np.random.default_rng(seed)
    n = len(per_pair)
    # one resample at a time: 60,000 pairs x 1,000 resamples at once would take 480 MB of indices
    means = np.array([per_pair[rng.integers(0, n, n)].mean() for _ in range(samples)])
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return [float(low), float(high)]


def compute_pck(predictions, references, normalizers, visible, category_ids, pair_ids, threshold: float = 0.2,
                bootstrap_samples: int = 1000, bootstrap_seed: int = 0) -> dict:
    """The metric as a plain function (NumPy in, Python numbers out)."""
    try:
        pred = np.asarray(predictions, dtype=np.float64)
        ref = np.asarray(references, dtype=np.float64)
        norm = np.asarray(normalizers, dtype=np.float64)
    except ValueError as err:  # ragged lists such as [[x, y], [x, y, z]]
        raise ValueError(f"predictions and references must be [x, y] pairs: {err}") from None
    vis = np.asarray(visible).astype(bool)
    cats = np.asarray(category_ids)
    pairs = np.asarray(pair_ids)
    n = len(pred)
    if n == 0:
        raise ValueError("no keypoint to score (empty inputs)")
    lengths = {"predictions": len(pred), "references": len(ref), "normalizers": len(norm),
               "visible": len(vis), "category_ids": len(cats), "pair_ids": len(pairs)}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"PCK inputs must have one entry per keypoint, got lengths {lengths}")
    if pred.shape != (n, 2) or ref.shape != (n, 2):
        raise ValueError(f"predictions and references must be [x, y] pairs, got shapes "
                         f"{pred.shape} and {ref.shape}")
    if not (np.isfinite(pred).all() and np.isfinite(ref).all() and np.isfinite(norm).all()):
        raise ValueError("PCK inputs contain NaN or inf (predictions, references or normalizers)")
    if (norm[vis] <= 0).any():
        raise ValueError("normalizers (bbox max(w, h)) must be > 0 for visible keypoints")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    if isinstance(bootstrap_samples, bool) or not isinstance(bootstrap_samples, int) or bootstrap_samples < 1:
        raise ValueError(f"bootstrap_samples must be a positive integer, got {bootstrap_samples!r}")

    # mmpose divides the offset by the normalizer, then keeps the norm in a float32 array and compares
    # it with t in float32: a distance on the threshold (or within float32 rounding of it) is a miss
    distance = np.linalg.norm((pred - ref) / np.where(vis, norm, 1.0)[:, None], axis=-1).astype(np.float32)
    correct = vis & (distance < np.float32(threshold))

    pair_keys, pair_index = np.unique(pairs, return_inverse=True)
    num_pairs = len(pair_keys)
    valid_per_pair = np.bincount(pair_index, weights=vis, minlength=num_pairs)
    correct_per_pair = np.bincount(pair_index, weights=correct, minlength=num_pairs)
    per_pair = np.divide(correct_per_pair, valid_per_pair, out=np.zeros(num_pairs), where=valid_per_pair > 0)
    pair_category = np.zeros(num_pairs, dtype=cats.dtype)
    pair_category[pair_index] = cats

    per_category = {int(cat): float(per_pair[pair_category == cat].mean()) for cat in np.unique(pair_category)}
    pooled_per_category = [float(correct[vis & (cats == cat)].mean()) for cat in np.unique(cats[vis])]
    return {
        "pck": float(per_pair.mean()),
        "pck_ci95": bootstrap_interval(per_pair, bootstrap_samples, bootstrap_seed),
        "num_pairs": num_pairs,
        "num_pairs_without_valid_keypoint": int((valid_per_pair == 0).sum()),
        "num_keypoints": int(vis.sum()),
        "num_categories": len(per_category),
        "pck_per_category": per_category,
        "pck_category_mean": float(np.mean(list(per_category.values()))),
        "pck_per_category_pooled": float(np.mean(pooled_per_category)) if pooled_per_category else 0.0,
        "pck_pooled": float(correct[vis].mean()) if vis.any() else 0.0,
        "pck_per_pair": per_pair.tolist(),
    }


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Pck(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Value("float64")),
                "references": datasets.Sequence(datasets.Value("float64")),
                "normalizers": datasets.Value("float64"),
                "visible": datasets.Value("int64"),
                "category_ids": datasets.Value("int64"),
                "pair_ids": datasets.Value("int64"),
            }),
            reference_urls=["https://github.com/luminxu/Pose-for-Everything",
                            "https://github.com/open-mmlab/mmpose/tree/main/projects/pose_anything"],
        )

    def _compute(self, predictions, references, normalizers, visible, category_ids, pair_ids, threshold: float = 0.2,
                 bootstrap_samples: int = 1000, bootstrap_seed: int = 0) -> dict:
        return compute_pck(predictions, references, normalizers, visible, category_ids, pair_ids, threshold,
                           bootstrap_samples, bootstrap_seed)
