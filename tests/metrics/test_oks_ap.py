"""The local OKS AP metric against pycocotools called directly, on synthetic COCO-keypoint cases."""

import contextlib
import io
from pathlib import Path

import evaluate
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from processing.coco import AP10K_SIGMAS

METRIC_DIR = Path(__file__).resolve().parents[2] / "metrics" / "oks_ap"
STATS = ("AP", "AP50", "AP75", "APM", "APL", "AR", "AR50", "AR75", "ARM", "ARL")
K = len(AP10K_SIGMAS)


@pytest.fixture(scope="module")
def oks_ap():
    return evaluate.load(str(METRIC_DIR))


def cocoeval_stats(predictions, references, sigmas=AP10K_SIGMAS) -> dict:
    """The same per-image inputs, scored the documented pycocotools way: COCO + loadRes + COCOeval."""
    images, annotations, results = [], [], []
    for image_id, (predicted, truth) in enumerate(zip(predictions, references), start=1):
        images.append({"id": image_id})
        for instance in truth:
            flat = np.asarray(instance["keypoints"], float).reshape(-1)
            bbox = instance["bbox"]
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": instance["category_id"],
                "keypoints": flat.tolist(), "num_keypoints": int((flat[2::3] > 0).sum()), "bbox": bbox,
                "area": instance.get("area", bbox[2] * bbox[3]), "iscrowd": 0,
            })
        for instance in predicted:
            results.append({"image_id": image_id, "category_id": instance["category_id"], "score": instance["score"],
                            "keypoints": np.asarray(instance["keypoints"], float).reshape(-1).tolist()})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": c} for c in sorted({a["category_id"] for a in annotations})]}
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(results), iouType="keypoints")
        evaluation.params.kpt_oks_sigmas = np.asarray(sigmas)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: None if value == -1 else float(value) for name, value in zip(STATS, evaluation.stats)}


def synthetic_case(seed: int, num_images: int = 12, categories=(1,), jitter: float = 0.0):
    """Images with 1-3 instances of medium and large size; predictions = ground truth + Gaussian jitter
    (in units of sqrt(area)), random scores. Some ground-truth keypoints are unlabelled (v = 0)."""
    rng = np.random.default_rng(seed)
    predictions, references = [], []
    for _ in range(num_images):
        truth, predicted = [], []
        for _ in range(rng.integers(1, 4)):
            side = rng.uniform(40, 150, size=2)  # area from 1600 (medium) to 22500 (large)
            x0, y0 = rng.uniform(0, 300, size=2)
            xy = np.column_stack([x0 + rng.uniform(0, side[0], K), y0 + rng.uniform(0, side[1], K)])
            v = np.where(rng.random(K) < 0.15, 0, 2)
            v[0] = 2  # at least one labelled keypoint
            xy[v == 0] = 0.0
            category = int(rng.choice(categories))
            truth.append({"category_id": category, "keypoints": np.column_stack([xy, v]).tolist(),
                          "bbox": [float(x0), float(y0), float(side[0]), float(side[1])]})
            noisy = xy + rng.normal(0, jitter * np.sqrt(side.prod()), size=xy.shape)
            predicted.append({"category_id": category, "keypoints": np.column_stack([noisy, np.ones(K)]).tolist(),
                              "score": float(rng.random())})
        predictions.append(predicted)
        references.append(truth)
    return predictions, references


def test_perfect_predictions_score_one(oks_ap):
    predictions, references = synthetic_case(seed=0)
    out = oks_ap.compute(predictions=predictions, references=references)
    for name in STATS:
        assert out[name] == pytest.approx(1.0), name
    assert out["num_images"] == 12
    assert out["num_instances"] == sum(len(r) for r in references) == out["num_predictions"]
    assert out["num_keypoints"] == sum(int(np.asarray(i["keypoints"])[:, 2].astype(bool).sum()) for r in references for i in r)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_jittered_predictions_equal_cocoeval(oks_ap, seed):
    predictions, references = synthetic_case(seed=seed, jitter=0.04)
    out = oks_ap.compute(predictions=predictions, references=references)
    expected = cocoeval_stats(predictions, references)
    assert {name: out[name] for name in STATS} == expected
    assert 0.05 < out["AP"] < 0.95  # a case where ranking and thresholds actually matter


def test_missing_detections_and_false_positives(oks_ap):
    predictions, references = synthetic_case(seed=4, jitter=0.02)
    predictions = [p[:-1] for p in predictions]  # every image loses one detection
    # an image without ground truth but with a confident detection: a false positive
    stray = {"category_id": 1, "keypoints": references[0][0]["keypoints"], "score": 0.99}
    predictions.append([{**stray, "keypoints": [[x + 1, y, 1] for x, y, _ in stray["keypoints"]]}])
    references.append([])
    out = oks_ap.compute(predictions=predictions, references=references)
    assert {name: out[name] for name in STATS} == cocoeval_stats(predictions, references)
    num_instances = sum(len(r) for r in references)
    assert out["AR50"] <= sum(len(p) for p in predictions[:-1]) / num_instances + 1e-9  # missed instances cap recall


def test_no_prediction_at_all_scores_zero(oks_ap):
    _, references = synthetic_case(seed=5)
    out = oks_ap.compute(predictions=[[] for _ in references], references=references)
    assert out["AP"] == 0.0 and out["AR"] == 0.0 and out["num_predictions"] == 0


