"""The bad-input catalog of issue #15: one regression test per case that once lost data, passed
silently, or failed with an unclear error. Each asserts the clear error (naming the file or field)
or the correct handling. Everything runs on the tiny random model and a few generated images.
"""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import train
from hub.export import ExportError, export_folder
from hub.space import space_inputs
from modeling_kptllm import KptLlmForKeypointComprehension, KptLlmProcessor
from modeling_kptllm.modeling_kptllm import KptLlmDetectionOutput
from processing.coco import load_image, load_keypoint_annotations
from processing.embedded import generate_embedded_benchmark
from processing.episodes import fixed_test_episodes, sample_episodes
from processing.evaluation import fixed_episode_file, score_pck
from tests.test_train import SMALL, data_flags

# --------------------------------------------------------------------------------------------
# Shared builders
# --------------------------------------------------------------------------------------------


def write_coco(folder: Path, num_images: int = 7, bbox=(2, 2, 26, 26), absurd_annotation: int | None = None) -> Path:
    """A COCO keypoints file of one category, one 32x32 image and instance per annotation (ids 50, 51, ...)."""
    images, annotations = [], []
    for i in range(num_images):
        Image.new("RGB", (32, 32), (i * 30, 0, 0)).save(folder / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 32, "height": 32})
        box = [0, 0, 2e9, 2e9] if 50 + i == absurd_annotation else list(bbox)
        annotations.append({"id": 50 + i, "image_id": i, "category_id": 1, "bbox": box,
                            "keypoints": [5, 5, 2, 20, 20, 2], "num_keypoints": 2})
    categories = [{"id": 1, "name": "thing", "supercategory": "s", "keypoints": ["a", "b"]}]
    path = folder / "coco.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """The tiny model and processor, saved once; tests copy it before damaging it."""
    from processing.builders import build_tiny_model
    from tests.helpers import KEYPOINT_NAMES

    model, processor = build_tiny_model(KEYPOINT_NAMES, seed=0)
    folder = tmp_path_factory.mktemp("bad_inputs") / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def damaged_copy(model_folder: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    return folder


def visual_inputs(processor, images, **kwargs):
    return processor(query=images["query"], support=images["support"], kpts=[[10, 10], [30, 40]], task="visual", **kwargs)


# --------------------------------------------------------------------------------------------
# Data loss
# --------------------------------------------------------------------------------------------


def test_resume_of_a_finished_run_without_checkpoints_refuses(tmp_path):
    """(1) done before: recorded here so the catalog is complete."""
    (tmp_path / "model").mkdir()
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match="holds a run's results .* nothing was overwritten"):
        train.checkpoint_to_resume(tmp_path, resume=True, explicit=None)


def test_episode_cache_never_stores_an_empty_episode_set(tmp_path):
    """(2) all images missing: a clear error and no file; once the images are back the evaluation works."""
    coco = write_coco(tmp_path)
    moved = tmp_path / "moved"
    moved.mkdir()
    for image in tmp_path.glob("*.png"):
        image.rename(moved / image.name)
    empty, report = load_keypoint_annotations(coco, tmp_path, return_report=True)
    path = tmp_path / "episodes" / "ep.json"
    with pytest.raises(ValueError, match=r"no 1-shot episode can be drawn from 0 instances.*Nothing was saved to .*ep\.json"):
        fixed_test_episodes(empty, path, num_shots=1, complete=not report.missing_images)
    assert not path.exists()
    for image in moved.iterdir():
        image.rename(tmp_path / image.name)
    full = load_keypoint_annotations(coco, tmp_path)
    assert len(fixed_test_episodes(full, path, num_shots=1)) == 7 and path.exists()


def test_a_transiently_missing_image_does_not_change_the_cached_episodes(tmp_path, caplog):
    """(2) one image missing: those episodes are not cached, and the cache is keyed by the instances drawn from."""
    coco = write_coco(tmp_path)
    full = load_keypoint_annotations(coco, tmp_path)
    (tmp_path / "3.png").rename(tmp_path / "3.png.away")
    partial, report = load_keypoint_annotations(coco, tmp_path, return_report=True)
    assert len(partial) == 6 and report.missing_images
    partial_file = fixed_episode_file(tmp_path, 1, 1, 5, partial)
    with caplog.at_level(logging.WARNING, logger="processing.episodes"):
        fixed_test_episodes(partial, partial_file, num_shots=1, num_queries_per_category=5, complete=False)
    assert not partial_file.exists() and "used for this run only" in caplog.text
    # even a caller that caches it cannot change the complete data's file: another key, another file
    fixed_test_episodes(partial, partial_file, num_shots=1, num_queries_per_category=5)
    (tmp_path / "3.png.away").rename(tmp_path / "3.png")
    full_file = fixed_episode_file(tmp_path, 1, 1, 5, full)
    assert full_file != partial_file
    episodes = fixed_test_episodes(load_keypoint_annotations(coco, tmp_path), full_file, num_shots=1, num_queries_per_category=5)
    assert episodes == sample_episodes(full, 1, 5, seed=0)
    # a file drawn from other instances, under the complete data's name, is refused, not silently reused
    shutil.copyfile(partial_file, full_file)
    with pytest.raises(ValueError, match="holds episodes drawn from other instances"):
        fixed_test_episodes(full, full_file, num_shots=1, num_queries_per_category=5)


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("repo_id", "not a repo id", "--repo_id 'not a repo id' is not a valid Hub repo id"),
        ("repo_id", "no-namespace", "--repo_id 'no-namespace' is not a valid Hub repo id"),
        ("base_model", "bad//name", "--base_model 'bad//name' is not a valid Hub repo id"),
        ("datasets", ["ok/data", "bad name"], "--datasets entry 'bad name'"),
        ("revision", "two words", "--revision 'two words' must be a single word"),
    ],
)
def test_export_validates_its_arguments_before_writing(tmp_path, argument, value, message):
    """(3) nothing (no output folder, no staging folder) is written for a bad Hub argument."""
    out = tmp_path / "exports" / "kptllm"
    with pytest.raises(ExportError, match=message):
        export_folder(tmp_path / "model", out, tmp_path / "results.json", **{argument: value})
    assert not (tmp_path / "exports").exists()


def test_two_trainings_cannot_write_one_output_folder(tmp_path):
    """(4) the second train.py is refused, naming the folder and the process that holds it."""
    out = tmp_path / "run"
    argv = SMALL + data_flags(tmp_path / "no-data") + ["--output_dir", str(out), "--max_steps", "1"]
    _, _, training_args = train.parse_arguments(argv)
    with train.output_folder_lock(out, training_args):
        with pytest.raises(SystemExit, match=rf"{out} is being written by another training run \(process \d+ on "):
            train.main(argv)
    assert not (out / train.LOCK_HOLDER_FILE).exists()  # released: a later run may take it
    with train.output_folder_lock(out, training_args):
        pass


# --------------------------------------------------------------------------------------------
# Silent cases
# --------------------------------------------------------------------------------------------


def _high_bit_images(tmp_path: Path) -> dict[str, Path]:
    paths = {"I;16": tmp_path / "grey16.png", "F": tmp_path / "float.tiff"}
    Image.fromarray(np.full((40, 50), 32896, dtype=np.uint16)).save(paths["I;16"])  # 128 in the high byte
    Image.fromarray(np.full((40, 50), 0.5, dtype=np.float32), mode="F").save(paths["F"])
    return paths


@pytest.mark.parametrize("mode", ["I;16", "F"])
def test_16_bit_and_float_images_are_rescaled_alike_everywhere(tiny, tmp_path, mode):
    """Processor, COCO reader and Space give the mid-grey of the 8-bit image, not white or black."""
    _, processor = tiny
    path = _high_bit_images(tmp_path)[mode]
    with Image.open(path) as opened:
        opened.load()
        assert opened.mode == mode
        raw = opened
    grey = Image.new("RGB", raw.size, (128, 128, 128))
    for converted in (processor.to_rgb_image(raw), load_image(path), space_inputs.load_image(path, "query image", processor.to_rgb_image)):
        assert converted.mode == "RGB" and converted.getpixel((3, 3)) == (128, 128, 128)
    expected = processor(query=grey, kpts=[[10, 10]], task="semantic")["pixel_values"]
    torch.testing.assert_close(processor(query=raw, kpts=[[10, 10]], task="semantic")["pixel_values"], expected)
    out_of_range = Image.fromarray(np.full((4, 4), 300.0, dtype=np.float32), mode="F")
    with pytest.raises(ValueError, match=r"query: the F-mode image holds values in \[300, 300\]"):
        processor(query=out_of_range, kpts=[[1, 1]], task="semantic")


def test_the_space_converts_uploads_with_the_processor(tiny, tmp_path, monkeypatch):
    """The Space's service hands the processor the same mid-grey a 16-bit upload holds (it used to be ~white)."""
    import importlib.util
    from types import SimpleNamespace

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    spec = importlib.util.spec_from_file_location("kptllm_space_app_bad_inputs", Path(space_inputs.__file__).with_name("app.py"))
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    model, processor = tiny
    monkeypatch.setattr(app, "pipeline", lambda *args, **kwargs: SimpleNamespace(model=model, processor=processor))
    service = app.KeypointService("a KptLLM folder")
    seen = []
    monkeypatch.setattr(service, "_run", lambda image, **kwargs: seen.append(image) or [{"name": "nose", "x": 1.0, "y": 1.0, "score": 0.5}])
    service.detect_textual(str(_high_bit_images(tmp_path)["I;16"]), "nose")
    assert seen[0].mode == "RGB" and seen[0].getpixel((3, 3)) == (128, 128, 128)


