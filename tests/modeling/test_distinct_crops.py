"""Each distinct crop once: the collator's deduplicated batch (query_index, support_index) trains exactly
like one query and support crop per row, with and without the shared prefix, while the vision tower,
the projector and the prompt extractor's memory see each distinct crop once."""

import copy

import pytest
import torch

from processing.collator import KptLlmDataCollator

SUPPORT_KPTS = [[10.0, 12.0], [30.0, 40.0], [45.0, 50.0]]
QUERY_KPTS = [[5.0, 5.0], [40.0, 30.0], [60.0, 50.0]]
NAMES = ["left eye", "nose", "tail tip"]
# (query image, support images): three instances, the third one's support is the first one's query
INSTANCES = (("query", ("support", "support2")), ("support", ("support2", "query")), ("support2", ("query", "support")))


def grouped_rows(processor, images, shots: int = 1, tasks=("visual", "semantic", "visual", "textual")):
    """Processor features of training rows grouped by instance (train.py's `--group_by_instance`): the
    rows of one instance share its query crop and its support draw; a semantic row's support crop is
    its own query crop."""
    features = []
    for query, supports in INSTANCES:
        for k, task in enumerate(tasks):
            k %= len(NAMES)
            kwargs = dict(query=images[query], task=task, kpt_names=[NAMES[k]], return_labels=True)
            if task == "semantic":
                kwargs["kpts"] = [QUERY_KPTS[k]]
            else:
                kwargs.update(query_kpts=[QUERY_KPTS[k]], query_visible=[int(k != 2)])
            if task == "visual":
                kwargs.update(support=[images[s] for s in supports[:shots]], kpts=[[SUPPORT_KPTS[k]]] * shots)
            features.append(dict(processor(**kwargs)))
    return features


def loss_and_gradients(model, batch, share_prefix: bool):
    model.zero_grad()
    out = model(**batch, share_prefix=share_prefix)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


