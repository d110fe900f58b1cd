"""Rehearse the paper's 7B recipe at full width and reduced depth on CPU, from a fake llava-1.5-7b-hf folder.

    OMP_NUM_THREADS=1 python -m benchmarks.paper_rehearsal                 # ~15-25 min on 2 cores, ~10 GB RAM
    python -m benchmarks.paper_rehearsal --work_dir /tmp/rehearsal --batch 2 --output benchmarks/results/paper_rehearsal.md

Stages, each in its own process with its wall time and peak RSS (GNU time's maximum resident set):
1. write: a random llava-1.5-7b-hf look-alike in the Hub's exact layout (transformers-4 config.json,
   float16 safetensors in 3 shards with `model.safetensors.index.json`, the Hub's key names such as
   `vision_tower.vision_model.*` and `language_model.model.*`, a 32002-token tokenizer whose `<image>` is
   32000 and `<pad>` 32001, a 32064-row embedding, CLIP's preprocessor_config.json) at the full widths
   (Vicuna 4096, CLIP ViT-L/14 at 336 px: 576 image tokens) but `--layers` layers per tower;
2. convert: `python -m hub.convert_llava` (float32 where the CPU has no native bf16, see below);
3. train: `deepspeed --num_gpus 1` with the `paper` preset's flags (LoRA r=128 α=256, ZeRO-2,
   activation checkpointing) for 3 steps, then save; a callback records the bytes of the engine's
   parameters and of ZeRO's optimizer partition after the first step (`MemoryProbe`);
4. reload: `AutoModel.from_pretrained(model, trust_remote_code=True)` in a fresh interpreter that cannot
   import this repository, and one `detect_keypoints` call;
5. eval: `python eval.py --limit 2` on the embedded benchmark (2 episodes).

The paper's bf16: on CPUs without AVX512-BF16/AMX torch multiplies bf16 matrices ~300x slower than
float32 (measured here: 0.24 vs 68 GFLOP/s for 1024x4096 @ 4096x4096), so the rehearsal then trains in
float32 (`--bf16 false`, converted with `--dtype float32`) and says so in its result. The batch per
device is `--batch` (default 2, not the paper's 16: one step at 16 rows of 636 tokens would take ~15 min
on one core); the memory model (`benchmarks/paper_memory.py`) scales the activations to 16.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script by the deepspeed launcher: the repository's packages must import
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import HfArgumentParser, LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast  # noqa: E402

# llava-hf/llava-1.5-7b-hf's CLIP normalisation (OpenAI CLIP's mean and std)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
LLAMA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in Llama's tokenizer
# transformers 5's LlavaForConditionalGeneration state-dict prefixes -> the Hub checkpoint's (transformers 4)
HUB_PREFIXES = (
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


@dataclass(frozen=True)
class FakeLlavaShape:
    """llava-1.5-7b-hf's widths; the depths are the rehearsal's choice."""

    text_hidden: int = 4096
    text_intermediate: int = 11008
    text_layers: int = 2
    text_heads: int = 32
    vocab_rows: int = 32064  # LLaVA-1.5 pads Vicuna's 32000 + <image> + <pad> to a multiple of 64
    base_tokens: int = 32000  # Llama's vocabulary; <image> and <pad> follow
    max_position_embeddings: int = 4096
    vision_hidden: int = 1024
    vision_intermediate: int = 4096
    vision_layers: int = 2
    vision_heads: int = 16
    image_size: int = 336
    patch_size: int = 14


def hub_key(key: str) -> str:
    """The Hub's name (transformers 4 layout) of a transformers-5 LlavaForConditionalGeneration tensor."""
    for prefix, hub_prefix in HUB_PREFIXES:
        if key.startswith(prefix):
            return hub_prefix + key[len(prefix) :]
    raise ValueError(f"{key} is not a LLaVA tensor name")


