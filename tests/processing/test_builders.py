"""Builders of tiny random models: initialisations that a from-scratch model needs in order to learn."""

import torch

from modeling_kptllm.modeling_kptllm import patch_centers, sine_cosine_embedding
from processing.builders import build_tiny_model
from tests.helpers import KEYPOINT_NAMES


def _linear_probe_r2(features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Held-out R^2 of a ridge regression (first half fits, second half scores)."""
    x = torch.cat([features, torch.ones(len(features), 1)], 1).double()
    y = targets.double()
    half = len(x) // 2
    weights = torch.linalg.solve(x[:half].T @ x[:half] + torch.eye(x.shape[1], dtype=x.dtype), x[:half].T @ y[:half])
    residual = ((x[half:] @ weights - y[half:]) ** 2).sum(0)
    return 1 - residual / ((y[half:] - y[half:].mean(0)) ** 2).sum(0)


def test_random_vision_tower_starts_with_readable_patch_positions():
    model, _ = build_tiny_model(KEYPOINT_NAMES, seed=0, image_size=32, patch_size=8)
    table = model.vision_tower.embeddings.position_embedding.weight.detach()
    grid = model.config.patch_grid_size
    expected = sine_cosine_embedding(patch_centers(grid, table.device), table.shape[1], grid / 2)
    torch.testing.assert_close(table[1:], expected)
    assert table[0].abs().max() == 0  # CLS row
    # the LLM can only regress a location it can read off the image tokens
    pixels = torch.rand(32, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        features = model.get_image_features(pixels)  # (B, h*w, D)
    positions = patch_centers(grid, features.device).repeat(len(pixels), 1)  # (B*h*w, 2)
    r2 = _linear_probe_r2(features.flatten(0, 1), positions)
    assert (r2 > 0.8).all(), r2


def test_small_heads_keep_a_usable_gain_at_init():
    """Fan-in init: with the LLM's 0.02 the tiny head's output barely moved with its input (collapse)."""
    model, _ = build_tiny_model(KEYPOINT_NAMES, seed=0)
    hidden = torch.randn(256, model.config.text_config.hidden_size)
    with torch.no_grad():
        spread = model.keypoint_head(hidden).std(0)
        prompts = model.prompt_encoder(torch.rand(256, 2))  # (N, D_v)
    assert (spread > 0.03).all(), spread
    # F_p enters the extractor's residual stream beside unit-scale support features
    assert 0.8 < prompts.pow(2).mean().sqrt() < 1.2
    head_std = model.keypoint_head.mlp[0].weight.std().item()
    assert abs(head_std - model.config.text_config.hidden_size**-0.5) < 0.02


def test_the_last_llm_attention_starts_louder_than_the_others():
    """The last layer's attention output is what `<keypoint>` retrieves: it must not start drowned."""
    model, _ = build_tiny_model(KEYPOINT_NAMES, seed=0, text_layers=3)
    layers = model.language_model.model.layers
    scales = [layer.self_attn.o_proj.weight.std().item() for layer in layers]
    assert scales[-1] > 6 * max(scales[:-1]), scales
