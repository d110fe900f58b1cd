"""KptLLM: a multimodal LLM for semantic keypoint comprehension (identify-then-detect).

    query image ──► vision tower ──► F_q ──► projector ─────────────────────────► z_q at <image>
    support image ─► vision tower ──► F_s ──┐
    keypoint (x, y) ─► sine-cosine PE ─► MLP ─► F_p ─► CrossAttnLayers(F_p, F_s) ─► z_p at <kpt_prompt>
    LLM([z_q, z_p, t]) ──► lm_head ──► the keypoint's name, then <keypoint>     ("identify")
                      └──► last hidden state at <keypoint> ──► FFN ──► (x, y)    ("detect")

Coordinates inside the model are normalized to [0, 1] in the resized crop of an instance's box.
This file ships to the Hub as remote code: relative imports only.
"""

import math
import os
import shutil
from dataclasses import dataclass
from itertools import chain
from typing import Any
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from .configuration_kptllm import KptLlmConfig
from .decoding_kptllm import KptLlmDecodingMixin, KptLlmDetectionOutput


# Amplitude of the positional encodings inside the prompt feature extractor: large enough that, with
# the cross-attention initialised as identities, position similarity outweighs content and a prompt
# starts attending to the patches within about one patch of it (measured: 99% of prompts put the
# most weight on their own patch of an 8x8 grid, ~60% of the weight).
POSITION_AMPLITUDE = 3.0

# `pipeline("keypoint-comprehension", model=folder, trust_remote_code=True)`: save_pretrained writes this into
# config.json and copies the pipeline's file beside the model's, as `Pipeline.save_pretrained` does
PIPELINE_FILE = "pipeline_kptllm.py"
CUSTOM_PIPELINES = {
    "keypoint-comprehension": {"impl": "pipeline_kptllm.KptLlmKeypointPipeline", "pt": ["AutoModel"], "type": "multimodal"},
}


@dataclass
class KptLlmOutput(ModelOutput):
    """
    loss: `lm_loss + keypoint_loss_weight * keypoint_loss` when labels are given.
    lm_loss: next-token cross-entropy on the answer tokens (labels != -100).
    keypoint_loss: L1 between predicted and target coordinates of visible keypoints.
    logits: (B, L, V) next-token scores; (B, L - shared_prefix_length, V) under `share_prefix`.
    pred_keypoints: (B, 2) normalized (x, y) regressed at each row's `<keypoint>` token; NaN for rows
        without one.
    cache: the language model's key/value cache.
    attentions: with `output_attentions=True` (eager attention), the LLM's (B, heads, L, L) attention
        weights, one per layer; under `share_prefix` only the rows' own queries: (B, heads, L - P, L).
    shared_prefix_length: P, the leading tokens computed once per distinct query crop (`share_prefix`);
        None when every row was computed in full.
    """

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    keypoint_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    pred_keypoints: torch.FloatTensor | None = None
    cache: Cache | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    shared_prefix_length: int | None = None


def sine_cosine_embedding(coords: torch.Tensor, dim: int, max_frequency: float) -> torch.Tensor:
    """Sine-cosine embedding of normalized 2-D points: (..., 2) -> (..., dim).

    Frequencies rise geometrically from 1 to `max_frequency` cycles per image side (the patch grid's
    resolution), so that the embedding tells neighbouring patches apart; each group of 4 channels is
    [sin x, cos x, sin y, cos y] at one frequency, so every attention head sees both axes.
    """
    if dim % 4:
        raise ValueError(f"sine-cosine embedding needs a dimension divisible by 4, got {dim}")
    num_freqs = dim // 4
    exponents = torch.arange(num_freqs, device=coords.device, dtype=torch.float32) / max(num_freqs - 1, 1)
    freqs = max_frequency**exponents  # (dim/4,)
    angles = 2 * math.pi * coords.float().unsqueeze(-2) * freqs.unsqueeze(-1)  # (..., dim/4, 2)
    embedding = torch.stack([angles[..., 0].sin(), angles[..., 0].cos(), angles[..., 1].sin(), angles[..., 1].cos()], -1)
    return embedding.flatten(-2)  # (..., dim)


def patch_centers(grid_size: int, device: torch.device) -> torch.Tensor:
    """Normalized (x, y) centers of a square patch grid, row-major like ViT tokens: (grid², 2)."""
    centers = (torch.arange(grid_size, device=device, dtype=torch.float32) + 0.5) / grid_size
    ys, xs = torch.meshgrid(centers, centers, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)


def mark_fan_in_init(module: nn.Module) -> None:
    """Have `_init_weights` draw the module's Linear weights with std 1/sqrt(fan_in) (LeCun normal).

    The LLM's `initializer_range` (0.02) suits widths near 2,500 only: in a 128-wide MLP each layer
    then shrinks its input about 4-10x, and the tiny model's three-layer keypoint head started (and,
    measured, stayed) with an output spread of 1e-6 across keypoints. Fan-in scaling keeps the gain of
    these small MLPs near 1 at any width (at 4,096 it is 0.016, close to 0.02).
    """
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            layer.fan_in_init = True


