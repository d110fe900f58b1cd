"""Textual-prompt OKS AP and semantic naming accuracy: end to end with a tiny random model, and the
scoring and baselines checked against independent computations (pycocotools called directly)."""

import contextlib
import io
from types import SimpleNamespace

import numpy as np
import pytest
from datasets import Dataset
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import processing.textual_eval as textual_eval
from processing.builders import build_tiny_model
from processing.coco import AP10K_KEYPOINT_NAMES, AP10K_SIGMAS
from processing.textual_eval import (
    CONSTANT_SCORE_ROW,
    evaluate_semantic,
    evaluate_textual_prompt,
    instance_score,
    load_clamp_protocol,
    naming_markdown_table,
    normalize_name,
    oks_markdown_table,
    score_names,
    score_oks,
)

STATS = ("AP", "AP50", "AP75", "APM", "APL", "AR", "AR50", "AR75", "ARM", "ARL")


@pytest.fixture(scope="module")
def clamp(small_benchmark):
    """(train, test) of CLAMP's different-order protocol on the small generated benchmark."""
    return load_clamp_protocol(small_benchmark, "bovidae_to_canidae")


@pytest.fixture(scope="module")
def ap10k_tiny():
    model, processor = build_tiny_model(AP10K_KEYPOINT_NAMES, seed=0)
    # An untrained model may emit <image>/<kpt_prompt>, which detect_keypoints cannot feed back (it has no
    # features for them mid-answer); a trained one never does. Mask them so the pipeline can be exercised.
    blocked = [processor.image_token_id, processor.kpt_prompt_token_id]

    def block_placeholders(module, args, logits):
        return logits.index_fill(-1, logits.new_tensor(blocked, dtype=int), float("-inf"))

    model.get_output_embeddings().register_forward_hook(block_placeholders)
    processor.crop_padding = 1.25
    return model.eval(), processor


def pycocotools_stats(rows: list[dict], predicted: list[np.ndarray], scores: list[float] | None = None,
                      sigmas=AP10K_SIGMAS) -> dict:
    """OKS AP of (K, 2) predictions (instance scores: 1 unless given) for instance rows, by pycocotools directly."""
    scores = scores or [1.0] * len(rows)
    images = sorted({row["image_id"] for row in rows})
    annotations, results = [], []
    for row, points, score in zip(rows, predicted, scores):
        bbox = row["bbox"]
        annotations.append({
            "id": len(annotations) + 1, "image_id": row["image_id"], "category_id": row["category_id"],
            "keypoints": np.column_stack([row["keypoints"], row["visible"]]).ravel().tolist(),
            "num_keypoints": int(sum(row["visible"])), "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0,
        })
        results.append({"image_id": row["image_id"], "category_id": row["category_id"], "score": score,
                        "keypoints": np.column_stack([points, np.ones(len(points))]).ravel().tolist()})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": [{"id": i} for i in images], "annotations": annotations,
                      "categories": [{"id": c} for c in sorted({a["category_id"] for a in annotations})]}
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(results), iouType="keypoints")
        evaluation.params.kpt_oks_sigmas = np.array(sigmas)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: None if value == -1 else float(value) for name, value in zip(STATS, evaluation.stats)}


def test_clamp_protocol_selects_families(clamp):
    train, test = clamp
    assert set(train["supercategory"]) == {"Bovidae"} and set(test["supercategory"]) == {"Canidae"}
    with pytest.raises(ValueError, match="unknown CLAMP protocol"):
        load_clamp_protocol("unused", "bovidae_to_felidae")


def test_textual_prompt_end_to_end(ap10k_tiny, clamp):
    model, processor = ap10k_tiny
    train, test = clamp
    results = evaluate_textual_prompt(model, processor, test, train, limit=2)
    assert set(results) == {"KptLLM", CONSTANT_SCORE_ROW, "mean-position"}
    assert 0.0 <= results["KptLLM"]["mean_instance_score"] <= 1.0
    labelled = int(np.sum(test.select(range(2))["visible"]))
    for scores in results.values():
        assert scores["num_instances"] == 2 and scores["num_keypoints"] == labelled
        assert all(scores[name] is None or 0.0 <= scores[name] <= 1.0 for name in STATS)
    assert 0 <= results["KptLLM"]["num_unlocalized"] <= 2 * len(AP10K_SIGMAS)
    assert 0.0 <= results["KptLLM"]["name_match"] <= 1.0
    table = oks_markdown_table(results)
    assert table.count("\n") == 4 and "| KptLLM |" in table


