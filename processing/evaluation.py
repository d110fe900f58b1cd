"""Visual-prompt evaluation on the official CAPE episodes: the model, matchers and two baselines, scored with PCK@0.2.

Scoring is the official MP-100 protocol (DESIGN.md §4, `metrics/pck`): per support-query pair, the share
of valid keypoints (visible in the query and in every support shot) within 0.2 x max(w, h) of the query's
box (strictly), a pair without a valid keypoint scoring 0; PCK is the mean over pairs, with a 95%
bootstrap interval over pairs. Per-category and pooled-keypoint figures are returned as labelled extras.

Baselines (measured on the same episodes, so they sit next to the model's number):
- support-copy: a query keypoint is put where the support's keypoint is, in normalized crop coordinates;
- mean-position: a query keypoint is put at the mean normalized position of that keypoint name over
  the training instances (the overall mean for names never seen in training).
"""

import functools
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import evaluate
import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm

from modeling_kptllm import KptLlmForKeypointComprehension, KptLlmProcessor
from modeling_kptllm.processing_kptllm import denormalize_points, normalize_points, square_crop_box

from .coco import load_image
from .episodes import CapeEpisode, Episode, instances_fingerprint

logger = logging.getLogger(__name__)

PCK_METRIC_PATH = str(Path(__file__).resolve().parents[1] / "metrics" / "pck")


@functools.cache
def _pck_metric() -> evaluate.EvaluationModule:
    """The local PCK metric, loaded once: each load copies and imports the metric script again."""
    return evaluate.load(PCK_METRIC_PATH)


def fixed_episode_file(data_dir: str | Path, split: int, num_shots: int, queries_per_category: int, instances: Dataset) -> Path:
    """Where a benchmark keeps its fixed test episodes: one file per sampling setting and set of test instances
    (`instances_fingerprint` in the name), shared by all tools. Keyed by the instances, so a file drawn while
    some images were missing, or from an older annotation file, is never taken for the complete data's."""
    key = instances_fingerprint(instances)[:12]
    return Path(data_dir) / "episodes" / f"split{split}_test_{num_shots}shot_{queries_per_category}q_{key}.json"


def _crop_box(row: dict, crop_padding: float):
    return square_crop_box(row["bbox"], (row["width"], row["height"]), crop_padding, "bbox")


def _scored(instances: Dataset, episode: Episode) -> tuple[dict, np.ndarray]:
    """The query row and the keypoints that count (the official mask): visible in the query AND in every support shot."""
    query = instances[episode.query_row]
    valid = np.asarray(query["visible"], dtype=bool)
    for row in episode.support_rows:
        valid &= np.asarray(instances[row]["visible"], dtype=bool)
    return query, valid


def official_normalizer(row: dict) -> float:
    """max(w, h) of the box the official reader keeps (`clean_bbox`): clipped to the image and measured
    between its first and last pixel, so a box inside its image counts w - 1 and h - 1."""
    x, y, w, h = row["bbox"]
    x1, y1 = max(0.0, x), max(0.0, y)
    x2 = min(row["width"] - 1.0, x1 + max(0.0, w - 1.0))
    y2 = min(row["height"] - 1.0, y1 + max(0.0, h - 1.0))
    return max(x2 - x1, y2 - y1)


MAX_ROWS_PER_CALL = 256
"""Keypoint rows decoded in one `detect_keypoints` call: an episode's queries go in as few calls as keep under it
(15 queries x 68 face landmarks would otherwise decode 1,020 rows at once)."""


def _shared_support_inputs(
    processor: KptLlmProcessor,
    instances: Dataset,
    support_rows: Sequence[int],
    query_rows: Sequence[int],
    task: str,
    identify_then_detect: bool,
):
    """(processor inputs, prompted keypoint indices) for query instances that share one support: every keypoint
    that some support shot shows is prompted, for every query, in one processor call.

    `task="visual+textual"` also gives each keypoint's name (Table 7): the support and the queries are of
    one category, so they share the names.
    """
    if task not in ("visual", "visual+textual"):
        raise ValueError(f"task must be 'visual' or 'visual+textual' for episodes, got {task!r}")
    queries = [instances[row] for row in query_rows]
    supports = [instances[row] for row in support_rows]
    support_visible = np.array([s["visible"] for s in supports], dtype=bool)
    prompted = np.flatnonzero(support_visible.any(0))  # keypoints some shot can show
    inputs = processor(
        query=[load_image(query["image_path"]) for query in queries],
        query_bbox=[query["bbox"] for query in queries],
        support=[load_image(s["image_path"]) for s in supports],
        kpts=[np.asarray(s["keypoints"])[prompted] for s in supports],
        support_bbox=[s["bbox"] for s in supports],
        support_visible=support_visible[:, prompted],
        task=task,
        kpt_names=[supports[0]["keypoint_names"][i] for i in prompted] if task == "visual+textual" else None,
        identify_then_detect=identify_then_detect,
    )
    return inputs, prompted


