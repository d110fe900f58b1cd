"""KptLlmProcessor: token layout per task, labels, crops and coordinates, and bad inputs."""

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_kptllm.modeling_kptllm import KptLlmDetectionOutput
from modeling_kptllm.processing_kptllm import denormalize_points, normalize_points, square_crop_box
from tests.helpers import random_image

KPTS = [[10.0, 12.0], [30.0, 40.0]]
NAMES = ["left eye", "nose"]


def count(ids: torch.Tensor, token_id: int) -> torch.Tensor:
    return (ids == token_id).sum(-1)


@pytest.mark.parametrize(
    ("task", "prompts_per_row"), [("visual", 1), ("semantic", 1), ("textual", 0), ("visual+textual", 1)]
)
def test_token_layout_per_task(tiny, images, task, prompts_per_row):
    _, processor = tiny
    support = None if task in ("semantic", "textual") else images["support"]
    kpts = None if task == "textual" else KPTS
    out = processor(query=images["query"], support=support, kpts=kpts, task=task, kpt_names=NAMES)
    ids = out["input_ids"]
    assert ids.shape[0] == 2 and out["pixel_values"].shape == (1, 3, 32, 32)
    assert (count(ids, processor.image_token_id) == processor.image_seq_length).all()
    assert (count(ids, processor.kpt_prompt_token_id) == prompts_per_row).all()
    assert (count(ids, processor.keypoint_token_id) == 0).all()
    text = processor.tokenizer.decode(ids[1], skip_special_tokens=False)
    assert text.endswith("ASSISTANT:")
    if task in ("textual", "visual+textual"):
        assert "nose" in text
    if prompts_per_row:
        assert out["prompt_coords"].shape == (2, 1, 2)
    else:
        assert "support_pixel_values" not in out


def test_training_labels_cover_only_the_answer(tiny, images):
    _, processor = tiny
    out = processor(
        query=images["query"], support=images["support"], kpts=KPTS, task="visual", kpt_names=NAMES,
        query_kpts=[[5, 5], [40, 30]], return_labels=True,
    )
    for ids, labels, mask in zip(out["input_ids"], out["labels"], out["attention_mask"]):
        answer = labels[labels != -100]
        assert processor.tokenizer.decode(answer) in (" It is the left eye. <keypoint></s>", " It is the nose. <keypoint></s>")
        assert (ids[-len(answer):] == answer).all()  # the answer closes the sequence
        assert (labels[mask == 0] == -100).all()
    semantic = processor(query=images["query"], kpts=KPTS, task="semantic", kpt_names=NAMES, return_labels=True)
    answer = semantic["labels"][0][semantic["labels"][0] != -100]
    assert processor.tokenizer.decode(answer) == " This is the left eye.</s>"
    no_itd = processor(
        query=images["query"], support=images["support"], kpts=KPTS, task="visual", kpt_names=NAMES,
        return_labels=True, identify_then_detect=False,
    )
    answer = no_itd["labels"][0][no_itd["labels"][0] != -100]
    assert processor.tokenizer.decode(answer) == " <keypoint></s>"


def test_crop_and_normalized_coordinates(tiny):
    _, processor = tiny
    query = random_image(100, 80, 4)
    out = processor(
        query=query, support=query, kpts=[[20, 30], [50, 40]], support_bbox=[10, 20, 40, 20], task="visual",
        query_bbox=[10, 20, 40, 20], query_kpts=[[20, 30], [50, 40]], query_visible=[1, 1],
    )
    # bbox 40x20 -> a 40x40 square centred on (30, 30): x0 = 10, y0 = 10
    expected = torch.tensor([[10 / 40, 20 / 40], [40 / 40, 30 / 40]])
    torch.testing.assert_close(out["prompt_coords"][:, 0], expected)
    torch.testing.assert_close(out["keypoint_labels"], expected)
    # the crop shows the box: a white square drawn inside the box lands where expected
    canvas = Image.new("RGB", (100, 80))
    canvas.paste((255, 255, 255), (30, 30, 50, 40))  # x 30..50, y 30..40
    crop = processor._crop(canvas, square_crop_box([10, 20, 40, 20], canvas.size, 1.0, "bbox"))
    pixels = np.asarray(crop)[..., 0] > 128
    rows, cols = np.nonzero(pixels)
    scale = 32 / 40
    assert cols.min() == pytest.approx(20 * scale, abs=1) and cols.max() == pytest.approx(40 * scale, abs=1)
    assert rows.min() == pytest.approx(20 * scale, abs=1) and rows.max() == pytest.approx(30 * scale, abs=1)


def test_post_process_maps_back_to_pixels(tiny):
    _, processor = tiny
    box = square_crop_box([10, 20, 40, 20], (100, 80), processor.crop_padding, "bbox")
    points = np.array([[20.0, 30.0], [49.5, 12.25]])
    np.testing.assert_allclose(denormalize_points(normalize_points(points, box), box), points)
    tokenizer = processor.tokenizer
    sequences = tokenizer([" It is the nose. <keypoint>", " This is the tail tip."], add_special_tokens=False, padding=True, return_tensors="pt")["input_ids"]
    outputs = KptLlmDetectionOutput(
        sequences=sequences,
        pred_keypoints=torch.tensor([[0.25, 0.5], [float("nan"), float("nan")]]),
        keypoint_found=torch.tensor([True, False]),
        keypoint_scores=torch.tensor([0.75, 0.0]),
    )
    # hand-made outputs carry no processor record: sizes (height, width) and boxes are given, as for VitPose
    (result,), = processor.post_process_keypoint_detection(outputs, target_sizes=[(80, 100)], boxes=[[[10, 20, 40, 20]]])
    assert result["names"] == ["nose", "tail tip"]
    torch.testing.assert_close(result["keypoints"], torch.tensor([[20.0, 30.0], [float("nan"), float("nan")]]), equal_nan=True)
    assert result["scores"].tolist() == [0.75, 0.0] and result["labels"].tolist() == [0, 1]
    assert result["bbox"].tolist() == [10, 20, 40, 20]