def test_several_categories_are_averaged(oks_ap):
    predictions, references = synthetic_case(seed=6, categories=(1, 2), jitter=0.03)
    out = oks_ap.compute(predictions=predictions, references=references)
    assert {name: out[name] for name in STATS} == cocoeval_stats(predictions, references)
    assert out["num_categories"] == 2
    # perfect in category 1, nothing predicted in category 2: AP = (1 + 0) / 2 over categories
    perfect_1 = [[{"category_id": 1, "keypoints": r["keypoints"], "score": 1.0} for r in refs if r["category_id"] == 1]
                 for refs in references]
    assert oks_ap.compute(predictions=perfect_1, references=references)["AP"] == pytest.approx(0.5)
    # the right keypoints under the wrong category earn nothing
    swapped = [[{"category_id": 3 - r["category_id"], "keypoints": r["keypoints"], "score": 1.0} for r in refs]
               for refs in references]
    assert oks_ap.compute(predictions=swapped, references=references)["AP"] == 0.0


def test_sigmas_change_the_result(oks_ap):
    predictions, references = synthetic_case(seed=7, jitter=0.04)
    default = oks_ap.compute(predictions=predictions, references=references)
    wider = [2 * s for s in AP10K_SIGMAS]
    out = oks_ap.compute(predictions=predictions, references=references, sigmas=wider)
    assert {name: out[name] for name in STATS} == cocoeval_stats(predictions, references, wider)
    assert out["AP"] > default["AP"]  # larger sigmas tolerate the same errors better


def test_undefined_area_range_is_none(oks_ap):
    gt = {"category_id": 1, "keypoints": [[10, 10, 2], [30, 30, 2]], "bbox": [0, 0, 40, 40]}  # area 1600: medium
    pred = {"category_id": 1, "keypoints": [[10, 10, 1], [30, 32, 1]], "score": 0.5}
    out = oks_ap.compute(predictions=[[pred]], references=[[gt]], sigmas=[0.05, 0.05])
    assert out["APL"] is None and out["ARL"] is None and out["APM"] is not None
    assert {name: out[name] for name in STATS} == cocoeval_stats([[pred]], [[gt]], [0.05, 0.05])


def test_flat_layout_streaming_and_default_area(oks_ap):
    predictions, references = synthetic_case(seed=8, jitter=0.03)
    expected = oks_ap.compute(predictions=predictions, references=references)
    flat_predictions = [[{**p, "keypoints": np.ravel(p["keypoints"]).tolist()} for p in row] for row in predictions]
    explicit_area = [[{**r, "area": r["bbox"][2] * r["bbox"][3]} for r in row] for row in references]
    for start in range(0, len(references), 5):
        oks_ap.add_batch(predictions=flat_predictions[start:start + 5], references=explicit_area[start:start + 5])
    assert oks_ap.compute() == expected
    smaller = [[{**r, "area": r["bbox"][2] * r["bbox"][3] / 4} for r in row] for row in references]
    assert oks_ap.compute(predictions=predictions, references=smaller)["AP"] < expected["AP"]  # area is used


def _one_case():
    gt = {"category_id": 1, "keypoints": [[10.0, 10.0, 2.0]] * K, "bbox": [0.0, 0.0, 40.0, 40.0]}
    pred = {"category_id": 1, "keypoints": [[10.0, 10.0, 1.0]] * K, "score": 0.5}
    return pred, gt


@pytest.mark.parametrize(
    "side, change, message",
    [
        ("pred", {"keypoints": [[10.0, 10.0, 1.0]] * (K - 1)}, r"predictions\[0\]\[0\].*keypoints.*17 x 3"),
        ("gt", {"keypoints": [10.0, 10.0, 2.0] * (K + 1)}, r"references\[0\]\[0\].*keypoints.*17 x 3"),
        ("pred", {"keypoints": [[10.0, 10.0]] * K}, r"predictions\[0\]\[0\].*keypoints.*shape"),
        ("pred", {"keypoints": [[float("nan"), 10.0, 1.0]] * K}, "NaN"),
        ("gt", {"bbox": [0.0, float("inf"), 40.0, 40.0]}, r"references\[0\]\[0\].*'bbox'.*NaN or inf"),
        ("pred", {"score": None}, r"missing required field\(s\) \['score'\]"),
        ("gt", {"bbox": None}, r"references\[0\]\[0\]: missing required field\(s\) \['bbox'\]"),
        ("gt", {"areaa": 3.0}, r"unknown field\(s\) \['areaa'\]"),
        ("gt", {"keypoints": [[10.0, 10.0, 3.0]] * K}, "visibility must be 0, 1 or 2"),
        ("gt", {"area": 0.0}, "'area' must be a finite number > 0"),
        ("gt", {"bbox": [0.0, 0.0, 40.0]}, r"\[x, y, w, h\]"),
        ("gt", {"keypoints": [[10.0, 10.0, 0.0]] * K}, "no ground-truth instance to score"),
    ],
)
def test_malformed_input_errors(oks_ap, side, change, message):
    pred, gt = _one_case()
    if side == "pred":
        pred = {**pred, **change}
    else:
        gt = {**gt, **change}
    with pytest.raises(ValueError, match=message):
        oks_ap.compute(predictions=[[pred]], references=[[gt]])


def test_missing_field_and_bad_sigmas(oks_ap):
    pred, gt = _one_case()
    del pred["category_id"]
    with pytest.raises(ValueError, match=r"predictions\[0\]\[0\]: missing required field\(s\) \['category_id'\]"):
        oks_ap.compute(predictions=[[pred]], references=[[gt]])
    pred, gt = _one_case()
    with pytest.raises(ValueError, match="sigmas must be"):
        oks_ap.compute(predictions=[[pred]], references=[[gt]], sigmas=[-0.1] * K)
    with pytest.raises(ValueError, match="Mismatch"):
        oks_ap.compute(predictions=[[pred], []], references=[[gt]])
    with pytest.raises(ValueError, match=r"must be a list of instance dicts"):
        oks_ap.compute(predictions=[pred], references=[[gt]])
