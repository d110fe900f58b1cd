"""benchmarks/paper_rehearsal.py's helpers at a tiny width: the fake llava-1.5-7b-hf writer (Hub layout, converts),
the optimizer and memory probes, the result's markdown. The full-width rehearsal itself takes ~20 min on 2 cores and
is a benchmark script (its result: benchmarks/results/paper_rehearsal.md)."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from benchmarks.paper_rehearsal import (
    FakeLlavaShape,
    format_markdown,
    hub_key,
    memory_probe_callback,
    optimizer_state_bytes,
    write_fake_llava,
)
from hub.convert_llava import convert_llava
from processing.builders import template_corpus
from tests.helpers import KEYPOINT_NAMES

TINY = FakeLlavaShape(
    text_hidden=64, text_intermediate=128, text_heads=4, vocab_rows=320, base_tokens=300,
    vision_hidden=32, vision_intermediate=64, vision_heads=4, image_size=28, patch_size=14,
)  # fmt: skip


@pytest.fixture(scope="module")
def fake_llava(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fake") / "llava-1.5-7b-hf"
    return folder, write_fake_llava(folder, TINY, template_corpus(KEYPOINT_NAMES))


def test_fake_checkpoint_has_the_hubs_layout(fake_llava):
    folder, written = fake_llava
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] and written["shards"] == 3
    keys = set(index["weight_map"])
    assert {"vision_tower.vision_model.embeddings.patch_embedding.weight", "vision_tower.vision_model.post_layernorm.weight",
            "multi_modal_projector.linear_2.bias", "language_model.model.layers.1.mlp.down_proj.weight",
            "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"} <= keys  # fmt: skip
    assert not any(key.startswith(("model.", "lm_head")) for key in keys)  # transformers-5 names are not the Hub's
    total = 0
    for shard in shards:
        with safe_open(folder / shard, framework="pt") as reader:
            assert reader.metadata() == {"format": "pt"}
            for key in reader.keys():
                tensor = reader.get_tensor(key)
                assert tensor.dtype == torch.float16 and index["weight_map"][key] == shard
                total += tensor.numel() * 2
    assert total == index["metadata"]["total_size"] == written["bytes"]
    with safe_open(folder / index["weight_map"]["language_model.model.embed_tokens.weight"], framework="pt") as reader:
        assert reader.get_slice("language_model.model.embed_tokens.weight").get_shape() == [320, 64]

    config = json.loads((folder / "config.json").read_text())
    assert config["transformers_version"].startswith("4.") and config["image_token_index"] == 300 and config["vocab_size"] == 320
    tokenizer_ids = json.loads((folder / "tokenizer.json").read_text())
    assert written["tokenizer_tokens"] == 302
    added = {token["content"]: token["id"] for token in tokenizer_ids["added_tokens"]}
    assert added["<image>"] == 300 and added["<pad>"] == 301 and added["<s>"] == 1


def test_fake_checkpoint_converts_with_kptllms_default_token_layout(fake_llava, tmp_path):
    folder, _ = fake_llava
    summary = convert_llava(folder, tmp_path / "kptllm")
    assert summary.dtype == "float16" and summary.vocab_size_before == summary.vocab_size_after == 320  # no resize
    assert summary.token_ids == {"<image>": 300, "<kpt_prompt>": 302, "<keypoint>": 303}  # 32000/32002/32003 at full size


def test_hub_key_knows_only_llava_tensors():
    assert hub_key("model.vision_tower.encoder.layers.0.mlp.fc1.weight") == "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert hub_key("lm_head.weight") == "language_model.lm_head.weight"
    with pytest.raises(ValueError):
        hub_key("keypoint_head.mlp.0.weight")


def test_optimizer_and_memory_probes(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    assert optimizer_state_bytes(optimizer) == {"master_bytes": 0, "moment_bytes": 2 * 8 * 4, "master_is_separate_copy": False}

    path = tmp_path / "probe.json"
    callback = memory_probe_callback(path)
    args, state = SimpleNamespace(world_size=1), SimpleNamespace(global_step=1, is_world_process_zero=True)
    callback.on_step_end(args, state, None, model=model, optimizer=optimizer)
    probe = json.loads(path.read_text())
    assert probe["parameters"] == 23 and probe["trainable_parameters"] == 8 and probe["parameter_bytes"] == 92
    assert probe["parameter_dtypes"] == ["float32"] and probe["moment_bytes"] == 64


def test_result_markdown_lists_every_stage():
    results = {
        "shape": vars(TINY) | {}, "checkpoint": {"tokenizer_tokens": 302, "parameters": 1000, "shards": 3}, "steps": 3,
        "batch": 2, "dtype": "float32", "bf16": False,
        "stages": [{"name": name, "wall_s": 1.5, "peak_rss_gb": 0.5} for name in ("write", "convert", "train", "reload", "eval")],
        "total_wall_s": 7.5, "memory_model_check": {"optimizer_bytes": {"predicted": 96.0, "measured": 96}},
        "train_log": [{"step": 1, "loss": 2.0, "lm_loss": 1.5, "keypoint_loss": 0.25}],
        "reload": {"class": "transformers_modules.x.KptLlm", "dtype": "torch.float32", "parameters": 10, "image_tokens": 4, "keypoints_finite": True},
        "eval": {"summary": [{"method": "KptLLM", "pck": 0.0}]}, "notes": ["a note"],
    }  # fmt: skip
    text = format_markdown(results)
    assert all(f"| {name} | 1.5 | 0.5 |" in text for name in ("write", "convert", "train", "reload", "eval"))
    assert "| optimizer_bytes | 96 | 96 |" in text and "* a note" in text and "step 1: loss 2.0" in text