def test_k_shot_support(tiny, images):
    _, processor = tiny
    out = processor(
        query=images["query"], support=[images["support"], images["support2"]], kpts=[KPTS, [[1, 2], [3, 4]]],
        support_visible=[[1, 0], [1, 1]], task="visual",
    )
    assert out["support_pixel_values"].shape == (2, 3, 32, 32)
    assert out["prompt_coords"].shape == (2, 2, 2)
    assert out["prompt_visible"].tolist() == [[1, 1], [0, 1]]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_any_image_mode_becomes_rgb(tiny, mode):
    _, processor = tiny
    image = random_image(40, 40, 5).convert(mode)
    out = processor(query=image, kpts=[[10, 10]], task="semantic")
    assert out["pixel_values"].shape == (1, 3, 32, 32) and torch.isfinite(out["pixel_values"]).all()


BAD_INPUTS = [
    (dict(kpts=[[200, 10]]), ValueError, r"kpts\[0\] = \[200.0, 10.0\] lies outside the 50x70 image"),
    (dict(kpts=[[float("nan"), 10]]), ValueError, "kpts contains NaN"),
    (dict(kpts="10,10"), TypeError, "kpts must be a sequence of \\(x, y\\) pairs"),
    (dict(kpts=[[1, 2, 3]]), ValueError, r"kpts must have shape \(K, 2\)"),
    (dict(kpts=[["a", "b"]]), TypeError, "kpts must be a sequence"),
    (dict(support_bbox=[0, 0, 0, 10]), ValueError, r"support_bbox \[0, 0, 0, 10\] is empty \(w=0"),
    (dict(query_bbox=[500, 500, 10, 10]), ValueError, "query_bbox .* lies outside the 80x60 image"),
    (dict(query_bbox=[0, 0, float("nan"), 10]), ValueError, "query_bbox .* contains NaN"),
    (dict(kpts=[[10, 10], [20, 20]], kpt_names=["nose"], return_labels=True), ValueError, "kpt_names has 1 names for 2 keypoints"),
    (dict(kpt_names="nose", return_labels=True), TypeError, "kpt_names must be a list"),
    (dict(return_labels=True), ValueError, "return_labels needs kpt_names"),
    (dict(support=None), ValueError, "needs a support image"),
    (dict(support=[None], kpts=[[[10, 10]]]), TypeError, r"support\[0\] must be a PIL.Image"),
    (dict(support="image.png"), TypeError, "support must be a PIL.Image"),
    (dict(query_kpts=[[5, 5], [6, 6]]), ValueError, "query_kpts has 2 keypoints, expected 1"),
    (dict(query_kpts=[[79, 59]], query_bbox=[0, 0, 10, 10]), ValueError, r"query_kpts\[0\] lies outside the instance box crop"),
    (dict(support_visible=[0]), ValueError, "keypoint 0 is invisible in every support shot"),
    (dict(support=["a", "b"], kpts=[[[1, 1]]]), ValueError, "2 support images need as many kpts arrays"),
    (dict(task="detect"), ValueError, "task='detect'"),
]


@pytest.mark.parametrize(("overrides", "error", "message"), BAD_INPUTS)
def test_bad_inputs_get_clear_errors(tiny, images, overrides, error, message):
    _, processor = tiny
    kwargs = dict(query=images["query"], support=images["support"], kpts=[[10, 10]], task="visual")
    kwargs.update(overrides)
    with pytest.raises(error, match=message):
        processor(**kwargs)


def test_oversized_and_invalid_images_are_refused(tiny):
    _, processor = tiny
    huge = Image.new("RGB", (1, 1))
    huge_size = Image.new("RGB", (9000, 8000))
    with pytest.raises(ValueError, match="query is 9000x8000 pixels, over max_image_pixels"):
        processor(query=huge_size, kpts=[[1, 1]], task="semantic")
    with pytest.raises(TypeError, match="numpy images must be uint8"):
        processor(query=np.zeros((4, 4, 3), dtype=np.float32), kpts=[[1, 1]], task="semantic")
    assert processor(query=np.asarray(huge), kpts=[[0.5, 0.5]], task="semantic")["pixel_values"].shape[0] == 1


def test_textual_prompt_accepts_descriptions(tiny, images):
    _, processor = tiny
    out = processor(query=images["query"], task="textual", kpt_names=NAMES, text=["the eye on the left", "the nose tip"])
    assert "the nose tip" in processor.tokenizer.decode(out["input_ids"][1])
    with pytest.raises(ValueError, match="text must be a list of 2 descriptions"):
        processor(query=images["query"], task="textual", kpt_names=NAMES, text=["one"])
