"""KptLLM configuration: a vision tower config and a causal-LM config, plus the keypoint modules.

Follows transformers' `LlavaConfig`: `vision_config` is any CLIP-like image encoder config and
`text_config` is any causal-LM config. With no arguments the config describes the paper's model,
LLaVA-1.5-7B (CLIP ViT-L/14-336 + Vicuna-7B shapes) with the KptLLM modules on top.
"""

import json
import os
from typing import Any, Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

PROMPT_FEATURE_EXTRACTORS = ("cross_attention", "avg_pool")
PROJECTOR_TYPES = ("mlp2x_gelu", "linear")
SHOT_FUSIONS = ("mean", "per_shot")


def read_json_file(path: str | os.PathLike) -> Any:
    """A JSON file of a model folder, or a ValueError naming the file (json's own error names no file)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
                         "the file is damaged: save the model/processor again or restore the file") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}); the file is damaged") from None


class KptLlmConfig(PreTrainedConfig):
    r"""
    Args:
        vision_config: config of the image encoder (default: CLIP ViT-L/14 at 336 px).
        text_config: config of the causal language model (default: Llama/Vicuna-7B shapes, vocabulary
            of 32064 = 32000 + LLaVA-1.5's padding, which holds the special tokens below).
        image_token_id: placeholder id of `<image>`; each one is replaced by one query patch feature.
        kpt_prompt_token_id: placeholder id of `<kpt_prompt>`; replaced by the prompt feature z_p.
        keypoint_token_id: id of `<keypoint>`; its last hidden state is regressed to (x, y).
        vision_feature_layer: which vision hidden state feeds the projector (LLaVA-1.5: -2).
        vision_feature_select_strategy: "default" drops the CLS token, "full" keeps every token.
        projector_type: "mlp2x_gelu" (LLaVA-1.5, so its weights load) or "linear" (the paper's text).
        projector_hidden_act: activation of the two-layer projectors.
        prompt_feature_extractor: "cross_attention" (paper Eq. 2) or "avg_pool" (Table 6 ablation:
            a tent-weighted average of support features around the keypoint).
        prompt_extractor_layers / prompt_extractor_heads / prompt_extractor_mlp_ratio: shape of the
            cross-attention extractor.
        prompt_pool_radius: radius, in patches, of the average-pooling window of the ablation.
        shot_fusion: "mean" averages the K shots of a keypoint into one z_p (CAPE convention);
            "per_shot" keeps one `<kpt_prompt>` per shot.
        keypoint_head_hidden_size: width of the keypoint FFN (default: the LLM width).
        keypoint_loss_weight: λ of Eq. 7 (paper: 2).
        ignore_index: label id ignored by the LM loss.
    """

    model_type = "kptllm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            init_kwargs={
                "intermediate_size": 4096,
                "hidden_size": 1024,
                "patch_size": 14,
                "image_size": 336,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "projection_dim": 768,
            },
        ),
        "text_config": SubConfigSpec(
            config_class=AutoConfig, model_type="llama", init_kwargs={"vocab_size": 32064}
        ),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    kpt_prompt_token_id: int = 32002
    keypoint_token_id: int = 32003
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    projector_type: str = "mlp2x_gelu"
    projector_hidden_act: str = "gelu"
    prompt_feature_extractor: str = "cross_attention"
    prompt_extractor_layers: int = 2
    prompt_extractor_heads: int = 8
    prompt_extractor_mlp_ratio: float = 4.0
    prompt_pool_radius: float = 1.5
    shot_fusion: str = "mean"
    keypoint_head_hidden_size: int | None = None
    keypoint_loss_weight: float = 2.0
    ignore_index: int = -100
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for field, value, allowed in (
            ("projector_type", self.projector_type, PROJECTOR_TYPES),
            ("prompt_feature_extractor", self.prompt_feature_extractor, PROMPT_FEATURE_EXTRACTORS),
            ("shot_fusion", self.shot_fusion, SHOT_FUSIONS),
        ):
            if value not in allowed:
                raise ValueError(f"KptLlmConfig.{field}={value!r}; expected one of {allowed}")
        vocab_size = self.text_config.vocab_size
        for field in ("image_token_id", "kpt_prompt_token_id", "keypoint_token_id"):
            token_id = getattr(self, field)
            if not 0 <= token_id < vocab_size:
                raise ValueError(
                    f"KptLlmConfig.{field}={token_id} is outside the language model's vocabulary "
                    f"(text_config.vocab_size={vocab_size}); add the token to the tokenizer and resize."
                )
        if len({self.image_token_id, self.kpt_prompt_token_id, self.keypoint_token_id}) != 3:
            raise ValueError("image_token_id, kpt_prompt_token_id and keypoint_token_id must differ")
        if self.vision_config.hidden_size % self.prompt_extractor_heads:
            raise ValueError(
                f"vision_config.hidden_size={self.vision_config.hidden_size} is not divisible by "
                f"prompt_extractor_heads={self.prompt_extractor_heads}"
            )
        if not self.tie_word_embeddings and self.text_config.tie_word_embeddings:
            self.tie_word_embeddings = self.text_config.tie_word_embeddings

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        # Refused here, before any model is built: the defaults describe the paper's 7B model, so a folder of
        # another model type (e.g. a plain Llama config.json) would otherwise allocate a 7B-shaped KptLLM.
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") != cls.model_type:
            raise ValueError(
                f"{pretrained_model_name_or_path}: config.json has model_type {config_dict.get('model_type')!r}, not "
                f"{cls.model_type!r}: this is not a KptLLM folder (convert a LLaVA-1.5 model with hub/convert_llava.py)"
            )
        return config_dict, kwargs

    @property
    def patch_grid_size(self) -> int:
        """Patches per side of the vision tower's feature map (336 / 14 = 24 in the paper)."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def image_seq_length(self) -> int:
        """Number of `<image>` placeholders one query image expands to (576 in the paper)."""
        return self.patch_grid_size**2


__all__ = ["KptLlmConfig", "read_json_file"]