def test_a_query_box_of_2e9_pixels_is_refused(tiny, images):
    _, processor = tiny
    with pytest.raises(ValueError, match=r"query_bbox \[0, 0, 2000000000.0, 2000000000.0\] reaches more than the image's own size"):
        visual_inputs(processor, images, query_bbox=[0, 0, 2e9, 2e9])


def test_a_name_beyond_the_models_positions_is_refused(tiny, images):
    model, processor = tiny
    name = "qwxzkjvbpy" * 1000  # 10,000 characters the tiny tokenizer has no merges for
    inputs = processor(query=images["query"], task="textual", kpt_names=[name])
    limit = model.config.text_config.max_position_embeddings
    assert inputs["input_ids"].shape[1] > limit
    with pytest.raises(ValueError, match=rf"hold \d+ tokens \+ max_new_tokens=24, more than the language model's max_position_embeddings={limit}"):
        model.detect_keypoints(**inputs)
    with pytest.raises(ValueError, match=f"max_position_embeddings={limit}: shorten the keypoint names"):
        model(**inputs)


@pytest.mark.parametrize("token", ["<keypoint>", "<image>", "<kpt_prompt>", "</s>"])
def test_control_tokens_in_names_are_refused(tiny, images, token):
    """Refused, not escaped: a name is plain text, and none of the training names holds such a token."""
    _, processor = tiny
    with pytest.raises(ValueError, match=rf"kpt_names\[1\] = 'tail {token}' contains the control token '{token}'"):
        processor(query=images["query"], task="textual", kpt_names=["nose", f"tail {token}"])
    with pytest.raises(ValueError, match=rf"text\[0\] = .* contains the control token '{token}'"):
        processor(query=images["query"], task="textual", kpt_names=["nose"], text=[f"the {token} here"])


