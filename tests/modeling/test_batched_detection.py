"""Several query images and boxes in one processor call and one `detect_keypoints` call; keypoint scores.

The batched call must give every instance what one call per instance gives (names, pixels, scores),
while each instance's query crop is encoded once and its shared prefix prefilled once. The model is
the briefly fitted tiny model of test_fast_decoding (so that rows emit `<keypoint>`); what it writes
does not matter, only that both ways agree.
"""

import pytest
import torch

from tests.helpers import KEYPOINT_NAMES, random_image
from tests.modeling.test_fast_decoding import SUPPORT_KPTS, Recorder, fitted, scene  # noqa: F401 (fixtures)

MAX_NEW_TOKENS = 16
BOXES = [[[0, 0, 50, 40], [20, 10, 55, 45]], None]  # two boxes on the first image, the whole second image


@pytest.fixture(scope="module")
def queries(scene):
    return [scene["query"], random_image(90, 70, 11)]


def prompt_arguments(scene, task: str) -> dict:
    if task == "textual":
        return {"kpt_names": KEYPOINT_NAMES, "task": "textual"}
    return {"support": scene["supports"][0], "kpts": SUPPORT_KPTS, "task": "visual", "identify_then_detect": task != "visual-no-itd"}


def instances(queries) -> list[tuple[object, list | None]]:
    return [(image, box) for image, boxes in zip(queries, BOXES) for box in (boxes or [None])]


@pytest.mark.parametrize("task", ["visual", "textual", "visual-no-itd"])
def test_one_call_for_several_images_and_boxes_matches_one_call_per_instance(fitted, scene, queries, task):
    model, processor = fitted
    arguments = prompt_arguments(scene, task)
    inputs = processor(query=queries, query_bbox=BOXES, **arguments)
    rows = inputs["input_ids"].shape[0]
    num_kpts = rows // 3
    assert inputs["pixel_values"].shape[0] == 3 and inputs["query_index"].tolist() == [0] * num_kpts + [1] * num_kpts + [2] * num_kpts
    with Recorder(model) as recorder:
        outputs = model.detect_keypoints(**inputs, max_new_tokens=MAX_NEW_TOKENS)
    # the three crops (and the support) in one tower call; three prefixes prefilled once each, then the rows
    assert recorder.images == [3 + (task != "textual")]
    (prefix_batch, prefix_length), (suffix_batch, _), *_ = recorder.decoder_calls
    assert prefix_batch == 3 and prefix_length > processor.image_seq_length and suffix_batch == rows
    results = processor.post_process_keypoint_detection(outputs)
    assert [len(boxes) for boxes in results] == [2, 1]

    pad_id = model.generation_config.pad_token_id
    flat = [result for boxes in results for result in boxes]
    for number, ((image, box), result) in enumerate(zip(instances(queries), flat)):
        single = model.detect_keypoints(**processor(query=image, query_bbox=box, **arguments), max_new_tokens=MAX_NEW_TOKENS)
        (expected,), = processor.post_process_keypoint_detection(single)
        assert result["names"] == expected["names"]
        assert result["labels"].tolist() == list(range(num_kpts))
        torch.testing.assert_close(result["bbox"], expected["bbox"])
        torch.testing.assert_close(result["keypoints"], expected["keypoints"], atol=1e-3, rtol=0, equal_nan=True)
        torch.testing.assert_close(result["scores"], expected["scores"], atol=1e-5, rtol=0)
        tokens = outputs.sequences[number * num_kpts : (number + 1) * num_kpts]
        width = single.sequences.shape[1]
        assert torch.equal(tokens[:, :width], single.sequences) and (tokens[:, width:] == pad_id).all()
    if task == "visual-no-itd":  # every row regresses a point: the comparison above covered coordinates
        assert all(torch.isfinite(result["keypoints"]).all() and (result["scores"] > 0).all() for result in flat)