def test_semantic_end_to_end(ap10k_tiny, clamp):
    model, processor = ap10k_tiny
    train, test = clamp
    results = evaluate_semantic(model, processor, test, train, limit=2)
    assert set(results) == {"KptLLM", "most-frequent", "nearest-mean-position"}
    labelled = int(np.sum(test.select(range(2))["visible"]))
    for scores in results.values():
        assert scores["num_keypoints"] + scores["num_excluded"] == labelled and scores["num_instances"] == 2
        assert 0.0 <= scores["accuracy"] <= 1.0
        assert scores["num_correct"] == round(scores["accuracy"] * scores["num_keypoints"])
    assert "| most-frequent |" in naming_markdown_table(results)


def test_perfect_predictor_and_independent_mean_position_baseline(ap10k_tiny, clamp, monkeypatch):
    _, processor = ap10k_tiny
    train, test = clamp

    def oracle(model, processor, row, identify_then_detect=True):
        points = np.asarray(row["keypoints"], float)
        names = [name.upper() + "." for name in row["keypoint_names"]]  # names match after normalization
        return points, names, np.ones(len(points))

    monkeypatch.setattr(textual_eval, "predict_textual", oracle)
    results = evaluate_textual_prompt(SimpleNamespace(eval=lambda: None), processor, test, train)
    for name in STATS:
        assert results["KptLLM"][name] in (None, pytest.approx(1.0)), name
    assert results["KptLLM"]["AP"] == pytest.approx(1.0) and results["KptLLM"]["name_match"] == 1.0
    assert results["KptLLM"]["num_instances"] == len(test) and results["KptLLM"]["num_unlocalized"] == 0

    # The mean-position baseline, recomputed here: square crop of side padding * max(w, h) around the box centre.
    def crop(row):
        x, y, w, h = row["bbox"]
        side = processor.crop_padding * max(w, h)
        return np.array([x + w / 2 - side / 2, y + h / 2 - side / 2]), side

    sums = {}
    for row in train:
        origin, side = crop(row)
        for name, point, visible in zip(row["keypoint_names"], row["keypoints"], row["visible"]):
            if visible:
                total, count = sums.get(name, (np.zeros(2), 0))
                sums[name] = (total + (np.asarray(point) - origin) / side, count + 1)
    assert set(sums) == set(AP10K_KEYPOINT_NAMES)  # every name seen in training: no fallback involved
    rows = list(test)
    baseline = []
    for row in rows:
        origin, side = crop(row)
        baseline.append(np.array([sums[name][0] / sums[name][1] * side + origin for name in row["keypoint_names"]]))
    expected = pycocotools_stats(rows, baseline)
    assert {name: pytest.approx(results["mean-position"][name]) if expected[name] is not None else None
            for name in STATS} == expected
    assert results["mean-position"]["AP"] < 1.0


def test_unlocalized_keypoints_are_scored_as_misses(clamp):
    _, test = clamp
    rows = list(test)
    truth = [np.asarray(row["keypoints"], float) for row in rows]
    assert score_oks(rows, truth)["AP"] == pytest.approx(1.0)
    nothing = score_oks(rows, [np.full((len(AP10K_SIGMAS), 2), np.nan) for _ in rows])
    assert nothing["AP"] == 0.0 and nothing["AR"] == 0.0
    assert nothing["num_unlocalized"] == len(rows) * len(AP10K_SIGMAS)
    # With the nose and the left hip not localized, the score is no better than any guess inside the box.
    rng = np.random.default_rng(0)
    jittered = [t + rng.normal(0, 0.03 * max(row["bbox"][2:]), t.shape) for t, row in zip(truth, rows)]
    missing = [2, 11]
    unlocalized = [np.where(np.isin(np.arange(len(p)), missing)[:, None], np.nan, p) for p in jittered]
    scored = score_oks(rows, unlocalized)
    assert scored["num_unlocalized"] == len(missing) * len(rows)
    for trial in range(3):
        guessed = []
        for p, row in zip(jittered, rows):
            x, y, w, h = row["bbox"]
            p = p.copy()
            p[missing] = [x, y] + rng.uniform(0, 1, (len(missing), 2)) * [w, h]
            guessed.append(p)
        assert scored["AP"] <= score_oks(rows, guessed)["AP"]
    assert scored["AP"] < score_oks(rows, jittered)["AP"]