@pytest.mark.parametrize("padding", [-1.25, 0, float("nan")])
def test_non_positive_crop_padding_is_refused(tiny, images, padding):
    """Negative padding cropped mirrored boxes silently; 0 blamed the keypoints."""
    _, processor = tiny
    saved = processor.crop_padding
    processor.crop_padding = padding
    try:
        with pytest.raises(ValueError, match=r"crop_padding must be a positive number .* got"):
            visual_inputs(processor, images)
    finally:
        processor.crop_padding = saved
    with pytest.raises(ValueError, match="crop_padding must be a positive number"):
        KptLlmProcessor(processor.image_processor, processor.tokenizer, crop_padding=padding)


@pytest.mark.parametrize("max_new_tokens", [0, -3])
def test_max_new_tokens_must_be_positive(tiny, images, max_new_tokens):
    model, processor = tiny
    with pytest.raises(ValueError, match=f"max_new_tokens must be a positive integer .* got {max_new_tokens}"):
        model.detect_keypoints(**visual_inputs(processor, images), max_new_tokens=max_new_tokens)


def test_post_processing_needs_the_query_sizes_when_the_outputs_do_not_carry_them(tiny, images):
    _, processor = tiny
    outputs = KptLlmDetectionOutput(
        sequences=torch.zeros(1, 1, dtype=torch.long), pred_keypoints=torch.tensor([[0.5, 0.5]]),
        keypoint_found=torch.tensor([True]), keypoint_scores=torch.tensor([0.5]),
    )
    with pytest.raises(ValueError, match=r"carry no keypoint_layout .* pass target_sizes=\[\(height, width\)"):
        processor.post_process_keypoint_detection(outputs)
    with pytest.raises(ValueError, match=r"target_sizes must hold \(height, width\) in whole, positive pixels"):
        processor.post_process_keypoint_detection(outputs, target_sizes=[(60, 80.5)])
    with pytest.raises(ValueError, match="1 keypoint rows do not split into 2 instances"):
        processor.post_process_keypoint_detection(outputs, target_sizes=[(60, 80)], boxes=[[[0, 0, 10, 10], [5, 5, 10, 10]]])
    with pytest.raises(ValueError, match="outputs lack keypoint_scores"):
        processor.post_process_keypoint_detection(outputs.__class__(**{**outputs, "keypoint_scores": None}), target_sizes=[(60, 80)])
    (result,), = processor.post_process_keypoint_detection(outputs, target_sizes=[(60, 80)])
    assert result["keypoints"].tolist() == [[40.0, 30.0]]  # the whole 80x60 image: an 80-pixel square crop