class CountRows:
    """Rows entering the vision tower, the query projector and the prompt extractor's memory (k_proj)."""

    def __init__(self, model):
        self.seen = {"tower": [], "projector": [], "memory": []}
        hooks = (
            (model.vision_tower, "tower"),
            (model.multi_modal_projector, "projector"),
            (model.prompt_feature_extractor.layers[0].cross_attn.k_proj, "memory"),
        )
        self.handles = [
            module.register_forward_hook(lambda m, args, out, key=key: self.seen[key].append(args[0].shape[0]))
            for module, key in hooks
        ]

    def close(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("shots", [1, 2])
@pytest.mark.parametrize("share_prefix", [False, True])
def test_distinct_crops_train_like_one_crop_per_row(tiny, images, shots, share_prefix):
    model = copy.deepcopy(tiny[0]).train()
    processor = tiny[1]
    # a semantic row's one "shot" is its own query crop: the collator batches one shot count at a time
    tasks = ("visual", "semantic", "visual", "textual") if shots == 1 else ("visual", "visual", "textual")
    features = grouped_rows(processor, images, shots=shots, tasks=tasks)
    pad = processor.tokenizer.pad_token_id
    per_row = KptLlmDataCollator(pad_token_id=pad, dedupe_crops=False)(features)
    distinct = KptLlmDataCollator(pad_token_id=pad)(features)
    rows, prompts = per_row["input_ids"].shape[0], per_row["prompt_coords"].shape[0]
    assert per_row["pixel_values"].shape[0] == rows and per_row["support_pixel_values"].shape[0] == prompts * shots
    assert distinct["pixel_values"].shape[0] == len(INSTANCES)
    assert distinct["support_pixel_values"].shape[0] < prompts * shots

    reference, reference_grads = loss_and_gradients(model, per_row, share_prefix=False)
    counter = CountRows(model)
    try:
        out, grads = loss_and_gradients(model, distinct, share_prefix=share_prefix)
    finally:
        counter.close()

    for key in ("loss", "lm_loss", "keypoint_loss"):
        torch.testing.assert_close(out[key], reference[key])
    torch.testing.assert_close(out.pred_keypoints, reference.pred_keypoints, equal_nan=True)
    if share_prefix:
        assert out.shared_prefix_length is not None  # the deduplicated batch still shares its prefix
        torch.testing.assert_close(out.logits, reference.logits[:, out.shared_prefix_length :], atol=1e-5, rtol=1e-4)
    else:
        torch.testing.assert_close(out.logits, reference.logits, atol=1e-5, rtol=1e-4)
    assert grads.keys() == reference_grads.keys() and any("vision_tower" in name for name in grads)
    for name, gradient in reference_grads.items():
        torch.testing.assert_close(grads[name], gradient, atol=1e-6, rtol=1e-4, msg=name)

    # each distinct crop once: through the tower, the projector (query crops) and the extractor's memory
    all_crops = torch.cat([distinct["pixel_values"], distinct["support_pixel_values"]]).flatten(1)
    assert counter.seen["tower"] == [len(torch.unique(all_crops, dim=0))]
    assert counter.seen["projector"] == [len(INSTANCES)]
    assert counter.seen["memory"] == [len(torch.unique(distinct["support_pixel_values"].flatten(1), dim=0))]


def test_one_crop_per_row_batches_share_the_prefix_too(tiny, images):
    # forward finds each row's crop while encoding: the per-row layout shares the same prefix as before
    model = copy.deepcopy(tiny[0]).train()
    features = grouped_rows(tiny[1], images)
    per_row = KptLlmDataCollator(pad_token_id=tiny[1].tokenizer.pad_token_id, dedupe_crops=False)(features)
    full, full_grads = loss_and_gradients(model, per_row, share_prefix=False)
    shared, shared_grads = loss_and_gradients(model, per_row, share_prefix=True)
    assert shared.shared_prefix_length is not None
    torch.testing.assert_close(shared.loss, full.loss)
    for name, gradient in full_grads.items():
        torch.testing.assert_close(shared_grads[name], gradient, atol=1e-6, rtol=1e-4, msg=name)


def test_support_index_equals_the_positional_layouts(tiny, images):
    model, processor = tiny
    kwargs = dict(query=images["query"], task="visual", kpt_names=NAMES, kpts=[SUPPORT_KPTS, SUPPORT_KPTS[::-1]])
    shared = processor(support=[images["support"], images["support2"]], **kwargs)  # N_s == S: shots serve every prompt
    prompts, shots = shared["prompt_coords"].shape[:2]
    reference = model(**shared)
    # the same shots named explicitly, in another order of the images
    swapped = dict(shared, support_pixel_values=shared["support_pixel_values"].flip(0),
                   support_index=torch.tensor([[1, 0]] * prompts))  # fmt: skip
    torch.testing.assert_close(model(**swapped).logits, reference.logits)
    # one copy per prompt shot (N_s == P * S) gives the same as well
    repeated = dict(shared, support_pixel_values=shared["support_pixel_values"].repeat(prompts, 1, 1, 1))
    torch.testing.assert_close(model(**repeated).logits, reference.logits)
    assert shots == 2


def test_bad_support_index_is_named(tiny, images):
    model, processor = tiny
    batch = processor(query=images["query"], support=images["support"], task="visual", kpt_names=NAMES, kpts=SUPPORT_KPTS)
    prompts = batch["prompt_coords"].shape[0]
    with pytest.raises(ValueError, match="support_index must be an integer tensor of shape"):
        model(**batch, support_index=torch.zeros(prompts, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the 1 of support_pixel_values"):
        model(**batch, support_index=torch.ones(prompts, 1, dtype=torch.long))
    two = dict(batch, support_pixel_values=batch["support_pixel_values"].repeat(2, 1, 1, 1))
    with pytest.raises(ValueError, match="support_index uses 1 of the 2 support images"):
        model(**two, support_index=torch.zeros(prompts, 1, dtype=torch.long))
