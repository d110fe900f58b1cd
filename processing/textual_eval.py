"""Textual-prompt keypoint detection (AP-10K, OKS AP: paper Table 4) and keypoint semantic
understanding (naming accuracy: paper Table 1), each scored next to baselines measured in the same run.

Textual prompt (top-down, as CLAMP and the paper: the query is cropped around its ground-truth box):
the model gets the query crop and the K keypoint names, one sequence per name, all K in one batched
`detect_keypoints` call; predictions are mapped back to pixels and scored with the local OKS AP
metric (`metrics/oks_ap`, pycocotools with AP-10K's sigmas).

Confidences: pycocotools ranks every prediction of the test set by its instance score before it
builds the precision-recall curve, so OKS AP rewards a model whose confident instances are the
well-localized ones (with one constant score the ranking is the file order, and AP measures that
order's luck, not the model). Each keypoint's score is the model's `keypoint_scores` (p(`<keypoint>`)
times the geometric mean of the probabilities of the answer tokens that name it; 0 where no
`<keypoint>` was emitted); it is the third value of each keypoint in the COCO results. The instance
score is mmpose's for top-down predictions (`CocoMetric(score_mode="bbox_keypoint")`, the rule of
CLAMP's `TopDownAp10KDataset` with `vis_thr=0.2`) with the ground-truth box's score 1: the mean of the
keypoint scores above 0.2, 0 when none is (:func:`instance_score`). The mean-position baseline has no
confidence: every one of its predictions scores 1.0, as does the `KptLLM (constant score)` row, the
model's own predictions ranked in file order, printed to show what the ranking contributes.

Baseline: mean-position (each name at its mean normalized crop position over the training
instances, placed in the query crop; the overall mean for a name never seen in training).

A keypoint the model does not localize (no `<keypoint>` emitted) is scored as the worst guess inside
the instance: it is put at the corner of the ground-truth box farthest from the ground-truth keypoint
(visibility 0 in the prediction). Its OKS term is then at most exp(-1 / (16 sigma^2)) (< 0.5 % for
AP-10K's sigmas), and the prediction's keypoint extent, from which pycocotools derives the area it
uses for area ranges, stays inside the box. Dropping such keypoints would score only the localized
ones; putting them "at infinity" would push the prediction's area past pycocotools' area ranges,
where an unmatched prediction is ignored instead of counted as a false positive. Both would
inflate AP.

Semantic understanding: the model gets the query crop and one labelled keypoint's position
(`task="semantic"`, all labelled keypoints of an instance in one batched call) and writes a name;
accuracy is exact match after :func:`normalize_name`. Baselines: the most frequent training name,
and the training name whose mean normalized position is nearest to the point (among the query
category's names when that category occurs in training, else among all training names). Labelled
keypoints that cannot be prompted (outside the image or the query crop) are left out of every
method's score and counted as `num_excluded`.

CLAMP's cross-species protocols (train on one AP-10K family, test on another) are read with
:func:`load_clamp_protocol`, which uses :data:`processing.coco.CLAMP_PROTOCOLS` and
:func:`processing.coco.load_ap10k`.
"""

from __future__ import annotations

import functools
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import evaluate
import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm

from modeling_kptllm import KptLlmForKeypointComprehension, KptLlmProcessor
from modeling_kptllm.processing_kptllm import Box, denormalize_points, normalize_points, square_crop_box

from .coco import AP10K_SIGMAS, CLAMP_PROTOCOLS, load_ap10k, load_image
from .evaluation import mean_positions

OKS_AP_METRIC_PATH = str(Path(__file__).resolve().parents[1] / "metrics" / "oks_ap")
CONSTANT_SCORE = 1.0
"""Instance and keypoint score of predictions that carry no confidence (the mean-position baseline)."""
KEYPOINT_SCORE_THRESHOLD = 0.2
"""Keypoints scored at or below this are left out of the instance score (mmpose's `keypoint_score_thr`,
mmpose 0.x's `vis_thr`, the value of CLAMP's AP-10K configs)."""
CONSTANT_SCORE_ROW = "KptLLM (constant score)"
"""The row of :func:`evaluate_textual_prompt` that scores the model's predictions with every score 1.0."""


@functools.cache
def _oks_metric() -> evaluate.EvaluationModule:
    """The local OKS AP metric, loaded once: each load copies and imports the metric script again."""
    return evaluate.load(OKS_AP_METRIC_PATH)


