"""Builds KptLLM models, tokenizers and processors from code, without downloading anything.

The tiny configurations here power the tests and the embedded default (a model trained on CPU in
minutes). Real checkpoints come from `from_pretrained` or from the LLaVA converter instead.
"""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPImageProcessorPil, PreTrainedTokenizerFast

from modeling_kptllm import KptLlmConfig, KptLlmForKeypointComprehension, KptLlmProcessor
from modeling_kptllm.processing_kptllm import QUESTIONS, SPECIAL_TOKENS

TINY_SYSTEM_PROMPT = "A chat about keypoints."
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
    vision_config = {
        "model_type": "clip_vision_model",
        "hidden_size": vision_hidden_size,
        "intermediate_size": vision_hidden_size * 4,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": num_heads,
        "image_size": image_size,
        "patch_size": patch_size,
    }
    text_config = {
        "model_type": "llama",
        "hidden_size": text_hidden_size,
        "intermediate_size": text_hidden_size * 4,
        "num_hidden_layers": text_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 4096,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    image_id, prompt_id, keypoint_id = (tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS)
    return KptLlmConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_id,
        kpt_prompt_token_id=prompt_id,
        keypoint_token_id=keypoint_id,
        prompt_extractor_heads=num_heads,
        **overrides,
    )


def build_tiny_model(
    keypoint_names: Iterable[str], seed: int = 0, **config_kwargs
) -> tuple[KptLlmForKeypointComprehension, KptLlmProcessor]:
    """A randomly initialised tiny KptLLM and its processor, with generation ids set for decoding."""
    import torch

    tokenizer = train_byte_level_tokenizer(template_corpus(keypoint_names))
    config = tiny_config(tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = KptLlmForKeypointComprehension(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    processor = build_processor(tokenizer, config.vision_config.image_size, config.vision_config.patch_size)
    return model, processor
