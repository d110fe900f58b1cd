"""Training dataset + collator: processor features for all tasks, padded batches, HF Trainer."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from processing.coco import load_mp100
from processing.collator import KeypointTrainingDataset, KptLlmDataCollator
from processing.episodes import make_training_samples

MIX = {"visual": 0.4, "textual": 0.2, "semantic": 0.2, "visual+textual": 0.2}


@pytest.fixture(scope="module")
def training_set(small_benchmark):
    instances = load_mp100(small_benchmark, 1, "train")
    samples = make_training_samples(instances, MIX, num_shots=1, seed=0)
    return instances, samples


def _dataset(training_set, tiny, **kwargs):
    _, processor = tiny
    instances, samples = training_set
    return KeypointTrainingDataset(instances, samples, processor, **kwargs)


def _features_per_task(dataset) -> dict[str, dict]:
    found = {}
    for index in range(len(dataset)):
        task = dataset.samples[index]["task"]
        if task not in found:
            found[task] = dataset[index]
        if len(found) == 4:
            return found
    raise AssertionError(f"the sample mix lacks tasks: {sorted(found)}")


def test_dataset_items_follow_their_task(training_set, tiny):
    model, processor = tiny
    features = _features_per_task(_dataset(training_set, tiny))
    kpt_prompt, keypoint = model.config.kpt_prompt_token_id, model.config.keypoint_token_id
    for task, feature in features.items():
        ids = feature["input_ids"][0]
        assert int((ids == kpt_prompt).sum()) == (0 if task == "textual" else 1), task
        assert int((ids == keypoint).sum()) == (0 if task == "semantic" else 1), task
        assert ("keypoint_labels" in feature) == (task != "semantic"), task
        answer = processor.tokenizer.decode(feature["labels"][0][feature["labels"][0] != -100])
        assert answer.startswith(" This is the" if task == "semantic" else " It is the"), (task, answer)


def test_collated_mixed_batch_trains_the_model(training_set, tiny):
    model, processor = tiny
    features = list(_features_per_task(_dataset(training_set, tiny)).values())
    batch = KptLlmDataCollator(pad_token_id=processor.tokenizer.pad_token_id)(features)
    lengths = [f["input_ids"].shape[1] for f in features]
    assert batch["input_ids"].shape == (4, max(lengths))
    for row, length in enumerate(lengths):  # right padding, masked and ignored
        assert (batch["attention_mask"][row, :length] == 1).all() and (batch["attention_mask"][row, length:] == 0).all()
        assert (batch["labels"][row, length:] == -100).all()
    assert batch["pixel_values"].shape[0] == 4
    prompted = sum("prompt_coords" in f for f in features)
    assert batch["support_pixel_values"].shape[0] == prompted == batch["prompt_coords"].shape[0] == 3
    assert batch["keypoint_labels"].shape == (4, 2)
    semantic_rows = [i for i, f in enumerate(features) if "keypoint_labels" not in f]
    assert batch["keypoint_visible"][semantic_rows].tolist() == [0]
    out = model(**batch)
    assert torch.isfinite(out.loss) and torch.isfinite(out.keypoint_loss)


def test_collator_rejects_mixed_shot_counts(tiny):
    _, processor = tiny
    one = {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long),
           "pixel_values": torch.zeros(1, 3, 32, 32), "support_pixel_values": torch.zeros(1, 3, 32, 32),
           "prompt_coords": torch.zeros(1, 1, 2), "prompt_visible": torch.ones(1, 1, dtype=torch.long)}
    five = dict(one, support_pixel_values=torch.zeros(5, 3, 32, 32), prompt_coords=torch.zeros(1, 5, 2),
                prompt_visible=torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"different numbers of support shots \[1, 5\]"):
        KptLlmDataCollator(pad_token_id=0)([one, five])
    with pytest.raises(ValueError, match="holds 2 sequences"):
        KptLlmDataCollator(pad_token_id=0)([dict(one, input_ids=torch.ones(2, 3, dtype=torch.long))])


def test_hf_trainer_runs_on_the_collated_dataset(training_set, tiny, tmp_path):
    import copy

    model, processor = tiny
    model = copy.deepcopy(model).train()
    before = model.keypoint_head.mlp[0].weight.detach().clone()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
        remove_unused_columns=False, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(training_set, tiny),
                      data_collator=KptLlmDataCollator(pad_token_id=processor.tokenizer.pad_token_id))
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, model.keypoint_head.mlp[0].weight)


def test_distinct_images_keep_first_seen_order():
    from processing.collator import distinct_images

    a, b, c = torch.zeros(3, 2, 2), torch.ones(3, 2, 2), torch.full((3, 2, 2), 2.0)
    distinct, index = distinct_images(torch.stack([b, b, a, b, c, a]))
    assert torch.equal(distinct, torch.stack([b, a, c])) and index.tolist() == [0, 0, 1, 0, 2, 1]


def test_collator_keeps_each_distinct_crop_once():
    pixels = {name: torch.full((1, 3, 4, 4), float(i)) for i, name in enumerate("abc")}

    def row(query, support=None):
        feature = {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long),
                   "pixel_values": pixels[query].clone()}
        if support is not None:
            feature.update(support_pixel_values=pixels[support].clone(), prompt_coords=torch.zeros(1, 1, 2),
                           prompt_visible=torch.ones(1, 1, dtype=torch.long))
        return feature

    # two instances' rows (a with support b, b with support c) and a textual row of a
    features = [row("a", "b"), row("a", "b"), row("a"), row("b", "c"), row("b", "c")]
    batch = KptLlmDataCollator(pad_token_id=0)(features)
    assert torch.equal(batch["pixel_values"], torch.cat([pixels["a"], pixels["b"]]))
    assert batch["query_index"].tolist() == [0, 0, 0, 1, 1]
    assert torch.equal(batch["support_pixel_values"], torch.cat([pixels["b"], pixels["c"]]))
    assert batch["support_index"].tolist() == [[0], [0], [1], [1]]  # one row per prompt, one column per shot
    per_row = KptLlmDataCollator(pad_token_id=0, dedupe_crops=False)(features)
    assert per_row["pixel_values"].shape[0] == 5 and per_row["support_pixel_values"].shape[0] == 4
    assert "query_index" not in per_row and "support_index" not in per_row
    # the indices rebuild the per-row layout
    assert torch.equal(batch["pixel_values"][batch["query_index"]], per_row["pixel_values"])
    assert torch.equal(batch["support_pixel_values"][batch["support_index"].view(-1)], per_row["support_pixel_values"])
