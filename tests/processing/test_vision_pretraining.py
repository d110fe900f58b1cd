"""Stage 0 (keypoint naming before KptLLM training): jittered crops, padding, shared modules, Trainer run."""

import copy

import pytest
import torch

from processing.coco import load_mp100
from processing.vision_pretraining import (
    KeypointNamingDataset,
    KeypointNamingModel,
    collate_keypoint_naming,
    pretrain_vision_modules,
)
from train import keypoint_vocabulary


@pytest.fixture(scope="module")
def instances(small_benchmark):
    return load_mp100(small_benchmark, 1, "train")


def _name_ids(instances) -> dict[str, int]:
    return {name: i for i, name in enumerate(keypoint_vocabulary(instances))}


def test_items_hold_the_visible_keypoints_inside_a_fresh_jittered_crop(instances, tiny):
    _, processor = tiny
    name_ids = _name_ids(instances)
    dataset = KeypointNamingDataset(instances, processor, name_ids, jitter=0.15, seed=0)
    size = processor.image_size
    row = instances[0]
    first, second = dataset[0], dataset[0]
    for item in (first, second):
        assert item["pixel_values"].shape == (3, size, size)
        assert ((item["keypoint_coords"] >= 0) & (item["keypoint_coords"] <= 1)).all()
        visible_names = {name_ids[n] for n, v in zip(row["keypoint_names"], row["visible"]) if v}
        assert set(item["labels"].tolist()) <= visible_names and len(item["labels"]) == len(item["keypoint_coords"])
    assert not torch.equal(first["keypoint_coords"], second["keypoint_coords"])  # a new jitter per draw
    # without jitter the crop is the processor's own and every visible keypoint is kept
    still = KeypointNamingDataset(instances, processor, name_ids, jitter=0.0)[0]
    assert len(still["labels"]) == sum(1 for v in row["visible"] if v)


def test_bad_arguments_are_named(instances, tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match="jitter"):
        KeypointNamingDataset(instances, processor, _name_ids(instances), jitter=1.5)
    with pytest.raises(ValueError, match="keypoint names without an id"):
        KeypointNamingDataset(instances, processor, {"nose": 0})
    model, _ = tiny
    with pytest.raises(ValueError, match="steps"):
        pretrain_vision_modules(model, processor, instances, keypoint_vocabulary(instances), "unused", steps=0)


def test_collate_pads_keypoints_with_ignored_labels():
    features = [
        {"pixel_values": torch.zeros(3, 4, 4), "keypoint_coords": torch.rand(3, 2), "labels": torch.tensor([1, 2, 3])},
        {"pixel_values": torch.ones(3, 4, 4), "keypoint_coords": torch.rand(1, 2), "labels": torch.tensor([4])},
    ]
    batch = collate_keypoint_naming(features)
    assert batch["pixel_values"].shape == (2, 3, 4, 4)
    assert batch["keypoint_coords"].shape == (2, 3, 2)
    assert batch["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]


def test_a_batch_without_keypoints_gives_a_zero_loss_not_nan(tiny):
    model = copy.deepcopy(tiny[0])  # backward below must not leave gradients on the shared fixture
    size = model.config.vision_config.image_size
    naming = KeypointNamingModel(model, num_names=5)
    empty = collate_keypoint_naming([{"pixel_values": torch.zeros(3, size, size), "keypoint_coords": torch.zeros(0, 2),
                                      "labels": torch.zeros(0, dtype=torch.long)}])
    loss = naming(**empty)["loss"]
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph, so the Trainer's backward works


@pytest.mark.parametrize("extractor", ["cross_attention", "avg_pool"])
def test_stage0_trains_the_kptllm_modules_in_place_and_leaves_the_llm_alone(instances, tiny, tmp_path, extractor):
    from processing.builders import build_tiny_model

    model, processor = build_tiny_model(keypoint_vocabulary(instances), seed=0, prompt_feature_extractor=extractor)
    naming = KeypointNamingModel(model, num_names=len(_name_ids(instances)))
    assert naming.vision_tower is model.vision_tower  # shared, so stage 0 trains KptLLM's own tower
    before = copy.deepcopy(model.state_dict())
    log = pretrain_vision_modules(model, processor, instances, keypoint_vocabulary(instances), tmp_path, steps=12, batch_size=8, use_cpu=True)
    losses = [entry["loss"] for entry in log if "loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    after = model.state_dict()
    changed = {name.split(".")[0] for name in after if not torch.equal(after[name], before[name])}
    expected = {"vision_tower"} | ({"prompt_encoder", "prompt_feature_extractor"} if extractor == "cross_attention" else set())
    assert changed == expected
    assert not list((tmp_path / "vision_pretraining").glob("checkpoint-*"))  # nothing to resume: no checkpoints
