"""save_pretrained -> AutoModel/AutoProcessor(trust_remote_code=True) in a process that cannot import the repo."""

import json
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.helpers import random_image, run_without_repo

LOADER = textwrap.dedent(
    """
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoProcessor

    folder, query_path, support_path, out_path = sys.argv[1:]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    inputs = processor(query=Image.open(query_path), support=Image.open(support_path),
                       kpts=[[10, 12], [30, 40]], task="visual", kpt_names=["left eye", "nose"], return_labels=True)
    with torch.no_grad():
        out = model(**inputs)
        det = model.detect_keypoints(**processor(query=Image.open(query_path), support=Image.open(support_path),
                                                 kpts=[[10, 12], [30, 40]], task="visual"), max_new_tokens=6)
    save_file({"input_ids": inputs["input_ids"], "logits": out.logits, "loss": out.loss.reshape(1),
               "sequences": det.sequences}, out_path)
    """
)


def test_saved_folder_loads_with_trust_remote_code_alone(tiny, tmp_path):
    model, processor = tiny
    folder = tmp_path / "kptllm-tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)

    files = {p.name for p in folder.iterdir()}
    assert {"configuration_kptllm.py", "modeling_kptllm.py", "processing_kptllm.py", "decoding_kptllm.py", "model.safetensors"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_kptllm.KptLlmConfig",
        "AutoModel": "modeling_kptllm.KptLlmForKeypointComprehension",
    }
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_kptllm.KptLlmProcessor"}
    assert set(load_file(folder / "model.safetensors")) == set(model.state_dict())

    query, support = random_image(80, 60, 1), random_image(50, 70, 2)
    query.save(tmp_path / "query.png")
    support.save(tmp_path / "support.png")
    result = run_without_repo(LOADER, [str(folder), str(tmp_path / "query.png"), str(tmp_path / "support.png"), str(tmp_path / "out.safetensors")], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]

    loaded = load_file(tmp_path / "out.safetensors")
    inputs = processor(query=query, support=support, kpts=[[10, 12], [30, 40]], task="visual", kpt_names=["left eye", "nose"], return_labels=True)
    with torch.no_grad():
        out = model(**inputs)
        det = model.detect_keypoints(
            **processor(query=query, support=support, kpts=[[10, 12], [30, 40]], task="visual"), max_new_tokens=6
        )
    assert torch.equal(loaded["input_ids"], inputs["input_ids"])
    torch.testing.assert_close(loaded["logits"], out.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded["loss"], out.loss.reshape(1), rtol=0, atol=1e-5)
    assert torch.equal(loaded["sequences"], det.sequences)


def test_remote_code_uses_relative_imports_only():
    package = Path(__file__).resolve().parents[2] / "modeling_kptllm"
    for name in sorted(path.name for path in package.glob("*.py")):
        source = (package / name).read_text()
        assert "import modeling_kptllm" not in source and "from modeling_kptllm" not in source, name
        assert "from processing" not in source and "import processing" not in source, name


PIPELINE_LOADER = textwrap.dedent(
    """
    import json
    from PIL import Image
    from transformers import pipeline

    folder, query_path, support_path, out_path = sys.argv[1:]
    detector = pipeline("keypoint-comprehension", model=folder, trust_remote_code=True)
    assert type(detector).__module__.startswith("transformers_modules"), type(detector).__module__
    query, support = Image.open(query_path), Image.open(support_path)
    results = {
        "visual": detector(query=query, support=support, kpts=[[10, 12], [30, 40]], identify_then_detect=False),
        "batched": detector(query=[query_path, query], query_bbox=[[[0, 0, 40, 40], [10, 5, 50, 40]], None],
                            kpt_names=["nose"], task="textual", identify_then_detect=False, max_new_tokens=4),
    }
    with open(out_path, "w") as handle:
        json.dump(results, handle)
    """
)


def test_saved_folder_runs_as_a_pipeline_with_trust_remote_code_alone(tiny, tmp_path):
    """`pipeline("keypoint-comprehension", model=folder, trust_remote_code=True)` in an interpreter without the
    repository: the folder's config names the pipeline file that save_pretrained copied beside the model's."""
    from modeling_kptllm.pipeline_kptllm import as_json_friendly

    model, processor = tiny
    folder = tmp_path / "kptllm-tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert (folder / "pipeline_kptllm.py").read_bytes() == (Path(__file__).resolve().parents[2] / "modeling_kptllm" / "pipeline_kptllm.py").read_bytes()
    assert json.loads((folder / "config.json").read_text())["custom_pipelines"] == {
        "keypoint-comprehension": {"impl": "pipeline_kptllm.KptLlmKeypointPipeline", "pt": ["AutoModel"], "type": "multimodal"}
    }
    query, support = random_image(80, 60, 1), random_image(50, 70, 2)
    query.save(tmp_path / "query.png")
    support.save(tmp_path / "support.png")
    result = run_without_repo(PIPELINE_LOADER, [folder, tmp_path / "query.png", tmp_path / "support.png", tmp_path / "out.json"], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    loaded = json.loads((tmp_path / "out.json").read_text())

    # the same as the processor and model in this process (no-ItD rows: every keypoint has a position and score)
    with torch.no_grad():
        visual = model.detect_keypoints(**processor(query=query, support=support, kpts=[[10, 12], [30, 40]], identify_then_detect=False))
        batched = model.detect_keypoints(**processor(
            query=[query, query], query_bbox=[[[0, 0, 40, 40], [10, 5, 50, 40]], None], kpt_names=["nose"], task="textual",
            identify_then_detect=False,
        ), max_new_tokens=4)
    expected = {
        "visual": [as_json_friendly(r) for r in processor.post_process_keypoint_detection(visual)[0]],
        "batched": [[as_json_friendly(r) for r in image] for image in processor.post_process_keypoint_detection(batched)],
    }
    assert [len(image) for image in loaded["batched"]] == [2, 1]
    for key in expected:
        flat_loaded = json.dumps(loaded[key], sort_keys=True)
        flat_expected = json.dumps(expected[key], sort_keys=True)
        assert flat_loaded.count('"x": null') == flat_expected.count('"x": null') == 0
    for mine, theirs in zip([expected["visual"]] + expected["batched"], [loaded["visual"]] + loaded["batched"]):
        for box_mine, box_theirs in zip(mine, theirs):
            assert box_mine["bbox"] == box_theirs["bbox"]
            for a, b in zip(box_mine["keypoints"], box_theirs["keypoints"]):
                assert a["label"] == b["label"] and a["name"] == b["name"]
                assert abs(a["x"] - b["x"]) < 1e-3 and abs(a["y"] - b["y"]) < 1e-3 and abs(a["score"] - b["score"]) < 1e-5