def _instance(image_id: int, points) -> dict:
    """An instance of three keypoints in its own 100 x 100 image, box and crop = the image (padding 1)."""
    return {"image_path": "unused.png", "image_id": image_id, "annotation_id": image_id, "category_id": 1,
            "bbox": [0.0, 0.0, 100.0, 100.0], "keypoints": [list(map(float, p)) for p in points], "visible": [1, 1, 1],
            "keypoint_names": ["a", "b", "c"], "width": 100, "height": 100}


def test_the_model_scores_rank_predictions_for_oks_ap(monkeypatch):
    """Two instances, one found exactly and one missed: AP depends on which pycocotools ranks first."""
    sigmas = [0.05, 0.05, 0.05]
    truth = [[20, 20], [50, 50], [80, 80]]
    rows = [_instance(1, truth), _instance(2, truth)]  # file order: the missed instance comes first
    predicted = [np.asarray(truth, float)[::-1].copy(), np.asarray(truth, float)]  # mirrored: OKS 1/3, no match; exact
    confident_in_the_hit = [np.array([0.3, 0.1, 0.3]), np.array([0.9, 0.8, 0.1])]  # instance scores 0.3 and 0.85
    assert [instance_score(s) for s in confident_in_the_hit] == [pytest.approx(0.3), pytest.approx(0.85)]
    assert instance_score(np.array([0.2, 0.1, 0.0])) == 0.0  # mmpose: keypoints at or below 0.2 are left out

    constant = score_oks(rows, predicted, sigmas)
    ranked = score_oks(rows, predicted, sigmas, keypoint_scores=confident_in_the_hit)
    misranked = score_oks(rows, predicted, sigmas, keypoint_scores=confident_in_the_hit[::-1])
    # the hit first: precision 1 up to recall 1/2 (AP = 51/101 on the 101 recall points); the miss first: 1/2
    assert ranked["AP"] == pytest.approx(51 / 101) and constant["AP"] == misranked["AP"] == pytest.approx(51 / 202)
    assert ranked["AP"] == pytest.approx(pycocotools_stats(rows, predicted, [0.3, 0.85], sigmas)["AP"])
    assert constant["AP"] == pytest.approx(pycocotools_stats(rows, predicted, None, sigmas)["AP"])

    written = []  # what reaches the metric: keypoint scores as the third values, the instance score as "score"
    metric = textual_eval._oks_metric()
    monkeypatch.setattr(textual_eval, "_oks_metric", lambda: SimpleNamespace(
        compute=lambda predictions, **kwargs: written.extend(predictions) or metric.compute(predictions=predictions, **kwargs)))
    score_oks(rows, [predicted[0], np.where([[0], [1], [0]], np.nan, predicted[1])], sigmas,
              keypoint_scores=[confident_in_the_hit[0], np.array([0.9, 0.0, 0.1])])
    assert [p["score"] for (p,) in written] == [pytest.approx(0.3), pytest.approx(0.9)]
    assert [k[2] for k in written[1][0]["keypoints"]] == [0.9, 0.0, 0.1]
    with pytest.raises(ValueError, match="keypoint scores per prediction"):
        score_oks(rows, predicted, sigmas, keypoint_scores=confident_in_the_hit[:1])
    with pytest.raises(ValueError, match=r"keypoint_scores\[1\] must be 3 numbers in \[0, 1\]"):
        score_oks(rows, predicted, sigmas, keypoint_scores=[confident_in_the_hit[0], np.array([1.5, 0.5, 0.5])])

    # evaluate_textual_prompt ranks by the model's scores and prints the constant-score row beside
    by_image = dict(zip((1, 2), zip(predicted, confident_in_the_hit)))
    monkeypatch.setattr(textual_eval, "predict_textual",
                        lambda model, processor, row, itd=True: (by_image[row["image_id"]][0], ["a", "b", "c"], by_image[row["image_id"]][1]))
    monkeypatch.setattr(textual_eval, "_oks_metric", lambda: metric)
    results = evaluate_textual_prompt(SimpleNamespace(eval=lambda: None), SimpleNamespace(crop_padding=1.0),
                                      Dataset.from_list(rows), Dataset.from_list(rows), sigmas=sigmas)
    assert results["KptLLM"]["AP"] == pytest.approx(ranked["AP"])
    assert results[CONSTANT_SCORE_ROW]["AP"] == pytest.approx(constant["AP"])
    assert results["KptLLM"]["mean_instance_score"] == pytest.approx((0.3 + 0.85) / 2)


