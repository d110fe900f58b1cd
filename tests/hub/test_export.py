"""hub.export: the exact Hub folder, its checks, the dry run and the push (with a fake HfApi)."""

import json
import shutil
import textwrap
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from hub import export as hub_export
from hub.export import (
    ExportError,
    PushError,
    check_export_folder,
    code_differing_from_repo,
    export_folder,
    main,
    push_folder,
)
from tests.helpers import random_image, run_without_repo

EVAL_REPORT = {
    "model": "runs/tiny/model",
    "benchmark": "embedded",
    "summary": [
        {
            "task": "Visual-prompt keypoint detection",
            "task_type": "keypoint-detection",
            "dataset": {"name": "KptLLM embedded MP-100-style", "type": "kptllm-embedded", "split": "split1-test", "config": "1-shot"},
            "metric": {"name": "PCK@0.2", "type": "pck", "value": 16.78},
            "baselines": {"support-copy": 29.12, "mean-position": 16.79},
            "setting": "100 fixed episodes, 805 keypoints",
        }
    ],
    "details": {},
}
EXPECTED_FILES = {
    "README.md", "config.json", "generation_config.json", "model.safetensors", "processor_config.json",
    "tokenizer.json", "tokenizer_config.json", "configuration_kptllm.py", "modeling_kptllm.py", "processing_kptllm.py",
    "decoding_kptllm.py", "pipeline_kptllm.py",
}
REPO_ID = "someone/kptllm-tiny"


@pytest.fixture(scope="module")
def model_folder(tiny, tmp_path_factory) -> Path:
    """A tiny model saved as train.py saves it, plus a file that is no part of a model repo."""
    model, processor = tiny
    folder = tmp_path_factory.mktemp("run") / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "train_log.jsonl").write_text("{}\n")
    return folder


@pytest.fixture(scope="module")
def eval_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "results.json"
    path.write_text(json.dumps(EVAL_REPORT))
    return path


