"""KptLlmForKeypointComprehension: shapes, losses, gradients, placeholder checks, decoding."""

import copy

import pytest
import torch
import torch.nn.functional as F

from modeling_kptllm import KptLlmForKeypointComprehension
from modeling_kptllm.modeling_kptllm import average_pool_around, sine_cosine_embedding
from processing.builders import template_corpus, tiny_config, train_byte_level_tokenizer
from processing.collator import KptLlmDataCollator

from tests.helpers import KEYPOINT_NAMES, random_image

SUPPORT_KPTS = [[10.0, 12.0], [30.0, 40.0], [45.0, 60.0]]
QUERY_KPTS = [[5.0, 5.0], [40.0, 30.0], [70.0, 50.0]]
NAMES = ["left eye", "nose", "tail tip"]


def visual_batch(processor, images, query_visible=(1, 1, 0), **kwargs):
    return processor(
        query=images["query"],
        support=images["support"],
        kpts=SUPPORT_KPTS,
        task="visual",
        kpt_names=NAMES,
        query_kpts=QUERY_KPTS,
        query_visible=list(query_visible),
        return_labels=True,
        **kwargs,
    )


def test_forward_shapes(tiny, images):
    model, processor = tiny
    batch = visual_batch(processor, images)
    out = model(**batch)
    num_rows, length = batch["input_ids"].shape
    assert out.logits.shape == (num_rows, length, model.config.text_config.vocab_size)
    assert out.pred_keypoints.shape == (num_rows, 2)
    assert ((out.pred_keypoints >= 0) & (out.pred_keypoints <= 1)).all()
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def test_loss_is_lm_plus_weighted_l1_on_answers_and_visible_keypoints(tiny, images):
    model, processor = tiny
    batch = visual_batch(processor, images)
    out = model(**batch)

    labels = batch["labels"]
    answer_positions = labels[:, 1:] != -100
    assert answer_positions.any(-1).all()
    # the prompt (system text, placeholders, question) is never a target
    prompt_ids = batch["input_ids"][:, :-answer_positions.sum(-1).max()]
    assert not torch.isin(prompt_ids, labels[labels != -100]).all()
    manual_lm = F.cross_entropy(out.logits[:, :-1][answer_positions], labels[:, 1:][answer_positions])
    torch.testing.assert_close(out.lm_loss, manual_lm)

    visible = batch["keypoint_visible"].bool()
    manual_l1 = (out.pred_keypoints[visible] - batch["keypoint_labels"][visible]).abs().mean()
    torch.testing.assert_close(out.keypoint_loss, manual_l1)
    torch.testing.assert_close(out.loss, manual_lm + 2.0 * manual_l1)

    # an invisible keypoint's target has no influence on the loss
    moved = dict(batch, keypoint_labels=batch["keypoint_labels"].clone())
    moved["keypoint_labels"][2] = torch.tensor([0.9, 0.1])
    torch.testing.assert_close(model(**moved).loss, out.loss)


def test_gradients_reach_every_trainable_module(images):
    from processing.builders import build_tiny_model

    model, processor = build_tiny_model(KEYPOINT_NAMES, seed=1)
    batch = visual_batch(processor, images)
    model(**batch).loss.backward()
    # a random tower feeds its last layer to the projector (LLaVA-1.5's CLIP: -2), so only the pooled
    # output's norm takes no part
    assert model.config.vision_feature_layer == -1
    missing = [
        name
        for name, param in model.named_parameters()
        if not name.startswith("vision_tower.post_layernorm") and (param.grad is None or param.grad.abs().sum() == 0)
    ]
    assert missing == []
    for module in ("multi_modal_projector", "prompt_encoder", "prompt_feature_extractor", "prompt_projector", "keypoint_head"):
        assert any(n.startswith(module) for n, _ in model.named_parameters())
    # the new special tokens' embeddings learn too (rows of <keypoint> and the placeholders' neighbours)
    embedding_grad = model.get_input_embeddings().weight.grad
    assert embedding_grad[model.config.keypoint_token_id].abs().sum() > 0


