"""Shared fixtures: tiny random KptLLM models and small synthetic images, all built in code."""

import pytest
import torch

from processing.builders import build_tiny_model
from tests.helpers import KEYPOINT_NAMES, random_image


@pytest.fixture(scope="session")
def tiny():
    """(model, processor): a randomly initialised tiny KptLLM in eval mode."""
    model, processor = build_tiny_model(KEYPOINT_NAMES, seed=0)
    return model.eval(), processor


@pytest.fixture()
def images():
    return {"query": random_image(80, 60, 1), "support": random_image(50, 70, 2), "support2": random_image(64, 64, 3)}


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def small_benchmark(tmp_path_factory):
    """A reduced embedded benchmark (3 instances per category, 96 px), generated once per session."""
    from processing.embedded import generate_embedded_benchmark

    out = tmp_path_factory.mktemp("embedded") / "data"
    generate_embedded_benchmark(out, seed=0, instances_per_category=3, instances_per_species=10, image_size=96)
    return out
