"""The local PCK metric: hand-computed cases, streaming, and input validation."""

from pathlib import Path

import evaluate
import pytest

METRIC_DIR = Path(__file__).resolve().parents[2] / "metrics" / "pck"


@pytest.fixture(scope="module")
def pck():
    return evaluate.load(str(METRIC_DIR))


def _case():
    # Category 1: a hit exactly on the boundary (distance 20 = 0.2 * 100, a 3-4-5 triangle),
    # a miss (distance 30) and an invisible keypoint far away that must be ignored.
    # Category 2: one hit (distance 1 <= 0.2 * 10).
    return dict(
        predictions=[[12.0, 16.0], [30.0, 0.0], [90.0, 90.0], [6.0, 5.0]],
        references=[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [5.0, 5.0]],
        normalizers=[100.0, 100.0, 100.0, 10.0],
        visible=[1, 1, 0, 1],
        category_ids=[1, 1, 1, 2],
    )


def test_hand_computed_macro_vs_micro(pck):
    out = pck.compute(**_case())
    assert out["pck_per_category"] == {1: 0.5, 2: 1.0}
    assert out["pck"] == pytest.approx(0.75)  # (0.5 + 1.0) / 2, per category then over categories
    assert out["pck_micro"] == pytest.approx(2 / 3)  # 2 correct of 3 visible keypoints
    assert out["num_keypoints"] == 3
    assert out["num_categories"] == 2


def test_boundary_is_inclusive_and_threshold_is_used(pck):
    case = _case()
    case["predictions"][0] = [12.0, 16.001]  # just past the boundary
    assert pck.compute(**case)["pck_per_category"][1] == 0.0
    assert pck.compute(**_case(), threshold=0.3)["pck_per_category"][1] == 1.0  # 30 <= 0.3 * 100
    assert pck.compute(**_case(), threshold=0.1)["pck"] == pytest.approx((0.0 + 1.0) / 2)


def test_invisible_keypoints_do_not_count(pck):
    case = _case()
    case["visible"] = [1, 1, 1, 1]  # now the far keypoint counts as a miss
    out = pck.compute(**case)
    assert out["pck_per_category"][1] == pytest.approx(1 / 3)


def test_streaming_batches_equal_one_shot(pck):
    case = _case()
    for i in range(0, 4, 2):
        pck.add_batch(**{k: v[i:i + 2] for k, v in case.items()})
    assert pck.compute() == pck.compute(**_case())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"predictions": [[0.0, 0.0]] * 3}, "Mismatch"),
        ({"category_ids": [1, 1]}, "Mismatch"),
        ({"predictions": [[float("nan"), 0.0], [30.0, 0.0], [0.0, 0.0], [6.0, 5.0]]}, "NaN"),
        ({"normalizers": [100.0, float("inf"), 100.0, 10.0]}, "NaN"),
        ({"normalizers": [100.0, 0.0, 100.0, 10.0]}, "> 0"),
        ({"visible": [0, 0, 0, 0]}, "no visible"),
        ({"references": [[0.0, 0.0, 0.0]] * 4}, r"\[x, y\]"),
    ],
)
def test_errors(pck, change, message):
    case = {**_case(), **change}
    with pytest.raises(ValueError, match=message):
        pck.compute(**case)


def test_bad_threshold(pck):
    with pytest.raises(ValueError, match="threshold"):
        pck.compute(**_case(), threshold=0.0)


def test_hand_computed_euclidean_distance_per_keypoint_normalizer_and_empty_category(pck):
    # Category 5: (15, 15) is 21.2 px away, a miss at 0.2 * 100 = 20 although each axis is within 20;
    # (3, 4) is 5 px away: a miss with normalizer 20 (limit 4), a hit with normalizer 25 (limit 5).
    # Category 7: one exact hit and one invisible miss. Category 9: nothing visible, so it is left out.
    out = pck.compute(
        predictions=[[15.0, 15.0], [3.0, 4.0], [3.0, 4.0], [7.0, 7.0], [50.0, 50.0], [1.0, 1.0]],
        references=[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [7.0, 7.0], [0.0, 0.0], [0.0, 0.0]],
        normalizers=[100.0, 20.0, 25.0, 10.0, 10.0, 10.0],
        visible=[1, 1, 1, 1, 0, 0],
        category_ids=[5, 5, 5, 7, 7, 9],
    )
    assert out["pck_per_category"] == {5: pytest.approx(1 / 3), 7: 1.0}
    assert out["pck"] == pytest.approx((1 / 3 + 1.0) / 2)
    assert out["pck_micro"] == pytest.approx(2 / 4)
    assert out["num_keypoints"] == 4 and out["num_categories"] == 2


def test_hand_computed_category_macro_average_is_not_keypoint_weighted(pck):
    # 9 keypoints of category 1, all hits; 1 keypoint of category 2, a miss (distance 3 > 0.2 * 10).
    out = pck.compute(
        predictions=[[0.0, 0.0]] * 9 + [[3.0, 0.0]],
        references=[[0.0, 0.0]] * 10,
        normalizers=[10.0] * 10,
        visible=[1] * 10,
        category_ids=[1] * 9 + [2],
    )
    assert out["pck"] == pytest.approx(0.5)  # (1.0 + 0.0) / 2, not 9 / 10
    assert out["pck_micro"] == pytest.approx(0.9)