def test_score_oks_errors(clamp):
    _, test = clamp
    rows = list(test.select(range(2)))
    truth = [np.asarray(row["keypoints"], float) for row in rows]
    with pytest.raises(ValueError, match="one prediction per instance"):
        score_oks(rows, truth[:1])
    with pytest.raises(ValueError, match=r"instance \d+ \(image \d+\) has 17 keypoints, but 5 sigmas"):
        score_oks(rows, [t[:5] for t in truth], sigmas=AP10K_SIGMAS[:5])
    with pytest.raises(ValueError, match=r"predictions\[1\] has shape \(16, 2\)"):
        score_oks(rows, [truth[0], truth[1][:16]])
    with pytest.raises(ValueError, match="inf"):
        score_oks(rows, [truth[0], np.full_like(truth[1], np.inf)])
    with pytest.raises(ValueError, match="limit must be None or an integer >= 1"):
        evaluate_textual_prompt(None, None, test, test, limit=0)


def _row(category_id, names, points, visible):
    return {"image_path": "unused.png", "image_id": len(names), "annotation_id": category_id, "category_id": category_id,
            "bbox": [0.0, 0.0, 100.0, 100.0], "keypoints": [list(map(float, p)) for p in points],
            "visible": list(visible), "keypoint_names": list(names), "width": 200, "height": 200}


def test_semantic_baselines_hand_computed(monkeypatch):
    # The crop is the box (padding 1): normalized position = pixels / 100.
    train = Dataset.from_list([
        _row(1, "abc", [[10, 10], [50, 50], [90, 90]], [1, 1, 1]),
        _row(1, "abc", [[30, 10], [50, 70], [90, 90]], [1, 1, 0]),
        _row(2, "cd", [[10, 90], [90, 10]], [1, 1]),
    ])
    # Labelled counts a: 2, b: 2, c: 2, d: 1 -> "a" (alphabetical among the most frequent).
    # Means: a (0.2, 0.1), b (0.5, 0.6), c (0.5, 0.9), d (0.9, 0.1).
    test = Dataset.from_list([
        # category 1 is seen: candidates a, b, c. a at (0.85, 0.15) -> b (d would be nearest among all);
        # b at (0.5, 0.55) -> b; c at (0.5, 0.95) -> c.
        _row(1, "abc", [[85, 15], [50, 55], [50, 95]], [1, 1, 1]),
        # category 3 is unseen: all names. d at (0.88, 0.12) -> d; a at (0.5, 0.88) -> c; b unlabelled;
        # e lies outside the crop, so it cannot be prompted: excluded.
        _row(3, "dabe", [[88, 12], [50, 88], [0, 0], [150, 50]], [1, 1, 0, 1]),
    ])
    calls = []

    def fake_names(model, processor, row, indices):
        calls.append(list(indices))
        return {1: ["A.", None, "c"], 3: ["D", "left a"]}[row["category_id"]]

    monkeypatch.setattr(textual_eval, "predict_names", fake_names)
    results = evaluate_semantic(SimpleNamespace(eval=lambda: None), SimpleNamespace(crop_padding=1.0), test, train)
    assert calls == [[0, 1, 2], [0, 1]]
    assert results["most-frequent"]["accuracy"] == pytest.approx(2 / 5)  # "a" right twice
    assert results["nearest-mean-position"]["accuracy"] == pytest.approx(3 / 5)  # b, c, d right
    assert results["KptLLM"]["accuracy"] == pytest.approx(3 / 5)  # "A.", "c", "D" right; None and "left a" wrong
    assert results["KptLLM"]["num_unnamed"] == 1
    assert all(r["num_keypoints"] == 5 and r["num_excluded"] == 1 and r["num_instances"] == 2 for r in results.values())

    empty_train = Dataset.from_list([_row(1, "ab", [[0, 0], [0, 0]], [0, 0])])
    with pytest.raises(ValueError, match="train_instances has no labelled keypoint"):
        evaluate_semantic(SimpleNamespace(eval=lambda: None), SimpleNamespace(crop_padding=1.0), test, empty_train)


def test_name_normalization_and_scoring():
    assert normalize_name(" Left_Eye. ") == "left eye" == normalize_name("left-eye")
    assert normalize_name("left eye") != normalize_name("right eye")
    assert score_names(["left eye", "nose"], ["LEFT EYE", None]) == {
        "accuracy": 0.5, "num_correct": 1, "num_keypoints": 2, "num_unnamed": 1}
    with pytest.raises(ValueError, match="one prediction per reference"):
        score_names(["nose"], [])
    with pytest.raises(ValueError, match="empty references"):
        score_names([], [])
    with pytest.raises(ValueError, match=r"references\[0\] must be a non-empty keypoint name"):
        score_names([""], ["nose"])
