"""PCK scoring of episodes and the two baselines, on hand-made and generated data."""

import numpy as np
import pytest
from datasets import Dataset

from processing.baselines import baseline_table
from processing.episodes import Episode
from processing.evaluation import (
    mean_position_prediction,
    mean_positions,
    score_pck,
    support_copy_prediction,
)


def _row(category_id, bbox, keypoints, visible, names=("a", "b")):
    return {"image_path": "unused.png", "category_id": category_id, "bbox": list(map(float, bbox)),
            "keypoints": [list(map(float, p)) for p in keypoints], "visible": list(visible),
            "keypoint_names": list(names), "width": 200, "height": 200}


@pytest.fixture()
def instances():
    return Dataset.from_list([
        _row(1, [0, 0, 100, 100], [[10, 10], [50, 90]], [1, 1]),   # support
        _row(1, [100, 100, 50, 50], [[105, 105], [125, 145]], [1, 1]),  # query: support scaled by 0.5, moved
        _row(1, [0, 0, 100, 100], [[90, 90], [20, 20]], [1, 0]),   # another query, b invisible
    ])


def test_support_copy_transfers_normalized_coordinates(instances):
    episode = Episode(1, (0,), 1, (10,), 11)
    predicted = support_copy_prediction(instances, episode, crop_padding=1.0)
    np.testing.assert_allclose(predicted, [[105, 105], [125, 145]])
    scores = score_pck(instances, [episode], [predicted])
    assert scores["pck"] == 1.0 and scores["num_keypoints"] == 2


def test_only_keypoints_visible_in_query_and_support_count_and_misses_are_wrong(instances):
    episode = Episode(1, (0,), 2, (10,), 12)
    # keypoint a is 20 px off (<= 0.2 * 100), b is invisible in the query: one scored keypoint
    scores = score_pck(instances, [episode], [np.array([[90.0, 110.0], [0.0, 0.0]])])
    assert scores["num_keypoints"] == 1 and scores["pck"] == 1.0
    scores = score_pck(instances, [episode], [np.array([[np.nan, np.nan], [20.0, 20.0]])])
    assert scores["pck"] == 0.0  # an unlocalized keypoint is wrong, not skipped


def test_mean_position_baseline(instances):
    means = mean_positions(instances, crop_padding=1.0)
    # a: (0.1, 0.1), (0.1, 0.1), (0.9, 0.9) -> 0.3667; b: (0.5, 0.9), (0.5, 0.9) (third invisible)
    np.testing.assert_allclose(means["a"], [1.1 / 3, 1.1 / 3])
    np.testing.assert_allclose(means["b"], [0.5, 0.9])
    predicted = mean_position_prediction(instances, Episode(1, (0,), 1, (10,), 11), means, crop_padding=1.0)
    np.testing.assert_allclose(predicted, [[100 + 50 * 1.1 / 3, 100 + 50 * 1.1 / 3], [125, 145]])


def test_baselines_on_the_generated_benchmark(small_benchmark):
    scores, table = baseline_table(small_benchmark, shots=(1,), queries_per_category=2)
    support_copy = scores[1]["support-copy"]
    assert len(support_copy) == 5 and all(0 <= v <= 100 for v in support_copy)
    # rotations and articulation make copying the support weak on this benchmark
    assert np.mean(support_copy) < 50
    assert table.count("\n") == 3 and "| support-copy | 1 |" in table
    # the fixed episode files are reused: a second run reads them and gives the same numbers
    again, _ = baseline_table(small_benchmark, shots=(1,), queries_per_category=2)
    assert again == scores