@pytest.fixture(scope="module")
def exported(model_folder, eval_json, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "kptllm-tiny"
    result = export_folder(model_folder, out, eval_json, repo_id=REPO_ID, load_check=False)
    assert result.status == "written"
    return out


def test_export_writes_exactly_the_hub_folder(exported, model_folder):
    names = {p.name for p in exported.iterdir()}
    assert names == EXPECTED_FILES
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in names)
    assert json.loads((exported / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_kptllm.KptLlmConfig",
        "AutoModel": "modeling_kptllm.KptLlmForKeypointComprehension",
        "AutoProcessor": "processing_kptllm.KptLlmProcessor",
    }
    assert json.loads((exported / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_kptllm.KptLlmProcessor"
    }
    assert json.loads((exported / "config.json").read_text())["custom_pipelines"] == {
        "keypoint-comprehension": {"impl": "pipeline_kptllm.KptLlmKeypointPipeline", "pt": ["AutoModel"], "type": "multimodal"}
    }
    # weights, tokenizer and code are the trained folder's, byte for byte
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json", "modeling_kptllm.py"):
        assert (exported / name).read_bytes() == (model_folder / name).read_bytes(), name
    card = ModelCard.load(exported / "README.md")
    assert card.data.library_name == "transformers" and f'repo_id = "{REPO_ID}"' in card.text
    assert check_export_folder(exported) == []
    assert not list(exported.parent.glob(".*staging*")), "the staging folder was left behind"


LOADER = textwrap.dedent(
    """
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModel, AutoProcessor

    folder, query_path, support_path, out_path = sys.argv[1:]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    for obj in (config, model, processor):
        assert type(obj).__module__.startswith("transformers_modules"), type(obj).__module__
    inputs = processor(query=Image.open(query_path), support=Image.open(support_path), kpts=[[10, 12], [30, 40]], task="visual")
    with torch.no_grad():
        logits = model(**inputs).logits
        sequences = model.detect_keypoints(**inputs, max_new_tokens=6).sequences
    save_file({"input_ids": inputs["input_ids"], "logits": logits, "sequences": sequences}, out_path)
    """
)


@pytest.mark.slow  # ~20-30 s on 2 busy cores: a fresh interpreter imports torch + transformers
def test_exported_folder_loads_offline_without_the_repo_with_the_same_logits(exported, tiny, tmp_path):
    model, processor = tiny
    query, support = random_image(80, 60, 1), random_image(50, 70, 2)
    query.save(tmp_path / "query.png")
    support.save(tmp_path / "support.png")
    result = run_without_repo(LOADER, [str(exported), str(tmp_path / "query.png"), str(tmp_path / "support.png"), str(tmp_path / "out.safetensors")], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]

    loaded = load_file(tmp_path / "out.safetensors")
    inputs = processor(query=query, support=support, kpts=[[10, 12], [30, 40]], task="visual")
    with torch.no_grad():
        logits = model(**inputs).logits
        sequences = model.detect_keypoints(**inputs, max_new_tokens=6).sequences
    assert torch.equal(loaded["input_ids"], inputs["input_ids"])
    torch.testing.assert_close(loaded["logits"], logits, rtol=0, atol=1e-5)
    assert torch.equal(loaded["sequences"], sequences)


def test_export_refuses_pickle_files(model_folder, eval_json, tmp_path):
    source = tmp_path / "model"
    shutil.copytree(model_folder, source)
    (source / "training_args.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle
    with pytest.raises(ExportError, match=r"pickle.*training_args\.bin"):
        export_folder(source, tmp_path / "out", eval_json, load_check=False)
    assert not (tmp_path / "out").exists()


def test_export_names_the_missing_piece(model_folder, eval_json, tmp_path):
    source = tmp_path / "model"
    shutil.copytree(model_folder, source)
    (source / "generation_config.json").unlink()
    with pytest.raises(ExportError, match="generation_config.json"):
        export_folder(source, tmp_path / "out", eval_json, load_check=False)
    (source / "processing_kptllm.py").unlink()
    with pytest.raises(ExportError, match="processing_kptllm.py is missing"):
        export_folder(source, tmp_path / "out", eval_json, load_check=False)


def test_code_comes_from_the_model_folder_unless_asked(model_folder, eval_json, tmp_path):
    source = tmp_path / "model"
    shutil.copytree(model_folder, source)
    edited = (source / "modeling_kptllm.py").read_text() + "\n# saved with an older version of the code\n"
    (source / "modeling_kptllm.py").write_text(edited)
    assert code_differing_from_repo(source) == ["modeling_kptllm.py"]
    default = export_folder(source, tmp_path / "folder-code", eval_json, load_check=False).folder
    assert (default / "modeling_kptllm.py").read_text() == edited
    repo = export_folder(source, tmp_path / "repo-code", eval_json, load_check=False, code_from_repo=True).folder
    assert (repo / "modeling_kptllm.py").read_bytes() == (hub_export.REPO_CODE_DIR / "modeling_kptllm.py").read_bytes()


def test_export_never_replaces_a_different_folder_without_overwrite(model_folder, eval_json, tmp_path):
    out = tmp_path / "kptllm-tiny"
    assert export_folder(model_folder, out, eval_json, load_check=False).status == "written"
    assert export_folder(model_folder, out, eval_json, load_check=False).status == "unchanged"

    config = out / "config.json"
    config.write_text(config.read_text().replace('"use_cache"', '"use_cache_edited"'))
    edited = config.read_bytes()
    with pytest.raises(ExportError, match=r"differs.*config\.json.*--overwrite"):
        export_folder(model_folder, out, eval_json, load_check=False)
    assert config.read_bytes() == edited, "a refused export changed the folder"

    (out / ".git").mkdir()  # e.g. a clone of the Hub repo: --overwrite must not delete it
    with pytest.raises(ExportError, match=r"\.git/.*even with"):
        export_folder(model_folder, out, eval_json, load_check=False, overwrite=True)
    (out / ".git").rmdir()
    assert export_folder(model_folder, out, eval_json, load_check=False, overwrite=True).status == "replaced"
    assert config.read_bytes() != edited
    assert not list(tmp_path.glob(".*staging*"))


def test_check_export_folder_finds_broken_folders(exported, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / "processing_kptllm.py").unlink()
    (broken / "pipeline_kptllm.py").unlink()
    (broken / "optimizer.pt").write_bytes(b"\x80\x04K\x01.")
    (broken / "model.safetensors").write_bytes(b"\x80\x04K\x01.")  # a pickle under a safetensors name
    config = json.loads((broken / "config.json").read_text())
    config["auto_map"]["AutoModel"] = "modeling_kptllm.NoSuchModel"
    (broken / "config.json").write_text(json.dumps(config))
    problems = "\n".join(check_export_folder(broken))
    assert "processor_config.json: auto_map.AutoProcessor" in problems and "processing_kptllm.py is not in the folder" in problems
    assert "optimizer.pt is a pickle-based file" in problems
    assert "model.safetensors is not a readable safetensors file" in problems
    assert "defines no class NoSuchModel" in problems
    assert "custom_pipelines.keypoint-comprehension = 'pipeline_kptllm.KptLlmKeypointPipeline', but pipeline_kptllm.py is not" in problems


def _forbid_network(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a network call was made")

    for name in ("__init__", "create_repo", "upload_folder", "upload_file", "create_commit"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, fail)
    monkeypatch.setattr(hub_export, "get_token", fail)
    monkeypatch.setattr("socket.socket.connect", fail)


def test_dry_run_lists_every_file_and_makes_no_network_call(exported, monkeypatch):
    _forbid_network(monkeypatch)
    lines = []
    result = push_folder(exported, REPO_ID, dry_run=True, log=lines.append)
    listing = "\n".join(lines)
    assert result.dry_run and result.commit is None
    assert f"https://huggingface.co/{REPO_ID}" in listing
    for path in exported.iterdir():
        assert f"{path.stat().st_size:,} B  {path.name}" in listing, path.name
    assert {name for name, _ in result.files} == EXPECTED_FILES


class FakeHfApi:
    """Records the calls a push makes and answers like huggingface_hub (commit oid + url)."""

    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        kwargs["files"] = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        self.calls.append(("upload_folder", kwargs))
        return SimpleNamespace(oid="a" * 40, commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/{'a' * 40}")

    def upload_file(self, **kwargs):
        kwargs["content"] = Path(kwargs["path_or_fileobj"]).read_text()
        self.calls.append(("upload_file", kwargs))
        return SimpleNamespace(oid="b" * 40, commit_url="https://huggingface.co/x/commit/" + "b" * 40)


def test_push_creates_the_repo_uploads_the_folder_and_pins_the_card(exported, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    folder = tmp_path / "kptllm-tiny"
    shutil.copytree(exported, folder)
    FakeHfApi.calls = []
    result = push_folder(folder, REPO_ID, token="hf_test", private=True, api_factory=FakeHfApi, log=lambda _: None)

    assert [name for name, _ in FakeHfApi.calls] == ["init", "create_repo", "upload_folder", "upload_file"]
    assert FakeHfApi.calls[0][1] == {"token": "hf_test"}
    assert FakeHfApi.calls[1][1] == {"repo_id": REPO_ID, "repo_type": "model", "private": True, "exist_ok": True}
    upload = FakeHfApi.calls[2][1]
    assert upload["repo_id"] == REPO_ID and upload["repo_type"] == "model" and Path(upload["folder_path"]) == folder
    assert upload["delete_patterns"] == "*" and set(upload["files"]) == EXPECTED_FILES
    card_upload = FakeHfApi.calls[3][1]
    assert card_upload["path_in_repo"] == "README.md" and card_upload["repo_id"] == REPO_ID
    assert f'revision = "{"a" * 40}"' in card_upload["content"]
    assert (folder / "README.md").read_text() == card_upload["content"]  # the local folder mirrors the repo
    assert (result.commit, result.card_commit) == ("a" * 40, "b" * 40)


def test_push_without_a_token_fails_before_any_upload(exported, tmp_path, monkeypatch):
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    FakeHfApi.calls = []
    with pytest.raises(PushError, match=r"no Hugging Face token.*nothing was uploaded"):
        push_folder(exported, REPO_ID, api_factory=FakeHfApi, log=lambda _: None)
    assert FakeHfApi.calls == []

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match="HF_HUB_OFFLINE"):
        push_folder(exported, REPO_ID, token="hf_test", api_factory=FakeHfApi, log=lambda _: None)
    assert FakeHfApi.calls == []


@pytest.mark.parametrize("repo_id", ["no-namespace", "a/b/c", "bad name/x"])
def test_push_rejects_bad_repo_ids(exported, repo_id):
    with pytest.raises(PushError, match="not a valid Hub repo id"):
        push_folder(exported, repo_id, dry_run=True, log=lambda _: None)


@pytest.mark.slow  # ~20 s on 2 busy cores: a fresh interpreter imports torch + transformers for the load check
def test_cli_exports_with_the_load_check_then_dry_runs(model_folder, eval_json, tmp_path, monkeypatch, capsys):
    """The command line end to end: export (offline load check in a fresh process) + dry-run listing."""
    _forbid_network(monkeypatch)
    out = tmp_path / "kptllm-tiny"
    result, pushed = main(["--model", str(model_folder), "--eval_json", str(eval_json), "--output_dir", str(out),
                           "--repo_id", REPO_ID, "--dry_run"])
    printed = capsys.readouterr().out
    assert result.load_check is not None and result.load_check["logits_finite"]
    assert all(name.startswith("transformers_modules.") for name in result.load_check["classes"])
    assert result.left_out == ["train_log.jsonl"] and "train_log.jsonl" in printed
    assert pushed.dry_run and "nothing was uploaded" in printed and "model.safetensors" in printed

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "m", "benchmark": "embedded"}))
    with pytest.raises(SystemExit, match=r"error: .*bad\.json: summary is missing"):
        main(["--model", str(model_folder), "--eval_json", str(bad), "--output_dir", str(tmp_path / "other")])
    with pytest.raises(SystemExit, match="need --repo_id"):
        main(["--model", str(model_folder), "--eval_json", str(eval_json), "--output_dir", str(out), "--push"])
