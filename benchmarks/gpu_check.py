"""The paper's model at full depth on one CUDA GPU, with random weights: training throughput, MFU, peak memory,
and `detect_keypoints` latency. Run through `benchmarks/gpu_check.sh` (no download, < 8 min on one H100/H200).

    bash benchmarks/gpu_check.sh                                # writes benchmarks/results/gpu_check.json
    python -m benchmarks.gpu_check --steps 20 --batch 16 --output gpu_check.json

1. training: LLaVA-1.5-7B shapes + KptLLM (KptLlmConfig's defaults, random init), LoRA r=128 α=256 on every
   LLM Linear and the other modules trained fully (`processing.builders.apply_lora`, as `--preset paper`),
   activation checkpointing, bf16 autocast with the frozen weights in bf16 and the trained ones (and
   AdamW's states) in fp32, as DeepSpeed keeps its fp32 master; `--batch` rows of one keypoint each, every
   row with its own random query and support crop (576 image tokens + the prompt). `--warmup` untimed
   steps, then `--steps` timed ones: tokens/s, rows/s, MFU (model FLOPs of `benchmarks.paper_memory`,
   which count no recompute, over the GPU's dense bf16 peak), `torch.cuda.max_memory_allocated`;
2. decoding: one instance with K = `--keypoints` keypoints, `detect_keypoints` (shared-prefix KV cache)
   vs one `generate()` per keypoint; a random model writes no `<keypoint>`, so every row decodes
   `--max_new_tokens` tokens in both methods: the same work.

There is no CPU fallback: without a CUDA device it exits with status 3 and says so.
"""

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

NO_GPU_EXIT_CODE = 3
# dense bf16 tensor-core peaks (TFLOP/s) by the name CUDA reports; SXM parts (PCIe H100: 756)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


@dataclass
class GpuCheckArguments:
    steps: int = field(default=20, metadata={"help": "timed training steps"})
    warmup: int = field(default=3, metadata={"help": "untimed training steps first (allocator, kernels)"})
    batch: int = field(default=16, metadata={"help": "rows per step (paper: 16 per GPU)"})
    lora_r: int = field(default=128, metadata={"help": "LoRA rank (paper: 128)"})
    lora_alpha: int = field(default=256, metadata={"help": "LoRA alpha (paper: 256)"})
    text_layers: int = field(default=32, metadata={"help": "LLM depth (paper: 32)"})
    vision_layers: int = field(default=24, metadata={"help": "CLIP depth (paper: 24)"})
    keypoints: int = field(default=17, metadata={"help": "K keypoints of the decoding instance"})
    max_new_tokens: int = field(default=24, metadata={"help": "decoded tokens per row"})
    decode_repeats: int = field(default=3, metadata={"help": "timed repeats of each decoding method (median)"})
    peak_tflops: float | None = field(default=None, metadata={"help": "the GPU's dense bf16 peak; default: by device name"})
    output: str = field(default="benchmarks/results/gpu_check.json", metadata={"help": "result JSON ('' = none)"})
    seed: int = field(default=0, metadata={"help": "random weights and inputs"})


def parse_arguments(argv: list[str]) -> GpuCheckArguments:
    (args,) = HfArgumentParser(GpuCheckArguments).parse_args_into_dataclasses(args=argv)
    for name in ("steps", "batch", "keypoints", "max_new_tokens", "decode_repeats", "text_layers", "vision_layers"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be >= 0, got {args.warmup}")
    return args


def require_cuda() -> torch.device:
    """The CUDA device, or exit loudly: a CPU run of the 7B model would take hours and prove nothing."""
    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False). This check measures the paper's "
            "7B model on a GPU and has no CPU fallback; run it on a machine with one H100/H200/A100.",
            file=sys.stderr,
        )
        raise SystemExit(NO_GPU_EXIT_CODE)
    return torch.device("cuda")


def peak_tflops_for(device_name: str, override: float | None = None) -> float:
    """Dense bf16 peak of a GPU from its CUDA name (e.g. "NVIDIA H200"); `override` wins."""
    if override is not None:
        return override
    for model, tflops in PEAK_BF16_TFLOPS.items():
        if model in device_name.upper():
            return tflops
    raise SystemExit(f"gpu_check: unknown GPU {device_name!r}: pass --peak_tflops (its dense bf16 peak in TFLOP/s)")