class KptLlmProjector(nn.Module):
    """LLaVA-1.5's `linear -> GELU -> linear` (same parameter names, so its weights load), or linear."""

    def __init__(self, config: KptLlmConfig, in_features: int):
        super().__init__()
        out_features = config.text_config.hidden_size
        self.linear_1 = nn.Linear(in_features, out_features)
        if config.projector_type == "mlp2x_gelu":
            self.act = ACT2FN[config.projector_hidden_act]
            self.linear_2 = nn.Linear(out_features, out_features)
        else:
            self.act = self.linear_2 = None
        mark_fan_in_init(self)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_1(features)
        if self.linear_2 is not None:
            hidden = self.linear_2(self.act(hidden))
        return hidden


class KptLlmPromptEncoder(nn.Module):
    """Eq. 1: F_p = MLP(PE(x)), mapping a keypoint position into the vision feature space."""

    def __init__(self, config: KptLlmConfig):
        super().__init__()
        dim = config.vision_config.hidden_size
        self.embed_dim = dim
        self.max_frequency = config.patch_grid_size / 2
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        # F_p starts the extractor's residual stream, to which the support features F_s are added; at unit
        # scale, like F_s, the position is not swamped (measured on the tiny model: F_p at rms 0.4 next to
        # F_s at 1.2 left a linear probe of z_p explaining 8-18% of the support coordinate's variance)
        self.norm = nn.LayerNorm(dim)
        mark_fan_in_init(self)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        embedding = sine_cosine_embedding(coords, self.embed_dim, self.max_frequency)
        return self.norm(self.mlp(embedding.to(self.mlp[0].weight.dtype)))  # (N, D)


def scores_against_own_memory(queries: torch.Tensor, keys: torch.Tensor, memory_index: torch.Tensor) -> torch.Tensor:
    """queries (N, H, Lq, d) . keys of each query row's own memory row: keys (M, H, Lk, d), memory_index (N,)
    -> (N, H, Lq, Lk).

    Many rows share one memory row (the K prompts of one image): every row is scored against all M memory
    rows in one product and its own row is kept, rather than copying that row's keys per query row (the
    copy and its backward were ~40% of the prompt extractor's time in stage 0).
    """
    all_pairs = torch.einsum("nhqd,mhkd->nhqmk", queries, keys)  # (N, H, Lq, M, Lk)
    index = memory_index.view(-1, 1, 1, 1, 1).expand(*all_pairs.shape[:3], 1, all_pairs.shape[-1])
    return all_pairs.gather(3, index).squeeze(3)


def weighted_sum_of_own_memory(weights: torch.Tensor, values: torch.Tensor, memory_index: torch.Tensor) -> torch.Tensor:
    """sum_k weights[n, h, q, k] * values[memory_index[n], h, k]: weights (N, H, Lq, Lk), values (M, H, Lk, d)
    -> (N, H, Lq, d), with no per-row copy of the values (see `scores_against_own_memory`)."""
    index = memory_index.view(-1, 1, 1, 1, 1).expand(*weights.shape[:3], 1, weights.shape[-1])
    spread = weights.new_zeros(*weights.shape[:3], values.shape[0], weights.shape[-1])  # (N, H, Lq, M, Lk)
    return torch.einsum("nhqmk,mhkd->nhqd", spread.scatter(3, index, weights.unsqueeze(3)), values)