@pytest.mark.parametrize("max_steps", ["0", "-5"])
def test_train_refuses_max_steps_that_are_not_positive_or_minus_one(max_steps):
    with pytest.raises(SystemExit, match=rf"--max_steps {max_steps}: pass a positive number of optimizer steps, or -1"):
        train.parse_arguments(["--max_steps", max_steps])


def test_an_absurd_annotation_box_is_skipped_with_a_warning(tmp_path, caplog):
    coco = write_coco(tmp_path, absurd_annotation=53)
    with caplog.at_level(logging.WARNING, logger="processing.coco"):
        dataset, report = load_keypoint_annotations(coco, tmp_path, return_report=True)
    assert 53 not in dataset["annotation_id"] and len(dataset) == 6 and report.skipped_implausible_bbox == 1
    assert f"{coco}: annotation 53: skipped: bbox [0.0, 0.0, 2000000000.0, 2000000000.0] reaches more" in caplog.text


def test_nan_predictions_are_scored_wrong_with_a_warning(tmp_path, caplog):
    dataset = load_keypoint_annotations(write_coco(tmp_path), tmp_path)
    episodes = sample_episodes(dataset, 1, seed=0)
    exact = [np.asarray(dataset[e.query_row]["keypoints"], float) for e in episodes]
    predictions = [np.full((2, 2), np.nan)] + exact[1:]
    with caplog.at_level(logging.WARNING, logger="processing.evaluation"):
        scores = score_pck(dataset, episodes, predictions)
    assert scores["pck"] == pytest.approx(6 / 7)
    assert "2 of 14 scored keypoints have no predicted position (NaN" in caplog.text


