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
