"""Memory and throughput model of the paper's run: 8 GPUs, batch 16 per GPU, bf16, ZeRO-2, activation checkpointing.

    python -m benchmarks.paper_memory                   # per-GPU breakdown + what batch fits on 80/40/24 GB
    python -m benchmarks.paper_memory --gpus 8 --batch_per_gpu 16 --text_tokens 60

Per GPU, in bytes (N = GPUs, P = every parameter the peft model holds, T = its trainable parameters):
* weights: 2 P (bf16). ZeRO-2 does not partition parameters; P includes peft's frozen originals of the
  fully trained modules (`benchmarks/paper_sizes.py`);
* gradients: ZeRO-2 keeps this rank's 1/N of the reduced gradients, in bf16 (2 T / N), an fp32 copy of
  it for the step (4 T / N), and the reduce buckets (two of `reduce_bucket_size` = hidden² elements with
  `overlap_comm`);
* optimizer: Adam's fp32 master weights and two moments for this rank's partition, 12 T / N;
* activations with checkpointing: every LLM and CLIP layer keeps its input (the checkpoint), one layer
  at a time is recomputed and back-propagated (its saved tensors and their gradients), and the logits
  of every position go through the fp32 cross-entropy (bf16 logits + fp32 log-softmax + fp32 and bf16
  gradients: 2 + 4 + 4 + 4 bytes per logit at the peak of the backward);
* a fixed allowance for the CUDA context, NCCL and allocator fragmentation (an assumption, 3 GiB).

The parameter, gradient and optimizer terms are exact given the counts; the rehearsal
(`benchmarks/paper_rehearsal.py`) measures them at full width and compares. The activation terms are
estimates from counting the tensors a layer saves for backward (see `llm_layer_saved_bytes_per_token`).

Throughput: model FLOPs per token (no recompute, as MFU counts them) = 2 N_fwd + 2 N_fwd (input
gradients) + 2 N_trained (weight gradients of LoRA and the fully trained modules only: the frozen LLM
needs none) + attention (12 · layers · hidden · context for forward + backward). Step times are given at
an assumed MFU; `benchmarks/gpu_check.sh` measures the real one.
"""

import math
from dataclasses import asdict, dataclass, field

from transformers import HfArgumentParser

GIB = 1024**3
GPU_MEMORY_GB = (80, 40, 24)  # A100/H100-80G, A100-40G, RTX 3090/4090/A5000-class cards
PEAK_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}  # dense bf16 tensor-core peak (SXM)


@dataclass(frozen=True)
class PaperShape:
    """Widths and depths of LLaVA-1.5-7B (KptLlmConfig's defaults) and the LoRA rank."""

    hidden: int = 4096
    intermediate: int = 11008
    layers: int = 32
    heads: int = 32
    vocab: int = 32064
    vision_hidden: int = 1024
    vision_intermediate: int = 4096
    vision_layers: int = 24
    vision_tokens: int = 577  # 24 x 24 patches + CLS
    lora_r: int = 128

    @classmethod
    def from_config(cls, config, lora_r: int = 128) -> "PaperShape":
        text, vision = config.text_config, config.vision_config
        return cls(
            hidden=text.hidden_size, intermediate=text.intermediate_size, layers=text.num_hidden_layers,
            heads=text.num_attention_heads, vocab=text.vocab_size, vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size, vision_layers=vision.num_hidden_layers,
            vision_tokens=config.image_seq_length + 1, lora_r=lora_r,
        )  # fmt: skip


@dataclass(frozen=True)
class ParameterCounts:
    """What the memory and FLOP terms need from `benchmarks/paper_sizes.py`."""

    in_training: int  # every parameter of the peft model (frozen LLM, LoRA, trained copies and peft's originals)
    trainable: int
    llm_matmul: int  # LLM weights every token multiplies with: decoder Linears (frozen), LoRA, LM head
    llm_trained_matmul: int  # of which trained (LoRA)
    vision: int  # the CLIP tower (trained fully), per image token
    projector: int  # the z_q projector, per image token

    @classmethod
    def from_sizes(cls, sizes: dict) -> "ParameterCounts":
        """From `paper_sizes.parameter_sizes` (GroupSize per group)."""
        return cls(
            in_training=sum(size.total for size in sizes.values()),
            trainable=sum(size.trainable for size in sizes.values()),
            llm_matmul=sizes["llm_decoder"].total + sizes["lora"].total + sizes["lm_head"].frozen,
            llm_trained_matmul=sizes["lora"].total,
            vision=sizes["vision_tower"].trainable,
            projector=sizes["multi_modal_projector"].trainable,
        )


