"""OKS-based keypoint AP/AR (COCO protocol, pycocotools) as a local `evaluate` metric.

Load it offline with ``evaluate.load("./metrics/oks_ap")`` (Hub metrics need the network).
This file is standalone on purpose (``evaluate`` copies it into its module cache), so the AP-10K
sigmas are repeated here rather than imported from the repo.
"""

from __future__ import annotations

import contextlib
import io
import math

import datasets
import evaluate
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

_CITATION = """\
@inproceedings{lin2014microsoft,
  title={Microsoft COCO: Common Objects in Context},
  author={Lin, Tsung-Yi and Maire, Michael and Belongie, Serge and Hays, James and Perona, Pietro and Ramanan, Deva and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  booktitle={ECCV},
  year={2014}
}
@article{yu2021ap10k,
  title={AP-10K: A Benchmark for Animal Pose Estimation in the Wild},
  author={Yu, Hang and Xu, Yufei and Zhang, Jing and Zhao, Wei and Guan, Ziyu and Tao, Dacheng},
  journal={arXiv preprint arXiv:2108.12617},
  year={2021}
}
"""

_DESCRIPTION = """\
COCO keypoint average precision and recall from object keypoint similarity (OKS), computed by
pycocotools' COCOeval (iouType "keypoints") with per-keypoint sigmas given as an argument (default:
AP-10K's 17). OKS between a prediction and a ground-truth instance is the mean over the ground
truth's labelled keypoints (v > 0) of exp(-d^2 / (2 * area * (2 * sigma)^2)); AP is averaged over
OKS thresholds 0.50:0.05:0.95, over recall, then over categories (COCO's `stats`).

One input row is one image: `references[i]` lists the ground-truth instances of image i and
`predictions[i]` the predicted instances of the same image (either may be empty). Predictions are
matched to ground truth by pycocotools (greedy by score, per image and category), so the order of
instances within a row does not matter. Statistics that pycocotools leaves undefined (-1: no
ground truth in that area range) are returned as None.
"""

_KWARGS_DESCRIPTION = """
Args (one entry per image):
    predictions (`list` of `list` of `dict`): the predicted instances on each image, each with
        category_id (`int`), keypoints (K x [x, y, v] or the flat COCO list of 3K numbers; v is
        not used) and score (`float`, the ranking confidence). A prediction's box and area are
        derived from its keypoints' extent, as pycocotools' `loadRes` does.
    references (`list` of `list` of `dict`): the ground-truth instances on each image, each with
        category_id (`int`), keypoints (K x [x, y, v] or flat; v in {0, 1, 2}, v > 0 = labelled),
        bbox ([x, y, w, h]), area (`float`, optional: default w * h, which is AP-10K's area) and
        iscrowd (0/1, optional: default 0).
    sigmas (`list` of `float`, optional): the K per-keypoint OKS sigmas; default AP-10K's.
Returns:
    AP, AP50, AP75, APM, APL, AR, AR50, AR75, ARM, ARL (`float` or None): COCOeval's stats
        (maxDets 20; M/L = area 32^2..96^2 / > 96^2); None where undefined.
    num_images (`int`), num_instances (`int`, ground truth that counts: not crowd, at least one
        labelled keypoint), num_keypoints (`int`, their labelled keypoints), num_predictions
        (`int`), num_categories (`int`, categories with ground truth).
Raises:
    ValueError: missing or None fields, a keypoint list whose length is not 3 * len(sigmas),
        NaN/inf numbers, visibility outside {0, 1, 2}, bbox not [x, y, w, h] with w, h >= 0,
        area <= 0 for an instance that counts, bad sigmas, or no ground truth that counts.
Examples:
    >>> oks_ap = evaluate.load("./metrics/oks_ap")
    >>> gt = {"category_id": 1, "keypoints": [[10, 10, 2], [30, 30, 2]], "bbox": [0, 0, 40, 40]}
    >>> pred = {"category_id": 1, "keypoints": [[10, 10, 1], [30, 30, 1]], "score": 0.9}
    >>> round(oks_ap.compute(predictions=[[pred]], references=[[gt]], sigmas=[0.05, 0.05])["AP"], 6)
    1.0
"""

AP10K_SIGMAS: tuple[float, ...] = (
    0.025, 0.025, 0.026, 0.035, 0.035,
    0.079, 0.072, 0.062, 0.079, 0.072, 0.062,
    0.107, 0.087, 0.089, 0.107, 0.087, 0.089,
)  # fmt: skip
"""AP-10K's per-keypoint OKS sigmas (copy of processing.coco.AP10K_SIGMAS, in AP-10K keypoint order:
eyes, nose, neck, root of tail, left/right shoulder-elbow-front paw, left/right hip-knee-back paw)."""

STAT_NAMES = ("AP", "AP50", "AP75", "APM", "APL", "AR", "AR50", "AR75", "ARM", "ARL")
"""COCOeval.stats for keypoints, in its order."""

