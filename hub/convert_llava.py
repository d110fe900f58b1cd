"""Convert a local llava-hf LLaVA-1.5 checkpoint (e.g. `llava-hf/llava-1.5-7b-hf`) into a KptLLM checkpoint.

    python -m hub.convert_llava --llava_dir llava-1.5-7b-hf --output_dir kptllm-llava-7b [--dtype bfloat16]

Carried over from LLaVA: the vision tower, the `multi_modal_projector` (query tokens z_q) and the
language model with its LM head, renamed by `KEY_MAPPING`; the tokenizer; the CLIP image mean/std.
New (left with KptLLM's own initialisation): `prompt_encoder`, `prompt_feature_extractor`,
`prompt_projector`, `keypoint_head`. `<kpt_prompt>` and `<keypoint>` are added to the tokenizer as
special tokens next to LLaVA's `<image>`. When the tokenizer then outgrows the embedding matrix, the
matrix and the LM head grow (to a multiple of `--pad_vocab_to_multiple_of`) with transformers'
`resize_token_embeddings(mean_resizing=True)`: new rows are drawn around the mean of the old rows.
llava-1.5-7b-hf's matrix already has 32064 rows for its 32002 tokens, and its own converter drew
the padding rows the same way, so there the new tokens get ids 32002 and 32003 (KptLlmConfig's
defaults) and those rows, and nothing is resized.

The output folder (safetensors, remote code, processor) is what `train.py --model_name_or_path`
and `AutoModel.from_pretrained(folder, trust_remote_code=True)` read.

Only safetensors are read (a folder with pickle weights only is refused, nothing is unpickled) and
only local files (no Hub access).

Memory: `from_pretrained` creates the model on the meta device and fills it tensor by tensor from
the memory-mapped safetensors (cast to `--dtype` on the way; with the checkpoint's own dtype the
parameters simply alias the mapped file), and safetensors writes the output straight from the
parameters. So the conversion needs about one copy of the model in the target dtype, plus ~1 GB
when the vocabulary grows (a float32 copy of the embedding matrix for its covariance). Measured
on a 0.53 B-parameter LLaVA (2.11 GB in float32, 3 shards, 1 thread): float32 -> float32 peaked at
2.67 GB resident (0.41 GB interpreter + 2.2 GB of mapped source pages, 0.14 GB anonymous), 10 s;
float32 -> bfloat16 at 3.59 GB (1.14 GB anonymous = the bfloat16 model, + 2.2 GB of mapped source
pages, which the kernel can drop under pressure), 14 s. For LLaVA-1.5-7B (float16, 14 GB) expect
~14 GB resident with `--dtype auto` and ~14 GB anonymous + reclaimable page cache with
`--dtype bfloat16`: plan for 16 GB of RAM, not 3 x 14 GB. `--report_peak_memory true` prints the
process's peak RSS.
"""

import copy
import json
import logging
import math
import resource
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoTokenizer, CLIPImageProcessorPil, HfArgumentParser, LlavaConfig
from transformers.utils import logging as hf_logging

from modeling_kptllm import KptLlmConfig, KptLlmForKeypointComprehension, KptLlmProcessor
from modeling_kptllm.processing_kptllm import IMAGE_TOKEN, KEYPOINT_TOKEN, KPT_PROMPT_TOKEN
from processing.builders import config_for_tokenizer, set_generation_ids

logger = logging.getLogger("convert_llava")

# Source prefix -> KptLLM prefix; the first matching row wins, so longer prefixes come first. Three
# layouts of the same LlavaForConditionalGeneration are in use:
#   Hub (transformers 4, llava-hf/llava-1.5-7b-hf): vision_tower.vision_model.*, multi_modal_projector.*,
#       language_model.model.*, language_model.lm_head.*
#   transformers 5 `save_pretrained`: the same without `vision_model.` (CLIP's prefix is gone in v5)
#   transformers 5 `state_dict()` (e.g. written with safetensors' save_file): model.vision_tower.*,
#       model.multi_modal_projector.*, model.language_model.* (a bare LlamaModel), lm_head.*
# KptLLM's own names are those of the transformers-5 save_pretrained layout, hence the identity rows.
KEY_MAPPING: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("vision_tower.", "vision_tower."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("language_model.model.", "language_model.model."),
    ("language_model.lm_head.", "language_model.lm_head."),
)
# KptLLM modules that LLaVA does not have: they keep the initialisation of `KptLlmPreTrainedModel`.
NEW_MODULES = ("prompt_encoder", "prompt_feature_extractor", "prompt_projector", "keypoint_head")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_LISTED_KEYS = 20