def reference_scores(model, inputs, outputs) -> torch.Tensor:
    """The definition, from one full forward pass per row over prompt + answer: p(<keypoint>) times the
    geometric mean of the probabilities of the answer tokens before it (placeholders ruled out)."""
    kpt_id = model.config.keypoint_token_id
    scores = []
    for row in range(inputs["input_ids"].shape[0]):
        prompt = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
        answer = outputs.sequences[row]
        if kpt_id not in answer.tolist() and prompt[-1] != kpt_id:
            scores.append(0.0)
            continue
        answer = answer[: answer.tolist().index(kpt_id) + 1] if kpt_id in answer.tolist() else answer[:0]
        ids = torch.cat([prompt, answer])[None]
        row_inputs = {
            "support_pixel_values": inputs["support_pixel_values"], "prompt_coords": inputs["prompt_coords"][row : row + 1],
            "prompt_visible": inputs["prompt_visible"][row : row + 1],
        }
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], **row_inputs).logits[0]
        logits[:, [model.config.image_token_id, model.config.kpt_prompt_token_id]] = float("-inf")
        log_probs = logits.float().log_softmax(-1)
        # the token at position t is predicted at t - 1; the scored tokens are the answer (or the forced <keypoint>)
        scored = answer if len(answer) else prompt[-1:]
        start = ids.shape[1] - len(scored)
        token_log_probs = log_probs[start - 1 : ids.shape[1] - 1].gather(1, scored[:, None]).squeeze(1)
        naming = token_log_probs[:-1]
        scores.append(float(token_log_probs[-1].exp() * (naming.mean().exp() if len(naming) else 1.0)))
    return torch.tensor(scores)


@pytest.mark.parametrize("identify_then_detect", [True, False])
def test_keypoint_scores_follow_their_definition(fitted, scene, identify_then_detect):
    model, processor = fitted
    inputs = processor(
        query=scene["query"], support=scene["supports"][0], kpts=SUPPORT_KPTS, task="visual", identify_then_detect=identify_then_detect
    )
    outputs = model.detect_keypoints(**inputs, max_new_tokens=MAX_NEW_TOKENS)
    assert outputs.keypoint_found.any(), "the fitted model must emit <keypoint> somewhere for this test to mean anything"
    torch.testing.assert_close(outputs.keypoint_scores, reference_scores(model, inputs, outputs), atol=1e-4, rtol=0)
    assert ((outputs.keypoint_scores > 0) == outputs.keypoint_found).all()


def test_recorded_layout_equals_explicit_sizes_and_boxes(fitted, scene, queries):
    model, processor = fitted
    inputs = processor(query=queries, query_bbox=BOXES, **prompt_arguments(scene, "visual-no-itd"))
    layout = inputs["keypoint_layout"]
    assert layout.image_sizes == [(60, 80), (70, 90)] and layout.num_keypoints == len(SUPPORT_KPTS)
    assert layout.boxes == [[[0.0, 0.0, 50.0, 40.0], [20.0, 10.0, 55.0, 45.0]], [[0.0, 0.0, 90.0, 70.0]]]
    outputs = model.detect_keypoints(**inputs.to("cpu"), max_new_tokens=2)  # .to keeps the record
    recorded = processor.post_process_keypoint_detection(outputs)
    explicit = processor.post_process_keypoint_detection(
        outputs, target_sizes=torch.tensor([[60, 80], [70, 90]]), boxes=[BOXES[0], None]
    )
    for mine, theirs in zip(sum(recorded, []), sum(explicit, [])):
        torch.testing.assert_close(mine["keypoints"], theirs["keypoints"])
        torch.testing.assert_close(mine["bbox"], theirs["bbox"])
    # model(**inputs) and generate(**inputs) take the processor's output as it is
    assert model(**inputs).logits.shape[0] == inputs["input_ids"].shape[0]


def test_batched_inputs_are_refused_where_they_cannot_work(fitted, scene, queries):
    _, processor = fitted
    with pytest.raises(ValueError, match="semantic task names points of one query instance"):
        processor(query=queries, kpts=SUPPORT_KPTS, task="semantic")
    with pytest.raises(ValueError, match="query_kpts .* need a single query instance"):
        processor(query=queries, kpt_names=KEYPOINT_NAMES, task="textual", query_kpts=SUPPORT_KPTS, return_labels=True)
    with pytest.raises(ValueError, match=r"query_bbox must hold one entry per query image \(2\)"):
        processor(query=queries, kpt_names=KEYPOINT_NAMES, task="textual", query_bbox=[[0, 0, 10, 10]])
    with pytest.raises(ValueError, match=r"query_bbox\[0\] must be \[x, y, w, h\], a list of such boxes or None"):
        processor(query=queries, kpt_names=KEYPOINT_NAMES, task="textual", query_bbox=[[0, 0, 10], None])
    with pytest.raises(ValueError, match=r"query_bbox\[1\]\[1\] \[500, 0, 10, 10\] lies outside the 90x70 image"):
        processor(query=queries, kpt_names=KEYPOINT_NAMES, task="textual", query_bbox=[None, [[0, 0, 9, 9], [500, 0, 10, 10]]])
    with pytest.raises(ValueError, match="query is an empty list"):
        processor(query=[], kpt_names=KEYPOINT_NAMES, task="textual")
