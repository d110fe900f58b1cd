"""Stage 0 (keypoint naming and matching before KptLLM training): jittered pairs, padding, targets, shared modules."""

import copy

import pytest
import torch

from modeling_kptllm.modeling_kptllm import patch_centers
from processing.coco import load_mp100
from processing.vision_pretraining import (
    FirstLayerMatch,
    KeypointPairDataset,
    VisionPretrainingModel,
    attention_match_loss,
    collate_keypoint_pairs,
    patch_targets,
    pretrain_vision_modules,
    prompt_distance,
    prompt_to_patch_cosine,
    sharpen_first_layer_match,
)
from train import keypoint_vocabulary


@pytest.fixture(scope="module")
def instances(small_benchmark):
    return load_mp100(small_benchmark, 1, "train")


def _name_ids(instances) -> dict[str, int]:
    return {name: i for i, name in enumerate(keypoint_vocabulary(instances))}


def test_items_pair_two_instances_of_one_category_in_fresh_jittered_crops(instances, tiny):
    _, processor = tiny
    name_ids = _name_ids(instances)
    dataset = KeypointPairDataset(instances, processor, name_ids, jitter=0.15, seed=0)
    size = processor.image_size
    row = instances[0]
    names = [name_ids[n] for n in row["keypoint_names"]]
    first, second = dataset[0], dataset[0]
    for item in (first, second):
        for prefix in ("", "query_"):
            assert item[f"{prefix}pixel_values"].shape == (3, size, size)
            assert ((item[f"{prefix}keypoint_coords"] >= 0) & (item[f"{prefix}keypoint_coords"] <= 1)).all()
            kept = item[f"{prefix}labels"] != -100
            assert item[f"{prefix}labels"][kept].tolist() == [n for n, k in zip(names, kept) if k]
        support_visible = torch.tensor(row["visible"]) > 0
        assert not (kept := item["labels"] != -100)[~support_visible].any() and kept.any()
        assert not torch.equal(item["pixel_values"], item["query_pixel_values"])  # another instance
    assert not torch.equal(first["keypoint_coords"], second["keypoint_coords"])  # a new jitter per draw
    # without jitter the support crop is the processor's own and every visible keypoint is kept
    still = KeypointPairDataset(instances, processor, name_ids, jitter=0.0)[0]
    assert (still["labels"] != -100).tolist() == [bool(v) for v in row["visible"]]


def test_a_category_with_one_instance_pairs_it_with_another_jitter_of_itself(instances, tiny):
    _, processor = tiny
    alone = instances.select([0])
    item = KeypointPairDataset(alone, processor, _name_ids(instances), jitter=0.15)[0]
    assert not torch.equal(item["keypoint_coords"], item["query_keypoint_coords"])
    assert item["labels"].shape == item["query_labels"].shape


def test_bad_arguments_are_named(instances, tiny):
    _, processor = tiny
    with pytest.raises(ValueError, match="jitter"):
        KeypointPairDataset(instances, processor, _name_ids(instances), jitter=1.5)
    with pytest.raises(ValueError, match="keypoint names without an id"):
        KeypointPairDataset(instances, processor, {"nose": 0})
    model, _ = tiny
    with pytest.raises(ValueError, match="steps"):
        pretrain_vision_modules(model, processor, instances, keypoint_vocabulary(instances), "unused", steps=0)


def test_collate_pads_keypoints_of_both_crops_with_ignored_labels():
    def item(count: int, fill: float) -> dict[str, torch.Tensor]:
        labels = torch.arange(1, count + 1)
        return {"pixel_values": torch.full((3, 4, 4), fill), "keypoint_coords": torch.rand(count, 2), "labels": labels,
                "query_pixel_values": torch.full((3, 4, 4), -fill), "query_keypoint_coords": torch.rand(count, 2),
                "query_labels": labels.masked_fill(labels == 1, -100)}

    batch = collate_keypoint_pairs([item(3, 1.0), item(1, 2.0)])
    assert batch["pixel_values"].shape == batch["query_pixel_values"].shape == (2, 3, 4, 4)
    assert batch["keypoint_coords"].shape == batch["query_keypoint_coords"].shape == (2, 3, 2)
    assert batch["labels"].tolist() == [[1, 2, 3], [1, -100, -100]]
    assert batch["query_labels"].tolist() == [[-100, 2, 3], [-100, -100, -100]]