# -- data ------------------------------------------------------------------------------------


def load_clamp_protocol(
    data_dir: str | Path,
    protocol: str,
    train_file: str = "annotations/ap10k_train.json",
    test_file: str = "annotations/ap10k_test.json",
    image_dir: str = "images",
) -> tuple[Dataset, Dataset]:
    """(train, test) instances of one of CLAMP's cross-species protocols on an AP-10K-layout benchmark.

    Training instances are those of the protocol's training family in `train_file`, test instances
    those of its test family in `test_file` (paths relative to `data_dir`; the embedded benchmark's
    defaults; for the real AP-10K pass e.g. `annotations/ap10k-train-split1.json` and `data`).
    """
    if protocol not in CLAMP_PROTOCOLS:
        raise ValueError(f"unknown CLAMP protocol {protocol!r}; expected one of {sorted(CLAMP_PROTOCOLS)}")
    train_family, test_family = CLAMP_PROTOCOLS[protocol]
    root = Path(data_dir)
    train = load_ap10k(root / train_file, root / image_dir, families=[train_family])
    test = load_ap10k(root / test_file, root / image_dir, families=[test_family])
    return train, test


def _first(instances: Dataset, limit: int | None) -> Dataset:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or an integer >= 1, got {limit!r}")
    if len(instances) == 0:
        raise ValueError("no instance to evaluate (the instances dataset is empty)")
    return instances if limit is None else instances.select(range(min(limit, len(instances))))


def _describe(row: dict) -> str:
    return f"instance {row.get('annotation_id', '?')} (image {row.get('image_id', '?')})"


def _crop_box(row: dict, crop_padding: float) -> Box:
    return square_crop_box(row["bbox"], (row["width"], row["height"]), crop_padding, f"{_describe(row)} bbox")


# -- textual-prompt keypoint detection --------------------------------------------------------


@torch.no_grad()
def predict_textual(
    model: KptLlmForKeypointComprehension,
    processor: KptLlmProcessor,
    row: dict,
    identify_then_detect: bool = True,
) -> tuple[np.ndarray, list[str | None], np.ndarray]:
    """All K keypoint names of one instance in one batched call -> (K, 2) pixels (NaN: not localized), the
    names the model wrote, and (K,) keypoint scores (the model's `keypoint_scores`, 0 where not localized)."""
    inputs = processor(
        query=load_image(row["image_path"]),
        query_bbox=row["bbox"],
        kpt_names=row["keypoint_names"],
        task="textual",
        identify_then_detect=identify_then_detect,
    ).to(model.device)
    outputs = model.detect_keypoints(**inputs)
    (result,), = processor.post_process_keypoint_detection(outputs)  # one image, one box
    return result["keypoints"].double().numpy(), result["names"], result["scores"].double().numpy()


def mean_position_predictions(instances: Dataset, train_instances: Dataset, crop_padding: float) -> list[np.ndarray]:
    """The mean-position baseline: each keypoint name at its mean training position in the query crop."""
    means = mean_positions(train_instances, crop_padding)
    predictions = []
    for row in instances:
        normalized = np.stack([means.get(name, means["*"]) for name in row["keypoint_names"]])  # (K, 2)
        predictions.append(denormalize_points(normalized, _crop_box(row, crop_padding)))
    return predictions


def _farthest_box_corners(points: np.ndarray, bbox: Sequence[float]) -> np.ndarray:
    """For each (x, y), the corner of the [x, y, w, h] box farthest from it: the worst guess in the box."""
    x0, y0, w, h = bbox
    x = np.where(points[:, 0] < x0 + w / 2, x0 + w, x0)
    y = np.where(points[:, 1] < y0 + h / 2, y0 + h, y0)
    return np.stack([x, y], axis=1)


def instance_score(keypoint_scores: np.ndarray) -> float:
    """mmpose's top-down instance score with a ground-truth box (box score 1): the mean of the keypoint
    scores above :data:`KEYPOINT_SCORE_THRESHOLD`, 0 when none is."""
    confident = keypoint_scores[keypoint_scores > KEYPOINT_SCORE_THRESHOLD]
    return float(confident.mean()) if len(confident) else 0.0