def test_a_model_folder_with_missing_tensors_fails_to_load(model_folder, tmp_path):
    folder = damaged_copy(model_folder, tmp_path)
    weights = load_file(folder / "model.safetensors")
    dropped = sorted(name for name in weights if name.startswith("keypoint_head."))
    save_file({k: v for k, v in weights.items() if k not in dropped}, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{folder}: the weights lack {len(dropped)} tensors of the model \(keypoint_head\."):
        KptLlmForKeypointComprehension.from_pretrained(folder)


def test_a_model_folder_with_nan_tensors_fails_to_load(model_folder, tmp_path):
    folder = damaged_copy(model_folder, tmp_path)
    weights = load_file(folder / "model.safetensors")
    name = next(k for k in sorted(weights) if k.startswith("keypoint_head.") and weights[k].is_floating_point())
    weights[name][0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{folder}: the weights {name} contain NaN or infinity"):
        KptLlmForKeypointComprehension.from_pretrained(folder)


# --------------------------------------------------------------------------------------------
# Unclear errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("empty", [Image.new("RGB", (0, 0)), np.zeros((0, 0, 3), np.uint8)], ids=["pil", "numpy"])
def test_an_empty_image_is_named_not_the_box(tiny, images, empty):
    _, processor = tiny
    with pytest.raises(ValueError, match=r"^query: the image is empty \(0x0 pixels\)"):
        processor(query=empty, support=images["support"], kpts=[[10, 10]])
    with pytest.raises(ValueError, match=r"^support: the image is empty"):
        processor(query=images["query"], support=empty, kpts=[[10, 10]])


def test_single_channel_arrays_are_grey_and_five_channels_are_refused(tiny, images):
    _, processor = tiny
    grey = np.asarray(images["query"].convert("L"))
    one_channel = processor(query=grey[..., None], kpts=[[10, 10]], task="semantic")["pixel_values"]
    torch.testing.assert_close(one_channel, processor(query=grey, kpts=[[10, 10]], task="semantic")["pixel_values"])
    with pytest.raises(ValueError, match=r"query: a HxWxC uint8 array needs C = 1 \(grey\), 3 \(RGB\) or 4 \(RGBA\) channels, got shape \(60, 80, 5\)"):
        processor(query=np.zeros((60, 80, 5), np.uint8), kpts=[[10, 10]], task="semantic")


def test_return_tensors_np_is_supported_and_the_model_asks_for_pt(tiny, images):
    model, processor = tiny
    inputs = visual_inputs(processor, images, return_tensors="np")
    assert all(isinstance(value, np.ndarray) for key, value in inputs.items() if key != "keypoint_layout")
    with pytest.raises(TypeError, match=r"input_ids must be a torch.Tensor, got numpy.ndarray: call the processor with return_tensors='pt'"):
        model.detect_keypoints(**inputs)
    with pytest.raises(ValueError, match=r"return_tensors='tf'; expected 'pt' \(what the model takes\) or 'np'"):
        visual_inputs(processor, images, return_tensors="tf")


def test_a_truncated_model_file_is_named(model_folder, tmp_path):
    folder = damaged_copy(model_folder, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match=rf"{weights} is not a readable safetensors file \(truncated or damaged\?\)"):
        KptLlmForKeypointComprehension.from_pretrained(folder)


def test_eval_reports_a_damaged_model_folder_without_a_traceback(model_folder, tmp_path):
    import eval as eval_script

    folder = damaged_copy(model_folder, tmp_path)
    (folder / "tokenizer.json").write_text("{garbage")
    with pytest.raises(SystemExit, match=rf"error: cannot load {folder}: {folder / 'tokenizer.json'} is not valid JSON"):
        eval_script.load_model(folder)


def _checkpoint(output_dir: Path, step: int, truncated: bool = False) -> Path:
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"w": torch.ones(64)}, folder / "model.safetensors")
    torch.save({"step": step}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if truncated:
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) - 40])
    return folder


def test_resume_falls_back_to_the_last_intact_checkpoint(tmp_path, caplog):
    intact = _checkpoint(tmp_path, 2)
    broken = _checkpoint(tmp_path, 4, truncated=True)
    with caplog.at_level(logging.WARNING, logger="train"):
        assert train.checkpoint_to_resume(tmp_path, resume=True, explicit=None) == str(intact)
    assert f"{broken} cannot be resumed from (model.safetensors is damaged" in caplog.text
    (intact / "optimizer.pt").write_bytes((intact / "optimizer.pt").read_bytes()[:-30])
    with pytest.raises(SystemExit, match=f"--resume: no checkpoint-\\* folder in {tmp_path} is intact"):
        train.checkpoint_to_resume(tmp_path, resume=True, explicit=None)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json"])
def test_a_garbage_json_file_is_named(model_folder, tmp_path, name):
    folder = damaged_copy(model_folder, tmp_path)
    (folder / name).write_text('{"model_type": "kptllm", garbage')
    with pytest.raises((ValueError, OSError), match=rf"{folder / name}.* (is not|not a) valid JSON"):
        if name == "config.json":
            KptLlmForKeypointComprehension.from_pretrained(folder)
        else:
            KptLlmProcessor.from_pretrained(folder, trust_remote_code=False)


def test_a_diverging_learning_rate_is_blamed_not_the_data(tmp_path):
    data = tmp_path / "data"
    generate_embedded_benchmark(data, instances_per_category=2, instances_per_species=10, image_size=64, workers=1)
    argv = SMALL + data_flags(data) + [
        "--output_dir", str(tmp_path / "run"), "--max_steps", "3", "--learning_rate", "1e6", "--logging_steps", "100",
        "--save_steps", "100", "--keypoint_attention_weight", "0",
    ]
    with pytest.raises(FloatingPointError, match=r"at step \d \(learning rate .*--learning_rate 1e\+06\): training diverged, the learning rate is probably too high"):
        train.main(argv)


def test_a_config_of_another_model_type_is_refused_before_building(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32}))

    def never(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(KptLlmForKeypointComprehension, "__init__", never)
    with pytest.raises(ValueError, match=rf"{tmp_path}: config.json has model_type 'llama', not 'kptllm': this is not a KptLLM folder"):
        KptLlmForKeypointComprehension.from_pretrained(tmp_path)