def paper_parameter_counts() -> ParameterCounts:
    """The counts of the paper configuration, built on the meta device (~10 s)."""
    from benchmarks.paper_sizes import build_on_meta, parameter_sizes

    return ParameterCounts.from_sizes(parameter_sizes(build_on_meta()))


@dataclass
class TrainingSetup:
    gpus: int = field(default=8, metadata={"help": "data-parallel GPUs (ZeRO-2 partitions gradients and optimizer over them)"})
    batch_per_gpu: int = field(default=16, metadata={"help": "rows per GPU per step (paper: 16)"})
    text_tokens: int = field(default=60, metadata={"help": "tokens of a row besides its 576 image tokens (system prompt, prompt, answer)"})
    images_per_row: float = field(
        default=2.0,
        metadata={"help": "crops through CLIP per row: 2 = a query and a support crop of its own (the upper bound; "
                          "instance-grouped batches encode each crop once, fewer)"},
    )
    weight_bytes: int = field(default=2, metadata={"help": "bytes per weight and activation element (bf16: 2)"})
    overhead_gib: float = field(default=3.0, metadata={"help": "CUDA context, NCCL buffers, allocator fragmentation (assumed)"})
    mfu: float = field(default=0.4, metadata={"help": "assumed model FLOPs utilisation for the step-time estimate"})
    gpu: str = field(default="A100", metadata={"help": "A100 | H100 | H200: peak bf16 FLOP/s for the step time"})


def llm_layer_saved_bytes_per_token(shape: PaperShape, element_bytes: int) -> float:
    """Bytes one LoRA'd Llama layer saves for backward per token when it is recomputed.

    Elements: RMSNorm inputs and outputs (2 x 2 H), q/k/v (3 H) and their RoPE'd q/k (2 H), the attention
    output (H; flash/SDPA saves no L x L matrix), gate/up outputs, SiLU(gate) and the product fed to
    down_proj (4 I); LoRA's dropout gives each of the 7 adapters its own copy of its input (q, k, v, o,
    gate, up: 6 H; down: I) plus a one-byte mask each, and an r-wide intermediate (7 r).
    """
    h, i, r = shape.hidden, shape.intermediate, shape.lora_r
    elements = 2 * 2 * h + 3 * h + 2 * h + h + 4 * i + 6 * h + i + 7 * r
    return elements * element_bytes + (6 * h + i)  # masks: one byte per element


def vision_layer_saved_bytes_per_token(shape: PaperShape, element_bytes: int) -> float:
    """Bytes one CLIP layer saves for backward per token: LayerNorm in/out (2 x 2 D), q/k/v (3 D), attention
    output (D), fc1 output and GELU output (2 x 4 D)."""
    d, m = shape.vision_hidden, shape.vision_intermediate
    return (2 * 2 * d + 3 * d + d + 2 * m) * element_bytes


@dataclass
class MemoryBreakdown:
    weights: float
    gradients: float
    optimizer: float
    llm_checkpoints: float
    llm_layer_recompute: float
    logits: float
    vision_activations: float
    overhead: float

    @property
    def activations(self) -> float:
        return self.llm_checkpoints + self.llm_layer_recompute + self.logits + self.vision_activations

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead


def tokens_per_row(shape: PaperShape, setup: TrainingSetup) -> int:
    return shape.vision_tokens - 1 + setup.text_tokens  # the CLS token is dropped before the LLM


def memory_per_gpu(shape: PaperShape, counts: ParameterCounts, setup: TrainingSetup) -> MemoryBreakdown:
    """Bytes per GPU of one training step at its peak (the backward of the first LLM layer)."""
    element = setup.weight_bytes
    partition = counts.trainable / setup.gpus
    reduce_buckets = 2 * shape.hidden**2 * element  # "auto" reduce_bucket_size = hidden², double-buffered
    tokens = setup.batch_per_gpu * tokens_per_row(shape, setup)
    image_tokens = setup.batch_per_gpu * setup.images_per_row * shape.vision_tokens
    vision_checkpoints = shape.vision_layers * image_tokens * shape.vision_hidden * element
    return MemoryBreakdown(
        weights=counts.in_training * element,
        gradients=partition * (element + 4) + reduce_buckets,
        optimizer=partition * 12,  # fp32 master + exp_avg + exp_avg_sq
        llm_checkpoints=shape.layers * tokens * shape.hidden * element,
        # the recomputed layer's saved tensors plus their gradients while it back-propagates
        llm_layer_recompute=2 * tokens * llm_layer_saved_bytes_per_token(shape, element),
        logits=tokens * shape.vocab * (element + 4 + 4 + 4),
        vision_activations=vision_checkpoints + 2 * image_tokens * vision_layer_saved_bytes_per_token(shape, element),
        overhead=setup.overhead_gib * GIB,
    )


