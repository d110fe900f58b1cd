"""Visual-prompt evaluation on episodes: the model, matchers and two baselines, scored with PCK@0.2.

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
from .episodes import Episode, instances_fingerprint

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
    """The query row and the keypoints that count: visible in the query and in some support shot."""
    query = instances[episode.query_row]
    in_support = np.zeros(len(query["visible"]), dtype=bool)
    for row in episode.support_rows:
        in_support |= np.asarray(instances[row]["visible"], dtype=bool)
    return query, np.asarray(query["visible"], dtype=bool) & in_support


def episode_inputs(
    processor: KptLlmProcessor, instances: Dataset, episode: Episode, task: str = "visual", identify_then_detect: bool = True
):
    """(processor inputs, prompted keypoint indices, query row) of one episode: every keypoint that some
    support shot shows is prompted, all in one processor call.

    `task="visual+textual"` also gives each keypoint's name (Table 7): the support and the query are of
    one category, so they share the names.
    """
    if task not in ("visual", "visual+textual"):
        raise ValueError(f"task must be 'visual' or 'visual+textual' for episodes, got {task!r}")
    query = instances[episode.query_row]
    supports = [instances[row] for row in episode.support_rows]
    support_visible = np.array([s["visible"] for s in supports], dtype=bool)
    prompted = np.flatnonzero(support_visible.any(0))  # keypoints some shot can show
    inputs = processor(
        query=load_image(query["image_path"]),
        query_bbox=query["bbox"],
        support=[load_image(s["image_path"]) for s in supports],
        kpts=[np.asarray(s["keypoints"])[prompted] for s in supports],
        support_bbox=[s["bbox"] for s in supports],
        support_visible=support_visible[:, prompted],
        task=task,
        kpt_names=[supports[0]["keypoint_names"][i] for i in prompted] if task == "visual+textual" else None,
        identify_then_detect=identify_then_detect,
    )
    return inputs, prompted, query


@torch.no_grad()
def predict_episode(
    model: KptLlmForKeypointComprehension,
    processor: KptLlmProcessor,
    instances: Dataset,
    episode: Episode,
    identify_then_detect: bool = True,
    task: str = "visual",
) -> tuple[np.ndarray, list[str | None]]:
    """All keypoints of one query instance in one batched `detect_keypoints` call -> pixels, names."""
    inputs, prompted, query = episode_inputs(processor, instances, episode, task, identify_then_detect)
    inputs = inputs.to(model.device)
    outputs = model.detect_keypoints(**inputs)
    (result,), = processor.post_process_keypoint_detection(outputs)  # one image, one box
    points = np.full((len(query["visible"]), 2), np.nan)
    points[prompted] = result["keypoints"].double().numpy()  # NaN where the model emitted no <keypoint>
    names: list[str | None] = [None] * len(query["visible"])
    for index, name in zip(prompted, result["names"]):
        names[index] = name
    return points, names


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
    """PCK@threshold (per category, then averaged) with the local `evaluate` metric.

    A keypoint the model did not localize (NaN) counts as wrong, not as absent; how many did is logged.
    """
    preds, refs, norms, visible, categories = [], [], [], [], []
    not_localized = 0
    for episode, predicted in zip(episodes, predictions):
        query, scored = _scored(instances, episode)
        not_localized += int((np.isnan(predicted).any(-1) & scored).sum())
        predicted = np.where(np.isnan(predicted), 1e9, predicted)  # never within the threshold
        preds += predicted.tolist()
        refs += query["keypoints"]
        norms += [max(query["bbox"][2], query["bbox"][3])] * len(scored)
        visible += scored.astype(int).tolist()
        categories += [query["category_id"]] * len(scored)
    if not_localized:
        logger.warning(
            "%d of %d scored keypoints have no predicted position (NaN: no <keypoint> written, or a matcher's NaN); "
            "they count as wrong", not_localized, sum(visible),
        )  # fmt: skip
    return _pck_metric().compute(
        predictions=preds, references=refs, normalizers=norms, visible=visible, category_ids=categories,
        threshold=threshold,
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
    episodes: Sequence[Episode],
    train_instances: Dataset,
    threshold: float = 0.2,
    identify_then_detect: bool = True,
    task: str = "visual",
    matching_peer=None,
    cosine_probe: bool = False,
) -> tuple[dict[str, dict], list[Prediction]]:
    """PCK of the model and of both baselines on the same episodes, and the model's predictions.

    With `matching_peer` (a `matching_peer.MatchingPeer`) its PCK is added; with `cosine_probe`, that
    of the plain cosine matcher on the model's own z_p and z_q (what its inputs already hold).

    The predictions are returned so that pictures can be drawn without predicting again.
    """
    from .matching_peer import match_episodes  # the matchers import the stage-0 data pipeline

    model.eval()
    predictions = [
        predict_episode(model, processor, instances, e, identify_then_detect, task)
        for e in tqdm(episodes, desc="KptLLM episodes")
    ]
    results = {"KptLLM": score_pck(instances, episodes, [points for points, _ in predictions], threshold)}
    if matching_peer is not None:
        results["matching peer"] = score_pck(
            instances, episodes, match_episodes(matching_peer, processor, instances, episodes, "matching peer"), threshold
        )
    if cosine_probe:
        results["cosine probe (KptLLM's z_p, z_q)"] = score_pck(
            instances, episodes, match_episodes(model, processor, instances, episodes, "cosine probe"), threshold
        )
    results.update(evaluate_baselines(instances, episodes, train_instances, processor.crop_padding, threshold))
    return results, predictions


def markdown_table(results: dict[str, dict], title: str = "PCK@0.2") -> str:
    lines = [f"| method | {title} | keypoints | categories |", "|---|---|---|---|"]
    for method, scores in results.items():
        lines.append(f"| {method} | {100 * scores['pck']:.2f} | {scores['num_keypoints']} | {scores['num_categories']} |")
    return "\n".join(lines)