def test_image_placeholder_count_check(tiny, images):
    model, processor = tiny
    batch = visual_batch(processor, images)
    broken = dict(batch, input_ids=batch["input_ids"].clone())
    row = broken["input_ids"][0]
    row[row == model.config.image_token_id] = processor.tokenizer.pad_token_id  # drop one row's image tokens
    with pytest.raises(ValueError, match="Image features and Image placeholder tokens do not match"):
        model(**broken)
    two_images = dict(batch, pixel_values=batch["pixel_values"].repeat(2, 1, 1, 1))
    with pytest.raises(ValueError, match="Image features and Image placeholder tokens do not match"):
        model(**two_images)


def test_prompt_placeholder_count_check(tiny, images):
    model, processor = tiny
    batch = visual_batch(processor, images)
    fewer_prompts = dict(batch, prompt_coords=batch["prompt_coords"][:2], prompt_visible=batch["prompt_visible"][:2])
    with pytest.raises(ValueError, match="Keypoint prompt features and Keypoint prompt placeholder tokens do not match"):
        model(**fewer_prompts)
    no_support = {k: v for k, v in batch.items() if k not in ("support_pixel_values", "prompt_coords", "prompt_visible")}
    with pytest.raises(ValueError, match="no support_pixel_values"):
        model(**no_support)
    with pytest.raises(ValueError, match="support images do not fit"):
        model(**dict(batch, support_pixel_values=batch["support_pixel_values"].repeat(2, 1, 1, 1)))
    with pytest.raises(ValueError, match="given together"):
        model(**{k: v for k, v in batch.items() if k != "prompt_coords"})


