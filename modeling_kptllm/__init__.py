"""KptLLM as HuggingFace remote code: config, model and processor (flat files, relative imports)."""

from .configuration_kptllm import KptLlmConfig
from .modeling_kptllm import KptLlmForKeypointComprehension, KptLlmPreTrainedModel
from .processing_kptllm import KptLlmProcessor

# `save_pretrained` then writes `auto_map` and copies these files, so the folder loads with
# `AutoModel/AutoProcessor.from_pretrained(..., trust_remote_code=True)`.
KptLlmConfig.register_for_auto_class()
KptLlmForKeypointComprehension.register_for_auto_class("AutoModel")
KptLlmProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["KptLlmConfig", "KptLlmForKeypointComprehension", "KptLlmPreTrainedModel", "KptLlmProcessor"]
