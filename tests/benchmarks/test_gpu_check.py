"""benchmarks/gpu_check.{sh,py}: the CPU-side logic (arguments, MFU arithmetic, peaks) and the loud no-GPU failure.

The GPU part itself cannot run here; its result is committed from a GPU machine when one is available.
"""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_paper_check():
    args = gpu_check.parse_arguments([])
    assert (args.steps, args.batch, args.lora_r, args.lora_alpha, args.keypoints) == (20, 16, 128, 256, 17)
    assert (args.text_layers, args.vision_layers) == (32, 24)
    args = gpu_check.parse_arguments(["--steps", "5", "--batch", "4", "--peak_tflops", "500", "--output", ""])
    assert (args.steps, args.batch, args.peak_tflops, args.output) == (5, 4, 500.0, "")


@pytest.mark.parametrize("flag", ["--steps", "--batch", "--keypoints"])
def test_refuses_non_positive_sizes(flag):
    with pytest.raises(SystemExit, match=flag):
        gpu_check.parse_arguments([flag, "0"])


def test_mfu_arithmetic_and_peaks():
    # 16 rows x 21 TFLOP in 1.2 s on a 989 TFLOP/s GPU
    assert gpu_check.mfu(16 * 21e12, 1.2, 989.0) == pytest.approx(16 * 21e12 / 1.2 / 989e12)
    assert gpu_check.mfu(312e12, 1.0, 312.0) == pytest.approx(1.0)
    assert gpu_check.peak_tflops_for("NVIDIA H200") == 989.0
    assert gpu_check.peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.peak_tflops_for("Some GPU", override=100.0) == 100.0
    with pytest.raises(SystemExit, match="--peak_tflops"):
        gpu_check.peak_tflops_for("Some GPU")
    assert gpu_check.median([3.0, 1.0, 2.0]) == 2.0 and gpu_check.median([4.0, 1.0, 2.0, 3.0]) == 2.5


def test_without_a_gpu_it_fails_loudly_instead_of_running_on_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--output", ""])
    assert exit_info.value.code == gpu_check.NO_GPU_EXIT_CODE
    assert "no CUDA GPU" in capsys.readouterr().err


def test_the_shell_script_exits_3_without_a_gpu():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--output", ""], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == gpu_check.NO_GPU_EXIT_CODE, result.stderr[-2000:]
    assert "no CUDA GPU" in result.stderr