def test_bad_tensors_are_named(tiny, images):
    model, processor = tiny
    batch = visual_batch(processor, images)
    nan_pixels = dict(batch, pixel_values=batch["pixel_values"].clone())
    nan_pixels["pixel_values"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(**nan_pixels)
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model(**dict(batch, pixel_values=batch["pixel_values"][:, :, :16]))
    with pytest.raises(ValueError, match=r"normalized to \[0, 1\]"):
        model(**dict(batch, prompt_coords=batch["prompt_coords"] + 2))
    with pytest.raises(ValueError, match="keypoint_labels must have shape"):
        model(**dict(batch, keypoint_labels=batch["keypoint_labels"][:2]))


def test_shared_query_crop_equals_repeated_crops(tiny, images):
    model, processor = tiny
    batch = visual_batch(processor, images)
    shared = model(**batch)
    repeated = model(**dict(batch, pixel_values=batch["pixel_values"].repeat(3, 1, 1, 1)))
    torch.testing.assert_close(shared.logits, repeated.logits)
    per_prompt_support = dict(batch, support_pixel_values=batch["support_pixel_values"].repeat(3, 1, 1, 1))
    torch.testing.assert_close(model(**per_prompt_support).logits, shared.logits)


def training_rows(processor, images, tasks=("visual", "textual", "visual")):
    """A training batch as KptLlmDataCollator builds it: two query crops, one row per task each (visual
    and textual rows differ in length: right padding)."""
    features = []
    for query in ("query", "support"):
        for k, task in enumerate(tasks):
            kwargs = dict(query=images[query], task=task, kpt_names=[NAMES[k]], query_kpts=[SUPPORT_KPTS[k]],
                          query_visible=[1], return_labels=True)
            if task == "visual":
                kwargs.update(support=images["support2"], kpts=[SUPPORT_KPTS[k]])
            features.append(dict(processor(**kwargs)))
    return KptLlmDataCollator(pad_token_id=processor.tokenizer.pad_token_id)(features)


def loss_and_gradients(model, batch, share_prefix):
    model.zero_grad()
    out = model(**batch, output_attentions=True, share_prefix=share_prefix)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_shared_prefix_training_equals_the_full_rows(tiny, images):
    model = copy.deepcopy(tiny[0]).train()
    model.set_attn_implementation("eager")
    batch = training_rows(tiny[1], images)
    assert batch["attention_mask"].eq(0).any()  # right padding: the rows differ in length
    full, full_grads = loss_and_gradients(model, batch, share_prefix=False)
    shared, shared_grads = loss_and_gradients(model, batch, share_prefix=True)

    prefix = int((batch["input_ids"][0] == model.config.image_token_id).nonzero().max()) + 1
    assert full.shared_prefix_length is None and shared.shared_prefix_length == prefix
    for key in ("loss", "lm_loss", "keypoint_loss"):
        torch.testing.assert_close(shared[key], full[key])
    torch.testing.assert_close(shared.pred_keypoints, full.pred_keypoints, equal_nan=True)
    torch.testing.assert_close(shared.logits, full.logits[:, prefix:], atol=1e-5, rtol=1e-4)
    for layer_shared, layer_full in zip(shared.attentions, full.attentions, strict=True):
        torch.testing.assert_close(layer_shared, layer_full[:, :, prefix:], atol=1e-6, rtol=1e-4)
    assert shared_grads.keys() == full_grads.keys() and any("vision_tower" in name for name in full_grads)
    for name, gradient in full_grads.items():
        torch.testing.assert_close(shared_grads[name], gradient, atol=1e-6, rtol=1e-4, msg=name)


def test_shared_prefix_needs_rows_that_share_a_query_crop(tiny, images):
    model, processor = tiny
    batch = training_rows(processor, images, tasks=("visual",))  # one row per crop: nothing to share
    out = model(**batch, share_prefix=True)
    assert out.shared_prefix_length is None
    assert out.logits.shape[1] == batch["input_ids"].shape[1]


def test_invisible_support_shots_do_not_affect_the_prompt(tiny, images):
    model, processor = tiny
    kwargs = dict(query=images["query"], task="visual", kpt_names=NAMES)
    two_shots = processor(
        support=[images["support"], images["support2"]],
        kpts=[SUPPORT_KPTS, [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]],
        support_visible=[[1, 1, 1], [0, 0, 0]],
        **kwargs,
    )
    one_shot = processor(support=images["support"], kpts=SUPPORT_KPTS, **kwargs)
    assert two_shots["prompt_coords"].shape == (3, 2, 2)
    torch.testing.assert_close(model(**two_shots).logits, model(**one_shot).logits)


@pytest.mark.parametrize("overrides", [{"prompt_feature_extractor": "avg_pool"}, {"shot_fusion": "per_shot"}, {"projector_type": "linear"}])
def test_ablation_variants_train(tiny, images, overrides):
    _, processor = tiny
    config = tiny_config(processor.tokenizer, **overrides)
    model = KptLlmForKeypointComprehension(config)
    if overrides.get("prompt_feature_extractor") == "avg_pool":
        assert model.prompt_encoder is None and model.prompt_feature_extractor is None
    batch_kwargs = dict(
        query=images["query"],
        support=[images["support"], images["support2"]],
        kpts=[SUPPORT_KPTS, [[5.0, 5.0], [20.0, 20.0], [60.0, 60.0]]],
        task="visual",
        kpt_names=NAMES,
        query_kpts=QUERY_KPTS,
        return_labels=True,
    )
    batch = processor(**batch_kwargs)
    if overrides.get("shot_fusion") == "per_shot":  # a processor for "mean" writes one <kpt_prompt> only
        with pytest.raises(ValueError, match="Keypoint prompt features and Keypoint prompt placeholder tokens"):
            model(**batch)
        processor = copy.copy(processor)
        processor.shot_fusion = "per_shot"
        batch = processor(**batch_kwargs)
        assert ((batch["input_ids"] == config.kpt_prompt_token_id).sum(-1) == 2).all()
    out = model(**batch)
    out.loss.backward()
    assert model.prompt_projector.linear_1.weight.grad.abs().sum() > 0


def test_average_pooling_picks_the_local_feature():
    grid = 4
    features = torch.arange(grid * grid, dtype=torch.float32).view(1, grid * grid, 1)  # feature = patch index
    coords = torch.tensor([[(2 + 0.5) / grid, (1 + 0.5) / grid]])  # the centre of patch (row 1, col 2)
    pooled = average_pool_around(features, coords, grid, radius=1.0)
    assert pooled.item() == pytest.approx(1 * grid + 2)


def test_sine_cosine_embedding_distinguishes_positions():
    emb = sine_cosine_embedding(torch.tensor([[0.1, 0.2], [0.2, 0.1], [0.1, 0.2]]), 16, max_frequency=4)
    assert emb.shape == (3, 16)
    torch.testing.assert_close(emb[0], emb[2])
    assert not torch.allclose(emb[0], emb[1])
    # each group of four channels is (sin x, cos x, sin y, cos y) at one frequency: unit norm per axis
    groups = emb.view(3, 4, 4)
    torch.testing.assert_close(groups[..., :2].pow(2).sum(-1), torch.ones(3, 4))
    with pytest.raises(ValueError, match="divisible by 4"):
        sine_cosine_embedding(torch.zeros(1, 2), 10, max_frequency=4)


def test_cross_attention_starts_as_local_pooling():
    """At initialisation a prompt's cross-attention weight peaks on the support patch under it."""
    config = tiny_config(train_byte_level_tokenizer(template_corpus(KEYPOINT_NAMES)), image_size=64, patch_size=8)
    model = KptLlmForKeypointComprehension(config).eval()
    grid = config.patch_grid_size
    torch.manual_seed(1)
    support = model.get_vision_features(torch.randn(2, 3, 64, 64))  # (2, 64, D)
    layer = model.prompt_feature_extractor.layers[0]
    captured = {}

    def capture_scores(module, args):
        query, key = module.q_proj(args[0]), module.k_proj(args[1])
        captured["scores"] = (query @ key.transpose(1, 2)).squeeze(1)  # (N, h*w), all heads together

    hook = layer.cross_attn.register_forward_pre_hook(capture_scores)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    coords = torch.stack([(cols.flatten() + 0.5) / grid, (rows.flatten() + 0.5) / grid], -1)  # every patch centre
    with torch.no_grad():
        for image in support:
            model.get_prompt_features(image[None], coords[:, None])
            hits = (captured["scores"].argmax(-1) == torch.arange(grid * grid)).float().mean()
            assert hits > 0.9, hits
    hook.remove()


# -- identify-then-detect decoding ---------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny):
    """The tiny model briefly fitted to one instance, so that it writes a name and emits <keypoint>.

    Forty steps teach the answer template, not always which keypoint is which: the tests using this
    check that decoding is right (batched == one-by-one reference), not what the model has learned.
    """
    base_model, processor = tiny
    model = copy.deepcopy(base_model).train()
    images = {"query": random_image(80, 60, 1), "support": random_image(50, 70, 2)}
    visual = visual_batch(processor, images)
    semantic = processor(query=images["query"], kpts=QUERY_KPTS, task="semantic", kpt_names=NAMES, return_labels=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        for batch in (visual, semantic):
            optimizer.zero_grad()
            model(**batch).loss.backward()
            optimizer.step()
    return model.eval(), processor, images


def test_prompt_features_let_the_model_tell_keypoints_apart(tiny, images):
    """The prompt pathway carries which keypoint is meant: naming three keypoints of one picture is learnt.

    (With a transformer-style positional encoding whose frequencies fall to 1/10000 cycle per image,
    z_p hardly changed with the position and this loss stalled at log(3) per name for 400 steps.)
    """
    base_model, processor = tiny
    model = copy.deepcopy(base_model).train()
    batch = processor(query=images["query"], kpts=QUERY_KPTS, task="semantic", kpt_names=NAMES, return_labels=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    model.eval()
    out = model.detect_keypoints(**processor(query=images["query"], kpts=QUERY_KPTS, task="semantic"))
    assert processor.decode_names(out.sequences) == NAMES


def test_keypoint_head_keeps_learning_under_a_large_learning_rate(tiny, images):
    """Distinct targets stay reachable: the head must not collapse to one point (dead units)."""
    base_model, processor = tiny
    model = copy.deepcopy(base_model).train()
    batch = visual_batch(processor, images, query_visible=[1, 1, 1])
    optimizer = torch.optim.AdamW(model.keypoint_head.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        out = model(**batch)
        out.keypoint_loss.backward()
        optimizer.step()
    assert out.keypoint_loss.item() < 0.05
    assert out.pred_keypoints.detach().std(0).min() > 0.05


def naive_detect(model, processor, images, index, max_new_tokens=16):
    """Reference: one keypoint, no KV cache, the whole sequence re-run for every new token."""
    inputs = processor(query=images["query"], support=images["support"], kpts=[SUPPORT_KPTS[index]], task="visual")
    ids = inputs["input_ids"]
    prompt_len = ids.shape[1]
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(**dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids)))
            if ids[0, -1] == model.config.keypoint_token_id:
                return ids[0, prompt_len:], out.pred_keypoints[0]
            ids = torch.cat([ids, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt_len:], None


def test_batched_detection_matches_per_keypoint_reference(trained):
    model, processor, images = trained
    inputs = processor(query=images["query"], support=images["support"], kpts=SUPPORT_KPTS, task="visual")
    out = model.detect_keypoints(**inputs)
    assert out.keypoint_found.all(), processor.tokenizer.batch_decode(out.sequences)
    names = processor.decode_names(out.sequences)
    assert set(names) <= set(NAMES)
    for index in range(len(SUPPORT_KPTS)):
        ref_tokens, ref_point = naive_detect(model, processor, images, index)
        row = out.sequences[index][: len(ref_tokens)]
        assert row.tolist() == ref_tokens.tolist()
        torch.testing.assert_close(out.pred_keypoints[index], ref_point, atol=1e-4, rtol=0)

    (result,), = processor.post_process_keypoint_detection(out)
    assert result["names"] == names and result["labels"].tolist() == list(range(len(SUPPORT_KPTS)))
    # the whole 80x60 image is the crop: an 80-pixel square centred on it
    x, y = result["keypoints"].T
    assert ((0 <= x) & (x <= 80) & (-10 <= y) & (y <= 70)).all()
    assert ((0 < result["scores"]) & (result["scores"] <= 1)).all()


def test_generate_drops_support_inputs_after_prefill_and_matches(trained):
    model, processor, images = trained
    inputs = processor(query=images["query"], support=images["support"], kpts=SUPPORT_KPTS, task="visual")
    detected = model.detect_keypoints(**inputs)
    generated = model.generate(**inputs, max_new_tokens=detected.sequences.shape[1], do_sample=False)
    new_tokens = generated[:, inputs["input_ids"].shape[1] :]
    kpt = model.config.keypoint_token_id
    for row, detected_row in zip(new_tokens.tolist(), detected.sequences.tolist()):
        end = detected_row.index(kpt) + 1
        assert row[:end] == detected_row[:end]

    later_step = model.prepare_inputs_for_generation(
        inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"],
        support_pixel_values=inputs["support_pixel_values"], prompt_coords=inputs["prompt_coords"],
        use_cache=True, is_first_iteration=False,
    )
    assert not {"pixel_values", "support_pixel_values", "prompt_coords"} & set(later_step)


def test_semantic_task_names_keypoints(trained):
    model, processor, images = trained
    inputs = processor(query=images["query"], kpts=QUERY_KPTS, task="semantic")
    out = model.detect_keypoints(**inputs)
    assert set(processor.decode_names(out.sequences)) <= set(NAMES)
    assert all(processor.tokenizer.decode(row, skip_special_tokens=True).startswith(" This is the") for row in out.sequences)
    assert not out.keypoint_found.any() and out.pred_keypoints.isnan().all()


def test_without_identify_then_detect_the_prefill_answers(trained):
    model, processor, images = trained
    inputs = processor(
        query=images["query"], support=images["support"], kpts=SUPPORT_KPTS, task="visual", identify_then_detect=False
    )
    assert (inputs["input_ids"][:, -1] == model.config.keypoint_token_id).all()
    out = model.detect_keypoints(**inputs)
    assert out.keypoint_found.all() and out.sequences.shape[1] == 0
    assert ((out.pred_keypoints >= 0) & (out.pred_keypoints <= 1)).all()