def largest_batch(shape: PaperShape, counts: ParameterCounts, setup: TrainingSetup, gpu_gb: float) -> int:
    """The largest batch per GPU whose modelled peak fits in `gpu_gb` (decimal GB, as cards are sold); 0 if none."""
    capacity = gpu_gb * 1e9
    batch = 0
    while memory_per_gpu(shape, counts, _with_batch(setup, batch + 1)).total <= capacity:
        batch += 1
        if batch > 4096:
            break
    return batch


def _with_batch(setup: TrainingSetup, batch: int) -> TrainingSetup:
    return TrainingSetup(**{**asdict(setup), "batch_per_gpu": batch})


def model_flops_per_row(shape: PaperShape, counts: ParameterCounts, setup: TrainingSetup) -> float:
    """Training FLOPs of one row (forward + backward, no recompute): what MFU counts."""
    tokens = tokens_per_row(shape, setup)
    llm = (4 * counts.llm_matmul + 2 * counts.llm_trained_matmul) * tokens
    attention = 12 * shape.layers * shape.hidden * tokens * tokens  # QK^T and AV, forward + backward
    image_tokens = setup.images_per_row * shape.vision_tokens
    vision = 6 * counts.vision * image_tokens + 12 * shape.vision_layers * shape.vision_hidden * shape.vision_tokens * image_tokens
    projector = 6 * counts.projector * (shape.vision_tokens - 1)
    return llm + attention + vision + projector


def step_seconds(shape: PaperShape, counts: ParameterCounts, setup: TrainingSetup) -> float:
    """Seconds per step at the assumed MFU on `setup.gpu` (every GPU runs its own batch in parallel)."""
    flops = setup.batch_per_gpu * model_flops_per_row(shape, counts, setup)
    return flops / (setup.mfu * PEAK_BF16_TFLOPS[setup.gpu] * 1e12)


def breakdown_table(memory: MemoryBreakdown) -> str:
    rows = [
        ("weights (bf16, every parameter incl. peft's originals)", memory.weights),
        ("gradients (ZeRO-2 partition, bf16 + fp32, + reduce buckets)", memory.gradients),
        ("optimizer (Adam fp32 master + 2 moments, ZeRO-2 partition)", memory.optimizer),
        ("activations: LLM layer inputs (checkpoints)", memory.llm_checkpoints),
        ("activations: one LLM layer recomputed + its gradients", memory.llm_layer_recompute),
        ("activations: logits + fp32 cross-entropy", memory.logits),
        ("activations: CLIP (checkpoints + one layer)", memory.vision_activations),
        ("CUDA context, NCCL, fragmentation (assumed)", memory.overhead),
        ("**total**", memory.total),
    ]
    return "\n".join(["| per GPU | GB |", "|---|---:|"] + [f"| {name} | {value / 1e9:.2f} |" for name, value in rows])


def capacity_table(shape: PaperShape, counts: ParameterCounts, setup: TrainingSetup) -> str:
    lines = ["| card | modelled peak at batch 16 | headroom | largest batch that fits |", "|---|---:|---:|---:|"]
    at_16 = memory_per_gpu(shape, counts, _with_batch(setup, 16)).total / 1e9
    for gpu_gb in GPU_MEMORY_GB:
        fits = largest_batch(shape, counts, setup, gpu_gb)
        lines.append(f"| {gpu_gb} GB | {at_16:.1f} GB | {gpu_gb - at_16:+.1f} GB | {fits} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    (setup,) = HfArgumentParser(TrainingSetup).parse_args_into_dataclasses(args=argv)
    shape, counts = PaperShape(), paper_parameter_counts()
    memory = memory_per_gpu(shape, counts, setup)
    print(breakdown_table(memory))
    print()
    print(capacity_table(shape, counts, setup))
    flops = model_flops_per_row(shape, counts, setup)
    seconds = step_seconds(shape, counts, setup)
    tokens = setup.batch_per_gpu * tokens_per_row(shape, setup)
    print(
        f"\nmodel FLOPs: {flops / 1e12:.2f} TFLOP per row; at MFU {setup.mfu:.0%} on {setup.gpu}: {seconds:.2f} s per step, "
        f"{tokens / seconds:,.0f} LLM tokens/s per GPU, {setup.gpus * setup.batch_per_gpu / seconds:.1f} rows/s over {setup.gpus} GPUs"
    )
    return {"memory": asdict(memory), "total": memory.total, "flops_per_row": flops, "step_seconds": seconds}


if __name__ == "__main__":
    main()