def episode_inputs(
    processor: KptLlmProcessor, instances: Dataset, episode: Episode, task: str = "visual", identify_then_detect: bool = True
):
    """(processor inputs, prompted keypoint indices, query row) of one support-query pair."""
    inputs, prompted = _shared_support_inputs(
        processor, instances, episode.support_rows, [episode.query_row], task, identify_then_detect
    )
    return inputs, prompted, instances[episode.query_row]


@torch.no_grad()
def predict_cape_episode(
    model: KptLlmForKeypointComprehension,
    processor: KptLlmProcessor,
    instances: Dataset,
    episode: CapeEpisode,
    identify_then_detect: bool = True,
    task: str = "visual",
) -> list[tuple[np.ndarray, list[str | None]]]:
    """(pixels, names) for every query of one episode, in `episode.pairs()` order.

    The queries share the support, so they go into one processor call and one batched `detect_keypoints`
    call (each query crop keeps its own shared prefix), split only to stay under `MAX_ROWS_PER_CALL`.
    """
    num_prompted = int(np.any([instances[row]["visible"] for row in episode.support_rows], axis=0).sum())
    per_call = max(1, MAX_ROWS_PER_CALL // max(1, num_prompted))
    predictions = []
    for start in range(0, len(episode.query_rows), per_call):
        query_rows = episode.query_rows[start : start + per_call]
        inputs, prompted = _shared_support_inputs(
            processor, instances, episode.support_rows, query_rows, task, identify_then_detect
        )
        outputs = model.detect_keypoints(**inputs.to(model.device))
        for row, (result,) in zip(query_rows, processor.post_process_keypoint_detection(outputs), strict=True):
            num_keypoints = len(instances[row]["visible"])
            points = np.full((num_keypoints, 2), np.nan)
            points[prompted] = result["keypoints"].double().numpy()  # NaN where the model emitted no <keypoint>
            names: list[str | None] = [None] * num_keypoints
            for index, name in zip(prompted, result["names"]):
                names[index] = name
            predictions.append((points, names))
    return predictions


def support_copy_prediction(instances: Dataset, episode: Episode, crop_padding: float) -> np.ndarray:
    query = instances[episode.query_row]
    normalized = []
    for row in episode.support_rows:
        support = instances[row]
        normalized.append(normalize_points(np.asarray(support["keypoints"], float), _crop_box(support, crop_padding)))
    weights = np.array([instances[row]["visible"] for row in episode.support_rows], float)[..., None]
    mean = (np.stack(normalized) * weights).sum(0) / np.maximum(weights.sum(0), 1)
    return denormalize_points(mean, _crop_box(query, crop_padding))


def mean_positions(train_instances: Dataset, crop_padding: float) -> dict[str, np.ndarray]:
    """Mean normalized crop position of every keypoint name over the visible training keypoints."""
    sums: dict[str, list] = defaultdict(lambda: [np.zeros(2), 0])
    for row in tqdm(train_instances, desc="mean keypoint positions", leave=False):
        normalized = normalize_points(np.asarray(row["keypoints"], float), _crop_box(row, crop_padding))
        for name, point, visible in zip(row["keypoint_names"], normalized, row["visible"]):
            if visible:
                sums[name][0] += point
                sums[name][1] += 1
    means = {name: total / count for name, (total, count) in sums.items()}
    means["*"] = np.mean(list(means.values()), axis=0) if means else np.full(2, 0.5)
    return means


def mean_position_prediction(instances: Dataset, episode: Episode, means: dict, crop_padding: float) -> np.ndarray:
    query = instances[episode.query_row]
    normalized = np.stack([means.get(name, means["*"]) for name in query["keypoint_names"]])
    return denormalize_points(normalized, _crop_box(query, crop_padding))


def score_pck(
    instances: Dataset, episodes: Sequence[Episode], predictions: Sequence[np.ndarray], threshold: float = 0.2
) -> dict:
    """Official PCK@threshold over the support-query pairs `episodes` (mean of per-pair accuracies, with
    its 95% bootstrap interval and the labelled extras) with the local `evaluate` metric.

    A keypoint the model did not localize (NaN) counts as wrong, not as absent; how many did is logged.
    """
    preds, refs, norms, visible, categories, pair_ids = [], [], [], [], [], []
    not_localized = 0
    for pair_id, (episode, predicted) in enumerate(zip(episodes, predictions, strict=True)):
        query, scored = _scored(instances, episode)
        not_localized += int((np.isnan(predicted).any(-1) & scored).sum())
        predicted = np.where(np.isnan(predicted), 1e9, predicted)  # never within the threshold
        preds += predicted.tolist()
        refs += query["keypoints"]
        norms += [official_normalizer(query)] * len(scored)
        visible += scored.astype(int).tolist()
        categories += [query["category_id"]] * len(scored)
        pair_ids += [pair_id] * len(scored)
    if not_localized:
        logger.warning(
            "%d of %d scored keypoints have no predicted position (NaN: no <keypoint> written, or a matcher's NaN); "
            "they count as wrong", not_localized, sum(visible),
        )  # fmt: skip
    return _pck_metric().compute(
        predictions=preds, references=refs, normalizers=norms, visible=visible, category_ids=categories,
        pair_ids=pair_ids, threshold=threshold,
    )


def evaluate_baselines(
    instances: Dataset, episodes: Sequence[Episode], train_instances: Dataset, crop_padding: float, threshold: float = 0.2
) -> dict[str, dict]:
    """PCK of support-copy and mean-position on the episodes (normalized in crops of `crop_padding`)."""
    means = mean_positions(train_instances, crop_padding)
    copied = [support_copy_prediction(instances, e, crop_padding) for e in episodes]
    averaged = [mean_position_prediction(instances, e, means, crop_padding) for e in episodes]
    return {
        "support-copy": score_pck(instances, episodes, copied, threshold),
        "mean-position": score_pck(instances, episodes, averaged, threshold),
    }


Prediction = tuple[np.ndarray, list[str | None]]  # (K, 2) pixels (NaN: not localized), names


def evaluate_visual_prompt(
    model: KptLlmForKeypointComprehension,
    processor: KptLlmProcessor,
    instances: Dataset,
    episodes: Sequence[CapeEpisode],
    train_instances: Dataset,
    threshold: float = 0.2,
    identify_then_detect: bool = True,
    task: str = "visual",
    matching_peer=None,
    cosine_probe: bool = False,
) -> tuple[dict[str, dict], list[Episode], list[Prediction]]:
    """Official PCK of the model and of both baselines on the same support-query pairs, the pairs and the
    model's predictions (one per pair, in the order of `[pair for e in episodes for pair in e.pairs()]`).

    With `matching_peer` (a `matching_peer.MatchingPeer`) its PCK is added; with `cosine_probe`, that
    of the plain cosine matcher on the model's own z_p and z_q (what its inputs already hold).

    The predictions are returned so that pictures can be drawn without predicting again.
    """
    from .matching_peer import match_episodes  # the matchers import the stage-0 data pipeline

    model.eval()
    pairs = [pair for episode in episodes for pair in episode.pairs()]
    predictions = [
        prediction
        for episode in tqdm(episodes, desc="KptLLM episodes")
        for prediction in predict_cape_episode(model, processor, instances, episode, identify_then_detect, task)
    ]
    results = {"KptLLM": score_pck(instances, pairs, [points for points, _ in predictions], threshold)}
    if matching_peer is not None:
        results["matching peer"] = score_pck(
            instances, pairs, match_episodes(matching_peer, processor, instances, pairs, "matching peer"), threshold
        )
    if cosine_probe:
        results["cosine probe (KptLLM's z_p, z_q)"] = score_pck(
            instances, pairs, match_episodes(model, processor, instances, pairs, "cosine probe"), threshold
        )
    results.update(evaluate_baselines(instances, pairs, train_instances, processor.crop_padding, threshold))
    return results, pairs, predictions


def bootstrap_interval_of_mean_over_splits(
    per_pair_by_split: Sequence[Sequence[float]], samples: int = 1000, seed: int = 0, level: float = 0.95
) -> list[float]:
    """95% bootstrap interval of the mean over splits of each split's mean pair accuracy: every resample
    draws each split's pairs with replacement (within the split, as the metric does for one split)."""
    rng = np.random.default_rng(seed)
    means = np.zeros(samples)
    for per_pair in per_pair_by_split:
        values = np.asarray(per_pair, dtype=float)
        for b in range(samples):  # one row at a time: 60,000 pairs x 1,000 resamples would not fit at once
            means[b] += values[rng.integers(0, len(values), len(values))].mean()
    means /= len(per_pair_by_split)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return [float(low), float(high)]


def markdown_table(results: dict[str, dict], title: str = "PCK@0.2") -> str:
    """The official PCK with its 95% bootstrap interval per method; the old averaging as a labelled extra."""
    lines = [
        f"| method | {title} (mean over pairs) | 95% CI (bootstrap over pairs) | pairs | valid keypoints "
        "| per-category pooled (extra) |",
        "|---|---|---|---|---|---|",
    ]
    for method, scores in results.items():
        low, high = scores["pck_ci95"]
        lines.append(
            f"| {method} | {100 * scores['pck']:.2f} | [{100 * low:.2f}, {100 * high:.2f}] | {scores['num_pairs']} "
            f"| {scores['num_keypoints']} | {100 * scores['pck_per_category_pooled']:.2f} |"
        )
    return "\n".join(lines)
