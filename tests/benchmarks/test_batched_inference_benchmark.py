"""benchmarks/batched_inference.py: a micro run end to end, its grouping of instances and its equality check.

The speedup is machine-dependent and not asserted; the README and the committed JSON report it.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "batched_inference.py"


@pytest.fixture(scope="module")
def bench():
    # benchmarks/ is a folder of scripts, not a package: load the script by path
    spec = importlib.util.spec_from_file_location("batched_inference_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_micro_run_times_both_ways_with_equal_answers(bench, tmp_path, capsys):
    output = tmp_path / "results" / "batched.json"
    result = bench.main(["--total", "4", "--per_call", "1,4", "--keypoints", "3", "--repeats", "2", "--warmup", "0",
                         "--fit_steps", "2", "--max_new_tokens", "8", "--output", str(output)])  # fmt: skip
    assert json.loads(output.read_text()) == json.loads(json.dumps(result))
    assert "| 4 | 1 |" in capsys.readouterr().out
    assert result["per_call"]["1"]["calls"] == 4 and result["per_call"]["4"]["calls"] == 1
    assert all(len(row["seconds"]) == 2 for row in result["per_call"].values())
    assert result["speedup_vs_first"]["1"] == 1.0 and result["same_answers"]["4"]["same"]


def test_instances_of_one_image_share_one_query_entry(bench):
    args = bench.BenchmarkArguments(total=5, keypoints=2)
    scene = bench.build_scene(args)
    images, boxes = bench.group_by_image(scene["instances"])
    # images alternate between the whole image and two boxes: 1 + 2 + 1 + 1 (the last image is cut at 5 instances)
    assert [1 if entry is None else len(entry) for entry in boxes] == [1, 2, 1, 1] and len(images) == 4
    assert boxes[0] is None and len(boxes[1][0]) == 4


def test_differences_are_caught(bench):
    def result(names, points, scores):
        return {"names": names, "keypoints": torch.tensor(points), "scores": torch.tensor(scores)}

    reference = [result(["nose"], [[1.0, 2.0]], [0.5])]
    assert bench.compare(reference, [result(["nose"], [[1.0, 2.0005]], [0.5])])["same"]
    assert not bench.compare(reference, [result(["eye"], [[1.0, 2.0]], [0.5])])["same"]
    assert not bench.compare(reference, [result(["nose"], [[1.0, 2.1]], [0.5])])["same"]
    assert not bench.compare(reference, [result(["nose"], [[float("nan"), float("nan")]], [0.0])])["same"]
    assert not bench.compare(reference, [result(["nose"], [[1.0, 2.0]], [0.4])])["same"]


def test_per_call_must_divide_the_total(bench):
    with pytest.raises(SystemExit, match="positive divisor of --total 8"):
        bench.parse_per_call("1,3", 8)
    with pytest.raises(SystemExit, match="comma-separated integers"):
        bench.parse_per_call("one", 8)