def score_oks(
    instances: Dataset | Sequence[dict],
    predictions: Sequence[np.ndarray],
    sigmas: Sequence[float] = AP10K_SIGMAS,
    keypoint_scores: Sequence[np.ndarray] | None = None,
) -> dict:
    """OKS AP/AR of per-instance predictions ((K, 2) pixels, NaN = not localized) with the local metric.

    `keypoint_scores`: per instance the (K,) confidences of its keypoints, in [0, 1]; each prediction is
    ranked by :func:`instance_score` of them. None: every prediction and localized keypoint scores
    :data:`CONSTANT_SCORE` (predictions without a confidence), so pycocotools ranks them in file order.

    Ground truth: each row's visible keypoints (v = 1), its bbox, and its area (the row's `area`
    column if it has one, else bbox w * h, which is what AP-10K's annotation files hold). Rows that
    share an `image_id` are one image, so pycocotools matches predictions to instances per image.
    Returns the metric's dict (see `metrics/oks_ap`) plus `num_unlocalized`, the keypoints predicted
    as NaN (scored as the farthest box corner, see the module docstring).
    """
    if len(predictions) != len(instances):
        raise ValueError(f"score_oks needs one prediction per instance: {len(predictions)} for {len(instances)}")
    if keypoint_scores is not None and len(keypoint_scores) != len(predictions):
        raise ValueError(f"score_oks needs keypoint scores per prediction: {len(keypoint_scores)} for {len(predictions)}")
    num_keypoints = len(sigmas)
    references: dict[int, list[dict]] = defaultdict(list)
    predicted: dict[int, list[dict]] = defaultdict(list)
    unlocalized = 0
    for index, (row, points) in enumerate(zip(instances, predictions)):
        truth = np.asarray(row["keypoints"], dtype=np.float64)  # (K, 2)
        visible = np.asarray(row["visible"], dtype=np.int64)  # (K,)
        if truth.shape != (num_keypoints, 2) or visible.shape != (num_keypoints,):
            raise ValueError(
                f"{_describe(row)} has {len(truth)} keypoints, but {num_keypoints} sigmas were given "
                "(the OKS sigmas are per keypoint: AP-10K's 17 by default)"
            )
        points = np.array(points, dtype=np.float64)
        if points.shape != (num_keypoints, 2):
            raise ValueError(f"predictions[{index}] has shape {points.shape}, expected ({num_keypoints}, 2)")
        if np.isinf(points).any():
            raise ValueError(f"predictions[{index}] contains inf (use NaN for a keypoint that was not localized)")
        missing = np.isnan(points).any(axis=1)
        unlocalized += int(missing.sum())
        if keypoint_scores is None:
            confidences, score = np.where(missing, 0.0, CONSTANT_SCORE), CONSTANT_SCORE
        else:
            confidences = np.asarray(keypoint_scores[index], dtype=np.float64)
            if confidences.shape != (num_keypoints,) or not ((confidences >= 0) & (confidences <= 1)).all():
                raise ValueError(f"keypoint_scores[{index}] must be {num_keypoints} numbers in [0, 1], got {confidences}")
            score = instance_score(confidences)
        points[missing] = _farthest_box_corners(truth[missing], row["bbox"])
        area = row["area"] if row.get("area") is not None else row["bbox"][2] * row["bbox"][3]
        image = int(row["image_id"])
        references[image].append({
            "category_id": int(row["category_id"]),
            "keypoints": np.column_stack([truth, visible]).tolist(),  # (K, 3)
            "bbox": list(row["bbox"]),
            "area": float(area),
        })
        predicted[image].append({
            "category_id": int(row["category_id"]),
            "keypoints": np.column_stack([points, confidences]).tolist(),  # (K, 3): x, y, keypoint score
            "score": score,  # pycocotools ranks the predictions of all images by it
        })
    images = list(references)
    scores = _oks_metric().compute(
        predictions=[predicted[i] for i in images], references=[references[i] for i in images], sigmas=list(sigmas)
    )
    scores["num_unlocalized"] = unlocalized
    return scores


