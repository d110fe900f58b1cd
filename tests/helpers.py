"""Helpers shared by the tests: small synthetic images, the tiny model's keypoint vocabulary, and a
fresh offline interpreter that cannot import this repository (for remote-code loading)."""

import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

KEYPOINT_NAMES = ["left eye", "right eye", "nose", "tail tip", "front left paw"]


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


BLOCK_REPO = textwrap.dedent(
    """
    import sys

    class BlockRepo:
        # the repo's packages must not be importable: only a folder's remote code may be used
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_kptllm", "processing", "tests", "hub"):
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, BlockRepo())
    sys.path = [p for p in sys.path if p not in ("", ".")]
    """
)


def run_without_repo(code: str, args: Sequence[object], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `code` (after BLOCK_REPO) in a new interpreter with HF_HUB_OFFLINE=1 and fresh HF caches."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf"))
    return subprocess.run(
        [sys.executable, "-c", BLOCK_REPO + textwrap.dedent(code), *map(str, args)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout,
    )