def test_patch_targets_weigh_the_nearest_patches_bilinearly():
    grid = 4
    centers = patch_centers(grid, "cpu")
    on_a_center = patch_targets(centers[5:6], grid)[0]
    assert on_a_center[5] == pytest.approx(1.0) and on_a_center.sum() == pytest.approx(1.0)
    halfway = patch_targets(((centers[5] + centers[6]) / 2)[None], grid)[0]
    assert halfway[5] == pytest.approx(0.5) and halfway[6] == pytest.approx(0.5)
    corner = patch_targets(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), grid)
    assert corner[0, 0] == pytest.approx(1.0) and corner[1, -1] == pytest.approx(1.0)  # beyond the outer centres


def test_the_matching_loss_prefers_the_true_correspondence(tiny):
    """With the query crop the support crop itself, the true keypoint has a lower loss than a wrong one."""
    model = copy.deepcopy(tiny[0])
    size = model.config.vision_config.image_size
    pretraining = VisionPretrainingModel(model, num_names=3, position_weight=0.0)
    torch.nn.init.zeros_(pretraining.classifier.weight)  # naming adds the same log(3) to both
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, size, size, generator=generator) * 4 - 2
    prompt = torch.tensor([[[0.3, 0.6]]])
    with torch.no_grad():
        pretraining.prompt_projector.load_state_dict(pretraining.multi_modal_projector.state_dict())
        support_tokens = model.get_prompt_features(model.get_vision_features(pixels), prompt)  # (1, D_llm)
        query_tokens = model.get_image_features(pixels)[0]  # (h*w, D_llm)
    similarity = torch.nn.functional.cosine_similarity(support_tokens, query_tokens)
    best, worst = patch_centers(model.config.patch_grid_size, "cpu")[torch.stack([similarity.argmax(), similarity.argmin()])]

    def loss(query_point: torch.Tensor) -> float:
        batch = dict(pixel_values=pixels, keypoint_coords=prompt, labels=torch.tensor([[1]]), query_pixel_values=pixels,
                     query_keypoint_coords=query_point[None, None], query_labels=torch.tensor([[1]]))
        return pretraining(**batch)["loss"].item()

    assert loss(best) < loss(worst)


def test_a_batch_without_keypoints_gives_a_finite_loss_with_a_graph(tiny):
    model = copy.deepcopy(tiny[0])  # backward below must not leave gradients on the shared fixture
    size = model.config.vision_config.image_size
    pretraining = VisionPretrainingModel(model, num_names=5)
    empty = {"pixel_values": torch.zeros(3, size, size), "keypoint_coords": torch.zeros(0, 2),
             "labels": torch.zeros(0, dtype=torch.long)}
    empty |= {f"query_{key}": value for key, value in empty.items()}
    loss = pretraining(**collate_keypoint_pairs([empty]))["loss"]
    assert torch.isfinite(loss)  # only the position probe's term
    loss.backward()  # part of the graph, so the Trainer's backward works


@pytest.mark.parametrize("extractor", ["cross_attention", "avg_pool"])
def test_stage0_trains_the_modules_before_the_llm_in_place_and_leaves_the_llm_alone(instances, tmp_path, extractor):
    from processing.builders import build_tiny_model

    model, processor = build_tiny_model(keypoint_vocabulary(instances), seed=0, prompt_feature_extractor=extractor)
    pretraining = VisionPretrainingModel(model, num_names=len(_name_ids(instances)))
    assert pretraining.vision_tower is model.vision_tower  # shared, so stage 0 trains KptLLM's own tower
    before = copy.deepcopy(model.state_dict())
    log = pretrain_vision_modules(model, processor, instances, keypoint_vocabulary(instances), tmp_path, steps=12, batch_size=4, use_cpu=True)
    losses = [entry["loss"] for entry in log if "loss" in entry]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    after = model.state_dict()
    changed = {name.split(".")[0] for name in after if not torch.equal(after[name], before[name])}
    expected = {"vision_tower", "multi_modal_projector", "prompt_projector"}
    expected |= {"prompt_encoder", "prompt_feature_extractor"} if extractor == "cross_attention" else set()
    assert changed == expected
    assert not list((tmp_path / "vision_pretraining").glob("checkpoint-*"))  # nothing to resume: no checkpoints