class ConversionError(ValueError):
    """The LLaVA folder (or the output folder) cannot be converted; the message says which file or field."""


@dataclass
class ConvertArguments:
    llava_dir: str = field(metadata={"help": "local llava-hf LLaVA-1.5 folder: config.json, *.safetensors, tokenizer, preprocessor_config.json"})
    output_dir: str = field(metadata={"help": "new KptLLM folder (must not exist or be empty)"})
    dtype: str = field(default="auto", metadata={"help": "auto (the checkpoint's own) | float32 | bfloat16 | float16"})
    pad_vocab_to_multiple_of: int = field(default=64, metadata={"help": "when the vocabulary grows, round it up to a multiple of this (LLaVA-1.5: 64)"})
    prompt_feature_extractor: str = field(default="cross_attention", metadata={"help": "cross_attention (paper Eq. 2) | avg_pool (Table 6 ablation)"})
    max_shard_size: str = field(default="5GB", metadata={"help": "safetensors shard size of the output"})
    seed: int = field(default=0, metadata={"help": "seed of the new modules' initialisation and the new embedding rows"})
    report_peak_memory: bool = field(default=False, metadata={"help": "print the process's peak RSS at the end"})


@dataclass
class ConversionSummary:
    output_dir: Path
    dtype: str
    source_files: list[str]
    copied_tensors: int
    skipped_buffers: list[str]
    new_modules: dict[str, int]  # module -> parameters
    token_ids: dict[str, int]
    vocab_size_before: int
    vocab_size_after: int

    def lines(self) -> list[str]:
        new = ", ".join(f"{name} ({count:,} params)" for name, count in self.new_modules.items())
        ids = ", ".join(f"{token}={token_id}" for token, token_id in self.token_ids.items())
        return [
            f"wrote {self.output_dir} ({self.dtype})",
            f"copied {self.copied_tensors} tensors from {', '.join(self.source_files)}",
            f"new modules (initialised): {new}",
            f"special tokens: {ids}",
            f"embedding rows: {self.vocab_size_before} -> {self.vocab_size_after}",
        ] + ([f"skipped non-persistent buffers: {', '.join(self.skipped_buffers)}"] if self.skipped_buffers else [])


def map_key(source_key: str) -> str | None:
    """The KptLLM name of a LLaVA tensor (first matching row of `KEY_MAPPING`), or None."""
    for source_prefix, target_prefix in KEY_MAPPING:
        if source_key.startswith(source_prefix):
            return target_prefix + source_key[len(source_prefix) :]
    return None


def _listed(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - MAX_LISTED_KEYS} more" if len(keys) > MAX_LISTED_KEYS else ""
    return ", ".join(keys[:MAX_LISTED_KEYS]) + more


def check_output_dir(output_dir: Path) -> None:
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise ConversionError(f"{output_dir} already exists and is not an empty folder; choose a new --output_dir (nothing was overwritten)")


def read_llava_config(llava_dir: Path) -> LlavaConfig:
    if not llava_dir.is_dir():
        raise ConversionError(f"{llava_dir} is not a folder")
    path = llava_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path} not found: --llava_dir must be a llava-hf LLaVA-1.5 folder (config.json, *.safetensors, tokenizer)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type != "llava":
        raise ConversionError(
            f"{path}: model_type is {model_type!r}, expected 'llava' (a llava-hf LLaVA-1.5 checkpoint such as llava-hf/llava-1.5-7b-hf)"
        )
    try:
        config = LlavaConfig.from_pretrained(llava_dir, local_files_only=True)
    except Exception as error:  # strict-dataclass and sub-config errors: name the file, keep the reason
        raise ConversionError(f"{path} is not a valid LlavaConfig: {error}") from None
    problems = []
    if not isinstance(config.vision_feature_layer, int):
        problems.append(f"vision_feature_layer={config.vision_feature_layer!r} (KptLLM reads one layer, an int)")
    if config.vision_feature_select_strategy != "default":
        problems.append(
            f"vision_feature_select_strategy={config.vision_feature_select_strategy!r} (KptLLM needs 'default': "
            "the prompt feature extractor and the processor count patches only, without CLS)"
        )
    if not config.multimodal_projector_bias:
        problems.append("multimodal_projector_bias=False (KptLLM's projector has biases)")
    if problems:
        raise ConversionError(f"{path}: unsupported LLaVA settings: " + "; ".join(problems))
    return config


