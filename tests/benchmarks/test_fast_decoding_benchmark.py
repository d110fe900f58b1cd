"""benchmarks/fast_decoding.py: a micro run end to end, its output structure and its equality checks.

The speedups are machine-dependent and not asserted; the README and the committed JSON report them.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from modeling_kptllm.modeling_kptllm import KptLlmDetectionOutput

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fast_decoding.py"


@pytest.fixture(scope="module")
def bench():
    # benchmarks/ is a folder of scripts, not a package: load the script by path
    spec = importlib.util.spec_from_file_location("fast_decoding_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_micro_run_times_three_methods_with_equal_outputs(bench, tmp_path, capsys):
    output = tmp_path / "results" / "fast.json"
    args = ["--preset", "micro", "--keypoints", "3", "--repeats", "2", "--warmup", "1", "--fit_steps", "2",
            "--max_new_tokens", "12", "--output", str(output)]  # fmt: skip
    result = bench.main(args)

    assert json.loads(output.read_text()) == json.loads(json.dumps(result))
    assert "| detect_keypoints() (shared prefix KV cache) |" in capsys.readouterr().out
    inputs = result["inputs"]
    assert inputs["keypoints"] == 3 and len(inputs["row_tokens"]) == 3
    # the shared prefix holds the query image, and saves prefill tokens
    assert inputs["shared_prefix_tokens"] > inputs["image_tokens"]
    assert inputs["prefill_tokens"]["shared_prefix"] < inputs["prefill_tokens"]["batched"]

    assert list(result["methods"]) == ["naive", "batched", "shared_prefix"]
    for method in result["methods"].values():
        assert len(method["times_s"]) == 2 and all(t > 0 for t in method["times_s"])
        assert method["q1_s"] <= method["median_s"] <= method["q3_s"]
        assert method["keypoints_per_s"] == pytest.approx(3 / method["median_s"])
    medians = {name: method["median_s"] for name, method in result["methods"].items()}
    assert result["speedup"]["shared_prefix_vs_naive"] == pytest.approx(medians["naive"] / medians["shared_prefix"])
    assert result["speedup"]["shared_prefix_vs_batched"] == pytest.approx(medians["batched"] / medians["shared_prefix"])
    assert result["target"]["met"] == (result["speedup"]["shared_prefix_vs_naive"] >= 8.0)

    equal = result["equal_outputs"]
    assert equal["all_equal"] and equal["names_identical"] and equal["tokens_identical"]
    assert equal["keypoint_found_identical"] and equal["max_coordinate_difference"] <= 1e-4
    assert len(equal["names"]) == 3 and len(equal["answer_tokens"]) == 3
    assert result["environment"]["torch_threads"] >= 1 and result["model"]["fit_losses"]


@pytest.fixture(scope="module")
def processor(bench):
    from processing.builders import build_tiny_model

    return build_tiny_model(bench.AP10K_KEYPOINT_NAMES)[1]


def detection(processor, answers: list[str], points: list[list[float]]) -> tuple[dict, KptLlmDetectionOutput]:
    """The same answers as the naive loop's dict and as a detect_keypoints output (right-padded rows)."""
    tokenizer = processor.tokenizer
    ids = [tokenizer(answer, add_special_tokens=False)["input_ids"] for answer in answers]
    width = max(len(row) for row in ids)
    sequences = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
    pred = torch.tensor(points)
    found = ~pred.isnan().any(-1)
    return {"answers": ids, "pred_keypoints": pred}, KptLlmDetectionOutput(sequences=sequences, pred_keypoints=pred, keypoint_found=found)


def test_equality_checks_catch_each_kind_of_difference(bench, processor):
    pad_id = processor.tokenizer.pad_token_id
    answers = [" It is the nose. <keypoint>", " It is the left eye. <keypoint>"]
    points = [[0.25, 0.5], [0.75, 0.125]]
    naive, batched = detection(processor, answers, points)
    _, shared = detection(processor, answers, points)
    same = bench.compare_outputs(processor, pad_id, naive, batched, shared)
    assert same["all_equal"] and same["names"] == ["nose", "left eye"] and same["keypoints_found"] == 2

    _, other_name = detection(processor, [answers[0], " It is the right eye. <keypoint>"], points)
    differs = bench.compare_outputs(processor, pad_id, naive, batched, other_name)
    assert not differs["names_identical"] and not differs["tokens_identical"] and not differs["all_equal"]

    _, moved = detection(processor, answers, [[0.25, 0.5], [0.75, 0.125 + 3e-4]])
    differs = bench.compare_outputs(processor, pad_id, naive, batched, moved)
    assert differs["names_identical"] and differs["tokens_identical"]
    assert differs["max_coordinate_difference"] == pytest.approx(3e-4, rel=1e-3) and not differs["all_equal"]

    _, missing = detection(processor, answers, [[0.25, 0.5], [math.nan, math.nan]])
    differs = bench.compare_outputs(processor, pad_id, naive, batched, missing)
    assert not differs["keypoint_found_identical"] and differs["max_coordinate_difference"] == math.inf


def test_main_refuses_to_report_timings_of_disagreeing_methods(bench, monkeypatch, tmp_path):
    def fake_run(args):
        return {"equal_outputs": {"all_equal": False}, "fake": True}

    monkeypatch.setattr(bench, "run_benchmark", fake_run)
    monkeypatch.setattr(bench, "format_markdown", lambda result: "TABLE")
    output = tmp_path / "out.json"
    with pytest.raises(SystemExit, match="disagree"):
        bench.main(["--preset", "micro", "--output", str(output)])
    assert json.loads(output.read_text())["fake"]  # written anyway, for inspection


def test_bad_arguments_name_the_option(bench):
    with pytest.raises(ValueError, match="keypoints must be in 1..17"):
        bench.build_scene(18, 1, 0)
    with pytest.raises(ValueError, match="preset='huge'"):
        bench.load_model(bench.BenchmarkArguments(preset="huge"), bench.build_scene(2, 1, 0))
    with pytest.raises(ValueError, match="task='pose'"):
        bench.task_inputs(None, bench.build_scene(2, 1, 0), "pose")