_PREDICTION_FIELDS = {"category_id": True, "keypoints": True, "score": True}  # field -> required
_REFERENCE_FIELDS = {"category_id": True, "keypoints": True, "bbox": True, "area": False, "iscrowd": False}

FEATURES = datasets.Features({
    "predictions": datasets.List({
        "category_id": datasets.Value("int64"),
        "keypoints": datasets.List(datasets.List(datasets.Value("float64"))),  # K x [x, y, v]
        "score": datasets.Value("float64"),
    }),
    "references": datasets.List({
        "category_id": datasets.Value("int64"),
        "keypoints": datasets.List(datasets.List(datasets.Value("float64"))),
        "bbox": datasets.List(datasets.Value("float64")),
        "area": datasets.Value("float64"),
        "iscrowd": datasets.Value("int64"),
    }),
})


def _standard_instances(instances, fields: dict[str, bool], where: str) -> list[dict]:
    """One image's instances with every schema field present (None if optional and absent) and
    keypoints as K x [x, y, v], so that `evaluate`'s encoder sees one layout; unknown or missing
    fields raise here, naming the instance, instead of deep inside `evaluate`/Arrow."""
    if instances is None:
        return []
    if isinstance(instances, dict) or not isinstance(instances, (list, tuple)):
        raise ValueError(f"{where} must be a list of instance dicts (one list per image), got {type(instances).__name__}")
    standard = []
    for j, instance in enumerate(instances):
        here = f"{where}[{j}]"
        if not isinstance(instance, dict):
            raise ValueError(f"{here} must be a dict, got {type(instance).__name__}")
        unknown = sorted(set(instance) - set(fields))
        if unknown:
            raise ValueError(f"{here}: unknown field(s) {unknown}; expected {sorted(fields)}")
        missing = [field for field, required in fields.items() if required and instance.get(field) is None]
        if missing:
            raise ValueError(f"{here}: missing required field(s) {missing}")
        try:
            keypoints = np.asarray(instance["keypoints"], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{here}: field 'keypoints' must be K x [x, y, v] or a flat list of 3K numbers") from None
        if keypoints.ndim == 1 and len(keypoints) % 3 == 0:
            keypoints = keypoints.reshape(-1, 3)
        if keypoints.ndim != 2 or keypoints.shape[1] != 3:
            raise ValueError(
                f"{here}: field 'keypoints' has shape {keypoints.shape}; expected K x [x, y, v] or 3K numbers"
            )
        standard.append({**{field: instance.get(field) for field in fields}, "keypoints": keypoints.tolist()})
    return standard


def _standard_rows(rows, fields: dict[str, bool], name: str):
    if rows is None:
        return None
    return [_standard_instances(instances, fields, f"{name}[{i}]") for i, instances in enumerate(rows)]


def _finite(values, where: str, field: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{where}: field '{field}' contains NaN or inf")
    return array


def _flat_keypoints(instance: dict, where: str, num_keypoints: int) -> list[float]:
    """K x [x, y, v] or 3K numbers -> the flat COCO list, checked."""
    try:
        array = np.asarray(instance["keypoints"], dtype=np.float64)
    except (TypeError, ValueError):  # ragged K x 3 lists, non-numbers
        raise ValueError(f"{where}: field 'keypoints' must be K x [x, y, v] or a flat list of 3K numbers") from None
    if array.shape not in ((num_keypoints, 3), (3 * num_keypoints,)):
        raise ValueError(
            f"{where}: field 'keypoints' has shape {array.shape}, expected {num_keypoints} x 3 or "
            f"{3 * num_keypoints} numbers (one (x, y, v) per sigma)"
        )
    return _finite(array, where, "keypoints").reshape(-1).tolist()


def _check_fields(instance: dict, fields: dict[str, bool], where: str) -> None:
    missing = [field for field, required in fields.items() if required and instance.get(field) is None]
    if missing:
        raise ValueError(f"{where}: missing required field(s) {missing}")


def _reference_annotation(instance: dict, where: str, num_keypoints: int, image_id: int, ann_id: int) -> dict:
    _check_fields(instance, _REFERENCE_FIELDS, where)
    keypoints = _flat_keypoints(instance, where, num_keypoints)
    visibility = keypoints[2::3]
    if any(v not in (0.0, 1.0, 2.0) for v in visibility):
        raise ValueError(f"{where}: keypoint visibility must be 0, 1 or 2, got {sorted(set(visibility))}")
    bbox = instance["bbox"]
    if len(bbox) != 4:
        raise ValueError(f"{where}: field 'bbox' must be [x, y, w, h], got {bbox}")
    bbox = _finite(bbox, where, "bbox").tolist()
    if bbox[2] < 0 or bbox[3] < 0:
        raise ValueError(f"{where}: field 'bbox' has a negative width or height: {bbox}")
    area = instance.get("area")
    area = bbox[2] * bbox[3] if area is None else float(area)
    iscrowd = int(instance.get("iscrowd") or 0)
    if iscrowd not in (0, 1):
        raise ValueError(f"{where}: field 'iscrowd' must be 0 or 1, got {iscrowd}")
    num_labelled = sum(v > 0 for v in visibility)
    # OKS divides by the area: a zero area would make every imperfect prediction score 0.
    if not math.isfinite(area) or (num_labelled and not iscrowd and area <= 0):
        raise ValueError(f"{where}: field 'area' must be a finite number > 0, got {area}")
    return {
        "id": ann_id, "image_id": image_id, "category_id": int(instance["category_id"]),
        "keypoints": keypoints, "num_keypoints": num_labelled, "bbox": bbox, "area": area, "iscrowd": iscrowd,
    }


def _prediction_result(instance: dict, where: str, num_keypoints: int, image_id: int) -> dict:
    _check_fields(instance, _PREDICTION_FIELDS, where)
    score = float(_finite(instance["score"], where, "score"))
    # No "bbox" key: loadRes would then treat these as box results and take the area from it.
    return {"image_id": image_id, "category_id": int(instance["category_id"]),
            "keypoints": _flat_keypoints(instance, where, num_keypoints), "score": score}


def compute_oks_ap(predictions, references, sigmas=AP10K_SIGMAS) -> dict:
    """The metric as a plain function: per-image lists of instance dicts in, Python numbers out."""
    sigma_array = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    if len(sigma_array) == 0 or not np.isfinite(sigma_array).all() or (sigma_array <= 0).any():
        raise ValueError(f"sigmas must be a non-empty list of finite numbers > 0, got {list(sigmas)}")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references need one entry per image, got {len(predictions)} and {len(references)}"
        )
    num_keypoints = len(sigma_array)
    images, annotations, results = [], [], []
    for row, (predicted, truth) in enumerate(zip(predictions, references)):
        image_id = row + 1  # one row = one image
        images.append({"id": image_id})
        for j, instance in enumerate(truth or []):
            where = f"references[{row}][{j}]"
            annotations.append(_reference_annotation(instance, where, num_keypoints, image_id, len(annotations) + 1))
        for j, instance in enumerate(predicted or []):
            results.append(_prediction_result(instance, f"predictions[{row}][{j}]", num_keypoints, image_id))
    counted = [a for a in annotations if a["num_keypoints"] > 0 and not a["iscrowd"]]
    if not counted:
        raise ValueError("no ground-truth instance to score (none that is not crowd and has a labelled keypoint)")

    category_ids = sorted({a["category_id"] for a in annotations})
    # pycocotools prints progress; keep the caller's stdout clean.
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO()
        ground_truth.dataset = {"images": images, "annotations": annotations,
                                "categories": [{"id": c} for c in category_ids]}
        ground_truth.createIndex()
        if results:
            detections = ground_truth.loadRes(results)
        else:  # loadRes cannot take an empty list (it looks at results[0]); no detection = AP 0
            detections = COCO()
            detections.dataset = {"images": images, "annotations": [],
                                  "categories": [{"id": c} for c in category_ids]}
            detections.createIndex()
        evaluation = COCOeval(ground_truth, detections, iouType="keypoints")
        evaluation.params.kpt_oks_sigmas = sigma_array
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    scores: dict = {name: (None if value < 0 else float(value)) for name, value in zip(STAT_NAMES, evaluation.stats)}
    scores.update(
        num_images=len(images),
        num_instances=len(counted),
        num_keypoints=int(sum(a["num_keypoints"] for a in counted)),
        num_predictions=len(results),
        num_categories=len({a["category_id"] for a in counted}),
    )
    return scores


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class OksAp(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # Two accepted keypoint layouts, tried in this order: K x [x, y, v] and COCO's flat list.
            features=FEATURES,
            reference_urls=["https://github.com/cocodataset/cocoapi", "https://github.com/AlexTheBad/AP-10K"],
        )

    # Inputs are standardised before `evaluate` encodes them: flat keypoint lists become K x 3 and
    # absent optional fields None (its encoder needs every schema key, and reports a missing one as
    # a bare KeyError).
    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of images (per image: the list of predicted / ground-truth instances)."""
        super().add_batch(
            predictions=_standard_rows(predictions, _PREDICTION_FIELDS, "predictions"),
            references=_standard_rows(references, _REFERENCE_FIELDS, "references"),
            **kwargs,
        )

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one image: its list of predicted instances and its list of ground-truth instances."""
        super().add(
            prediction=None if prediction is None else _standard_instances(prediction, _PREDICTION_FIELDS, "prediction"),
            reference=None if reference is None else _standard_instances(reference, _REFERENCE_FIELDS, "reference"),
            **kwargs,
        )

    def _compute(self, predictions, references, sigmas=AP10K_SIGMAS) -> dict:
        return compute_oks_ap(predictions, references, sigmas)