def test_the_first_layer_match_is_the_llms_own_first_attention_from_the_prompt(tiny, images):
    """FirstLayerMatch scores z_p against z_q exactly as the LLM's first layer does in a real sequence
    (the real row also attends to text tokens, so the weights over the image tokens agree up to one factor)."""
    model, processor = copy.deepcopy(tiny[0]), tiny[1]
    model.set_attn_implementation("eager")
    for parameter in model.language_model.get_decoder().layers[0].parameters():  # not the identity-like init
        torch.nn.init.normal_(parameter, std=0.3)
    inputs = processor(query=images["query"], support=images["support"], kpts=[[10.0, 20.0], [30.0, 40.0]])
    config = model.config
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
        embeds = model.embed_multimodal_inputs(inputs["input_ids"], inputs["pixel_values"], inputs["support_pixel_values"],
                                               inputs["prompt_coords"], inputs.get("prompt_visible"))
        ids = inputs["input_ids"]
        is_image, prompt_column = ids[0] == config.image_token_id, (ids[0] == config.kpt_prompt_token_id).nonzero()[0, 0]
        match = FirstLayerMatch(model, prompt_distance(processor, config))
        rows = torch.arange(len(ids))  # one query crop per row here
        weights, _ = match.attend(embeds[:, prompt_column], embeds[:, is_image], rows)  # (K, heads, h*w+1)
    real = out.attentions[0][:, :, prompt_column]  # (K, heads, L)
    real_image = real[:, :, is_image]
    torch.testing.assert_close(real_image / real_image.sum(-1, keepdim=True),
                               weights[..., :-1] / weights[..., :-1].sum(-1, keepdim=True), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(real[:, :, prompt_column] / real_image.sum(-1),
                               weights[..., -1] / weights[..., :-1].sum(-1), rtol=1e-4, atol=1e-6)  # z_p's own key


def test_prompts_that_share_a_query_crop_are_scored_as_with_one_copy_of_the_crop_each(tiny):
    """FirstLayerMatch and the cosine read each crop's tokens once (rows name the crop of each prompt);
    the result is the one of copying the crop's tokens per prompt."""
    model = copy.deepcopy(tiny[0])
    for parameter in model.language_model.get_decoder().layers[0].parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    match = FirstLayerMatch(model, prompt_distance=3)
    width = model.config.text_config.hidden_size
    query_tokens, prompt_tokens = torch.randn(3, model.config.patch_grid_size**2, width), torch.randn(5, width)
    rows = torch.tensor([2, 0, 2, 1, 2])
    copies = torch.arange(5)
    with torch.no_grad():
        for grouped, copied in zip(match.attend(prompt_tokens, query_tokens, rows),
                                   match.attend(prompt_tokens, query_tokens[rows], copies), strict=True):
            torch.testing.assert_close(grouped, copied)
    torch.testing.assert_close(prompt_to_patch_cosine(prompt_tokens, query_tokens, rows),
                               prompt_to_patch_cosine(prompt_tokens, query_tokens[rows]))


def test_the_attention_match_loss_rewards_a_sharp_attention_on_the_target_over_a_spread_one():
    grid = 4
    centres = patch_centers(grid, "cpu")
    target = centres[5:6]  # (1, 2)
    sharp = torch.zeros(1, 1, grid * grid)
    sharp[0, 0, 5] = 1.0
    # most weight on the target, some on a far look-alike: the argmax is right, the weighted centre is not
    split = torch.zeros(1, 1, grid * grid)
    split[0, 0, 5], split[0, 0, 15] = 0.7, 0.3
    assert attention_match_loss(sharp, target, grid, centre_weight=0.0) < attention_match_loss(split, target, grid, 0.0)
    centre_term = attention_match_loss(split, target, grid, 1.0) - attention_match_loss(split, target, grid, 0.0)
    assert centre_term.item() == pytest.approx(0.3 * (centres[15] - centres[5]).abs().sum().item(), rel=1e-5)
    assert attention_match_loss(sharp, target, grid, 5.0) - attention_match_loss(sharp, target, grid, 0.0) == pytest.approx(0.0, abs=1e-6)


def test_stage0_with_the_first_layer_match_trains_that_layer_and_no_other_llm_weight(instances, tmp_path):
    from processing.builders import build_tiny_model

    model, processor = build_tiny_model(keypoint_vocabulary(instances), seed=0)
    before = copy.deepcopy(model.state_dict())
    pretrain_vision_modules(model, processor, instances, keypoint_vocabulary(instances), tmp_path, steps=6,
                            batch_size=4, use_cpu=True, match_first_llm_layer=True)
    after = model.state_dict()
    changed_llm = {name for name in after if name.startswith("language_model") and not torch.equal(after[name], before[name])}
    first_layer = "language_model.model.layers.0."
    assert changed_llm and all(name.startswith(first_layer) for name in changed_llm)
    assert {first_layer + f"self_attn.{p}_proj.weight" for p in "qkvo"} <= changed_llm


def test_sharpening_the_first_layer_match_multiplies_its_scores(tiny):
    model = copy.deepcopy(tiny[0])
    for parameter in model.language_model.get_decoder().layers[0].parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    match = FirstLayerMatch(model, prompt_distance=3)
    width = model.config.text_config.hidden_size
    query_tokens, prompt_tokens, rows = torch.randn(2, model.config.patch_grid_size**2, width), torch.randn(3, width), torch.tensor([0, 1, 1])
    with torch.no_grad():
        soft, _ = match.attend(prompt_tokens, query_tokens, rows)
        asked, _ = match.attend(prompt_tokens, query_tokens, rows, sharpness=4.0)
        match.sharpen(4.0)
        sharpened, _ = match.attend(prompt_tokens, query_tokens, rows)
    torch.testing.assert_close(sharpened, asked)
    assert (sharpened.amax(-1) > soft.amax(-1)).all()  # the same match, more weight on its peak
    assert torch.equal(sharpened.argmax(-1), soft.argmax(-1))


def test_stage0_sharpens_the_first_layer_match_to_its_best_factor_on_training_pairs(instances, tiny, monkeypatch):
    import processing.vision_pretraining as vision_pretraining

    model, processor = copy.deepcopy(tiny[0]), tiny[1]
    name_ids = _name_ids(instances)
    pretraining_model = VisionPretrainingModel(model, len(name_ids), prompt_distance=prompt_distance(processor, model.config))
    rates = {1.0: 0.5, 2.0: 0.7, 4.0: 0.7}  # a tie: the smaller factor
    asked = {}

    def hit_rates(self, batches, sharpness, radius):
        asked.update(batches=list(batches), sharpness=tuple(sharpness), radius=radius)
        return {factor: rates[factor] for factor in sharpness}

    monkeypatch.setattr(vision_pretraining.VisionPretrainingModel, "match_hit_rates", hit_rates)
    monkeypatch.setattr(vision_pretraining, "SHARPNESS_CANDIDATES", tuple(rates))
    q_proj = model.language_model.get_decoder().layers[0].self_attn.q_proj.weight
    before = q_proj.detach().clone()
    assert sharpen_first_layer_match(pretraining_model, instances, processor, name_ids, 4, 0.15, seed=0) == 2.0
    torch.testing.assert_close(q_proj.detach(), 2 * before)
    assert asked["radius"] == pytest.approx(0.2 / processor.crop_padding)
    assert asked["batches"] and all(len(batch["pixel_values"]) <= 4 for batch in asked["batches"])

    # no keypoint in both crops of any fitting pair: the match stays as trained
    monkeypatch.setattr(vision_pretraining.VisionPretrainingModel, "match_hit_rates", lambda self, batches, sharpness, radius: {})
    assert sharpen_first_layer_match(pretraining_model, instances, processor, name_ids, 4, 0.15, seed=0) == 1.0
    torch.testing.assert_close(q_proj.detach(), 2 * before)


def test_the_match_hit_rate_counts_attention_centres_near_the_target(instances, tiny):
    model, processor = copy.deepcopy(tiny[0]), tiny[1]
    name_ids = _name_ids(instances)
    pretraining_model = VisionPretrainingModel(model, len(name_ids), prompt_distance=prompt_distance(processor, model.config))
    batch = collate_keypoint_pairs([KeypointPairDataset(instances, processor, name_ids, seed=0)[i] for i in range(4)])
    rates = pretraining_model.match_hit_rates([batch], (1.0, 8.0), radius=2.0)  # every point lies within 2
    assert rates == {1.0: 1.0, 8.0: 1.0}
    assert set(pretraining_model.match_hit_rates([batch], (1.0,), radius=0.0).values()) == {0.0}
