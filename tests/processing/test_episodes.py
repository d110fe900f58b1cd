"""Tests for processing/episodes.py: episodes, fixed test-episode files, training samples."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path

import pytest
from datasets import Dataset
from PIL import Image

from processing.coco import INSTANCE_FEATURES, load_keypoint_annotations
from processing.episodes import (
    DEFAULT_TASK_MIX,
    TASKS,
    CapeEpisode,
    Episode,
    coco_file_order,
    fixed_test_episodes,
    load_episodes,
    make_training_samples,
    sample_cape_episodes,
    sample_episodes,
    save_episodes,
    validate_task_mix,
)

NUM_KEYPOINTS = 4


def make_dataset(
    category_sizes: dict[int, int], hidden: dict[int, list[int]] | None = None
) -> Dataset:
    """An instance dataset with the loader's schema: ``category_sizes`` maps category id → count.

    Annotation ids are ``1000 * category + i``; ``hidden`` maps an annotation id to the keypoint
    indices that are not visible in it.
    """
    hidden = hidden or {}
    rows = []
    for category_id, size in category_sizes.items():
        for i in range(size):
            annotation_id = 1000 * category_id + i
            visible = [0 if k in hidden.get(annotation_id, []) else 1 for k in range(NUM_KEYPOINTS)]
            rows.append({
                "image_path": f"/data/{annotation_id}.png", "image_id": annotation_id,
                "annotation_id": annotation_id, "category_id": category_id,
                "category_name": f"category{category_id}", "supercategory": "thing",
                "bbox": [0.0, 0.0, 10.0, 10.0],
                "keypoints": [[float(k)] * 2 if v else [0.0, 0.0] for k, v in enumerate(visible)],
                "visible": visible, "keypoint_names": [f"point {k}" for k in range(NUM_KEYPOINTS)],
                "width": 10, "height": 10,
            })  # fmt: skip
    return Dataset.from_list(rows, features=INSTANCE_FEATURES)


def as_ids(dataset: Dataset, episodes: list[Episode]) -> list[tuple[int, tuple[int, ...], int]]:
    """Episodes in terms of annotation ids, checking the rows agree with the ids."""
    ids = dataset["annotation_id"][:]
    result = []
    for e in episodes:
        assert tuple(ids[r] for r in e.support_rows) == e.support_annotation_ids
        assert ids[e.query_row] == e.query_annotation_id
        result.append((e.category_id, e.support_annotation_ids, e.query_annotation_id))
    return result


# --------------------------------------------------------------------------------------------
# Episodes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_shots", [1, 5])
def test_episodes_respect_k_shot_constraints(num_shots: int) -> None:
    dataset = make_dataset({1: 8, 2: 6, 3: 12})
    categories = dataset["category_id"][:]
    episodes = sample_episodes(dataset, num_shots, None, seed=0)
    assert len(episodes) == 8 + 6 + 12  # every instance is a query once
    for episode in episodes:
        assert episode.num_shots == num_shots
        assert len(set(episode.support_rows)) == num_shots
        assert episode.query_row not in episode.support_rows
        assert {categories[r] for r in (*episode.support_rows, episode.query_row)} == {
            episode.category_id
        }
    assert [e.category_id for e in episodes] == sorted(e.category_id for e in episodes)
    as_ids(dataset, episodes)


def test_categories_too_small_for_an_episode_are_excluded_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dataset = make_dataset({1: 1, 2: 2, 3: 5, 4: 6})
    with caplog.at_level(logging.WARNING, logger="processing.episodes"):
        one_shot = sample_episodes(dataset, 1, None, seed=0)
    assert {e.category_id for e in one_shot} == {2, 3, 4}
    assert "category 1 ('category1') has 1 instance(s)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="processing.episodes"):
        five_shot = sample_episodes(dataset, 5, None, seed=0)
    assert {e.category_id for e in five_shot} == {4}
    assert all(f"category {c} ('category{c}')" in caplog.text for c in (1, 2, 3))


def test_episodes_are_deterministic_and_invariant_to_row_order() -> None:
    dataset = make_dataset({1: 10, 2: 7})
    first = sample_episodes(dataset, 1, 4, seed=3)
    assert sample_episodes(dataset, 1, 4, seed=3) == first
    assert as_ids(dataset, sample_episodes(dataset, 1, 4, seed=4)) != as_ids(dataset, first)
    shuffled = dataset.shuffle(seed=11)
    assert as_ids(shuffled, sample_episodes(shuffled, 1, 4, seed=3)) == as_ids(dataset, first)


def test_num_queries_per_category() -> None:
    dataset = make_dataset({1: 10, 2: 3})
    episodes = sample_episodes(dataset, 1, 4, seed=0)
    per_category = Counter(e.category_id for e in episodes)
    assert per_category == {1: 4, 2: 3}  # capped at the category size
    queries = [e.query_row for e in episodes]
    assert len(set(queries)) == len(queries)


@pytest.mark.parametrize(
    ("num_shots", "num_queries"), [(0, None), (-1, None), (True, None), (1, 0), (1, 2.5)]
)
def test_episode_arguments_are_validated(num_shots: int, num_queries: int | None) -> None:
    with pytest.raises(ValueError, match="must be a positive integer"):
        sample_episodes(make_dataset({1: 3}), num_shots, num_queries, seed=0)


def test_duplicate_annotation_ids_are_rejected() -> None:
    dataset = make_dataset({1: 3})
    doubled = Dataset.from_list([dataset[0], dataset[0], dataset[1]], features=INSTANCE_FEATURES)
    with pytest.raises(ValueError, match="Annotation id 1000 appears in rows 0 and 1"):
        sample_episodes(doubled, 1, None, seed=0)


def test_save_and_load_episodes_by_annotation_id(tmp_path: Path) -> None:
    dataset = make_dataset({1: 6, 2: 6})
    episodes = sample_episodes(dataset, 5, None, seed=1)
    path = tmp_path / "sub" / "episodes.json"
    save_episodes(episodes, path)
    stored = json.loads(path.read_text())
    assert stored["episodes"][0] == {
        "category_id": episodes[0].category_id,
        "support": list(episodes[0].support_annotation_ids),
        "query": episodes[0].query_annotation_id,
    }
    assert load_episodes(path, dataset) == episodes
    shuffled = dataset.shuffle(seed=5)
    reloaded = load_episodes(path, shuffled)
    assert as_ids(shuffled, reloaded) == as_ids(dataset, episodes)  # rows re-resolved


def test_load_episodes_errors(tmp_path: Path) -> None:
    dataset = make_dataset({1: 4, 2: 4})
    path = tmp_path / "episodes.json"
    save_episodes(sample_episodes(dataset, 1, None, seed=0), path)
    smaller = dataset.filter(lambda row: row["annotation_id"] != 1002)
    with pytest.raises(ValueError, match="annotation id 1002 is not in the dataset"):
        load_episodes(path, smaller)
    payload = json.loads(path.read_text())
    payload["episodes"][0]["category_id"] = 2
    path.write_text(json.dumps(payload))
    with pytest.raises(
        ValueError,
        match="episode 0: annotation id 100\\d has category 1 in the dataset, the file says 2",
    ):
        load_episodes(path, dataset)
    path.write_text(path.read_text()[:50])
    with pytest.raises(ValueError, match="episodes.json: invalid JSON at line"):
        load_episodes(path, dataset)
    path.write_text(json.dumps({"episodes": []}))
    with pytest.raises(ValueError, match="not a KptLLM episode file"):
        load_episodes(path, dataset)


def test_fixed_test_episodes_are_created_once_and_shared(tmp_path: Path) -> None:
    dataset = make_dataset({1: 9, 2: 5})
    path = tmp_path / "test_episodes_1shot.json"
    first = fixed_test_episodes(dataset, path, num_shots=1, seed=0, num_queries_per_category=3)
    text = path.read_text()
    # A second run, on the same data loaded in another order, gets the same support/query pairs.
    shuffled = dataset.shuffle(seed=2)
    second = fixed_test_episodes(shuffled, path, num_shots=1, seed=0, num_queries_per_category=3)
    assert path.read_text() == text
    assert as_ids(shuffled, second) == as_ids(dataset, first)
    # The file wins over resampling: hand-edited episodes are returned as stored.
    payload = json.loads(text)
    payload["episodes"] = payload["episodes"][:2]
    path.write_text(json.dumps(payload))
    assert (
        len(fixed_test_episodes(dataset, path, num_shots=1, seed=0, num_queries_per_category=3))
        == 2
    )


def test_fixed_test_episodes_refuses_mismatched_file(tmp_path: Path) -> None:
    dataset = make_dataset({1: 9, 2: 6})
    path = tmp_path / "episodes.json"
    fixed_test_episodes(dataset, path, num_shots=1, seed=0)
    with pytest.raises(ValueError, match="'num_shots': 1.*'num_shots': 5"):
        fixed_test_episodes(dataset, path, num_shots=5, seed=0)
    with pytest.raises(ValueError, match="'seed': 0.*'seed': 1"):
        fixed_test_episodes(dataset, path, num_shots=1, seed=1)
    other = make_dataset({3: 9})
    with pytest.raises(ValueError, match="episodes.json holds episodes drawn from other instances"):
        fixed_test_episodes(other, path, num_shots=1, seed=0)


def test_episodes_from_a_loaded_coco_file(tmp_path: Path) -> None:
    """End to end: COCO JSON → loader → episodes (the category with one instance is excluded)."""
    images, annotations = [], []
    for i in range(7):
        Image.new("RGB", (32, 32)).save(tmp_path / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 32, "height": 32})
        annotations.append({
            "id": 50 + i, "image_id": i, "category_id": 1 if i < 6 else 2, "bbox": [0, 0, 30, 30],
            "keypoints": [5, 5, 2, 10, 10, 2], "num_keypoints": 2,
        })  # fmt: skip
    categories = [
        {"id": c, "name": n, "supercategory": "s", "keypoints": ["a", "b"]}
        for c, n in ((1, "one"), (2, "two"))
    ]
    path = tmp_path / "coco.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    dataset = load_keypoint_annotations(path, tmp_path)
    episodes = fixed_test_episodes(dataset, tmp_path / "ep.json", num_shots=5, seed=0)
    assert len(episodes) == 6 and {e.category_id for e in episodes} == {1}


# --------------------------------------------------------------------------------------------
# Training samples
# --------------------------------------------------------------------------------------------


def test_training_samples_cover_each_visible_keypoint_once() -> None:
    hidden = {1000: [0, 1], 1001: [3], 2000: [0, 1, 2]}
    dataset = make_dataset({1: 5, 2: 4}, hidden)
    samples = make_training_samples(dataset, seed=0)
    visible = dataset["visible"][:]
    expected = {
        (row, k) for row, flags in enumerate(visible) for k, flag in enumerate(flags) if flag
    }
    pairs = list(zip(samples["query_row"][:], samples["keypoint_index"][:], strict=True))
    assert len(pairs) == len(expected) and set(pairs) == expected
    assert set(samples.column_names) == {"task", "query_row", "support_rows", "keypoint_index"}


@pytest.mark.parametrize("num_shots", [1, 5])
def test_visual_supports_are_valid(num_shots: int) -> None:
    # Keypoint 0 is visible only in 1000 and 1001: a visual sample for it must use the other one.
    hidden = {1000 + i: [0] for i in range(2, 8)}
    dataset = make_dataset({1: 8, 2: 7}, hidden)
    categories = dataset["category_id"][:]
    visible = dataset["visible"][:]
    mix = {"visual": 1.0, "textual": 1.0, "semantic": 1.0, "visual+textual": 1.0}
    samples = make_training_samples(dataset, mix, num_shots=num_shots, seed=1)
    assert set(samples["task"][:]) == set(TASKS)
    for sample in samples:
        query, supports, k = sample["query_row"], sample["support_rows"], sample["keypoint_index"]
        assert visible[query][k] == 1
        if "visual" not in sample["task"]:
            assert supports == []
            continue
        assert len(supports) == len(set(supports)) == num_shots
        assert query not in supports
        assert {categories[r] for r in supports} == {categories[query]}
        assert any(visible[r][k] for r in supports)


def test_training_samples_are_deterministic_and_row_order_invariant() -> None:
    dataset = make_dataset({1: 6, 2: 6}, {1003: [1]})
    first = make_training_samples(dataset, seed=7)
    assert make_training_samples(dataset, seed=7).to_list() == first.to_list()
    assert make_training_samples(dataset, seed=8).to_list() != first.to_list()

    def by_ids(ds: Dataset, samples: Dataset) -> list[tuple]:
        ids = ds["annotation_id"][:]
        return [
            (
                s["task"],
                ids[s["query_row"]],
                tuple(ids[r] for r in s["support_rows"]),
                s["keypoint_index"],
            )
            for s in samples
        ]

    shuffled = dataset.shuffle(seed=3)
    assert by_ids(shuffled, make_training_samples(shuffled, seed=7)) == by_ids(dataset, first)


def test_task_mix_proportions_and_samples_per_epoch() -> None:
    dataset = make_dataset({c: 10 for c in range(1, 11)})  # 400 visible pairs
    samples = make_training_samples(dataset, DEFAULT_TASK_MIX, seed=0)
    counts = Counter(samples["task"][:])
    assert len(samples) == 400
    assert abs(counts["visual"] / 400 - 0.6) < 0.08
    assert abs(counts["textual"] / 400 - 0.2) < 0.08
    assert abs(counts["semantic"] / 400 - 0.2) < 0.08
    assert len(make_training_samples(dataset, seed=0, samples_per_epoch=50)) == 50
    many = make_training_samples(dataset, {"textual": 1}, seed=0, samples_per_epoch=1000)
    assert len(many) == 1000 and set(many["task"][:]) == {"textual"}
    pairs = Counter(zip(many["query_row"][:], many["keypoint_index"][:], strict=True))
    assert set(pairs.values()) <= {2, 3}  # cycles through reshuffles: every pair 2-3 times


def test_pairs_that_cannot_be_visual_fall_back_or_are_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dataset = make_dataset({1: 1, 2: 3})  # category 1 has no possible support
    with caplog.at_level(logging.WARNING, logger="processing.episodes"):
        samples = make_training_samples(dataset, {"visual": 1, "semantic": 1}, seed=0)
    assert "category 1 ('category1') has a single instance" in caplog.text
    single_row = dataset["category_id"][:].index(1)
    tasks_of_single = {s["task"] for s in samples if s["query_row"] == single_row}
    assert tasks_of_single == {"semantic"}
    assert len(samples) == 4 * NUM_KEYPOINTS
    visual_only = make_training_samples(dataset, {"visual": 1}, seed=0)
    assert len(visual_only) == 3 * NUM_KEYPOINTS and single_row not in visual_only["query_row"][:]
    # 5-shot needs 6 instances: nothing in this dataset can be visual.
    assert len(make_training_samples(dataset, {"visual": 1}, num_shots=5, seed=0)) == 0


@pytest.mark.parametrize(
    ("mix", "message"),
    [
        ({"visual": 1.0, "texual": 0.5}, r"Unknown task\(s\) \['texual'\]"),
        ({"visual": -0.1, "textual": 1.0}, "must be non-negative"),
        ({"visual": 0.0, "textual": 0.0}, "must sum to a positive number"),
        ({}, "must sum to a positive number"),
        ({"visual": float("nan")}, "must be a finite number"),
        ({"visual": "0.5"}, "must be a finite number"),
    ],
)
def test_task_mix_is_validated(mix: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_task_mix(mix)
    with pytest.raises(ValueError, match=message):
        make_training_samples(make_dataset({1: 3}), mix)


def test_validate_task_mix_normalises() -> None:
    assert validate_task_mix({"visual": 3, "semantic": 1, "textual": 0}) == {
        "visual": 0.75,
        "semantic": 0.25,
    }


@pytest.mark.parametrize("num_shots", [1, 3])
def test_instance_grouped_samples_keep_an_instance_together_with_one_support_draw(num_shots: int) -> None:
    hidden = {1000 + i: [0] for i in range(2, 8)} | {2001: [1, 2]}
    dataset = make_dataset({1: 8, 2: 7}, hidden)
    categories = dataset["category_id"][:]
    visible = dataset["visible"][:]
    samples = make_training_samples(dataset, DEFAULT_TASK_MIX, num_shots=num_shots, seed=3, group_by_instance=True)
    # every visible (instance, keypoint) pair once per epoch, as without grouping
    expected = {(row, k) for row, flags in enumerate(visible) for k, flag in enumerate(flags) if flag}
    pairs = list(zip(samples["query_row"][:], samples["keypoint_index"][:], strict=True))
    assert len(pairs) == len(expected) and set(pairs) == expected
    # one contiguous run per instance, sharing one support draw
    runs = [row for i, row in enumerate(samples["query_row"][:]) if i == 0 or samples["query_row"][i - 1] != row]
    assert len(runs) == len(set(runs)) == len(dataset)
    draws: dict[int, set[tuple[int, ...]]] = {}
    for sample in samples:
        query, supports, k = sample["query_row"], sample["support_rows"], sample["keypoint_index"]
        if "visual" not in sample["task"]:
            assert supports == []
            continue
        draws.setdefault(query, set()).add(tuple(supports))
        assert len(supports) == len(set(supports)) == num_shots and query not in supports
        assert {categories[r] for r in supports} == {categories[query]}
        assert any(visible[r][k] for r in supports)  # visual only where a support shows the keypoint
    assert all(len(draw) == 1 for draw in draws.values())
    assert set(samples["task"][:]) == set(DEFAULT_TASK_MIX)
    # deterministic, and samples_per_epoch cycles through reshuffled instances
    again = make_training_samples(dataset, DEFAULT_TASK_MIX, num_shots=num_shots, seed=3, group_by_instance=True)
    assert again.to_dict() == samples.to_dict()
    longer = make_training_samples(dataset, DEFAULT_TASK_MIX, num_shots=num_shots, seed=3, group_by_instance=True,
                                   samples_per_epoch=2 * len(samples) + 5)
    assert len(longer) == 2 * len(samples) + 5


def test_instance_grouped_samples_without_a_fallback_task_drop_unshown_keypoints() -> None:
    dataset = make_dataset({1: 2}, {1001: [0]})  # keypoint 0 of 1000 is shown by no other instance
    samples = make_training_samples(dataset, {"visual": 1.0}, seed=0, group_by_instance=True)
    assert (0, 0) not in set(zip(samples["query_row"][:], samples["keypoint_index"][:]))
    assert set(samples["task"][:]) == {"visual"}
    # a pass that can make no sample ends instead of looping forever
    single = make_dataset({1: 1})
    assert len(make_training_samples(single, {"visual": 1.0}, seed=0, group_by_instance=True, samples_per_epoch=10)) == 0


def test_cape_episodes_are_drawn_as_the_official_code_draws_them(caplog: pytest.LogCaptureFixture) -> None:
    """`random.seed(1)`, then per category (file order) and episode `random.sample(instances, shots + queries)`
    over the category's instances listed by image (file order), then annotation."""
    dataset = make_dataset({7: 9, 2: 12, 5: 3})
    # the images listed in the file in reverse id order; categories 7 before 2; 5 is too small for 1 + 4
    image_order = sorted(dataset["image_id"][:], reverse=True)
    with caplog.at_level(logging.WARNING, logger="processing.episodes"):
        episodes = sample_cape_episodes(dataset, 1, 4, 3, category_order=[7, 2, 5], image_order=image_order)
    assert "category 5 ('category5') has 3 instance(s); an episode draws 5" in caplog.text
    random.seed(1)
    expected = []
    for category in (7, 2):
        instances = sorted((row for row, c in enumerate(dataset["category_id"]) if c == category),
                           key=lambda row: image_order.index(dataset[row]["image_id"]))
        for _ in range(3):
            expected.append(random.sample(instances, 5))
    assert [[*e.support_rows, *e.query_rows] for e in episodes] == expected
    first = episodes[0]
    assert isinstance(first, CapeEpisode) and first.num_shots == 1 and len(first.query_rows) == 4
    pairs = first.pairs()
    assert all(p.support_rows == first.support_rows and p.category_id == 7 for p in pairs)  # the queries share it
    assert [p.query_annotation_id for p in pairs] == list(first.query_annotation_ids)
    # without the file's orders: categories and images by id
    by_id = sample_cape_episodes(dataset, 2, 3, 1)
    assert [e.category_id for e in by_id] == [2, 7]
    with pytest.raises(ValueError, match="every category is too small"):
        sample_cape_episodes(dataset, 5, 15, 1)


def test_coco_file_order_reads_categories_and_images_as_listed(tmp_path: Path) -> None:
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"categories": [{"id": 9}, {"id": 3}], "images": [{"id": 4}, {"id": 1}], "annotations": []}))
    assert coco_file_order(path) == ([9, 3], [4, 1])
