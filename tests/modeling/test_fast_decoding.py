"""detect_keypoints with a shared prefix KV cache: same answers as the unshared path and as `generate()`.

The shared path prefills the rows' common start (system text + query image) once with batch 1 and
only the per-row rest (keypoint prompt, question) per row. These tests compare, token for token and
coordinate for coordinate, (a) the shared path, (b) the same call with `share_prefix=False` (every row
prefilled in full) and (c) one HF `generate()` per keypoint followed by one forward pass over the
answer for the coordinates, for every task layout the processor writes; and they count the vision
tower's images and the decoder's prefill tokens to catch a silent fallback to per-row work.
"""

import copy

import pytest
import torch

from processing.builders import build_tiny_model
from tests.helpers import KEYPOINT_NAMES, random_image

SUPPORT_KPTS = [[10.0, 12.0], [30.0, 40.0], [45.0, 60.0], [20.0, 20.0], [5.0, 5.0]]
QUERY_KPTS = [[5.0, 5.0], [40.0, 30.0], [70.0, 50.0], [20.0, 30.0], [60.0, 10.0]]
MAX_NEW_TOKENS = 16
TASKS = ("visual", "textual", "semantic", "visual+textual", "visual-5-shot", "visual-no-itd")


@pytest.fixture(scope="module")
def scene():
    return {
        "query": random_image(80, 60, 1),
        "supports": [random_image(50, 70, 2 + shot) for shot in range(5)],
    }


@pytest.fixture(scope="module")
def fitted(scene):
    """The tiny model fitted for a few seconds to one instance, so that rows write names of different
    lengths and emit `<keypoint>` (a random model never does, which would leave the coordinates untested).

    What it has learnt does not matter here: the tests compare decoding paths with each other.
    """
    model, processor = build_tiny_model(KEYPOINT_NAMES, seed=0)
    query, support = scene["query"], scene["supports"][0]
    common = {"kpt_names": KEYPOINT_NAMES, "return_labels": True}
    batches = [
        processor(query=query, support=support, kpts=SUPPORT_KPTS, task="visual", query_kpts=QUERY_KPTS, **common),
        processor(query=query, task="textual", query_kpts=QUERY_KPTS, **common),
        processor(query=query, kpts=QUERY_KPTS, task="semantic", **common),
    ]
    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(40):
        for batch in batches:
            optimizer.zero_grad()
            model(**batch).loss.backward()
            optimizer.step()
    # Llama zeroes the pad row (padding_idx), which hides padding mistakes (a zero key and value barely
    # move the attention); a checkpoint's pad row can be anything, and masked slots must not matter
    with torch.no_grad():
        model.get_input_embeddings().weight[model.generation_config.pad_token_id].normal_()
    return model.eval(), processor


@pytest.fixture(scope="module")
def models(fitted):
    """The fitted model under both attention implementations of the LLM and the vision tower."""
    model, processor = fitted
    eager = copy.deepcopy(model)
    eager.language_model.set_attn_implementation("eager")
    eager.vision_tower.set_attn_implementation("eager")
    assert eager.language_model.config._attn_implementation == "eager"
    assert model.language_model.config._attn_implementation == "sdpa"
    return {"sdpa": model, "eager": eager}, processor


def task_inputs(processor, scene, task: str):
    query, supports = scene["query"], scene["supports"]
    if task == "visual":
        return processor(query=query, support=supports[0], kpts=SUPPORT_KPTS, task="visual")
    if task == "textual":
        return processor(query=query, kpt_names=KEYPOINT_NAMES, task="textual")
    if task == "semantic":
        return processor(query=query, kpts=QUERY_KPTS, task="semantic")
    if task == "visual+textual":
        return processor(query=query, support=supports[0], kpts=SUPPORT_KPTS, kpt_names=KEYPOINT_NAMES, task="visual+textual")
    if task == "visual-5-shot":
        shots = [[[x + shot, y + shot] for x, y in SUPPORT_KPTS] for shot in range(5)]
        return processor(query=query, support=supports, kpts=shots, task="visual")
    if task == "visual-no-itd":
        return processor(query=query, support=supports[0], kpts=SUPPORT_KPTS, task="visual", identify_then_detect=False)
    raise ValueError(task)