def safetensors_files(llava_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files; refuses folders that hold pickle weights only."""
    index = llava_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ConversionError(f"{index} is not a safetensors index (needs a 'weight_map'): {error}") from None
        files = [llava_dir / name for name in sorted(set(weight_map.values()))]
        missing = [path.name for path in files if not path.is_file()]
        if missing:
            raise ConversionError(f"{index} lists shards that are not in {llava_dir}: {_listed(missing)}")
        return files
    single = llava_dir / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = sorted(path.name for path in llava_dir.iterdir() if path.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ConversionError(
            f"{llava_dir} holds only pickle weights ({_listed(pickles)}); this converter reads safetensors only and never "
            "unpickles (unpickling runs code). Get the safetensors files of the checkpoint (llava-hf/llava-1.5-7b-hf ships them)."
        )
    raise ConversionError(f"{llava_dir} has no model.safetensors or model.safetensors.index.json")


def read_checkpoint_header(files: Sequence[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) of every tensor, from the files' headers (no tensor data is read)."""
    tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as reader:
                for key in reader.keys():
                    if key in tensors:
                        raise ConversionError(f"tensor {key!r} appears in more than one shard ({path.name} and another)")
                    tensor_slice = reader.get_slice(key)
                    tensors[key] = (tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
        except SafetensorError as error:
            raise ConversionError(f"{path} is not a readable safetensors file: {error}") from None
    if not tensors:
        raise ConversionError(f"{', '.join(p.name for p in files)} hold no tensors")
    return tensors


def resolve_dtype(name: str, header: dict[str, tuple[tuple[int, ...], str]]) -> torch.dtype:
    if name == "auto":  # the checkpoint's own floating-point type (llava-1.5-7b-hf: float16)
        for _, file_dtype in header.values():
            if file_dtype in SAFETENSORS_DTYPES:
                return SAFETENSORS_DTYPES[file_dtype]
        return torch.float32
    if name not in DTYPES:
        raise ConversionError(f"--dtype {name!r}: expected auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_llava_tokenizer(llava_dir: Path, image_token_id: int):
    """LLaVA's tokenizer with `<kpt_prompt>` and `<keypoint>` added as special tokens (left padding)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(llava_dir, local_files_only=True)
    except Exception as error:  # OSError, ValueError, ...: missing or unreadable tokenizer files
        raise ConversionError(f"could not load the tokenizer of {llava_dir}: {error}") from None
    vocab = tokenizer.get_vocab()
    if IMAGE_TOKEN not in vocab:
        raise ConversionError(f"the tokenizer of {llava_dir} has no {IMAGE_TOKEN} token: not a llava-hf tokenizer")
    if vocab[IMAGE_TOKEN] != image_token_id:
        raise ConversionError(
            f"{llava_dir}: the tokenizer's {IMAGE_TOKEN} id is {vocab[IMAGE_TOKEN]} but config.json's image_token_index is {image_token_id}"
        )
    # registered as special tokens (never split, skipped when decoding); `<image>` keeps its id
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [IMAGE_TOKEN, KPT_PROMPT_TOKEN, KEYPOINT_TOKEN]}, replace_extra_special_tokens=False
    )
    tokenizer.padding_side = "left"  # detect_keypoints decodes a left-padded batch
    return tokenizer


def build_image_processor(llava_dir: Path, image_size: int) -> CLIPImageProcessorPil:
    """A CLIP image processor at the vision tower's size with LLaVA's normalisation (mean/std, rescale)."""
    try:
        source = CLIPImageProcessorPil.from_pretrained(llava_dir, local_files_only=True)
    except Exception as error:
        raise ConversionError(f"could not load the image processor of {llava_dir} (preprocessor_config.json): {error}") from None
    crop = source.crop_size
    crop_height = crop["height"] if isinstance(crop, dict) else crop.height
    if crop_height != image_size:
        logger.warning("%s crops %s px but the vision tower takes %s px: using %s", llava_dir, crop_height, image_size, image_size)
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(source.image_mean),
        image_std=list(source.image_std),
        rescale_factor=source.rescale_factor,
    )


def _sub_config_dict(sub_config) -> dict:
    values = sub_config.to_diff_dict()  # what differs from the class defaults, model_type included
    for key in ("_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype"):
        values.pop(key, None)
    return values


def build_kptllm_config(llava_config: LlavaConfig, tokenizer, vocab_size: int, prompt_feature_extractor: str) -> KptLlmConfig:
    text_config = {**_sub_config_dict(llava_config.text_config), "vocab_size": vocab_size}
    try:
        return config_for_tokenizer(
            tokenizer,
            _sub_config_dict(llava_config.vision_config),
            text_config,
            vision_feature_layer=llava_config.vision_feature_layer,
            vision_feature_select_strategy=llava_config.vision_feature_select_strategy,
            projector_type="mlp2x_gelu",  # LLaVA-1.5's linear-GELU-linear, so its projector loads
            projector_hidden_act=llava_config.projector_hidden_act,
            prompt_feature_extractor=prompt_feature_extractor,
            tie_word_embeddings=llava_config.tie_word_embeddings,
        )
    except ValueError as error:
        raise ConversionError(f"the LLaVA config does not give a valid KptLlmConfig: {error}") from None


def check_key_mapping(
    header: dict[str, tuple[tuple[int, ...], str]], skeleton: KptLlmForKeypointComprehension
) -> tuple[int, list[str]]:
    """Every source tensor maps onto a KptLLM tensor of the same shape and every shared KptLLM tensor is filled.

    Returns (number of copied tensors, skipped source buffers). `skeleton` lives on the meta device.
    Source tensors that land on a non-persistent buffer (old CLIP checkpoints store `position_ids`)
    are skipped: the model recomputes them.
    """
    targets = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    non_persistent = {name for name, _ in skeleton.named_buffers()} - set(targets)
    unmapped, mismatched, skipped, filled = [], [], [], {}
    for source_key, (shape, _) in header.items():
        target = map_key(source_key)
        if target in non_persistent:
            skipped.append(source_key)
        elif target is None or target not in targets:
            unmapped.append(source_key if target is None else f"{source_key} (-> {target})")
        elif target in filled:
            mismatched.append(f"{source_key} and {filled[target]} both map to {target}")
        elif targets[target] != shape:
            mismatched.append(f"{source_key} {list(shape)} -> {target} {list(targets[target])}")
        else:
            filled[target] = source_key
    tied = {"language_model.lm_head.weight"} if skeleton.config.tie_word_embeddings else set()
    missing = [
        name for name in targets if name not in filled and name not in tied and name.split(".")[0] not in NEW_MODULES
    ]
    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} source tensors have no place in KptLLM: {_listed(unmapped)}")
    if mismatched:
        problems.append(f"{len(mismatched)} tensors do not fit: {_listed(mismatched)}")
    if missing:
        problems.append(f"{len(missing)} KptLLM tensors outside the new modules are not in the checkpoint: {_listed(missing)}")
    if problems:
        raise ConversionError("the checkpoint does not map onto KptLLM:\n  " + "\n  ".join(problems))
    return len(filled), sorted(skipped)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide from_pretrained's load report (it lists the new modules as MISSING, which is expected here)."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def convert_llava(
    llava_dir: str | Path,
    output_dir: str | Path,
    dtype: str = "auto",
    pad_vocab_to_multiple_of: int = 64,
    prompt_feature_extractor: str = "cross_attention",
    max_shard_size: str = "5GB",
    seed: int = 0,
) -> ConversionSummary:
    """Write a KptLLM folder converted from the llava-hf folder `llava_dir`; see the module docstring."""
    llava_dir, output_dir = Path(llava_dir), Path(output_dir)
    if pad_vocab_to_multiple_of < 1:
        raise ConversionError(f"--pad_vocab_to_multiple_of must be >= 1, got {pad_vocab_to_multiple_of}")
    check_output_dir(output_dir)
    llava_config = read_llava_config(llava_dir)
    files = safetensors_files(llava_dir)
    header = read_checkpoint_header(files)
    torch_dtype = resolve_dtype(dtype, header)
    tokenizer = load_llava_tokenizer(llava_dir, llava_config.image_token_id)

    source_vocab = llava_config.text_config.vocab_size
    grows = len(tokenizer) > source_vocab
    vocab_size = math.ceil(len(tokenizer) / pad_vocab_to_multiple_of) * pad_vocab_to_multiple_of if grows else source_vocab
    config = build_kptllm_config(llava_config, tokenizer, vocab_size, prompt_feature_extractor)
    # KptLlmConfig checks the token ids against the final vocabulary; loading needs the checkpoint's,
    # and resize_token_embeddings sets the final one back.
    loading_config = copy.deepcopy(config)
    loading_config.text_config.vocab_size = source_vocab

    with torch.device("meta"), quiet_transformers():
        skeleton = KptLlmForKeypointComprehension(loading_config)
    copied, skipped = check_key_mapping(header, skeleton)
    del skeleton

    renames = {f"^{source.replace('.', '[.]')}": target for source, target in KEY_MAPPING if source != target}
    torch.manual_seed(seed)  # the new modules' init and the new embedding rows
    with quiet_transformers():
        model, info = KptLlmForKeypointComprehension.from_pretrained(
            llava_dir,
            config=loading_config,
            key_mapping=renames,
            dtype=torch_dtype,
            use_safetensors=True,
            local_files_only=True,
            output_loading_info=True,
        )
    # the header check above already guarantees this; a disagreement means from_pretrained renamed differently
    skipped_targets = {map_key(key) for key in skipped}
    unexpected = [key for key in info["unexpected_keys"] if key not in skipped and map_key(key) not in skipped_targets]
    not_new = [key for key in info["missing_keys"] if key.split(".")[0] not in NEW_MODULES]
    if unexpected or not_new or info["mismatched_keys"]:
        raise RuntimeError(
            f"from_pretrained disagrees with KEY_MAPPING: unexpected {_listed(unexpected)}; missing {_listed(not_new)}; "
            f"mismatched {info['mismatched_keys']}"
        )
    if grows:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_vocab_to_multiple_of, mean_resizing=True)
    if model.config.text_config.vocab_size != vocab_size or model.get_input_embeddings().weight.shape[0] != vocab_size:
        raise RuntimeError(f"resizing gave {model.config.text_config.vocab_size} rows, expected {vocab_size}")
    set_generation_ids(model, tokenizer)

    processor = KptLlmProcessor(
        image_processor=build_image_processor(llava_dir, config.vision_config.image_size),
        tokenizer=tokenizer,
        image_seq_length=config.image_seq_length,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    # save_original_format=False: write KptLLM's own names. The default would undo `key_mapping` and
    # write LLaVA's names back, which KptLLM's loader does not know.
    model.save_pretrained(output_dir, max_shard_size=max_shard_size, save_original_format=False)
    processor.save_pretrained(output_dir)

    return ConversionSummary(
        output_dir=output_dir,
        dtype=str(torch_dtype).removeprefix("torch."),
        source_files=[path.name for path in files],
        copied_tensors=copied,
        skipped_buffers=skipped,
        new_modules={
            name: sum(p.numel() for p in getattr(model, name).parameters())
            for name in NEW_MODULES
            if getattr(model, name) is not None
        },
        token_ids={token: tokenizer.convert_tokens_to_ids(token) for token in (IMAGE_TOKEN, KPT_PROMPT_TOKEN, KEYPOINT_TOKEN)},
        vocab_size_before=source_vocab,
        vocab_size_after=vocab_size,
    )


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def main(argv: list[str] | None = None) -> ConversionSummary:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    (args,) = HfArgumentParser(ConvertArguments).parse_args_into_dataclasses(args=argv)
    try:
        summary = convert_llava(
            args.llava_dir,
            args.output_dir,
            dtype=args.dtype,
            pad_vocab_to_multiple_of=args.pad_vocab_to_multiple_of,
            prompt_feature_extractor=args.prompt_feature_extractor,
            max_shard_size=args.max_shard_size,
            seed=args.seed,
        )
    except ConversionError as error:
        raise SystemExit(f"convert_llava: {error}") from None
    for line in summary.lines():
        logger.info(line)
    if args.report_peak_memory:
        logger.info("peak RSS: %.2f GB", peak_rss_bytes() / 1e9)
    return summary


if __name__ == "__main__":
    main()