class KptLlmAttention(nn.Module):
    """Multi-head attention with separate q/k/v/o projections (plain Linears: LoRA-, ZeRO- and init-friendly).

    `starts_local=True` marks the cross-attention to the support features: it is initialised so that,
    before training, it pools the support patches around the prompt position.
    """

    def __init__(self, dim: int, num_heads: int, starts_local: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.starts_local = starts_local
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        if starts_local:
            # q/k as identities turn the logits into similarities of the (amplified) sine-cosine
            # positions, which peak at the prompt; v/o as identities pass the pooled features through.
            # The extractor thus starts as a soft local pooling (Table 6's baseline) and learns global
            # context from there, instead of starting as a blind average of the whole support image.
            for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
                proj.identity_init_scale = 1.0

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, memory_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        # query (N, Lq, D); key, value (M, Lk, D); memory_index (N,): the key/value row of each query row
        # (None: M == N). Many prompts share one support image, so its keys and values are projected once.
        batch, q_len, dim = query.shape

        def split_heads(x: torch.Tensor) -> torch.Tensor:  # (N, L, D) -> (N, H, L, D/H)
            return x.view(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

        queries = split_heads(self.q_proj(query))  # (N, H, Lq, D/H)
        keys, values = split_heads(self.k_proj(key)), split_heads(self.v_proj(value))  # (M, H, Lk, D/H)
        if memory_index is None:
            attended = F.scaled_dot_product_attention(queries, keys, values)  # (N, H, Lq, D/H)
        else:
            scores = scores_against_own_memory(queries, keys, memory_index) * queries.shape[-1] ** -0.5  # (N, H, Lq, Lk)
            attended = weighted_sum_of_own_memory(scores.softmax(-1), values, memory_index)  # (N, H, Lq, D/H)
        return self.o_proj(attended.transpose(1, 2).reshape(batch, q_len, dim))


class KptLlmCrossAttentionLayer(nn.Module):
    """A pre-norm transformer decoder layer: self-attention over the prompts, cross-attention to F_s, FFN."""

    def __init__(self, config: KptLlmConfig):
        super().__init__()
        dim = config.vision_config.hidden_size
        heads = config.prompt_extractor_heads
        self.self_attn_norm = nn.LayerNorm(dim)
        self.self_attn = KptLlmAttention(dim, heads)
        self.cross_attn_norm = nn.LayerNorm(dim)
        self.cross_attn = KptLlmAttention(dim, heads, starts_local=True)
        self.mlp_norm = nn.LayerNorm(dim)
        hidden = int(dim * config.prompt_extractor_mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(
        self,
        prompts: torch.Tensor,
        prompt_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        memory_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # prompts, prompt_pos: (N, 1, D); memory: (M, h*w, D); memory_pos: (1, h*w, D); memory_index: (N,) or None
        normed = self.self_attn_norm(prompts)
        prompts = prompts + self.self_attn(normed + prompt_pos, normed + prompt_pos, normed)
        normed = self.cross_attn_norm(prompts)
        prompts = prompts + self.cross_attn(normed + prompt_pos, memory + memory_pos, memory, memory_index)
        return prompts + self.mlp(self.mlp_norm(prompts))


class KptLlmPromptFeatureExtractor(nn.Module):
    """Eq. 2: z_p = CrossAttnLayers(F_p, F_s), with F_p as query and F_s (+ 2-D PE) as key/value."""

    def __init__(self, config: KptLlmConfig):
        super().__init__()
        self.grid_size = config.patch_grid_size
        self.max_frequency = config.patch_grid_size / 2
        self.layers = nn.ModuleList(KptLlmCrossAttentionLayer(config) for _ in range(config.prompt_extractor_layers))
        self.norm = nn.LayerNorm(config.vision_config.hidden_size)

    def forward(
        self,
        prompt_embeds: torch.Tensor,
        coords: torch.Tensor,
        support_features: torch.Tensor,
        memory_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # prompt_embeds: (N, D); coords: (N, 2); support_features: (M, h*w, D); memory_index: (N,) rows of
        # support_features, None when M == N -> (N, D)
        dim = prompt_embeds.shape[-1]
        dtype = prompt_embeds.dtype
        prompt_pos = POSITION_AMPLITUDE * sine_cosine_embedding(coords, dim, self.max_frequency)  # (N, D)
        centers = patch_centers(self.grid_size, coords.device)
        memory_pos = POSITION_AMPLITUDE * sine_cosine_embedding(centers, dim, self.max_frequency)  # (h*w, D)
        prompt_pos, memory_pos = prompt_pos.to(dtype).unsqueeze(1), memory_pos.to(dtype).unsqueeze(0)
        prompts = prompt_embeds.unsqueeze(1)  # (N, 1, D)
        for layer in self.layers:
            prompts = layer(prompts, prompt_pos, support_features, memory_pos, memory_index)
        return self.norm(prompts.squeeze(1))


def patch_offsets(coords: torch.Tensor, grid_size: int) -> torch.Tensor:
    """|patch centre - point| per axis, in patches: coords (N, 2) -> (N, h*w, 2)."""
    centers = patch_centers(grid_size, coords.device)  # (h*w, 2)
    return (centers[None] - coords[:, None].float()).abs() * grid_size


def average_pool_around(
    support_features: torch.Tensor, coords: torch.Tensor, grid_size: int, radius: float
) -> torch.Tensor:
    """Table 6 baseline: tent-weighted mean of the support patches within `radius` patches of x.

    support_features: (N, h*w, D), coords: (N, 2) -> (N, D).
    """
    offsets = patch_offsets(coords, grid_size)  # (N, h*w, 2)
    weights = (1 - offsets / radius).clamp(min=0).prod(-1)  # (N, h*w)
    # the nearest patch always contributes, so a keypoint between patch centres never gets zero weight
    nearest = offsets.pow(2).sum(-1).argmin(-1)  # (N,)
    weights[torch.arange(len(coords), device=coords.device), nearest] += 1e-6
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.einsum("np,npd->nd", weights.to(support_features.dtype), support_features)


class KptLlmKeypointHead(nn.Module):
    """Eq. 5: y = FFN(u_kpt), squashed to [0, 1] because targets are normalized crop coordinates.

    GELU, not ReLU: with ReLU every unit of the first layer died early in training the tiny model
    (measured: 0% ever active), after which the head predicted the same point for every keypoint.
    """

    def __init__(self, config: KptLlmConfig):
        super().__init__()
        dim = config.text_config.hidden_size
        hidden = config.keypoint_head_hidden_size or dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 2))
        mark_fan_in_init(self)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.mlp(hidden_states).sigmoid()


class KptLlmPreTrainedModel(PreTrainedModel):
    config_class = KptLlmConfig
    config: KptLlmConfig
    base_model_prefix = "kptllm"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["KptLlmCrossAttentionLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        identity_scale = getattr(module, "identity_init_scale", None)
        if isinstance(module, nn.Linear) and identity_scale is not None:
            eye = torch.eye(module.out_features, module.in_features, device=module.weight.device, dtype=module.weight.dtype)
            init.copy_(module.weight, eye * identity_scale)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and getattr(module, "fan_in_init", False):
            init.normal_(module.weight, mean=0.0, std=module.in_features**-0.5)
            if module.bias is not None:
                init.zeros_(module.bias)


class KptLlmForKeypointComprehension(KptLlmDecodingMixin, KptLlmPreTrainedModel, GenerationMixin):
    """Vision tower + prompt encoder + prompt feature extractor + causal LLM + keypoint head (paper §3).

    Inputs beyond the usual `input_ids` / `attention_mask`:
      pixel_values (N_q, 3, H, W): one query crop per `<image>` block, in order; a single crop is
          shared by every sequence of the batch (one instance, K keypoint sequences).
      query_index (B,): the crop of `pixel_values` that fills each row's `<image>` block (the processor
          writes it: several instances with K rows each).
      support_pixel_values (N_s, 3, H, W), prompt_coords (P, S, 2), prompt_visible (P, S): S support
          shots for each of the P prompts. Either N_s == S (the same shots serve every prompt) or
          N_s == P * S (shot s of prompt p is image p * S + s). Invisible shots are left out of the mean.
      support_index (P, S): the image of `support_pixel_values` that holds shot s of prompt p, for any
          N_s (the training collator writes it, with each distinct support crop once).
      labels (B, L): answer token ids, -100 elsewhere; keypoint_labels (B, 2), keypoint_visible (B,):
          the target of each row's `<keypoint>` token.
    """

    def __init__(self, config: KptLlmConfig):
        super().__init__(config)
        self.loss_type = "ForCausalLM"
        vision_dim = config.vision_config.hidden_size
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = KptLlmProjector(config, vision_dim)
        if config.prompt_feature_extractor == "cross_attention":
            self.prompt_encoder = KptLlmPromptEncoder(config)
            self.prompt_feature_extractor = KptLlmPromptFeatureExtractor(config)
        else:
            self.prompt_encoder = self.prompt_feature_extractor = None
        self.prompt_projector = KptLlmProjector(config, vision_dim)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.keypoint_head = KptLlmKeypointHead(config)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' loading, refusing a broken folder with an error that names it.

        The weight files of a local folder are opened before anything is built (a truncated file fails with
        its path, not a bare safetensors error); a model that the weights do not fully cover (missing tensors
        would keep their random initialization) or that holds NaN/inf weights is refused, not only logged.
        With `output_loading_info=True` the caller reads the missing keys itself (the LLaVA converter expects
        the KptLLM modules to be missing), so they are returned, not refused.
        """
        source = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(source):
            for path in sorted(Path(source).glob("*.safetensors")):
                try:
                    with safe_open(path, framework="pt"):
                        pass
                except (SafetensorError, OSError) as error:
                    raise OSError(f"{path} is not a readable safetensors file (truncated or damaged?): {error}") from None
        with_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs)
        missing = sorted(info["missing_keys"])
        if missing and not with_info:
            raise ValueError(
                f"{source}: the weights lack {len(missing)} tensors of the model ({', '.join(missing[:4])}"
                f"{', ...' if len(missing) > 4 else ''}); they would stay randomly initialized. Is the folder complete?"
            )
        non_finite = [
            name for name, tensor in chain(model.named_parameters(), model.named_buffers())
            if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all()
        ]
        if non_finite:
            raise ValueError(
                f"{source}: the weights {', '.join(non_finite[:4])}{', ...' if len(non_finite) > 4 else ''} contain NaN "
                "or infinity (a diverged training run?)"
            )
        return (model, info) if with_info else model

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' saving; with the remote code it also ships the pipeline (file + config entry)."""
        pipeline_file = Path(__file__).with_name(PIPELINE_FILE)
        # a model loaded as remote code finds only the files its modules import beside it: without the
        # pipeline's file the folder must not advertise the pipeline
        ships_pipeline = self._auto_class is not None and pipeline_file.is_file()
        if ships_pipeline:
            self.config.custom_pipelines = CUSTOM_PIPELINES
        elif hasattr(self.config, "custom_pipelines"):
            del self.config.custom_pipelines
        super().save_pretrained(save_directory, *args, **kwargs)
        if ships_pipeline:
            shutil.copyfile(pipeline_file, Path(save_directory) / PIPELINE_FILE)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def get_vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, h*w, D_v): the selected vision layer, CLS dropped under "default"."""
        self._check_pixel_values(pixel_values, "pixel_values")
        return self._encode_images(pixel_values)

    def _encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, h*w, D_v), identical crops encoded once (see `_encode_distinct_images`)."""
        features, crop_of_image = self._encode_distinct_images(pixel_values)
        return features if len(features) == len(pixel_values) else features[crop_of_image]

    def _encode_distinct_images(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.LongTensor]:
        """(N, 3, H, W) -> features of the distinct crops (U, h*w, D_v) and each image's row among them (N,).

        The K keypoint rows of one instance share its query and support crops (instance-grouped
        training batches, the unshared decoding path): the tower runs once per distinct crop, and the
        caller keeps working on the U distinct features (projector, prompt memory) instead of N copies.
        """
        flat = pixel_values.flatten(1)  # (N, 3*H*W)
        unique, crop_of_image = torch.unique(flat, dim=0, return_inverse=True)
        if len(unique) < len(flat):
            return self._encode_unique_images(unique.view(-1, *pixel_values.shape[1:])), crop_of_image
        # all distinct: keep the caller's order (no gather needed afterwards)
        return self._encode_unique_images(pixel_values), torch.arange(len(flat), device=pixel_values.device)

    def _encode_unique_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        outputs = self.vision_tower(pixel_values.to(self.vision_tower.dtype), output_hidden_states=True)
        features = outputs.hidden_states[self.config.vision_feature_layer]
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        return features

    def _check_pixel_values(self, pixel_values: torch.Tensor, field: str) -> None:
        expected = self.config.vision_config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, expected, expected):
            raise ValueError(f"{field} must have shape (N, 3, {expected}, {expected}), got {tuple(pixel_values.shape)}")
        if not torch.isfinite(pixel_values.sum()):  # one reduction: NaN and inf propagate into the sum
            raise ValueError(f"{field} contain NaN or infinity")

    def _check_sequence_inputs(self, input_ids, pixel_values, support_pixel_values, prompt_coords, attention_mask,
                               max_new_tokens: int = 0) -> None:
        """Clear errors for inputs that would otherwise fail deep inside torch, or silently overrun the LLM."""
        for name, value in (("input_ids", input_ids), ("pixel_values", pixel_values), ("attention_mask", attention_mask),
                            ("support_pixel_values", support_pixel_values), ("prompt_coords", prompt_coords)):
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"{name} must be a torch.Tensor, got {type(value).__module__}.{type(value).__name__}: "
                    "call the processor with return_tensors='pt' (the default) for the model"
                )
        limit = getattr(self.config.text_config, "max_position_embeddings", None)
        if limit is not None and input_ids.shape[-1] + max_new_tokens > limit:
            raise ValueError(
                f"the sequences hold {input_ids.shape[-1]} tokens" + (f" + max_new_tokens={max_new_tokens}" if max_new_tokens else "")
                + f", more than the language model's max_position_embeddings={limit}: shorten the keypoint names or text"
            )

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Query tokens z_q: (N, 3, H, W) -> (N, h*w, D_llm)."""
        return self.multi_modal_projector(self.get_vision_features(pixel_values))

    def get_prompt_features(
        self,
        support_features: torch.Tensor,
        prompt_coords: torch.Tensor,
        prompt_visible: torch.Tensor | None = None,
        support_index: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """Prompt tokens z_p from support features (N_s, h*w, D_v) and coordinates (P, S, 2).

        `support_index` (P, S) names the row of `support_features` that holds shot s of prompt p (the
        collator writes it: each distinct support crop once); without it N_s == S (the same shots serve
        every prompt) or N_s == P * S (shot s of prompt p is image p * S + s).
        Returns (P, D_llm) under "mean" shot fusion and (P * S, D_llm) under "per_shot".
        """
        image_of_shot = self._support_image_of_shot(prompt_coords, support_features.shape[0], support_index)  # (P*S,)
        num_prompts, num_shots, _ = prompt_coords.shape
        memory_index = image_of_shot.to(support_features.device)
        if len(memory_index) == support_features.shape[0] and torch.equal(
            memory_index, torch.arange(len(memory_index), device=memory_index.device)
        ):
            memory_index = None  # one support image per prompt shot, in order: plain attention, no gather
        coords = prompt_coords.reshape(-1, 2).to(support_features.device)  # (P*S, 2)
        if self.prompt_feature_extractor is not None:
            prompt_embeds = self.prompt_encoder(coords).to(support_features.dtype)  # (P*S, D_v)
            features = self.prompt_feature_extractor(prompt_embeds, coords, support_features, memory_index)
        else:
            memory = support_features if memory_index is None else support_features[memory_index]  # (P*S, h*w, D_v)
            features = average_pool_around(memory, coords, self.config.patch_grid_size, self.config.prompt_pool_radius)
        features = self.prompt_projector(features).view(num_prompts, num_shots, -1)  # (P, S, D_llm)
        if self.config.shot_fusion == "per_shot":
            return features.flatten(0, 1)
        if prompt_visible is None:
            return features.mean(1)
        weights = prompt_visible.to(features.device, features.dtype).view(num_prompts, num_shots, 1)
        if (weights.sum(1) == 0).any():
            raise ValueError("every prompt needs at least one visible support shot (prompt_visible is all 0)")
        return (features * weights).sum(1) / weights.sum(1)

    @staticmethod
    def _support_image_of_shot(
        prompt_coords: torch.Tensor, num_support: int, support_index: torch.LongTensor | None
    ) -> torch.LongTensor:
        """The support image (0..N_s-1) of every prompt shot, prompt-major: (P * S,). Checks prompt_coords too."""
        if prompt_coords.ndim != 3 or prompt_coords.shape[-1] != 2:
            raise ValueError(f"prompt_coords must have shape (P, S, 2), got {tuple(prompt_coords.shape)}")
        if not torch.isfinite(prompt_coords).all():
            raise ValueError("prompt_coords contain NaN or infinity")
        if ((prompt_coords < 0) | (prompt_coords > 1)).any():
            raise ValueError("prompt_coords must be normalized to [0, 1] in the support crop")
        num_prompts, num_shots, _ = prompt_coords.shape
        device = prompt_coords.device
        if support_index is not None:
            expected = (num_prompts, num_shots)
            if not isinstance(support_index, torch.Tensor) or support_index.shape != expected or support_index.is_floating_point():
                raise ValueError(f"support_index must be an integer tensor of shape {expected}: one support image per prompt shot")
            image_of_shot = support_index.reshape(-1).to(device)
            if len(image_of_shot) and (int(image_of_shot.min()) < 0 or int(image_of_shot.max()) >= num_support):
                raise ValueError(f"support_index names images outside the {num_support} of support_pixel_values")
            used = int(image_of_shot.unique().numel())
            if used != num_support:  # an image no prompt reads: the support images and the prompts do not belong together
                raise ValueError(f"support_index uses {used} of the {num_support} support images")
            return image_of_shot
        if num_support == num_shots:  # the same shots serve every prompt: prompt p, shot s reads image s
            return torch.arange(num_shots, device=device).repeat(num_prompts)
        if num_support == num_prompts * num_shots:
            return torch.arange(num_support, device=device)
        raise ValueError(
            f"{num_support} support images do not fit prompt_coords of shape {tuple(prompt_coords.shape)}: "
            f"expected {num_shots} (shared shots) or {num_prompts * num_shots} (one set per prompt)"
        )

    def _scatter_placeholders(
        self, inputs_embeds: torch.Tensor, input_ids: torch.Tensor, token_id: int, features: torch.Tensor, name: str
    ) -> torch.Tensor:
        """Replace every `token_id` position by the next row of `features` (LLaVA's masked_scatter)."""
        mask = input_ids == token_id
        n_tokens, n_features = int(mask.sum()), features.shape[0]
        if n_tokens != n_features:
            raise ValueError(f"{name} features and {name} placeholder tokens do not match: tokens {n_tokens}, features {n_features}")
        mask = mask.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.dtype))

    def embed_multimodal_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        support_pixel_values: torch.Tensor | None = None,
        prompt_coords: torch.Tensor | None = None,
        prompt_visible: torch.Tensor | None = None,
        query_index: torch.LongTensor | None = None,
        support_index: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with `<image>` and `<kpt_prompt>` replaced by z_q and z_p: (B, L, D_llm)."""
        return self._embed_multimodal_inputs(
            input_ids, pixel_values, support_pixel_values, prompt_coords, prompt_visible, query_index, support_index
        )[0]

    def _embed_multimodal_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None,
        support_pixel_values: torch.Tensor | None,
        prompt_coords: torch.Tensor | None,
        prompt_visible: torch.Tensor | None,
        query_index: torch.LongTensor | None,
        support_index: torch.LongTensor | None,
    ) -> tuple[torch.Tensor, torch.LongTensor | None]:
        """`embed_multimodal_inputs`, plus each row's query crop (B,) as 0..U-1 (equal ids: identical crops;
        None unless every row holds one `<image>` block), which `shared_training_prefix` reuses.

        Every distinct crop goes through the vision tower once, and its features stay single: the
        projector runs once per distinct query crop and the prompt extractor projects each distinct
        support crop's keys and values once (`memory_index`), however many rows share them.
        """
        inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, L, D_llm)
        if (support_pixel_values is None) != (prompt_coords is None):
            raise ValueError("support_pixel_values and prompt_coords must be given together")
        images = []
        for field, pixels in (("pixel_values", pixel_values), ("support_pixel_values", support_pixel_values)):
            if pixels is not None:
                self._check_pixel_values(pixels, field)
                images.append(pixels)
        if images:  # one vision-tower call for query and support crops alike (checked above)
            features, crop_of_image = self._encode_distinct_images(torch.cat(images))  # (U, h*w, D_v), (N_q + N_s,)
        num_query = 0 if pixel_values is None else pixel_values.shape[0]
        crop_of_row = None
        if pixel_values is not None:
            block_crop = crop_of_image[:num_query]  # (N_q,) the distinct crop of each query image
            if query_index is not None:  # several instances, each crop shared by its K keypoint rows
                self._check_query_index(query_index, input_ids.shape[0], num_query)
                block_crop = block_crop[query_index.to(block_crop.device)]  # (B,)
            elif num_query == 1:  # one crop shared by every sequence (one instance, K keypoint sequences)
                block_crop = block_crop.expand(input_ids.shape[0])
            query_crops, block_crop = torch.unique(block_crop, return_inverse=True)  # (U_q,), (N_blocks,) in 0..U_q-1
            image_features = self.multi_modal_projector(features[query_crops])[block_crop]  # (N_blocks, h*w, D_llm)
            inputs_embeds = self._scatter_placeholders(
                inputs_embeds, input_ids, self.config.image_token_id, image_features.flatten(0, 1), "Image"
            )
            if len(block_crop) == input_ids.shape[0]:
                crop_of_row = block_crop
        if support_pixel_values is not None:
            image_of_shot = self._support_image_of_shot(prompt_coords, support_pixel_values.shape[0], support_index)
            shot_crop = crop_of_image[num_query:][image_of_shot.to(crop_of_image.device)]  # (P*S,) distinct crop per shot
            support_crops, memory_index = torch.unique(shot_crop, return_inverse=True)  # (U_s,), (P*S,)
            prompt_features = self.get_prompt_features(
                features[support_crops], prompt_coords, prompt_visible, support_index=memory_index.view(prompt_coords.shape[:2])
            )
            inputs_embeds = self._scatter_placeholders(
                inputs_embeds, input_ids, self.config.kpt_prompt_token_id, prompt_features, "Keypoint prompt"
            )
        elif (input_ids == self.config.kpt_prompt_token_id).any():
            raise ValueError("input_ids contain <kpt_prompt> tokens but no support_pixel_values/prompt_coords")
        if pixel_values is None and (input_ids == self.config.image_token_id).any():
            raise ValueError("input_ids contain <image> tokens but no pixel_values")
        return inputs_embeds, crop_of_row

    @staticmethod
    def _check_query_index(query_index: torch.Tensor, batch: int, num_query: int) -> None:
        if not isinstance(query_index, torch.Tensor) or query_index.shape != (batch,) or query_index.is_floating_point():
            raise ValueError(f"query_index must be an integer tensor of shape ({batch},): one query crop per row")
        if batch and (int(query_index.min()) < 0 or int(query_index.max()) >= num_query):
            raise ValueError(f"query_index names crops outside the {num_query} of pixel_values")
        used = int(query_index.unique().numel())
        if used != num_query:  # a crop no row reads: pixel_values and the rows do not belong together
            raise ValueError(
                f"Image features and Image placeholder tokens do not match: query_index uses {used} of the "
                f"{num_query} crops in pixel_values"
            )

    def predict_keypoints(self, input_ids: torch.LongTensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and (B, L, D) hidden states -> (B, 2) keypoints at each row's `<keypoint>` (NaN if none)."""
        is_keypoint = input_ids == self.config.keypoint_token_id  # (B, L)
        per_row = is_keypoint.sum(-1)
        if (per_row > 1).any():
            raise ValueError("each sequence may hold at most one <keypoint> token (one keypoint per sequence)")
        rows, cols = is_keypoint.nonzero(as_tuple=True)
        pred = hidden_states.new_full((input_ids.shape[0], 2), float("nan"))
        pred[rows] = self.keypoint_head(hidden_states[rows, cols]).to(pred.dtype)
        return pred

    def keypoint_loss(
        self,
        pred_keypoints: torch.Tensor,
        keypoint_labels: torch.Tensor,
        keypoint_visible: torch.Tensor | None,
        hidden_states: torch.Tensor,
    ) -> torch.Tensor:
        """Mean L1 over the visible keypoints of the rows that hold a `<keypoint>` token."""
        if keypoint_labels.shape != pred_keypoints.shape:
            raise ValueError(f"keypoint_labels must have shape {tuple(pred_keypoints.shape)}, got {tuple(keypoint_labels.shape)}")
        visible = torch.ones_like(keypoint_labels[:, 0], dtype=torch.bool) if keypoint_visible is None else keypoint_visible.bool()
        has_token = ~pred_keypoints.isnan().any(-1)
        if (visible & ~has_token).any():
            if not torch.isfinite(hidden_states).all():  # NaN from the weights, not a row without <keypoint>
                raise FloatingPointError("the model's hidden states contain NaN or infinity: its weights have diverged")
            raise ValueError("a visible keypoint target belongs to a sequence without a <keypoint> token")
        if not torch.isfinite(keypoint_labels[visible]).all():
            raise ValueError("keypoint_labels of visible keypoints contain NaN or infinity")
        if not visible.any():
            # keeps the head in the graph so distributed training sees every parameter used
            return self.keypoint_head(hidden_states[:1, :1]).sum() * 0.0
        return F.l1_loss(pred_keypoints[visible], keypoint_labels[visible].to(pred_keypoints.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        support_pixel_values: torch.Tensor | None = None,
        prompt_coords: torch.Tensor | None = None,
        prompt_visible: torch.Tensor | None = None,
        query_index: torch.LongTensor | None = None,
        keypoint_layout: Any = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        keypoint_labels: torch.Tensor | None = None,
        keypoint_visible: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        share_prefix: bool = False,
        support_index: torch.LongTensor | None = None,
        **kwargs,
    ) -> KptLlmOutput:
        """`share_prefix=True` (training): rows with the same query crop compute their common start (system
        prompt and query image, `shared_training_prefix`) once; the loss, keypoints and gradients are those
        of the full computation, while `logits` and `attentions` cover the rows' own tokens only.
        `keypoint_layout` (the processor's record of images and boxes, for post-processing) is accepted so
        that `model(**inputs)` and `generate(**inputs)` take the processor's output as it is; it is not used."""
        if input_ids is None:
            raise ValueError("input_ids are required: placeholders are found by token id")
        if cache is None:  # the whole sequence is here (training, prefill): it must fit the LLM's positions
            self._check_sequence_inputs(input_ids, pixel_values, support_pixel_values, prompt_coords, attention_mask)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)  # Trainer's, for the LM loss only
        inputs_embeds, crop_of_row = self._embed_multimodal_inputs(
            input_ids, pixel_values, support_pixel_values, prompt_coords, prompt_visible, query_index, support_index
        )
        prefix_length = 0
        if share_prefix and cache is None and position_ids is None and not logits_to_keep:
            prefix_length, crop_of_row = self.shared_training_prefix(
                input_ids, attention_mask, pixel_values, labels, crop_of_row=crop_of_row
            )
        if prefix_length:
            outputs = self._decode_with_shared_prefix(prefix_length, crop_of_row, inputs_embeds, attention_mask, **kwargs)
            input_ids = input_ids[:, prefix_length:]
            labels = None if labels is None else labels[:, prefix_length:]
        else:
            outputs = self.get_decoder()(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = outputs.last_hidden_state  # (B, L - P, D_llm)
        kept = hidden_states if not logits_to_keep else hidden_states[:, -logits_to_keep:]
        logits = self.get_output_embeddings()(kept)  # (B, L - P, V)
        pred_keypoints = self.predict_keypoints(input_ids, hidden_states)  # (B, 2)

        loss = lm_loss = kpt_loss = None
        if labels is not None:
            lm_loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.text_config.vocab_size,
                num_items_in_batch=num_items_in_batch,
            )
            loss = lm_loss
        if keypoint_labels is not None:
            kpt_loss = self.keypoint_loss(pred_keypoints, keypoint_labels, keypoint_visible, hidden_states)
            weighted = self.config.keypoint_loss_weight * kpt_loss
            loss = weighted if loss is None else loss + weighted
        return KptLlmOutput(
            loss=loss,
            lm_loss=lm_loss,
            keypoint_loss=kpt_loss,
            logits=logits,
            pred_keypoints=pred_keypoints,
            cache=outputs.cache if use_cache and not prefix_length else None,
            attentions=outputs.attentions,
            shared_prefix_length=prefix_length or None,
        )

    def shared_training_prefix(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        labels: torch.LongTensor | None,
        crop_of_row: torch.LongTensor | None = None,
    ) -> tuple[int, torch.Tensor | None]:
        """Leading tokens of a training batch that rows with the same query crop can compute once.

        The processor's layout starts every row with the same ids up to the last `<image>` token (system
        prompt, "USER:", the query image's placeholders); the K keypoint rows of one instance also share
        the crop, hence the same hidden states there. Returns that length P and each row's crop (B,) in
        0..U-1, or (0, None) (compute every row in full) when the batch does not have this form: ids
        differ before it, a row is padded or supervised there (the LM loss would miss the label at P), no
        two rows share a crop, or activations are recomputed (gradient checkpointing turns the KV cache off).

        `crop_of_row` (B,): each row's query crop, equal ids for identical crops, as `forward` found them
        while encoding (`pixel_values` may then hold each distinct crop once, with `query_index`); without
        it `pixel_values` must hold one crop per row, compared here.
        """
        unshared = 0, None
        if pixel_values is None or pixel_values.ndim != 4:
            return unshared
        if crop_of_row is None and pixel_values.shape[0] != input_ids.shape[0]:
            return unshared
        if crop_of_row is not None and crop_of_row.shape != input_ids.shape[:1]:
            return unshared
        if self._recomputes_activations() or input_ids.shape[0] < 2:
            return unshared
        is_image = input_ids[0] == self.config.image_token_id
        if not is_image.any():
            return unshared
        prefix_length = int(is_image.nonzero().max()) + 1
        if not (input_ids[:, :prefix_length] == input_ids[:1, :prefix_length]).all():
            return unshared
        if attention_mask is not None and not attention_mask[:, :prefix_length].bool().all():
            return unshared
        if labels is not None and (labels[:, : prefix_length + 1] != -100).any():
            return unshared
        if crop_of_row is None:
            crops, crop_of_row = torch.unique(pixel_values.flatten(1), dim=0, return_inverse=True)
        else:  # (B,) ids, made 0..U-1 for `_decode_with_shared_prefix`
            crops, crop_of_row = torch.unique(crop_of_row, return_inverse=True)
        if len(crops) == input_ids.shape[0]:
            return unshared
        return prefix_length, crop_of_row

    def _recomputes_activations(self) -> bool:
        # transformers 5.x renamed is_gradient_checkpointing (deprecated, warns) to is_activation_checkpointing
        if hasattr(type(self), "is_activation_checkpointing"):
            return bool(self.is_activation_checkpointing)
        return bool(self.is_gradient_checkpointing)

    def _decode_with_shared_prefix(
        self,
        prefix_length: int,
        crop_of_row: torch.Tensor,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs,
    ):
        """The LLM over a batch whose rows share their first P tokens per query crop: the prefix of each
        distinct crop once, its KV cache handed to every row of that crop, then the rows' own tokens.

        inputs_embeds (B, L, D_llm), crop_of_row (B,) in 0..U-1 -> the decoder's output for columns P..L-1
        (B, L - P, D_llm); positions and masking are those of the full computation, and gradients reach
        the prefix through the cache.
        """
        batch, length, _ = inputs_embeds.shape
        device = inputs_embeds.device
        first_row = torch.full((int(crop_of_row.max()) + 1,), batch, device=device)
        first_row = first_row.scatter_reduce(0, crop_of_row, torch.arange(batch, device=device), reduce="amin")  # (U,)
        decoder = self.get_decoder()
        prefix_positions = torch.arange(prefix_length, device=device)[None].expand(len(first_row), -1)  # (U, P)
        cache = decoder(
            inputs_embeds=inputs_embeds[first_row, :prefix_length], position_ids=prefix_positions, use_cache=True
        ).cache
        cache.batch_select_indices(crop_of_row)  # every layer's keys/values: (U, H, P, d) -> (B, H, P, d)
        positions = torch.arange(prefix_length, length, device=device)[None].expand(batch, -1)  # (B, L - P)
        return decoder(
            inputs_embeds=inputs_embeds[:, prefix_length:],
            attention_mask=attention_mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            **kwargs,
        )

    def prepare_inputs_for_generation(self, *args, **kwargs):
        # images and prompts are only needed to fill the placeholders at prefill; the cache holds them afterwards
        first_step = kwargs.get("is_first_iteration", False) or not kwargs.get("use_cache", True)
        model_inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        if not first_step:
            for key in ("pixel_values", "support_pixel_values", "prompt_coords", "prompt_visible", "query_index", "support_index"):
                model_inputs.pop(key, None)
        return model_inputs


__all__ = ["KptLlmDetectionOutput", "KptLlmForKeypointComprehension", "KptLlmPreTrainedModel"]