def generate_one_by_one(model, inputs) -> list[tuple[list[int], torch.Tensor]]:
    """The naive loop a user would write: per keypoint, `generate()` until `<keypoint>` or eos, then one
    forward pass over prompt + answer for the coordinates. Returns (answer ids, (x, y) or NaN) per row."""
    kpt_id = model.config.keypoint_token_id
    stop_ids = [model.generation_config.eos_token_id, kpt_id]
    results = []
    for row in range(inputs["input_ids"].shape[0]):
        ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()][None]  # (1, L_row), padding dropped
        row_inputs = {"pixel_values": inputs["pixel_values"]}
        if "support_pixel_values" in inputs:
            row_inputs["support_pixel_values"] = inputs["support_pixel_values"]
            row_inputs["prompt_coords"] = inputs["prompt_coords"][row : row + 1]
            row_inputs["prompt_visible"] = inputs["prompt_visible"][row : row + 1]
        answer = ids.new_zeros(1, 0)
        if ids[0, -1] != kpt_id:  # no-ItD prompts already end with <keypoint>: nothing to generate
            generated = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False, eos_token_id=stop_ids, **row_inputs,
            )
            answer = generated[:, ids.shape[1] :]
        full = torch.cat([ids, answer], dim=1)
        point = torch.full((2,), float("nan"))
        if full[0, -1] == kpt_id:
            with torch.no_grad():
                point = model(input_ids=full, attention_mask=torch.ones_like(full), **row_inputs).pred_keypoints[0]
        results.append((answer[0].tolist(), point))
    return results