def evaluate_textual_prompt(
    model: KptLlmForKeypointComprehension,
    processor: KptLlmProcessor,
    instances: Dataset,
    train_instances: Dataset,
    sigmas: Sequence[float] = AP10K_SIGMAS,
    limit: int | None = None,
    identify_then_detect: bool = True,
) -> dict[str, dict]:
    """OKS AP of the model and of the mean-position baseline on the same (first `limit`) instances.

    Returns {"KptLLM": scores, :data:`CONSTANT_SCORE_ROW`: scores, "mean-position": scores}; scores as
    :func:`score_oks` (KptLLM ranked by its confidences, the constant-score row by file order), and for
    the model also `name_match`: the share of keypoints whose generated name (the identify step) is the
    prompted name after :func:`normalize_name` (None without identify-then-detect), and
    `mean_instance_score`.
    """
    instances = _first(instances, limit)
    results = {}
    model.eval()
    predicted, confidences, names_match = [], [], []
    for row in tqdm(instances, desc="KptLLM textual prompts"):
        points, names, scores = predict_textual(model, processor, row, identify_then_detect)
        predicted.append(points)
        confidences.append(scores)
        names_match += [normalize_name(n) == normalize_name(p) for n, p in zip(names, row["keypoint_names"])]
    results["KptLLM"] = score_oks(instances, predicted, sigmas, keypoint_scores=confidences)
    results["KptLLM"]["name_match"] = float(np.mean(names_match)) if identify_then_detect else None
    results["KptLLM"]["mean_instance_score"] = float(np.mean([instance_score(s) for s in confidences]))
    results[CONSTANT_SCORE_ROW] = score_oks(instances, predicted, sigmas)
    baseline = mean_position_predictions(instances, train_instances, processor.crop_padding)
    results["mean-position"] = score_oks(instances, baseline, sigmas)
    return results


# -- keypoint semantic understanding ----------------------------------------------------------


def normalize_name(name: str | None) -> str | None:
    """Case-, punctuation- and spacing-insensitive form of a keypoint name ("Left_Eye." -> "left eye").

    Words are kept, so left/right and every other word stay significant.
    """
    if name is None:
        return None
    return re.sub(r"[\W_]+", " ", name.casefold()).strip()


def score_names(references: Sequence[str], predictions: Sequence[str | None]) -> dict:
    """Naming accuracy: exact match after :func:`normalize_name`; a missing name (None) is wrong."""
    if len(references) != len(predictions):
        raise ValueError(f"score_names needs one prediction per reference: {len(predictions)} for {len(references)}")
    if len(references) == 0:
        raise ValueError("no keypoint to score (empty references)")
    for index, name in enumerate(references):
        if not isinstance(name, str) or not normalize_name(name):
            raise ValueError(f"references[{index}] must be a non-empty keypoint name, got {name!r}")
    correct = sum(normalize_name(p) == normalize_name(r) for r, p in zip(references, predictions))
    return {
        "accuracy": correct / len(references),
        "num_correct": int(correct),
        "num_keypoints": len(references),
        "num_unnamed": sum(p is None for p in predictions),
    }


def promptable_keypoints(row: dict, crop_padding: float) -> tuple[np.ndarray, int]:
    """Indices of the labelled keypoints that can be prompted (inside the image and the query crop),
    and how many labelled keypoints could not."""
    points = np.asarray(row["keypoints"], dtype=np.float64)  # (K, 2)
    visible = np.asarray(row["visible"], dtype=bool)
    normalized = normalize_points(points, _crop_box(row, crop_padding))
    inside_image = (points >= 0).all(1) & (points[:, 0] <= row["width"]) & (points[:, 1] <= row["height"])
    inside_crop = ((normalized >= 0) & (normalized <= 1)).all(1)
    usable = visible & inside_image & inside_crop
    return np.flatnonzero(usable), int(visible.sum() - usable.sum())


@torch.no_grad()
def predict_names(
    model: KptLlmForKeypointComprehension,
    processor: KptLlmProcessor,
    row: dict,
    keypoint_indices: Sequence[int],
) -> list[str | None]:
    """The model's name for each given keypoint of one instance (one batched call); None if unparsable."""
    points = np.asarray(row["keypoints"], dtype=np.float64)[list(keypoint_indices)]
    inputs = processor(
        query=load_image(row["image_path"]), query_bbox=row["bbox"], kpts=points, task="semantic"
    ).to(model.device)
    outputs = model.detect_keypoints(**inputs)
    return processor.decode_names(outputs.sequences)


def most_frequent_name(train_instances: Dataset) -> str:
    """The most frequent labelled keypoint name in training (ties: alphabetically first)."""
    counts = Counter(
        name for row in train_instances for name, visible in zip(row["keypoint_names"], row["visible"]) if visible
    )
    if not counts:
        raise ValueError("train_instances has no labelled keypoint: the naming baselines need training names")
    return min(counts, key=lambda name: (-counts[name], name))


