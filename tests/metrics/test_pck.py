"""The local PCK metric, official CAPE scoring: per-pair accuracy, mean over pairs, strict threshold, bootstrap."""

from pathlib import Path

import evaluate
import numpy as np
import pytest

METRIC_DIR = Path(__file__).resolve().parents[2] / "metrics" / "pck"


@pytest.fixture(scope="module")
def pck():
    return evaluate.load(str(METRIC_DIR))


def _case():
    # Pair 0 (category 1): a hit (distance 10 of limit 20), a miss exactly on the threshold (20 = 0.2 * 100,
    # not < 20) and an invalid keypoint far away: 1/2. Pair 1 (category 1): its only keypoint is invalid,
    # so the pair scores 0. Pair 2 (category 2): one hit (distance 1 < 0.2 * 10): 1.
    return dict(
        predictions=[[10.0, 0.0], [20.0, 0.0], [90.0, 90.0], [0.0, 0.0], [6.0, 5.0]],
        references=[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [50.0, 50.0], [5.0, 5.0]],
        normalizers=[100.0, 100.0, 100.0, 100.0, 10.0],
        visible=[1, 1, 0, 0, 1],
        category_ids=[1, 1, 1, 1, 2],
        pair_ids=[0, 0, 0, 1, 2],
    )


def test_mean_over_pairs_with_a_pair_without_valid_keypoints_scoring_zero(pck):
    out = pck.compute(**_case())
    assert out["pck"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert out["pck_per_pair"] == [0.5, 0.0, 1.0]
    assert out["num_pairs"] == 3 and out["num_pairs_without_valid_keypoint"] == 1
    assert out["num_keypoints"] == 3 and out["num_categories"] == 2
    # the labelled extras: per category over its pairs, and keypoints pooled
    assert out["pck_per_category"] == {1: pytest.approx(0.25), 2: 1.0}
    assert out["pck_category_mean"] == pytest.approx((0.25 + 1.0) / 2)
    assert out["pck_per_category_pooled"] == pytest.approx((0.5 + 1.0) / 2)  # the old headline figure
    assert out["pck_pooled"] == pytest.approx(2 / 3)


def test_the_threshold_is_strict_and_float32_as_in_mmpose(pck):
    case = _case()
    case["predictions"][1] = [19.999, 0.0]  # just inside the limit: now a hit
    assert pck.compute(**case)["pck_per_pair"][0] == 1.0
    case["predictions"][1] = [20.0 - 1e-7, 0.0]  # 0.2 - 1e-9 rounds to float32(0.2): a miss, as mmpose scores it
    assert pck.compute(**case)["pck_per_pair"][0] == 0.5
    assert pck.compute(**_case(), threshold=0.3)["pck_per_pair"][0] == 1.0  # 20 < 0.3 * 100
    assert pck.compute(**_case(), threshold=0.1)["pck_per_pair"][0] == 0.0  # 10 is not < 0.1 * 100


def test_euclidean_distance_against_each_pairs_own_normalizer(pck):
    # (15, 15) is 21.2 px away: a miss at 0.2 * 100 although each axis is within 20;
    # (3, 4) is 5 px away: a miss with normalizer 20 (limit 4), a hit with normalizer 26 (limit 5.2).
    out = pck.compute(
        predictions=[[15.0, 15.0], [3.0, 4.0], [3.0, 4.0]], references=[[0.0, 0.0]] * 3,
        normalizers=[100.0, 20.0, 26.0], visible=[1, 1, 1], category_ids=[5, 5, 5], pair_ids=[0, 1, 2],
    )
    assert out["pck_per_pair"] == [0.0, 0.0, 1.0]


def test_a_pair_with_many_keypoints_does_not_outweigh_others(pck):
    # pair 0: 9 keypoints, all hits; pair 1: 1 keypoint, a miss -> (1 + 0) / 2, not 9 / 10
    out = pck.compute(
        predictions=[[0.0, 0.0]] * 9 + [[3.0, 0.0]], references=[[0.0, 0.0]] * 10, normalizers=[10.0] * 10,
        visible=[1] * 10, category_ids=[1] * 10, pair_ids=[0] * 9 + [1],
    )
    assert out["pck"] == pytest.approx(0.5) and out["pck_pooled"] == pytest.approx(0.9)


def test_bootstrap_interval_is_seeded_and_brackets_the_mean(pck):
    rng = np.random.default_rng(3)
    n = 400
    hits = (rng.random(n) < 0.7).astype(float)
    case = dict(predictions=[[0.0, 0.0] if h else [50.0, 0.0] for h in hits], references=[[0.0, 0.0]] * n,
                normalizers=[100.0] * n, visible=[1] * n, category_ids=[1] * n, pair_ids=list(range(n)))
    out = pck.compute(**case)
    low, high = out["pck_ci95"]
    assert low < out["pck"] < high
    assert high - low == pytest.approx(2 * 1.96 * np.sqrt(out["pck"] * (1 - out["pck"]) / n), rel=0.2)
    assert pck.compute(**case)["pck_ci95"] == out["pck_ci95"]  # seeded
    assert pck.compute(**case, bootstrap_seed=1)["pck_ci95"] != out["pck_ci95"]


def test_streaming_batches_equal_one_shot(pck):
    case = _case()
    for i in range(0, 5, 2):
        pck.add_batch(**{k: v[i:i + 2] for k, v in case.items()})
    assert pck.compute() == pck.compute(**_case())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"predictions": [[0.0, 0.0]] * 3}, "Mismatch"),
        ({"pair_ids": [0, 0]}, "Mismatch"),
        ({"predictions": [[float("nan"), 0.0], [30.0, 0.0], [0.0, 0.0], [0.0, 0.0], [6.0, 5.0]]}, "NaN"),
        ({"normalizers": [100.0, float("inf"), 100.0, 100.0, 10.0]}, "NaN"),
        ({"normalizers": [100.0, 0.0, 100.0, 100.0, 10.0]}, "> 0"),
        ({"references": [[0.0, 0.0, 0.0]] * 5}, r"\[x, y\]"),
    ],
)
def test_errors(pck, change, message):
    case = {**_case(), **change}
    with pytest.raises(ValueError, match=message):
        pck.compute(**case)


def test_bad_threshold_and_bootstrap_samples(pck):
    with pytest.raises(ValueError, match="threshold"):
        pck.compute(**_case(), threshold=0.0)
    with pytest.raises(ValueError, match="bootstrap_samples"):
        pck.compute(**_case(), bootstrap_samples=0)