def llava_hub_config(shape: FakeLlavaShape) -> dict:
    """config.json as llava-hf/llava-1.5-7b-hf has it (transformers 4.36 fields), at `shape`."""
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": shape.base_tokens,
        "model_type": "llava",
        "pad_token_id": shape.base_tokens + 1,
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "lmsys/vicuna-7b-v1.5",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": shape.text_hidden,
            "intermediate_size": shape.text_intermediate,
            "num_hidden_layers": shape.text_layers,
            "num_attention_heads": shape.text_heads,
            "max_position_embeddings": shape.max_position_embeddings,
            "model_type": "llama",
            "rms_norm_eps": 1e-05,
            "torch_dtype": "float16",
            "vocab_size": shape.vocab_rows,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.36.0.dev0",
        "vision_config": {
            "hidden_size": shape.vision_hidden,
            "image_size": shape.image_size,
            "intermediate_size": shape.vision_intermediate,
            "model_type": "clip_vision_model",
            "num_attention_heads": shape.vision_heads,
            "num_hidden_layers": shape.vision_layers,
            "patch_size": shape.patch_size,
            "projection_dim": 768,
            "vocab_size": 32000,
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": shape.vocab_rows,
    }


def fake_llava_tokenizer(base_tokens: int, corpus: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer laid out like LLaVA-1.5's: `<unk>` `<s>` `</s>` at 0-2, `base_tokens`
    entries in all (merges learnt on `corpus`, unused filler entries after them), then `<image>` and `<pad>`.

    Llama's SentencePiece model is not available offline; what matters downstream is the id layout
    (32000 = `<image>`, 32001 = `<pad>`, then KptLLM's two tokens) and that any text round-trips.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    learnt = Tokenizer(models.BPE())
    learnt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=min(base_tokens, 1000), special_tokens=list(LLAMA_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    learnt.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(learnt.to_str())["model"]
    vocab = dict(model["vocab"])
    if len(vocab) > base_tokens:
        raise ValueError(f"the corpus gives {len(vocab)} tokens, more than base_tokens={base_tokens}")
    for index in range(len(vocab), base_tokens):  # never produced by a merge: placeholders for Llama's other pieces
        vocab[f"<unused_{index}>"] = index
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in model["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    wrapped.add_special_tokens({"extra_special_tokens": ["<image>"]})  # llava-hf: <image> = 32000, <pad> = 32001
    wrapped.add_special_tokens({"pad_token": "<pad>"})
    return wrapped


def _random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Norm weights 1, biases 0, everything else N(0, 0.02): a random model that computes finite values."""
    if re.search(r"(norm|layrnorm|layer_norm)[^.]*\.weight$", name):
        return torch.ones(shape, dtype=torch.float16)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.float16)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.float16)


def write_fake_llava(folder: Path, shape: FakeLlavaShape, corpus: list[str], shards: int = 3, seed: int = 0) -> dict:
    """Write the fake checkpoint folder; returns {tensors, parameters, bytes, shards}."""
    folder.mkdir(parents=True, exist_ok=True)
    config = llava_hub_config(shape)
    with torch.device("meta"):  # tensor names and shapes only
        skeleton = LlavaForConditionalGeneration(LlavaConfig.from_dict(config))
    tensors = {hub_key(key): tuple(value.shape) for key, value in skeleton.state_dict().items()}
    total_bytes = sum(2 * math.prod(size) for size in tensors.values())
    shard_bytes = math.ceil(total_bytes / shards)
    generator = torch.Generator().manual_seed(seed)

    weight_map: dict[str, str] = {}
    groups: list[list[str]] = [[]]
    filled = 0
    for key, size in tensors.items():  # consecutive tensors fill a shard up to a third of the bytes, as the Hub's do
        if filled >= shard_bytes * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(key)
        filled += 2 * math.prod(size)
    for index, keys in enumerate(groups, start=1):
        filename = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        save_file({key: _random_tensor(key, tensors[key], generator) for key in keys}, folder / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, filename))
    index_file = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": shape.base_tokens + 1, "transformers_version": "4.36.0.dev0"})
    )
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": shape.image_size, "width": shape.image_size}, "do_center_crop": True,
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": CLIP_MEAN, "image_processor_type": "CLIPImageProcessor", "image_std": CLIP_STD,
        "processor_class": "LlavaProcessor", "resample": 3, "rescale_factor": 1 / 255,
        "size": {"shortest_edge": shape.image_size},
    }, indent=2))  # fmt: skip
    tokenizer = fake_llava_tokenizer(shape.base_tokens, corpus)
    tokenizer.save_pretrained(folder)
    return {
        "tensors": len(tensors),
        "parameters": sum(math.prod(size) for size in tensors.values()),
        "bytes": total_bytes,
        "shards": len(groups),
        "tokenizer_tokens": len(tokenizer),
    }


# -- the training stage's probe: bytes the memory model predicts, measured in the DeepSpeed engine -------


def tensor_bytes(tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors if isinstance(tensor, torch.Tensor))


def optimizer_state_bytes(optimizer) -> dict[str, int]:
    """Bytes of an optimizer's fp32 master weights and Adam moments (a DeepSpeed ZeRO-1/2 optimizer or a torch one)."""
    # accelerate's DeepSpeedOptimizerWrapper -> DeepSpeed's ZeRO optimizer (holding the fp32 partition) -> torch's AdamW
    chain = [optimizer]
    while hasattr(chain[-1], "optimizer") and len(chain) < 4:
        chain.append(chain[-1].optimizer)
    masters = next((o.single_partition_of_fp32_groups for o in chain if hasattr(o, "single_partition_of_fp32_groups")), None)
    moments = [value for state in chain[-1].state.values() for key, value in state.items() if key in ("exp_avg", "exp_avg_sq")]
    return {
        "master_bytes": tensor_bytes(masters) if masters is not None else 0,
        "moment_bytes": tensor_bytes(moments),
        "master_is_separate_copy": masters is not None,
    }


def memory_probe_callback(path: Path):
    """A TrainerCallback that writes, after the first optimizer step, the bytes of the model's parameters
    (all, trainable) and of the optimizer's fp32 master weights and moments to `path` (JSON)."""
    from transformers import TrainerCallback

    class MemoryProbe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step != 1 or not state.is_world_process_zero:
                return
            parameters = list(model.parameters())
            trainable = [p for p in parameters if p.requires_grad]
            record = {
                "parameters": sum(p.numel() for p in parameters),
                "trainable_parameters": sum(p.numel() for p in trainable),
                "parameter_bytes": tensor_bytes(parameters),
                "parameter_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in parameters}),
                "optimizer_class": type(optimizer).__name__,
                **optimizer_state_bytes(optimizer),
                "world_size": args.world_size,
                "activation_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
            }
            path.write_text(json.dumps(record, indent=2))

    return MemoryProbe()


def train_stage(argv: list[str]) -> None:
    """`deepspeed ... benchmarks/paper_rehearsal.py --train_stage PROBE_JSON <train.py flags>`."""
    import train

    probe_path = Path(argv[0])
    train.main(argv[1:], callbacks=[memory_probe_callback(probe_path)])


# -- the stages: each in its own process, timed, with its peak RSS -----------------------------------

RELOAD_CODE = textwrap.dedent(
    """
    import json, sys
    for name in ("modeling_kptllm", "processing", "hub"):  # only the folder's remote code may be used
        assert name not in sys.modules
    sys.path = [p for p in sys.path if p not in ("", ".")]
    import torch
    from transformers import AutoModel, AutoProcessor
    from PIL import Image

    folder = sys.argv[1]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image = Image.new("RGB", (400, 300), (120, 90, 60))
    inputs = processor(query=image, support=image, kpts=[[100.0, 80.0], [250.0, 200.0]], task="visual")
    with torch.no_grad():
        out = model.detect_keypoints(**inputs, max_new_tokens=4)
    print(json.dumps({
        "class": f"{type(model).__module__}.{type(model).__name__}",
        "dtype": str(model.dtype), "parameters": sum(p.numel() for p in model.parameters()),
        "image_tokens": int((inputs["input_ids"][0] == model.config.image_token_id).sum()),
        "sequences": list(out.sequences.shape), "keypoints_finite": bool(torch.isfinite(out.pred_keypoints).all()),
    }))
    """
)


@dataclass
class StageResult:
    name: str
    command: list[str]
    wall_s: float
    peak_rss_gb: float
    returncode: int
    output_tail: str


def run_stage(name: str, command: list[str], log_dir: Path, env: dict[str, str] | None = None, cwd: Path = REPO) -> StageResult:
    """Run `command` under GNU time: its wall time and the peak RSS of its largest process (train: the
    DeepSpeed worker, not the launcher)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    rusage = log_dir / f"{name}.time"
    started = time.perf_counter()
    with (log_dir / f"{name}.log").open("w") as log:
        completed = subprocess.run(["/usr/bin/time", "-v", "-o", str(rusage), *command], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", rusage.read_text()).group(1))
    tail = (log_dir / f"{name}.log").read_text()[-3000:]
    return StageResult(name, command, round(wall, 1), round(peak_kib * 1024 / 1e9, 2), completed.returncode, tail)


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels here (AVX512-BF16 or AMX); without them bf16 matmuls crawl."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@dataclass
class RehearsalArguments:
    work_dir: str = field(default="runs/paper_rehearsal", metadata={"help": "fake checkpoint, converted model, run, logs"})
    data_dir: str = field(default="data/embedded", metadata={"help": "the embedded benchmark (generated if absent)"})
    layers: int = field(default=2, metadata={"help": "layers in each tower (the widths are the paper's)"})
    batch: int = field(default=2, metadata={"help": "rows per device per step (paper: 16)"})
    steps: int = field(default=3, metadata={"help": "training steps"})
    deepspeed: bool = field(default=True, metadata={"help": "train under `deepspeed --num_gpus 1` (ZeRO-2 on DeepSpeed's CPU accelerator)"})
    output: str = field(default="benchmarks/results/paper_rehearsal.md", metadata={"help": "the result (markdown + a JSON block)"})


def rehearse(args: RehearsalArguments) -> dict:
    from modeling_kptllm.processing_kptllm import DEFAULT_SYSTEM_PROMPT
    from processing.builders import template_corpus
    from processing.coco import load_mp100
    from processing.embedded import ensure_embedded_benchmark

    work = Path(args.work_dir).resolve()
    if work.exists():
        shutil.rmtree(work)  # the rehearsal's own folder: every stage starts from nothing
    logs = work / "logs"
    data_dir = Path(args.data_dir).resolve()
    ensure_embedded_benchmark(data_dir)
    names = sorted({n for subset in ("train", "test") for names in load_mp100(data_dir, 1, subset)["keypoint_names"] for n in names})
    bf16 = cpu_has_fast_bf16()
    dtype = "bfloat16" if bf16 else "float32"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    shape = FakeLlavaShape(text_layers=args.layers, vision_layers=args.layers)
    results: dict = {"shape": asdict(shape), "bf16": bf16, "dtype": dtype, "batch": args.batch, "steps": args.steps, "stages": []}

    def stage(name: str, command: list[str], **kwargs) -> StageResult:
        result = run_stage(name, command, logs, env=kwargs.pop("env", env), **kwargs)
        results["stages"].append(asdict(result))
        print(f"{name}: {result.wall_s} s, peak RSS {result.peak_rss_gb} GB, exit {result.returncode}", flush=True)
        if result.returncode != 0:
            raise SystemExit(f"stage {name} failed; log: {logs / (name + '.log')}\n{result.output_tail}")
        return result

    (work / "corpus.json").parent.mkdir(parents=True, exist_ok=True)
    # LLaVA's system prompt is in the tokenizer's training text, so that a row is about as long as with
    # Llama's tokenizer (576 image tokens + ~60) rather than spelled out byte by byte
    (work / "corpus.json").write_text(json.dumps(template_corpus(names, system_prompt=DEFAULT_SYSTEM_PROMPT)))
    stage("write", [sys.executable, "-m", "benchmarks.paper_rehearsal", "--write_checkpoint", str(work / "llava-1.5-7b-hf-fake"),
                    json.dumps(asdict(shape)), str(work / "corpus.json")])  # fmt: skip
    results["checkpoint"] = json.loads((work / "llava-1.5-7b-hf-fake" / "written.json").read_text())
    converted = work / "kptllm-converted"
    stage("convert", [sys.executable, "-m", "hub.convert_llava", "--llava_dir", str(work / "llava-1.5-7b-hf-fake"),
                      "--output_dir", str(converted), "--dtype", dtype, "--report_peak_memory", "true"])  # fmt: skip

    run_dir = work / "run"
    probe = work / "memory_probe.json"
    train_flags = [
        "--preset", "paper", "--model_name_or_path", str(converted), "--dataset", "embedded", "--data_dir", str(data_dir),
        "--output_dir", str(run_dir), "--max_steps", str(args.steps), "--save_steps", str(args.steps), "--logging_steps", "1",
        "--per_device_train_batch_size", str(args.batch), "--eval_episodes", "0", "--bf16", str(bf16).lower(),
    ]  # fmt: skip
    if args.deepspeed:
        port = str(29500 + os.getpid() % 1000)
        launcher = ["deepspeed", "--num_gpus", "1", "--master_port", port, str(REPO / "benchmarks" / "paper_rehearsal.py")]
    else:
        launcher = [sys.executable, str(REPO / "benchmarks" / "paper_rehearsal.py")]
        train_flags += ["--deepspeed", "", "--use_cpu", "true"]
    stage("train", [*launcher, "--train_stage", str(probe), *train_flags])
    results["memory_probe"] = json.loads(probe.read_text())
    results["train_log"] = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]

    model_dir = run_dir / "model"
    isolated = work / "isolated"
    isolated.mkdir()
    clean_env = {key: value for key, value in env.items() if key != "PYTHONPATH"}
    clean_env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(isolated / "modules"), HF_HOME=str(isolated / "hf"))
    reload = stage("reload", [sys.executable, "-c", RELOAD_CODE, str(model_dir)], env=clean_env, cwd=isolated)
    results["reload"] = json.loads(reload.output_tail.strip().splitlines()[-1])
    evaluation = stage("eval", [sys.executable, "eval.py", "--model", str(model_dir), "--data_dir", str(data_dir), "--limit", "2",
                                "--output_dir", str(work / "eval"), "--num_pictures", "0", "--matching_peer", "none"])  # fmt: skip
    results["eval"] = json.loads((work / "eval" / "results.json").read_text())
    results["eval_table"] = evaluation.output_tail
    results["memory_model_check"] = memory_model_check(converted, results["memory_probe"])
    return results


def memory_model_check(converted_dir: Path, probe: dict, lora_r: int = 128, lora_alpha: int = 256) -> dict:
    """The memory model's parameter and optimizer bytes for the rehearsal's model (one process, its dtype)
    beside what the probe measured in the DeepSpeed engine."""
    from benchmarks.paper_memory import PaperShape, ParameterCounts, TrainingSetup, memory_per_gpu
    from benchmarks.paper_sizes import build_on_meta, parameter_sizes
    from modeling_kptllm import KptLlmConfig

    config = KptLlmConfig.from_pretrained(converted_dir)
    counts = ParameterCounts.from_sizes(parameter_sizes(build_on_meta(config, {"r": lora_r, "alpha": lora_alpha, "dropout": 0.05})))
    element_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[probe["parameter_dtypes"][0]]
    setup = TrainingSetup(gpus=probe["world_size"], weight_bytes=element_bytes)
    predicted = memory_per_gpu(PaperShape.from_config(config, lora_r), counts, setup)
    measured_optimizer = probe["master_bytes"] + probe["moment_bytes"]
    return {
        "parameters": {"predicted": counts.in_training, "measured": probe["parameters"]},
        "trainable": {"predicted": counts.trainable, "measured": probe["trainable_parameters"]},
        "parameter_bytes": {"predicted": predicted.weights, "measured": probe["parameter_bytes"]},
        "optimizer_bytes": {"predicted": predicted.optimizer, "measured": measured_optimizer},
    }


def format_markdown(results: dict) -> str:
    """The committed result: what ran, each stage's wall time and peak RSS, the memory-model check, the evaluation."""
    shape = results["shape"]
    lines = [
        "# Paper configuration rehearsal: full width, reduced depth, CPU",
        "",
        f"`python -m benchmarks.paper_rehearsal` ({results.get('date', '')}; {results.get('machine', '')}). Fake "
        f"llava-1.5-7b-hf in the Hub's layout: Vicuna width {shape['text_hidden']} (MLP {shape['text_intermediate']}, "
        f"{shape['text_heads']} heads), {shape['vocab_rows']}-row embedding, tokenizer of {results['checkpoint']['tokenizer_tokens']} "
        f"tokens, CLIP width {shape['vision_hidden']} at {shape['image_size']} px / patch {shape['patch_size']} "
        f"({(shape['image_size'] // shape['patch_size']) ** 2} image tokens), {shape['text_layers']} LLM and "
        f"{shape['vision_layers']} CLIP layers; {results['checkpoint']['parameters']:,} float16 parameters in "
        f"{results['checkpoint']['shards']} shards. Trained {results['steps']} steps at batch {results['batch']} with the `paper` "
        f"preset's flags, in {results['dtype']} (bf16 {'native' if results['bf16'] else 'not native on this CPU: see below'}).",
        "",
        "| stage | wall time (s) | peak RSS (GB) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {stage['name']} | {stage['wall_s']} | {stage['peak_rss_gb']} |" for stage in results["stages"]]
    lines += [f"| **all** | **{results.get('total_wall_s', '')}** | |", ""]
    check = results.get("memory_model_check")
    if check:
        lines += ["Memory model (`benchmarks/paper_memory.py`) against the DeepSpeed engine after step 1:", "",
                  "| quantity | predicted | measured |", "|---|---:|---:|"]  # fmt: skip
        lines += [f"| {name} | {values['predicted']:,.0f} | {values['measured']:,.0f} |" for name, values in check.items()]
        lines.append("")
    losses = [record for record in results["train_log"] if "loss" in record and "train_runtime" not in record]
    lines += ["Training log: " + "; ".join(
        f"step {r['step']}: loss {r['loss']}, LM {r.get('lm_loss')}, keypoint L1 {r.get('keypoint_loss')}" for r in losses), ""]
    lines += [f"Reload in a fresh interpreter: `{results['reload']['class']}`, {results['reload']['dtype']}, "
              f"{results['reload']['parameters']:,} parameters, {results['reload']['image_tokens']} `<image>` tokens per row, "
              f"keypoints finite: {results['reload']['keypoints_finite']}.", ""]  # fmt: skip
    summary = results["eval"].get("summary", [])
    lines += ["Evaluation (`eval.py --limit 2`, random weights: the numbers only show that it runs):", "", "```",
              json.dumps(summary, indent=1)[:3000], "```", ""]  # fmt: skip
    lines += ["Notes:", ""] + [f"* {note}" for note in results.get("notes", [])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--write_checkpoint":  # stage 1, in its own process
        folder, shape, corpus = Path(argv[1]), FakeLlavaShape(**json.loads(argv[2])), json.loads(Path(argv[3]).read_text())
        written = write_fake_llava(folder, shape, corpus)
        (folder / "written.json").write_text(json.dumps(written))
        return None
    train_argv = [arg for arg in argv if not arg.startswith("--local_rank")]  # the deepspeed launcher adds --local_rank=0
    if train_argv and train_argv[0] == "--train_stage":
        train_stage(train_argv[1:])
        return None
    (args,) = HfArgumentParser(RehearsalArguments).parse_args_into_dataclasses(args=argv)
    started = time.perf_counter()
    results = rehearse(args)
    results["total_wall_s"] = round(time.perf_counter() - started, 1)
    results["date"] = time.strftime("%Y-%m-%d")
    results["machine"] = f"{os.cpu_count()} CPU cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, torch {torch.__version__}"
    write_results(results, Path(args.output))
    return results


def write_results(results: dict, output: Path) -> None:
    """output.md (the table) and output.json (everything, logs' tails included)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    output.with_suffix(".md").write_text(format_markdown(results))


if __name__ == "__main__":
    main()
