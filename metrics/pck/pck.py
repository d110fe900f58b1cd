"""PCK (Percentage of Correct Keypoints) as a local `evaluate` metric, MP-100 / POMNet protocol.

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
PCK@t for keypoint localisation. A predicted keypoint is correct when its Euclidean distance to
the ground truth is <= t * normalizer, where the normalizer is max(width, height) of the query
instance's bounding box (t = 0.2 in the MP-100 protocol). Only keypoints flagged visible (in the
MP-100 protocol: visible in both the support and the query) are scored. PCK is averaged within
each category, then over categories (the reported number, `pck`); the average over all scored
keypoints (`pck_micro`) and the per-category values are returned too.

Note: mmpose's `keypoint_pck_accuracy` uses a strict `<`; this metric uses `<=` as fixed in the
project's DESIGN.md, which only matters for distances exactly on the threshold.
"""

_KWARGS_DESCRIPTION = """
Args (one entry per keypoint):
    predictions (`list` of `[x, y]`): predicted keypoint positions.
    references (`list` of `[x, y]`): ground-truth positions, same coordinate frame.
    normalizers (`list` of `float`): max(w, h) of the query bbox, in that frame; > 0.
    visible (`list` of `int`/`bool`): 1 if the keypoint counts (visible in support and query).
    category_ids (`list` of `int`): category of the query instance.
    threshold (`float`, default 0.2): the PCK threshold t.
Returns:
    pck (`float`): mean over categories of the per-category PCK (categories without any
        visible keypoint are left out).
    pck_micro (`float`): correct / scored keypoints over everything.
    pck_per_category (`dict[int, float]`): per-category PCK.
    num_keypoints (`int`): number of scored keypoints.
    num_categories (`int`): number of categories in `pck`.
Raises:
    ValueError: mismatched lengths, NaN/inf coordinates or normalizers, normalizer <= 0,
        threshold <= 0, or no visible keypoint at all.
Examples:
    >>> pck = evaluate.load("./metrics/pck")
    >>> pck.compute(predictions=[[0, 0], [10, 0]], references=[[0, 0], [0, 0]],
    ...             normalizers=[100, 100], visible=[1, 1], category_ids=[1, 1])["pck"]
    1.0
"""


def compute_pck(predictions, references, normalizers, visible, category_ids,
                threshold: float = 0.2) -> dict:
    """The metric as a plain function (NumPy in, Python numbers out)."""
    try:
        pred = np.asarray(predictions, dtype=np.float64)
        ref = np.asarray(references, dtype=np.float64)
        norm = np.asarray(normalizers, dtype=np.float64)
    except ValueError as err:  # ragged lists such as [[x, y], [x, y, z]]
        raise ValueError(f"predictions and references must be [x, y] pairs: {err}") from None
    vis = np.asarray(visible).astype(bool)
    cats = np.asarray(category_ids)
    n = len(pred)
    if n == 0:
        raise ValueError("no keypoint to score (empty inputs)")
    lengths = {"predictions": len(pred), "references": len(ref), "normalizers": len(norm),
               "visible": len(vis), "category_ids": len(cats)}
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
    if not vis.any():
        raise ValueError("no visible keypoint to score")

    dist = np.linalg.norm(pred - ref, axis=1)
    # Normalised distance vs threshold, as mmpose/POMNet compute it.
    correct = np.zeros(n, dtype=bool)
    correct[vis] = dist[vis] / norm[vis] <= threshold
    per_category: dict[int, float] = {}
    for cat in sorted(set(cats[vis].tolist())):
        mask = vis & (cats == cat)
        per_category[int(cat)] = float(correct[mask].mean())
    return {
        "pck": float(np.mean(list(per_category.values()))),
        "pck_micro": float(correct[vis].mean()),
        "pck_per_category": per_category,
        "num_keypoints": int(vis.sum()),
        "num_categories": len(per_category),
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
            }),
            reference_urls=["https://github.com/luminxu/Pose-for-Everything"],
        )

    def _compute(self, predictions, references, normalizers, visible, category_ids,
                 threshold: float = 0.2) -> dict:
        return compute_pck(predictions, references, normalizers, visible, category_ids, threshold)