def mfu(model_flops_per_step: float, seconds_per_step: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak."""
    return model_flops_per_step / seconds_per_step / (peak_tflops * 1e12)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


# -- GPU side -----------------------------------------------------------------------------------


def build_paper_model(args: GpuCheckArguments, device: torch.device):
    """(peft model, processor): KptLlmConfig's LLaVA-1.5-7B shapes, random bf16 weights built on the GPU, the paper's LoRA."""
    from transformers import CLIPImageProcessorPil

    from benchmarks.paper_rehearsal import fake_llava_tokenizer
    from modeling_kptllm import KptLlmConfig, KptLlmForKeypointComprehension, KptLlmProcessor
    from modeling_kptllm.processing_kptllm import DEFAULT_SYSTEM_PROMPT, SPECIAL_TOKENS
    from processing.builders import apply_lora, set_generation_ids, template_corpus

    # LLaVA's system prompt in the tokenizer's training text: rows of ~576 + 60 tokens, as with Llama's tokenizer
    tokenizer = fake_llava_tokenizer(32000, template_corpus(AP10K_NAMES, system_prompt=DEFAULT_SYSTEM_PROMPT))
    tokenizer.add_special_tokens({"extra_special_tokens": list(SPECIAL_TOKENS)}, replace_extra_special_tokens=False)
    tokenizer.padding_side = "left"
    config = KptLlmConfig()
    config.text_config.num_hidden_layers = args.text_layers
    config.vision_config.num_hidden_layers = args.vision_layers
    ids = [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS]
    if ids != [config.image_token_id, config.kpt_prompt_token_id, config.keypoint_token_id]:
        raise RuntimeError(f"the tokenizer's placeholder ids {ids} differ from the config's")
    torch.manual_seed(args.seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = KptLlmForKeypointComprehension(config)
    finally:
        torch.set_default_dtype(default_dtype)
    set_generation_ids(model, tokenizer)
    size = config.vision_config.image_size
    processor = KptLlmProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer,
        image_seq_length=config.image_seq_length,
    )
    peft_model = apply_lora(model, args.lora_r, args.lora_alpha, 0.05)
    for parameter in peft_model.parameters():
        if parameter.requires_grad:  # trained weights in fp32: the master copy DeepSpeed keeps under bf16
            parameter.data = parameter.data.float()
    return peft_model, processor


AP10K_NAMES = [
    "left eye", "right eye", "nose", "neck", "root of tail", "left shoulder", "left elbow", "left front paw",
    "right shoulder", "right elbow", "right front paw", "left hip", "left knee", "left back paw", "right hip",
    "right knee", "right back paw",
]  # fmt: skip


def random_training_batch(processor, rows: int, seed: int, device: torch.device) -> dict:
    """`rows` visual-prompt rows, each with its own random query and support crop and one keypoint (the collator's layout)."""
    import numpy as np
    from PIL import Image

    from processing.collator import KptLlmDataCollator

    rng = np.random.default_rng(seed)

    def image() -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, size=(400, 400, 3), dtype=np.uint8))

    features = []
    for row in range(rows):
        name = AP10K_NAMES[row % len(AP10K_NAMES)]
        point = (rng.uniform(40, 360, 2)).tolist()
        features.append(dict(processor(
            query=image(), support=image(), kpts=[point], kpt_names=[name], query_kpts=[point], return_labels=True, task="visual",
        )))  # fmt: skip
    batch = KptLlmDataCollator(pad_token_id=processor.tokenizer.pad_token_id)(features)
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def time_training(model, batch: dict, args: GpuCheckArguments, device: torch.device) -> dict:
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0, fused=True)
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronizes
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    return {"step_times_s": times, "losses": losses, "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9}


def time_decoding(model, processor, args: GpuCheckArguments, device: torch.device) -> dict:
    """`detect_keypoints` (shared prefix) vs one `generate()` per keypoint, K keypoints of one random instance."""
    import numpy as np
    from PIL import Image

    from benchmarks.fast_decoding import naive_detect, per_row_inputs

    model.eval()
    rng = np.random.default_rng(args.seed + 1)
    query, support = (Image.fromarray(rng.integers(0, 256, size=(400, 400, 3), dtype=np.uint8)) for _ in range(2))
    points = rng.uniform(40, 360, (args.keypoints, 2)).tolist()
    inputs = processor(query=query, support=support, kpts=points, task="visual")
    inputs = {key: value.to(device) for key, value in inputs.items()}
    rows = [{key: value.to(device) for key, value in row.items()} for row in per_row_inputs(inputs)]
    timings: dict[str, list[float]] = {"shared_prefix": [], "generate_per_keypoint": []}
    with torch.autocast(device.type, dtype=torch.bfloat16):
        for repeat in range(args.decode_repeats + 1):  # the first repeat warms up
            for method in timings:
                torch.cuda.synchronize()
                started = time.perf_counter()
                if method == "shared_prefix":
                    model.detect_keypoints(**inputs, max_new_tokens=args.max_new_tokens)
                else:
                    naive_detect(model, rows, args.max_new_tokens)
                torch.cuda.synchronize()
                if repeat:
                    timings[method].append(time.perf_counter() - started)
    medians = {method: median(values) for method, values in timings.items()}
    return {
        "keypoints": args.keypoints,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "times_s": timings,
        "median_s": medians,
        "speedup": medians["generate_per_keypoint"] / medians["shared_prefix"],
    }


def run(args: GpuCheckArguments) -> dict:
    device = require_cuda()
    from benchmarks.paper_memory import PaperShape, ParameterCounts, TrainingSetup, model_flops_per_row
    from benchmarks.paper_sizes import parameter_sizes

    started = time.perf_counter()
    name = torch.cuda.get_device_name(device)
    peak = peak_tflops_for(name, args.peak_tflops)
    model, processor = build_paper_model(args, device)
    counts = ParameterCounts.from_sizes(parameter_sizes(model))
    batch = random_training_batch(processor, args.batch, args.seed, device)
    tokens_per_row = float(batch["attention_mask"].sum(-1).float().mean())
    shape = PaperShape.from_config(model.config, args.lora_r)
    setup = TrainingSetup(batch_per_gpu=args.batch, text_tokens=round(tokens_per_row) - (shape.vision_tokens - 1))
    flops_per_step = args.batch * model_flops_per_row(shape, counts, setup)

    training = time_training(model, batch, args, device)
    step = median(training["step_times_s"])
    decoding = time_decoding(model, processor, args, device)
    result = {
        "device": name,
        "peak_bf16_tflops": peak,
        "arguments": asdict(args),
        "parameters": {"in_training": counts.in_training, "trainable": counts.trainable},
        "tokens_per_row": tokens_per_row,
        "training": {
            **training,
            "median_step_s": step,
            "tokens_per_s": args.batch * tokens_per_row / step,
            "rows_per_s": args.batch / step,
            "model_tflops_per_step": flops_per_step / 1e12,
            "mfu": mfu(flops_per_step, step, peak),
        },
        "decoding": decoding,
        "environment": {"torch": torch.__version__, "cuda": torch.version.cuda},
        "wall_s": time.perf_counter() - started,
    }
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    result = run(args)
    training, decoding = result["training"], result["decoding"]
    print(
        f"{result['device']}: {training['median_step_s']:.2f} s/step at batch {args.batch} "
        f"({result['tokens_per_row']:.0f} tokens/row): {training['tokens_per_s']:,.0f} tokens/s, MFU {training['mfu']:.1%}, "
        f"peak {training['peak_memory_gb']:.1f} GB; detect_keypoints K={args.keypoints}: "
        f"{decoding['median_s']['shared_prefix']:.3f} s shared prefix vs {decoding['median_s']['generate_per_keypoint']:.3f} s "
        f"generate() per keypoint ({decoding['speedup']:.1f}x); total {result['wall_s']:.0f} s"
    )
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
