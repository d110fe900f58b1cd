"""benchmarks/train_step_overhead.py: identical inputs for both models, and a micro run end to end."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_step_overhead.py"


@pytest.fixture(scope="module")
def bench():
    # benchmarks/ is a folder of scripts, not a package: load the script by path
    spec = importlib.util.spec_from_file_location("train_step_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_llava_gets_the_same_sequence_without_the_prompt_token(bench):
    inputs = bench.build_inputs(bench.PRESETS["micro"])
    ours, llava = inputs["kptllm"], inputs["llava"]
    kpt_prompt_id = ours["config"].kpt_prompt_token_id
    ids, llava_ids = ours["batch"]["input_ids"], llava["batch"]["input_ids"]

    assert llava_ids.shape == ids.shape
    is_prompt = ids == kpt_prompt_id
    assert is_prompt.sum(-1).eq(1).all()  # one <kpt_prompt> per row ...
    assert not (llava_ids == kpt_prompt_id).any()  # ... which LLaVA sees as an ordinary token
    assert torch.equal(llava_ids[~is_prompt], ids[~is_prompt])
    for key in ("attention_mask", "labels"):
        assert torch.equal(llava["batch"][key], ours["batch"][key])
    # the same backbones and the same image token count
    assert llava["config"].vision_config.to_dict() == ours["config"].vision_config.to_dict()
    assert llava["config"].text_config.to_dict() == ours["config"].text_config.to_dict()
    assert llava["config"].image_token_id == ours["config"].image_token_id
    rows = ids.shape[0]
    assert (ids == ours["config"].image_token_id).sum() == rows * ours["config"].image_seq_length


def test_ours_gets_train_py_batch_and_llava_one_crop_per_row(bench):
    preset = bench.PRESETS["micro"]
    inputs = bench.build_inputs(preset)
    ours, llava = inputs["kptllm"]["batch"], inputs["llava"]["batch"]
    rows = preset.instances * preset.keypoints
    # KptLlmDataCollator's layout: right padding, each distinct crop once, indices per row and per prompt shot
    assert ours["attention_mask"][:, 0].eq(1).all()
    assert ours["pixel_values"].shape[0] == ours["support_pixel_values"].shape[0] == preset.instances
    assert ours["query_index"].tolist() == [i for i in range(preset.instances) for _ in range(preset.keypoints)]
    assert ours["support_index"].view(-1).tolist() == ours["query_index"].tolist()
    # LLaVA: the same query crop in every row of an instance, one per row
    assert llava["pixel_values"].shape[0] == rows
    assert torch.equal(llava["pixel_values"], ours["pixel_values"][ours["query_index"]])
    info = inputs["info"]
    assert info["images_encoded"] == {"kptllm": 2 * preset.instances, "llava": rows}
    tokens = info["llm_tokens_per_step"]
    assert tokens["llava"] == tokens["kptllm_full_rows"] == ours["input_ids"].numel() > tokens["kptllm"]
    assert set(info["inputs"]) == {"kptllm", "kptllm_full_rows", "llava"}
    assert bench.FORWARD_OPTIONS["kptllm"] == {"share_prefix": True}  # as KptLlmTrainer passes it


def test_micro_run_trains_both_models(bench):
    # in-process for speed; the subprocess path of the same runner is tested below
    result = bench.run_benchmark("micro", warmup=1, steps=2, isolate=False, device="cpu")

    json.dumps(result)  # what --output writes
    assert [row["model"] for row in result["rows"]] == ["llava", "kptllm", "kptllm_full_rows"]
    # the same model, weights and rows with and without the shared prefix: the same first loss
    assert result["rows"][1]["losses"][0] == pytest.approx(result["rows"][2]["losses"][0], rel=1e-5)
    assert result["rows"][1]["forward_options"] == {"share_prefix": True}
    for row in result["rows"]:
        assert row["timed_steps"] == 2 and len(row["step_times_s"]) == 2
        assert row["step_time_median_s"] > 0 and row["samples_per_s"] > 0
        assert row["step_time_q1_s"] <= row["step_time_median_s"] <= row["step_time_q3_s"]
        assert len(row["losses"]) == 3 and row["loss_finite"]
        assert all(math.isfinite(v) for v in row["losses"])
        # every module group was updated by the optimizer
        assert row["parameters_changed"] > 0
        for group, counts in row["groups"].items():
            assert counts["tensors"] > 0 and counts["changed"] > 0, (row["model"], group, counts)
        assert row["peak_memory_mib"] is None  # both models in one process: no separate peak
    ours = result["rows"][1]
    assert {"prompt_encoder", "prompt_feature_extractor", "keypoint_head"} <= set(ours["groups"])
    assert ours["parameters"] > result["rows"][0]["parameters"]

    overhead = result["overhead"]
    expected = 100 * (ours["step_time_median_s"] / result["rows"][0]["step_time_median_s"] - 1)
    assert overhead["step_time_pct"] == pytest.approx(expected)
    assert overhead["within_target"] == (overhead["step_time_pct"] <= 10.0)
    full = result["overhead_full_rows"]
    assert full["step_time_pct"] == pytest.approx(
        100 * (result["rows"][2]["step_time_median_s"] / result["rows"][0]["step_time_median_s"] - 1)
    )

    table = bench.format_markdown(result)
    assert "| LlavaForConditionalGeneration" in table and "| KptLlmForKeypointComprehension" in table
    assert "overhead" in table and "share_prefix=False" in table


def test_worker_subprocess_trains_and_reports_its_own_peak_memory(bench, tmp_path):
    inputs = bench.build_inputs(bench.PRESETS["micro"])
    inputs["kptllm"]["config"].save_pretrained(tmp_path / "kptllm")
    torch.save(inputs["kptllm"]["batch"], tmp_path / "kptllm_batch.pt")
    worker = bench.WorkerClient("kptllm_full_rows", tmp_path, lr=1e-3, device="cpu", seed=0, threads=1, adamw="default")
    try:
        worker.wait_ready()
        seconds, loss = worker.step()
        assert seconds > 0 and math.isfinite(loss)
        worker.step()
        row = worker.finish(warmup=1)
    finally:
        worker.close()
    assert row["model"] == "kptllm_full_rows" and row["timed_steps"] == 1 and row["torch_threads"] == 1
    assert row["forward_options"] == {"share_prefix": False}
    assert row["loss_finite"] and row["parameters_changed"] > 0
    # the high-water mark of the worker's own address space, above its post-import baseline
    assert row["peak_memory_mib"] > 0 and row["peak_memory_delta_mib"] > 0
    assert row["peak_memory_mib"] == row["rss_peak"]["vm_hwm_mib"]


def test_main_writes_json(bench, tmp_path, monkeypatch, capsys):
    calls = {}

    def fake_run(preset, **kwargs):  # main's wiring only; the measurement is tested above
        calls.update(kwargs, preset=preset)
        return {"fake": True}

    monkeypatch.setattr(bench, "run_benchmark", fake_run)
    monkeypatch.setattr(bench, "format_markdown", lambda result: "TABLE")
    output = tmp_path / "results" / "out.json"
    bench.main(["--preset", "micro", "--steps", "1", "--warmup", "0", "--output", str(output)])
    assert json.loads(output.read_text()) == {"fake": True, "preset": "micro"}
    assert calls["preset"] == bench.PRESETS["micro"] and calls["steps"] == 1 and calls["isolate"] is True
    assert "TABLE" in capsys.readouterr().out
