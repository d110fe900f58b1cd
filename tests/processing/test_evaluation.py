"""PCK scoring of episodes and the two baselines, on hand-made and generated data."""

import random

import numpy as np
import pytest
from datasets import Dataset

from processing.baselines import baseline_table
from processing.episodes import CapeEpisode, Episode
from processing.evaluation import (
    bootstrap_interval_of_mean_over_splits,
    mean_position_prediction,
    mean_positions,
    official_normalizer,
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
    # keypoint a is 19 px off (< 0.2 * 99, the official box spans pixels 0..99), b is invisible in the query
    scores = score_pck(instances, [episode], [np.array([[90.0, 109.0], [0.0, 0.0]])])
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
    scores, table = baseline_table(small_benchmark, shots=(1,), episodes=1, queries=2)
    support_copy = scores[1]["support-copy"]
    assert len(support_copy) == 5 and all(0 <= v <= 100 for v in support_copy)
    # rotations and articulation make copying the support weak on this benchmark
    assert np.mean(support_copy) < 50
    assert table.count("\n") == 3 and "| support-copy | 1 |" in table
    # the official draw is deterministic: a second run gives the same numbers
    again, _ = baseline_table(small_benchmark, shots=(1,), episodes=1, queries=2)
    assert again == scores


def official_report_metric(instances, paired_samples, predictions, threshold=0.2):
    """The official CAPE evaluation (`TransformerBaseDataset._report_metric`, PCK branch, with mmpose's
    `keypoint_pck_accuracy` on one pair at a time), restated: a keypoint is masked in unless the query or
    any support shot hides it, the box is the reader's clean box (pixels x1..x2, clipped to the image),
    distances are kept in float32, a pair's accuracy is the share of masked-in keypoints strictly under
    the threshold (0 with none), and the PCK is the mean over pairs."""
    accuracies = []
    for pair, predicted in zip(paired_samples, predictions):
        query = instances[pair[-1]]
        mask = np.asarray(query["visible"]) > 0
        for shot in pair[:-1]:
            mask = np.bitwise_and(mask, np.asarray(instances[shot]["visible"]) > 0)
        x, y, w, h = query["bbox"]
        x1, y1 = max(0, x), max(0, y)
        clean_w = min(query["width"] - 1, x1 + max(0, w - 1)) - x1
        clean_h = min(query["height"] - 1, y1 + max(0, h - 1)) - y1
        normalize = np.array([max(clean_w, clean_h)] * 2)
        distances = np.full(len(mask), -1, dtype=np.float32)
        offsets = (np.asarray(predicted) - np.asarray(query["keypoints"])) / normalize
        distances[mask] = np.linalg.norm(offsets[mask], axis=-1)
        per_keypoint = [float(d < threshold) if d != -1 else -1 for d in distances]
        valid = [a for a in per_keypoint if a >= 0]
        accuracies.append(np.mean(valid) if valid else 0)
    return float(np.mean(accuracies))


@pytest.fixture()
def five_shot_category():
    """Category 3: five support shots (shot 3 hides keypoint b) and two queries that share them."""
    names = ("a", "b", "c", "d")
    shot = [[10, 10], [20, 20], [30, 30], [40, 40]]
    rows = [_row(3, [0, 0, 101, 101], shot, [1, 1, 1, 1], names) for _ in range(5)]
    rows[3] = _row(3, [0, 0, 101, 101], shot, [1, 0, 1, 1], names)
    # query 5: box spans pixels 0..100 (normalizer 100, limit 20); query 6 shows only b, which shot 3 hides
    rows.append(_row(3, [0, 0, 101, 101], [[50, 50], [60, 60], [70, 70], [80, 80]], [1, 1, 1, 1], names))
    rows.append(_row(3, [0, 0, 101, 101], [[0, 0], [60, 60], [0, 0], [0, 0]], [0, 1, 0, 0], names))
    return Dataset.from_list(rows)


def test_official_protocol_on_hand_built_episodes(five_shot_category, instances):
    """What the official code computes: every shot must show a keypoint, the threshold is strict, a pair
    without a valid keypoint scores 0, and pairs (not keypoints) are averaged."""
    episodes = [CapeEpisode(3, (0, 1, 2, 3, 4), (5, 6), (100, 101, 102, 103, 104), (105, 106)),
                CapeEpisode(1, (0,), (1,), (10,), (11,))]
    datasets = [five_shot_category, instances]
    predictions = [
        np.array([[70.0, 50.0],      # a: 20 px off = 0.2 x 100, on the threshold: a miss
                  [60.0, 60.0],      # b: exact, but shot 3 hides b: not scored
                  [80.0, 70.0],      # c: 10 px off: a hit
                  [80.0, 99.9]]),    # d: 19.9 px off: a hit
        np.array([[0.0, 0.0], [200.0, 200.0], [0.0, 0.0], [0.0, 0.0]]),  # only b is visible in the query: no valid keypoint
    ]
    pairs = episodes[0].pairs()
    assert [p.query_row for p in pairs] == [5, 6] and {p.support_rows for p in pairs} == {(0, 1, 2, 3, 4)}
    scores = score_pck(datasets[0], pairs, predictions)
    expected = official_report_metric(datasets[0], [(*p.support_rows, p.query_row) for p in pairs], predictions)
    assert expected == pytest.approx((2 / 3 + 0) / 2)
    assert scores["pck"] == pytest.approx(expected)
    assert scores["pck_per_pair"] == [pytest.approx(2 / 3), 0.0]
    assert scores["num_pairs_without_valid_keypoint"] == 1 and scores["num_keypoints"] == 3
    assert scores["pck_pooled"] == pytest.approx(2 / 3)  # the pooled extra ignores the empty pair
    # a second category's 1-shot pair (the support-copy fixture): scored the same way
    copy_pair = episodes[1].pairs()
    copied = [support_copy_prediction(datasets[1], copy_pair[0], crop_padding=1.0)]
    assert score_pck(datasets[1], copy_pair, copied)["pck"] == official_report_metric(datasets[1], [(0, 1)], copied) == 1.0


def test_the_official_normalizer_is_the_clean_box():
    assert official_normalizer(_row(1, [0, 0, 101, 51], [[0, 0]] * 2, [1, 1])) == 100  # pixels 0..100
    # x: 150..199, clipped at the image's last pixel; y: starts at 0 but keeps its length (0..59), as the official code does
    assert official_normalizer(_row(1, [150, -20, 80, 60], [[0, 0]] * 2, [1, 1])) == 59


def test_the_interval_of_a_single_split_is_the_metrics():
    import evaluate

    from processing.evaluation import PCK_METRIC_PATH

    rng = np.random.default_rng(0)
    per_pair = rng.random(300)
    metric = evaluate.load(PCK_METRIC_PATH)
    pairs = list(range(300))
    out = metric.compute(predictions=[[0, 0]] * 300, references=[[0, 0]] * 300, normalizers=[1] * 300,
                         visible=[1] * 300, category_ids=[1] * 300, pair_ids=pairs)
    assert out["pck_ci95"][0] == out["pck_ci95"][1] == 1.0
    low, high = bootstrap_interval_of_mean_over_splits([per_pair])
    assert low < per_pair.mean() < high
    both = bootstrap_interval_of_mean_over_splits([per_pair, per_pair])
    assert both[1] - both[0] < high - low  # two independent splits average out: a narrower interval


def test_an_episodes_queries_in_one_batched_call_match_one_call_per_query(tiny, small_benchmark, monkeypatch):
    import processing.evaluation as evaluation
    from processing.coco import load_mp100
    from processing.episodes import sample_cape_episodes

    model, processor = tiny
    test = load_mp100(small_benchmark, 1, "test")
    (episode,) = sample_cape_episodes(test, num_shots=1, num_queries=2, num_episodes=1)[:1]
    batched = evaluation.predict_cape_episode(model, processor, test, episode)
    monkeypatch.setattr(evaluation, "MAX_ROWS_PER_CALL", 1)  # one query per call
    single = evaluation.predict_cape_episode(model, processor, test, episode)
    assert len(batched) == len(single) == 2
    for (points, names), (points_alone, names_alone) in zip(batched, single):
        np.testing.assert_allclose(points, points_alone, atol=1e-4)
        assert names == names_alone