class Recorder:
    """Forward hooks that count the vision tower's images and the decoder's (batch, length) calls."""

    def __init__(self, model):
        self.images: list[int] = []
        self.decoder_calls: list[tuple[int, int]] = []
        self.handles = [
            model.vision_tower.register_forward_pre_hook(self._vision, with_kwargs=True),
            model.get_decoder().register_forward_pre_hook(self._decoder, with_kwargs=True),
        ]

    def _vision(self, module, args, kwargs):
        pixels = args[0] if args else kwargs["pixel_values"]
        self.images.append(pixels.shape[0])

    def _decoder(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        self.decoder_calls.append(tuple(embeds.shape[:2]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("task", TASKS)
def test_shared_prefix_matches_unshared_and_generate(models, scene, task, attention):
    all_models, processor = models
    model = all_models[attention]
    inputs = task_inputs(processor, scene, task)
    assert model._shared_prefix_length(
        inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
        inputs.get("support_pixel_values"), inputs.get("prompt_coords"),
    ) > 0, "the processor's layout must take the shared path"

    shared = model.detect_keypoints(**inputs, max_new_tokens=MAX_NEW_TOKENS)
    unshared = model.detect_keypoints(**inputs, max_new_tokens=MAX_NEW_TOKENS, share_prefix=False)
    assert torch.equal(shared.sequences, unshared.sequences)
    assert torch.equal(shared.keypoint_found, unshared.keypoint_found)
    torch.testing.assert_close(shared.pred_keypoints, unshared.pred_keypoints, atol=1e-4, rtol=0, equal_nan=True)
    assert processor.decode_names(shared.sequences) == processor.decode_names(unshared.sequences)

    # What a briefly fitted model writes differs between CPUs (it once wrote no <keypoint> on a row), so
    # only structural facts are asserted here; coordinates are always compared through the no-ItD
    # prompts, which end with <keypoint> and so regress a point on every row whatever the model writes.
    if task == "semantic":
        assert not shared.keypoint_found.any()
    if task == "visual-no-itd":
        assert shared.sequences.shape[1] == 0 and shared.keypoint_found.all()
        assert torch.isfinite(shared.pred_keypoints).all()

    pad_id = model.generation_config.pad_token_id
    for row, (answer, point) in enumerate(generate_one_by_one(model, inputs)):
        tokens = shared.sequences[row].tolist()
        assert tokens[: len(answer)] == answer, (row, processor.tokenizer.decode(tokens), processor.tokenizer.decode(answer))
        assert all(token == pad_id for token in tokens[len(answer) :])
        torch.testing.assert_close(shared.pred_keypoints[row], point, atol=1e-4, rtol=0, equal_nan=True)


@pytest.mark.parametrize("task", ["textual", "visual+textual", "visual-5-shot", "semantic"])
def test_shared_prefill_gives_the_full_prefill_logits(models, scene, task):
    """The step that starts the answer, compared directly (tighter than the greedy answers)."""
    all_models, processor = models
    model = all_models["sdpa"]
    inputs = task_inputs(processor, scene, task)
    multimodal = {key: inputs.get(key) for key in ("pixel_values", "support_pixel_values", "prompt_coords", "prompt_visible")}
    prefix_length = model._shared_prefix_length(
        inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
        inputs.get("support_pixel_values"), inputs.get("prompt_coords"),
    )
    with torch.no_grad():
        shared, attention, positions = model._prefill_with_shared_prefix(
            prefix_length, inputs["input_ids"], inputs["attention_mask"], pad_id=model.generation_config.pad_token_id,
            **multimodal,
        )
        positions_full = inputs["attention_mask"].cumsum(-1) - 1
        full = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            position_ids=positions_full.clamp(min=0), logits_to_keep=2, **multimodal,
        )
    torch.testing.assert_close(shared.logits, full.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(positions[:, -1], positions_full[:, -1])
    assert torch.equal(attention.sum(-1), inputs["attention_mask"].sum(-1))  # as many visible slots per row
    assert shared.cache.get_seq_length() == attention.shape[1]


def test_textual_rows_of_different_lengths_are_padded_between_prefix_and_rest(models, scene):
    all_models, processor = models
    model = all_models["sdpa"]
    inputs = task_inputs(processor, scene, "textual")
    lengths = inputs["attention_mask"].sum(-1)
    assert lengths.unique().numel() > 1, "names of different token lengths: the suffix batch needs padding"
    with Recorder(model) as recorder:
        out = model.detect_keypoints(**inputs, max_new_tokens=MAX_NEW_TOKENS)
    prefix_length, suffix_call = recorder.decoder_calls[0][1], recorder.decoder_calls[1]
    assert suffix_call == (len(lengths), int(lengths.max()) - prefix_length)
    # rows stop at different steps: the longer names still decode after the shorter ones finished
    answer_lengths = (out.sequences != model.generation_config.pad_token_id).sum(-1)
    assert answer_lengths.unique().numel() > 1


@pytest.mark.parametrize("task", ["visual", "visual-5-shot", "semantic", "textual"])
def test_query_encoded_once_and_prefix_prefilled_once(models, scene, task):
    all_models, processor = models
    model = all_models["sdpa"]
    inputs = task_inputs(processor, scene, task)
    rows, length = inputs["input_ids"].shape
    image_tokens = processor.image_seq_length
    num_support = inputs["support_pixel_values"].shape[0] if task in ("visual", "visual-5-shot") else 0

    with Recorder(model) as recorder:
        model.detect_keypoints(**inputs, max_new_tokens=MAX_NEW_TOKENS)
    # one tower call: the query crop once (for the semantic task it is also the support crop) + the shots
    assert recorder.images == [1 + num_support]
    prefix_call, suffix_call, *steps = recorder.decoder_calls
    assert prefix_call[0] == 1 and prefix_call[1] > image_tokens  # system text + all image tokens, batch 1
    assert suffix_call[0] == rows and suffix_call[1] == length - prefix_call[1]
    assert all(step == (rows, 1) for step in steps)
    if task.startswith("visual"):
        # the prefix stops right before the row-specific <kpt_prompt>
        row = inputs["input_ids"][0][inputs["attention_mask"][0].bool()]
        assert row[prefix_call[1]] == model.config.kpt_prompt_token_id

    # the same hooks see the per-row work of the unshared path, so the checks above can fail
    with Recorder(model) as recorder:
        model.detect_keypoints(**inputs, max_new_tokens=MAX_NEW_TOKENS, share_prefix=False)
    assert recorder.decoder_calls[0] == (rows, length)
    # identical crops are encoded once on that path too (the semantic task's support crop is its query crop)
    assert sum(recorder.images) == 1 + num_support


def test_rows_that_share_no_query_take_the_full_path(models, scene):
    all_models, processor = models
    model = all_models["sdpa"]
    inputs = dict(task_inputs(processor, scene, "visual"))
    del inputs["keypoint_layout"]  # not a tensor: `single` below slices every input
    rows, length = inputs["input_ids"].shape
    reference = model.detect_keypoints(**inputs, max_new_tokens=MAX_NEW_TOKENS, share_prefix=False)

    # one (identical) query crop per row: the rows may differ, nothing is shared
    per_row = dict(inputs, pixel_values=inputs["pixel_values"].expand(rows, -1, -1, -1).clone())
    # a single row: nothing to share
    single = {key: (value[:1] if key != "support_pixel_values" else value) for key, value in inputs.items()}
    for case in (per_row, single):
        with Recorder(model) as recorder:
            out = model.detect_keypoints(**case, max_new_tokens=MAX_NEW_TOKENS)
        batch = case["input_ids"].shape[0]
        assert recorder.decoder_calls[0] == (batch, length)
        assert torch.equal(out.sequences, reference.sequences[:batch, : out.sequences.shape[1]])
        torch.testing.assert_close(out.pred_keypoints, reference.pred_keypoints[:batch], atol=1e-4, rtol=0)

    # right padding breaks the left-padded layout the shared path relies on: fall back
    right_padded = dict(inputs, attention_mask=inputs["attention_mask"].clone())
    right_padded["attention_mask"][1, -1] = 0
    assert model._shared_prefix_length(
        right_padded["input_ids"], right_padded["attention_mask"], inputs["pixel_values"],
        inputs["support_pixel_values"], inputs["prompt_coords"],
    ) == 0


def test_shared_path_reports_bad_inputs_by_field(models, scene):
    all_models, processor = models
    model = all_models["sdpa"]
    inputs = task_inputs(processor, scene, "visual")
    broken = dict(inputs, pixel_values=inputs["pixel_values"].clone())
    broken["pixel_values"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="pixel_values contain NaN"):
        model.detect_keypoints(**broken)
    with pytest.raises(ValueError, match="prompt_coords must be normalized"):
        model.detect_keypoints(**dict(inputs, prompt_coords=inputs["prompt_coords"] + 2))
    with pytest.raises(ValueError, match="support_pixel_values must have shape"):
        model.detect_keypoints(**dict(inputs, support_pixel_values=inputs["support_pixel_values"][:, :, :8]))