def nearest_mean_names(
    row: dict,
    keypoint_indices: Sequence[int],
    means: dict[str, np.ndarray],
    names_by_category: dict[int, list[str]],
    crop_padding: float,
) -> list[str]:
    """For each keypoint, the training name whose mean normalized position is nearest (ties: alphabetical).

    Candidates are the names of the query's category when that category occurs in training
    (`names_by_category`), else every training name.
    """
    candidates = names_by_category.get(row["category_id"]) or sorted(name for name in means if name != "*")
    centres = np.stack([means[name] for name in candidates])  # (C, 2)
    points = normalize_points(np.asarray(row["keypoints"], dtype=np.float64), _crop_box(row, crop_padding))
    distances = np.linalg.norm(points[list(keypoint_indices), None] - centres[None], axis=-1)  # (N, C)
    return [candidates[i] for i in distances.argmin(axis=1)]  # argmin takes the first of equal distances


def _training_names_by_category(train_instances: Dataset, means: dict[str, np.ndarray]) -> dict[int, list[str]]:
    names: dict[int, set[str]] = defaultdict(set)
    for category, keypoint_names in zip(train_instances["category_id"], train_instances["keypoint_names"]):
        names[category] |= {name for name in keypoint_names if name in means}
    return {category: sorted(found) for category, found in names.items() if found}


def evaluate_semantic(
    model: KptLlmForKeypointComprehension,
    processor: KptLlmProcessor,
    instances: Dataset,
    train_instances: Dataset,
    limit: int | None = None,
) -> dict[str, dict]:
    """Naming accuracy of the model and of both baselines on the labelled keypoints of the first `limit` instances.

    Returns {"KptLLM", "most-frequent", "nearest-mean-position"} -> :func:`score_names`'s dict plus
    `num_instances` and `num_excluded` (labelled keypoints that could not be prompted, left out of all).
    """
    instances = _first(instances, limit)
    crop_padding = processor.crop_padding
    frequent = most_frequent_name(train_instances)
    means = mean_positions(train_instances, crop_padding)
    names_by_category = _training_names_by_category(train_instances, means)
    model.eval()
    truth: list[str] = []
    guesses: dict[str, list[str | None]] = {"KptLLM": [], "most-frequent": [], "nearest-mean-position": []}
    excluded = 0
    for row in tqdm(instances, desc="KptLLM keypoint naming"):
        indices, left_out = promptable_keypoints(row, crop_padding)
        excluded += left_out
        if len(indices) == 0:
            continue
        truth += [row["keypoint_names"][i] for i in indices]
        guesses["KptLLM"] += predict_names(model, processor, row, indices)
        guesses["most-frequent"] += [frequent] * len(indices)
        guesses["nearest-mean-position"] += nearest_mean_names(row, indices, means, names_by_category, crop_padding)
    if not truth:
        raise ValueError(f"none of the {len(instances)} instances has a labelled keypoint that can be prompted")
    return {
        method: {**score_names(truth, names), "num_instances": len(instances), "num_excluded": excluded}
        for method, names in guesses.items()
    }


# -- tables -----------------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def oks_markdown_table(results: dict[str, dict], title: str = "AP-10K, OKS") -> str:
    """Table 4's columns (AP, AP50, AP75, APM, APL, AR) in %; "–" where undefined (no instance of that size)."""
    columns = ("AP", "AP50", "AP75", "APM", "APL", "AR")
    lines = [f"| method ({title}) | {' | '.join(columns)} | instances | keypoints |", "|---" * (len(columns) + 3) + "|"]
    for method, scores in results.items():
        cells = " | ".join(_percent(scores[c]) for c in columns)
        lines.append(f"| {method} | {cells} | {scores['num_instances']} | {scores['num_keypoints']} |")
    return "\n".join(lines)


def naming_markdown_table(results: dict[str, dict], title: str = "naming accuracy") -> str:
    lines = [f"| method | {title} | keypoints | instances |", "|---|---|---|---|"]
    for method, scores in results.items():
        lines.append(f"| {method} | {_percent(scores['accuracy'])} | {scores['num_keypoints']} | {scores['num_instances']} |")
    return "\n".join(lines)
