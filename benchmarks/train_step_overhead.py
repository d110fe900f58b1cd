#!/usr/bin/env python
"""Training-step overhead of KptLLM against transformers' LLaVA with the same backbones.

One training step = forward + backward + AdamW step on one batch. Both models are built in code
from configs (no download) with the SAME CLIP vision config and the SAME Llama text config, and get
the same rows: `instances` x `keypoints` visual-task rows, one processor call per (instance,
keypoint) as `processing.collator.KeypointTrainingDataset` makes them, the rows of one instance
with one support draw (train.py's default `--group_by_instance`).

* ours ("kptllm"): `KptLlmForKeypointComprehension` on that batch exactly as train.py trains it:
         collated by `KptLlmDataCollator` (right padding; each distinct query crop and support crop
         once, with `query_index` / `support_index`) and called with `share_prefix=True` (the rows of
         one query crop compute the system prompt and image tokens once), as `KptLlmTrainer` does.
         Loss = LM + 2 * L1; it also runs the prompt encoder, the prompt feature extractor and the
         keypoint head.
* ours, full rows ("kptllm_full_rows", skipped with --no-full-rows): the same model and batch with
         `share_prefix=False`, i.e. the language model computes every row in full, as LLaVA does.
* LLaVA: `LlavaForConditionalGeneration` on its natural inputs: the same token ids, except that
         `<kpt_prompt>` is replaced by an ordinary text token (same sequence length, one multimodal
         input fewer per row), one query crop per row (LLaVA fills every `<image>` block from its own
         image and has no index to share one) and the same labels (loss = LM).

Each model lives in its own fresh worker subprocess, so that peak-memory high-water marks do not
mix; the parent drives the workers step by step, rotating the order (LLaVA, ours, ours-full | ours,
ours-full, LLaVA | ...), so that load changes on a shared machine hit all alike.

    python benchmarks/train_step_overhead.py                     # --preset tiny
    python benchmarks/train_step_overhead.py --preset design     # DESIGN.md §6: 224/14, batch 8 x ~300 tokens
    python benchmarks/train_step_overhead.py --preset design --profile   # + where our extra time goes

Prints a Markdown table and writes `--output` (JSON). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# imported in every process (parent and both workers), so that the workers' memory baselines match
from transformers import LlavaConfig, LlavaForConditionalGeneration  # noqa: E402

from modeling_kptllm import KptLlmConfig, KptLlmForKeypointComprehension  # noqa: E402

MODELS = ("llava", "kptllm", "kptllm_full_rows")
LABELS = {
    "llava": "LlavaForConditionalGeneration (transformers)",
    "kptllm": "KptLlmForKeypointComprehension (ours, as train.py trains it)",
    "kptllm_full_rows": "KptLlmForKeypointComprehension (ours, share_prefix=False)",
}
# which model class and which inputs each measured row uses
ARCHITECTURE = {"llava": "llava", "kptllm": "kptllm", "kptllm_full_rows": "kptllm"}
# keyword arguments of the forward call besides the batch: KptLlmTrainer passes share_prefix=True under
# train.py's default --group_by_instance
FORWARD_OPTIONS = {"llava": {}, "kptllm": {"share_prefix": True}, "kptllm_full_rows": {"share_prefix": False}}
TARGET_OVERHEAD_PCT = 10.0
DEFAULT_OUTPUT = "benchmarks/results/train_step_overhead.json"
# AdamW implementations: torch's default is the per-tensor loop on CPU (foreach on CUDA)
ADAMW_IMPLEMENTATIONS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}

# MP-100 / AP-10K-like keypoint names; an instance asks for K of them
KEYPOINT_NAMES = (
    "left eye", "right eye", "nose", "neck", "root of tail", "left shoulder", "left elbow",
    "left front paw", "right shoulder", "right elbow", "right front paw", "left hip", "left knee",
    "left back paw", "right hip", "right knee", "right back paw", "tail tip", "left ear", "right ear",
)  # fmt: skip


@dataclass(frozen=True)
class Preset:
    """Backbone sizes and batch shape. Rows per batch = instances * keypoints."""

    image_size: int
    patch_size: int
    vision_hidden_size: int
    vision_layers: int
    text_hidden_size: int
    text_layers: int
    num_heads: int
    instances: int
    keypoints: int

    @property
    def batch_size(self) -> int:
        return self.instances * self.keypoints

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


PRESETS = {
    # for the unit test: a few seconds on 2 CPU cores
    "micro": Preset(32, 8, 32, 2, 32, 1, num_heads=2, instances=2, keypoints=2),
    # default: CLIP 64 px / patch 8 (64 image tokens), hidden 128, 4 layers + Llama 256, 4 layers
    "tiny": Preset(64, 8, 128, 4, 256, 4, num_heads=4, instances=2, keypoints=4),
    # DESIGN.md §6: CLIP 224 / 14 (256 image tokens) + Llama 256 x 4, batch 8 x ~300 tokens
    "design": Preset(224, 14, 128, 4, 256, 4, num_heads=4, instances=2, keypoints=4),
}


# ---------------------------------------------------------------------------------------------
# inputs: configs and batches, built once in the parent so both models see identical data
# ---------------------------------------------------------------------------------------------
def _random_image(rng: np.random.Generator) -> Image.Image:
    width, height = (int(v) for v in rng.integers(96, 192, size=2))
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _random_instance(rng: np.random.Generator, num_kpts: int):
    """An image, an instance box inside it and `num_kpts` keypoints inside the box (pixels)."""
    image = _random_image(rng)
    w = float(rng.uniform(0.4, 0.9) * image.width)
    h = float(rng.uniform(0.4, 0.9) * image.height)
    x = float(rng.uniform(0, image.width - w))
    y = float(rng.uniform(0, image.height - h))
    kpts = np.stack([rng.uniform(x + 1, x + w - 1, num_kpts), rng.uniform(y + 1, y + h - 1, num_kpts)], axis=1)
    return image, [x, y, w, h], kpts.tolist()


def _left_pad_cat(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
    length = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (length - t.shape[1], 0), value=value) for t in tensors])


def build_inputs(preset: Preset, seed: int = 0) -> dict:
    """Configs and batches of both models.

    One processor call per (instance, keypoint) row, as `KeypointTrainingDataset` makes training rows,
    the rows of one instance with the same query and support (one support draw per instance, train.py's
    `--group_by_instance`), collated by train.py's `KptLlmDataCollator`: ours gets each distinct crop once
    plus `query_index` / `support_index`; LLaVA gets the same ids, masks and labels and one query crop per
    row.

    Returns {"kptllm": {"config", "batch"}, "llava": {"config", "batch"}, "info": {...}}.
    """
    from processing.builders import build_processor, template_corpus, tiny_config, train_byte_level_tokenizer
    from processing.collator import KptLlmDataCollator

    tokenizer = train_byte_level_tokenizer(template_corpus(KEYPOINT_NAMES))
    config = tiny_config(
        tokenizer,
        image_size=preset.image_size,
        patch_size=preset.patch_size,
        vision_hidden_size=preset.vision_hidden_size,
        vision_layers=preset.vision_layers,
        text_hidden_size=preset.text_hidden_size,
        text_layers=preset.text_layers,
        num_heads=preset.num_heads,
    )
    processor = build_processor(tokenizer, preset.image_size, preset.patch_size)
    if processor.image_seq_length != config.image_seq_length:
        raise AssertionError("processor and model disagree on the image token count")

    rng = np.random.default_rng(seed)
    features = []
    for _ in range(preset.instances):
        names = [KEYPOINT_NAMES[i] for i in rng.choice(len(KEYPOINT_NAMES), preset.keypoints, replace=False)]
        query, query_box, query_kpts = _random_instance(rng, preset.keypoints)
        support, support_box, support_kpts = _random_instance(rng, preset.keypoints)
        for k, name in enumerate(names):  # one training row per keypoint, as KeypointTrainingDataset builds them
            features.append(dict(processor(
                query=query, support=support, kpts=[support_kpts[k]], task="visual", kpt_names=[name],
                query_bbox=query_box, support_bbox=support_box, query_kpts=[query_kpts[k]], return_labels=True,
            )))  # fmt: skip
    batch = KptLlmDataCollator(pad_token_id=tokenizer.pad_token_id)(features)  # train.py's collator

    # LLaVA: same ids with <kpt_prompt> replaced by an ordinary text token ("\n", which already
    # separates the prompt's parts), same masks and LM labels, one query crop per row
    filler_id = tokenizer("\n", add_special_tokens=False)["input_ids"]
    if len(filler_id) != 1:
        raise AssertionError(f"'\\n' is not a single token: {filler_id}")
    filler_id = filler_id[0]
    llava_ids = batch["input_ids"].clone()
    llava_ids[llava_ids == config.kpt_prompt_token_id] = filler_id
    llava_batch = {
        "input_ids": llava_ids,
        "attention_mask": batch["attention_mask"].clone(),
        "labels": batch["labels"].clone(),
        # LLaVA fills each row's <image> block from its own image
        "pixel_values": batch["pixel_values"][batch["query_index"]].contiguous(),
    }
    llava_config = LlavaConfig(
        vision_config=config.vision_config.to_dict(),
        text_config=config.text_config.to_dict(),
        image_token_id=config.image_token_id,
        image_seq_length=config.image_seq_length,
        projector_hidden_act=config.projector_hidden_act,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    rows, length = batch["input_ids"].shape
    query_crops = batch["pixel_values"].shape[0]
    # the shared prefix of train.py's step: every row's ids up to its last <image> token (system prompt, image)
    prefix = int((batch["input_ids"][0] == config.image_token_id).nonzero().max()) + 1
    info = {
        "batch_rows": rows,
        "sequence_length": length,
        "padding_tokens": int((batch["attention_mask"] == 0).sum()),
        "padding_side": "right (KptLlmDataCollator)",
        "image_tokens_per_row": config.image_seq_length,
        "kpt_prompt_tokens_per_row": int((batch["input_ids"] == config.kpt_prompt_token_id).sum()) // rows,
        "kpt_prompt_replacement_in_llava": tokenizer.convert_ids_to_tokens(filler_id),
        "inputs": {
            "kptllm": f"KptLlmDataCollator batch: pixel_values {tuple(batch['pixel_values'].shape)} + query_index, "
            f"support_pixel_values {tuple(batch['support_pixel_values'].shape)} + support_index; share_prefix=True",
            "kptllm_full_rows": "the same batch, share_prefix=False",
            "llava": f"pixel_values {tuple(llava_batch['pixel_values'].shape)} (one query crop per row)",
        },
        "images_encoded": {
            "kptllm": len(torch.unique(torch.cat([batch["pixel_values"], batch["support_pixel_values"]]).flatten(1), dim=0)),
            "llava": rows,
        },
        "shared_prefix_tokens": prefix,
        "llm_tokens_per_step": {  # positions the language model computes (padding included)
            "kptllm": query_crops * prefix + rows * (length - prefix),
            "kptllm_full_rows": rows * length,
            "llava": rows * length,
        },
        "vocab_size": len(tokenizer),
    }
    return {
        "kptllm": {"config": config, "batch": batch},
        "llava": {"config": llava_config, "batch": llava_batch},
        "info": info,
    }


def build_model(name: str, config) -> torch.nn.Module:
    name = ARCHITECTURE.get(name, name)
    if name == "kptllm":
        return KptLlmForKeypointComprehension(config)
    if name == "llava":
        return LlavaForConditionalGeneration(config)
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")


# ---------------------------------------------------------------------------------------------
# measurement: a runner per model, driven step by step (in a worker subprocess or in-process)
# ---------------------------------------------------------------------------------------------
def _rss_high_water_mib() -> dict:
    """The process's resident-set high-water mark.

    `vm_hwm_mib` (Linux /proc/self/status VmHWM) belongs to the current address space only and is
    what we report. `ru_maxrss_mib` (getrusage) is kept for reference: Linux folds the high-water
    mark of the address space an exec replaces into ru_maxrss, and with subprocess's vfork/exec
    that is the PARENT's, so in a child started by a fat parent ru_maxrss is at least the parent's
    peak (measured: 814 MiB in a child of a parent holding 800 MiB).
    """
    out = {"vm_hwm_mib": None, "vm_rss_mib": None}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    out["vm_hwm_mib"] = int(line.split()[1]) / 1024
                elif line.startswith("VmRSS:"):
                    out["vm_rss_mib"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["ru_maxrss_mib"] = maxrss / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS
    return out


def _peak_rss_mib(sample: dict) -> float:
    return sample["vm_hwm_mib"] if sample["vm_hwm_mib"] is not None else sample["ru_maxrss_mib"]


def _fingerprints(model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """Cheap per-tensor checksums (no full copy of the weights, which would inflate peak memory)."""
    with torch.no_grad():
        return {
            name: (float(p.double().sum()), float(p.double().abs().sum()))
            for name, p in model.named_parameters()
        }


def _module_groups(name: str) -> tuple[str, ...]:
    if ARCHITECTURE[name] == "kptllm":
        return ("vision_tower", "multi_modal_projector", "prompt_encoder", "prompt_feature_extractor",
                "prompt_projector", "language_model", "keypoint_head")  # fmt: skip
    return ("vision_tower", "multi_modal_projector", "language_model", "lm_head")


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


class TrainStepRunner:
    """One model, its optimizer and its batch; `step()` runs and times one training step."""

    def __init__(
        self, name: str, config, batch: dict, lr: float = 1e-4, device: str = "cpu", seed: int = 0, adamw: str = "default"
    ):
        self.name = name
        self.adamw = adamw
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.rss_baseline = _rss_high_water_mib()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.cuda_baseline = torch.cuda.memory_allocated(self.device)
        torch.manual_seed(seed)
        self.model = build_model(name, config).to(self.device)
        self.model.train()
        self.batch = {k: v.to(self.device) for k, v in batch.items()}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, **ADAMW_IMPLEMENTATIONS[adamw])
        self.fingerprints = _fingerprints(self.model)
        self.times: list[float] = []
        self.losses: list[float] = []

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def step(self) -> tuple[float, float]:
        """forward + backward + AdamW step; returns (seconds, loss)."""
        self._sync()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(**self.batch, **FORWARD_OPTIONS.get(self.name, {})).loss
        loss.backward()
        self.optimizer.step()
        loss_value = loss.item()  # a sync point too
        self._sync()
        elapsed = time.perf_counter() - start
        self.times.append(elapsed)
        self.losses.append(loss_value)
        return elapsed, loss_value

    def finish(self, warmup: int) -> dict:
        """Statistics of the steps after the first `warmup` ones, peak memory, what trained."""
        peak = _rss_high_water_mib()
        after = _fingerprints(self.model)
        before = self.fingerprints
        changed = {n for n in before if before[n] != after[n]}
        groups = {}
        for group in _module_groups(self.name):
            names = [n for n in before if n.split(".")[0] == group or n.startswith(f"model.{group}.")]
            groups[group] = {"tensors": len(names), "changed": sum(n in changed for n in names)}
        times = self.times[warmup:]
        q1, median, q3 = _quartiles(times)
        rows = self.batch["input_ids"].shape[0]
        result = {
            "model": self.name,
            "label": LABELS[self.name],
            "device": str(self.device),
            "torch_threads": torch.get_num_threads(),
            "forward_options": FORWARD_OPTIONS.get(self.name, {}),
            "attn_implementation": self.model.config._attn_implementation,
            "adamw": self.adamw,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "parameter_tensors": len(before),
            "batch_rows": rows,
            "sequence_length": self.batch["input_ids"].shape[1],
            "warmup_steps": warmup,
            "timed_steps": len(times),
            "warmup_times_s": self.times[:warmup],
            "step_times_s": times,
            "step_time_median_s": median,
            "step_time_q1_s": q1,
            "step_time_q3_s": q3,
            "step_time_iqr_s": q3 - q1,
            "step_time_min_s": min(times),
            "samples_per_s": rows / median,
            "losses": self.losses,
            "loss_finite": all(math.isfinite(v) for v in self.losses),
            "parameters_changed": len(changed),
            "parameters_changed_fraction": len(changed) / len(before),
            "groups": groups,
            "rss_baseline": self.rss_baseline,
            "rss_peak": peak,
        }
        if self.cuda:
            peak_bytes = torch.cuda.max_memory_allocated(self.device)
            result["peak_memory_method"] = "torch.cuda.max_memory_allocated"
            result["peak_memory_mib"] = peak_bytes / 2**20
            result["peak_memory_delta_mib"] = (peak_bytes - self.cuda_baseline) / 2**20
        else:
            result["peak_memory_method"] = "VmHWM (process RSS high-water mark), own subprocess"
            result["peak_memory_mib"] = _peak_rss_mib(peak)
            result["peak_memory_delta_mib"] = _peak_rss_mib(peak) - _peak_rss_mib(self.rss_baseline)
        return result


PROTOCOL_PREFIX = "@@bench "


def _worker(args: argparse.Namespace) -> None:
    """A measurement subprocess: builds one runner, then obeys `step` / `finish` lines on stdin."""
    workdir = Path(args.workdir)
    architecture = ARCHITECTURE[args.worker]
    config_class = KptLlmConfig if architecture == "kptllm" else LlavaConfig
    config = config_class.from_pretrained(workdir / architecture)
    batch = torch.load(workdir / f"{architecture}_batch.pt", weights_only=True)

    def reply(payload) -> None:
        sys.stdout.write(PROTOCOL_PREFIX + json.dumps(payload) + "\n")
        sys.stdout.flush()

    runner = TrainStepRunner(
        args.worker, config, batch, lr=args.lr, device=args.device, seed=args.seed, adamw=args.adamw
    )
    reply({"ready": True})
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            seconds, loss = runner.step()
            reply({"time": seconds, "loss": loss})
        elif command.startswith("finish"):
            reply(runner.finish(int(command.split()[1])))
            return
        else:
            raise SystemExit(f"unknown command {command!r}")


class WorkerClient:
    """The parent's handle on one worker subprocess (a runner in its own address space)."""

    def __init__(
        self, name: str, workdir: Path, lr: float, device: str, seed: int, threads: int | None, adamw: str
    ):
        self.name = name
        command = [
            sys.executable, str(Path(__file__).resolve()), "--worker", name, "--workdir", str(workdir),
            "--lr", str(lr), "--device", device, "--seed", str(seed), "--adamw", adamw,
        ]  # fmt: skip
        if threads is not None:
            command += ["--threads", str(threads)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1
        )

    def wait_ready(self) -> None:
        self._read()  # {"ready": true}: imports done, model built

    def _read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(PROTOCOL_PREFIX):
                return json.loads(line[len(PROTOCOL_PREFIX):])
        self.process.wait()
        self.stderr.seek(0)
        raise RuntimeError(f"the {self.name} worker exited ({self.process.returncode}):\n{self.stderr.read()[-4000:]}")

    def _send(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._read()

    def step(self) -> tuple[float, float]:
        reply = self._send("step")
        return reply["time"], reply["loss"]

    def finish(self, warmup: int) -> dict:
        result = self._send(f"finish {warmup}")
        self.close()
        return result

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.stderr.close()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _overhead(ours: dict, ref: dict) -> dict:
    """Step time (and peak memory) of `ours` relative to `ref`, in %: medians, step-paired ratios, best steps."""
    paired = [a / b for a, b in zip(ours["step_times_s"], ref["step_times_s"])]
    pq1, pmedian, pq3 = _quartiles(paired)

    def pct(a, b):
        return None if a is None or not b else 100.0 * (a / b - 1.0)

    overhead = {
        "step_time_pct": pct(ours["step_time_median_s"], ref["step_time_median_s"]),
        "samples_per_s_pct": 100.0 * (1.0 - ours["samples_per_s"] / ref["samples_per_s"]),
        "paired_step_time_pct_median": 100.0 * (pmedian - 1.0),
        "paired_step_time_pct_iqr": [100.0 * (pq1 - 1.0), 100.0 * (pq3 - 1.0)],
        "min_step_time_pct": pct(ours["step_time_min_s"], ref["step_time_min_s"]),
        "peak_memory_pct": pct(ours["peak_memory_mib"], ref["peak_memory_mib"]),
        "peak_memory_delta_pct": pct(ours["peak_memory_delta_mib"], ref["peak_memory_delta_mib"]),
        "target_pct": TARGET_OVERHEAD_PCT,
    }
    overhead["within_target"] = overhead["step_time_pct"] <= TARGET_OVERHEAD_PCT
    return overhead


def run_benchmark(
    preset: str | Preset = "tiny",
    warmup: int = 3,
    steps: int = 10,
    isolate: bool = True,
    device: str = "auto",
    lr: float = 1e-4,
    seed: int = 0,
    threads: int | None = None,
    adamw: str = "default",
    full_rows: bool = True,
) -> dict:
    """Measures the models on identical rows and returns their rows, the overheads and metadata.

    The models' steps are interleaved, the order rotating each round (LLaVA, ours, ours-full | ours,
    ours-full, LLaVA | ...): on a shared machine a load change then hits all alike, and each timed
    step of ours has a LLaVA step next to it (`overhead["paired_step_time_pct_median"]`).
    isolate=True keeps each model in its own worker subprocess — the only way to get a separate peak
    memory per model; isolate=False runs them in this process (faster to start; peak memory is then
    None because the models would share one high-water mark). threads=None leaves torch's default
    intra-op thread count alone. adamw: "default" (torch's choice: a per-tensor loop on CPU),
    "foreach" or "fused", for every model. full_rows=False skips ours without the shared prefix.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    preset_name = preset if isinstance(preset, str) else "custom"
    spec = PRESETS[preset] if isinstance(preset, str) else preset
    device = resolve_device(device)
    inputs = build_inputs(spec, seed=seed)
    models = MODELS if full_rows else MODELS[:2]
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    runners: dict = {}
    with tempfile.TemporaryDirectory(prefix="kptllm_bench_") as tmp:
        workdir = Path(tmp)
        try:
            for name in models:
                architecture = ARCHITECTURE[name]
                config, batch = inputs[architecture]["config"], inputs[architecture]["batch"]
                if isolate:
                    if not (workdir / architecture).exists():
                        config.save_pretrained(workdir / architecture)
                        torch.save(batch, workdir / f"{architecture}_batch.pt")
                    runners[name] = WorkerClient(name, workdir, lr, device, seed, threads, adamw)
                else:
                    runners[name] = TrainStepRunner(name, config, batch, lr, device, seed, adamw)
            for runner in runners.values():  # workers start side by side; timing starts once all are ready
                if isinstance(runner, WorkerClient):
                    runner.wait_ready()
            for i in range(warmup + steps):
                shift = i % len(models)
                for name in models[shift:] + models[:shift]:
                    runners[name].step()
            results = {name: runners.pop(name).finish(warmup) for name in models}
        finally:
            for runner in runners.values():
                if isinstance(runner, WorkerClient):
                    runner.close()
    if not isolate:  # one process: the models share one high-water mark (RSS and CUDA alike)
        for row in results.values():
            row["peak_memory_method"] = "n/a: all models in one process (isolate=False)"
            row["peak_memory_mib"] = row["peak_memory_delta_mib"] = None

    ref = results["llava"]
    result = {
        "benchmark": "train_step_overhead",
        "preset": preset_name,
        "preset_spec": asdict(spec),
        "device": device,
        "isolated": isolate,
        "adamw": adamw,
        "inputs": inputs["info"],
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_1m_before": load_before,
            "load_average_1m_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        },
        "rows": [results[name] for name in models],
        # the headline: ours as train.py trains it (shared prefix) against LLaVA
        "overhead": _overhead(results["kptllm"], ref),
        "notes": [
            f"one step = zero_grad + forward + backward + AdamW ({adamw}) step on the same rows; fp32; steps of "
            "the models interleaved",
            "LLaVA sees the same token ids with <kpt_prompt> replaced by an ordinary text token "
            f"({inputs['info']['kpt_prompt_replacement_in_llava']!r}): same sequence length, one multimodal "
            "input fewer per row, and one query crop per row (its natural input)",
            "ours gets train.py's batch (KptLlmDataCollator: each distinct query and support crop once, "
            "query_index / support_index) and share_prefix=True as KptLlmTrainer passes it; it encodes each "
            "distinct crop once, runs the prompt encoder, prompt feature extractor and keypoint head "
            "(loss = LM + 2 * L1); LLaVA's loss is LM only",
        ],
    }
    if full_rows:  # ours with the language model over every row in full, as LLaVA computes it
        result["overhead_full_rows"] = _overhead(results["kptllm_full_rows"], ref)
    return result


# ---------------------------------------------------------------------------------------------
# --profile: where does the extra time of our step go?
# ---------------------------------------------------------------------------------------------
def _median_time(fn, reps: int, warmup: int = 2, sync=lambda: None) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile_overhead(
    preset: str | Preset = "tiny", reps: int = 10, device: str = "auto", seed: int = 0, top: int = 12
) -> dict:
    """Component timings (forward + backward, median of `reps`) and a torch.profiler op diff.

    Components are timed on the real batches, each on its own (`.sum().backward()` or its loss as
    the backward seed), in one process: the vision tower on LLaVA's crops (one per row) and on ours'
    distinct crops, the prompt path (prompt encoder + extractor + projector), the keypoint head + L1,
    the language model + LM loss over full rows, the AdamW step of each model, and the full steps
    (timed one model after the other: the interleaved benchmark is the better overhead figure).
    """
    from torch.profiler import ProfilerActivity, profile

    spec = PRESETS[preset] if isinstance(preset, str) else preset
    device = resolve_device(device)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    inputs = build_inputs(spec, seed=seed)
    runners = {
        name: TrainStepRunner(
            name, inputs[ARCHITECTURE[name]]["config"], inputs[ARCHITECTURE[name]]["batch"], device=device, seed=seed
        )
        for name in MODELS
    }
    ours = runners["kptllm"].model
    batch = runners["kptllm"].batch
    rows = batch["input_ids"].shape[0]
    timings: dict[str, float] = {}

    def backward(fn):
        def run():
            ours.zero_grad(set_to_none=True)
            fn().backward()

        return run

    query, support = batch["pixel_values"], batch["support_pixel_values"]  # distinct crops
    per_row = runners["llava"].batch["pixel_values"]
    timings[f"vision tower, {len(per_row)} query crops, one per row (as LLaVA)"] = _median_time(
        backward(lambda: ours.get_vision_features(per_row).sum()), reps, sync=sync
    )
    both = torch.cat([query, support])
    timings[f"vision tower, {len(both)} distinct query + support crops (ours)"] = _median_time(
        backward(lambda: ours.get_vision_features(both).sum()), reps, sync=sync
    )
    with torch.no_grad():
        support_features = ours.get_vision_features(support)
    support_features.requires_grad_(True)
    timings["prompt path: encoder + extractor + projector"] = _median_time(
        backward(lambda: ours.get_prompt_features(
            support_features, batch["prompt_coords"], batch["prompt_visible"], support_index=batch["support_index"]
        ).sum()),
        reps,
        sync=sync,
    )  # fmt: skip
    with torch.no_grad():
        embeds = ours.embed_multimodal_inputs(
            batch["input_ids"], query, support, batch["prompt_coords"], batch["prompt_visible"],
            query_index=batch["query_index"], support_index=batch["support_index"],
        )  # fmt: skip
        hidden = ours.get_decoder()(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
    embeds.requires_grad_(True)
    hidden.requires_grad_(True)

    def keypoint_loss():
        pred = ours.predict_keypoints(batch["input_ids"], hidden)
        return ours.keypoint_loss(pred, batch["keypoint_labels"], batch["keypoint_visible"], hidden)

    timings["keypoint head + L1 loss"] = _median_time(backward(keypoint_loss), reps, sync=sync)

    def language_model_loss():
        out = ours.get_decoder()(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
        logits = ours.get_output_embeddings()(out.last_hidden_state)
        return ours.loss_function(logits=logits, labels=batch["labels"], vocab_size=ours.config.text_config.vocab_size)

    timings["language model + lm_head + LM loss, full rows (as LLaVA)"] = _median_time(
        backward(language_model_loss), reps, sync=sync
    )

    for name, runner in runners.items():
        if name == "kptllm_full_rows":
            continue  # the same optimizer as ours
        runner.step()  # leaves gradients for the optimizer-only timing
        timings[f"AdamW step only, {name} ({len(runner.fingerprints)} tensors)"] = _median_time(
            runner.optimizer.step, reps, sync=sync
        )
    for name, runner in runners.items():
        timings[f"full training step, {name}"] = _median_time(runner.step, reps, sync=sync)

    # op-level diff: self CPU (CUDA: device) time per op over `reps` steps, ours (as train.py) minus LLaVA
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    op_totals = {}
    for name in ("kptllm", "llava"):
        runner = runners[name]
        with profile(activities=activities) as prof:
            for _ in range(reps):
                runner.step()
        time_field = "self_device_time_total" if cuda else "self_cpu_time_total"  # microseconds
        op_totals[name] = {
            e.key: (getattr(e, time_field) / 1e3 / reps, e.count // reps) for e in prof.key_averages()
        }  # ms per step, calls per step
    keys = set(op_totals["kptllm"]) | set(op_totals["llava"])
    diff = sorted(
        (
            (
                key,
                op_totals["kptllm"].get(key, (0.0, 0))[0],
                op_totals["llava"].get(key, (0.0, 0))[0],
                op_totals["kptllm"].get(key, (0.0, 0))[1],
                op_totals["llava"].get(key, (0.0, 0))[1],
            )
            for key in keys
        ),
        key=lambda item: item[2] - item[1],
    )[:top]
    return {
        "preset": preset if isinstance(preset, str) else "custom",
        "device": device,
        "batch_rows": rows,
        "sequence_length": batch["input_ids"].shape[1],
        "torch_threads": torch.get_num_threads(),
        "component_median_s": timings,
        "op_diff_ms_per_step": [
            {"op": k, "kptllm_ms": a, "llava_ms": b, "kptllm_calls": ca, "llava_calls": cb} for k, a, b, ca, cb in diff
        ],
    }


def format_profile(result: dict) -> str:
    lines = [
        f"### Where the time goes — preset `{result['preset']}` on {result['device']} "
        f"({result['torch_threads']} threads, batch {result['batch_rows']} × {result['sequence_length']})",
        "",
        "| component (forward + backward unless noted) | median ms |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {1e3 * t:.1f} |" for name, t in result["component_median_s"].items()]
    lines += [
        "",
        f"| op (self {'device' if result['device'] == 'cuda' else 'CPU'} time per step) | ours ms | LLaVA ms | Δ ms "
        "| calls ours / LLaVA |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result["op_diff_ms_per_step"]:
        lines.append(
            f"| `{row['op']}` | {row['kptllm_ms']:.1f} | {row['llava_ms']:.1f} | "
            f"{row['kptllm_ms'] - row['llava_ms']:+.1f} | {row['kptllm_calls']} / {row['llava_calls']} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def _fmt_mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def format_markdown(result: dict) -> str:
    info, ov = result["inputs"], result["overhead"]
    mem_col = "peak CUDA MiB (Δ)" if result["device"] == "cuda" else "peak RSS MiB (Δ over imports)"
    lines = [
        f"### Training-step overhead — preset `{result['preset']}` on {result['device']} "
        f"({result['rows'][-1]['torch_threads']} threads)",
        "",
        f"batch {info['batch_rows']} rows × {info['sequence_length']} tokens "
        f"({info['image_tokens_per_row']} image tokens/row, right padding); images encoded per step: "
        f"ours {info['images_encoded']['kptllm']}, LLaVA {info['images_encoded']['llava']}; "
        f"LLM positions per step: ours {info['llm_tokens_per_step']['kptllm']:,} (shared prefix of "
        f"{info['shared_prefix_tokens']} tokens once per query crop), full rows and LLaVA "
        f"{info['llm_tokens_per_step']['llava']:,}; "
        f"{result['rows'][0]['warmup_steps']} warm-up + {result['rows'][0]['timed_steps']} timed steps each; "
        f"AdamW {result['adamw']}",
        "",
        "inputs: " + "; ".join(f"{name}: {given}" for name, given in info["inputs"].items()),
        "",
        f"| model | params | samples/s | step median (s) | IQR (s) | {mem_col} | loss first → last |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['label']} | {row['parameters'] / 1e6:.2f} M | {row['samples_per_s']:.2f} | "
            f"{row['step_time_median_s']:.4f} | {row['step_time_iqr_s']:.4f} | "
            f"{_fmt_mib(row['peak_memory_mib'])} ({_fmt_mib(row['peak_memory_delta_mib'])}) | "
            f"{row['losses'][0]:.3f} → {row['losses'][-1]:.3f} |"
        )
    verdict = "within" if ov["within_target"] else "ABOVE"
    mem = "" if ov["peak_memory_pct"] is None else f"; peak memory {ov['peak_memory_pct']:+.1f}%"
    mem_delta = "" if ov["peak_memory_delta_pct"] is None else f" (Δ {ov['peak_memory_delta_pct']:+.1f}%)"
    lo, hi = ov["paired_step_time_pct_iqr"]
    ref_rate, ours_rate = result["rows"][0]["samples_per_s"], result["rows"][1]["samples_per_s"]
    lines += [
        "",
        f"**KptLLM overhead: {ov['step_time_pct']:+.1f}% step time "
        f"({ours_rate / ref_rate:.2f}x LLaVA's samples/s){mem}{mem_delta}** — "
        f"{verdict} the {ov['target_pct']:.0f}% target. "
        f"Cross-checks: step-paired median {ov['paired_step_time_pct_median']:+.1f}% "
        f"(IQR {lo:+.1f}% … {hi:+.1f}%), best step {ov['min_step_time_pct']:+.1f}%.",
        "",
    ]
    if "overhead_full_rows" in result:
        full = result["overhead_full_rows"]
        lo, hi = full["paired_step_time_pct_iqr"]
        lines += [
            f"Ours with `share_prefix=False` (the LLM over every row in full, as LLaVA): "
            f"{full['step_time_pct']:+.1f}% step time; step-paired median {full['paired_step_time_pct_median']:+.1f}% "
            f"(IQR {lo:+.1f}% … {hi:+.1f}%), best step {full['min_step_time_pct']:+.1f}%.",
            "",
        ]
    lines += [
        f"Note: LLaVA gets the same ids with `<kpt_prompt>` replaced by the text token "
        f"`{info['kpt_prompt_replacement_in_llava']}` (same length, 1 multimodal input fewer per row).",
    ]
    noisy = [r["model"] for r in result["rows"] if r["step_time_iqr_s"] > 0.25 * r["step_time_median_s"]]
    if noisy:
        env = result["environment"]
        lines += [
            "",
            f"WARNING: noisy timings (IQR > 25% of the median for {', '.join(noisy)}; 1-min load average "
            f"{env['load_average_1m_before']:.2f} before, {env['load_average_1m_after']:.2f} after on "
            f"{env['cpu_count']} CPUs). Other processes were competing for the cores: rerun on a quiet machine.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first (default 3)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model (default 20)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--adamw", choices=sorted(ADAMW_IMPLEMENTATIONS), default="default", help="AdamW implementation (both models)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-isolate", action="store_true", help="both models in this process (no CPU peak memory)")
    parser.add_argument("--instances", type=int, help="override the preset's instances per batch")
    parser.add_argument("--keypoints", type=int, help="override the preset's keypoints (rows) per instance")
    parser.add_argument(
        "--no-full-rows", action="store_true", help="skip ours with share_prefix=False (the LLM over every row in full)"
    )
    parser.add_argument("--profile", action="store_true", help="also break our overhead down (components, ops)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads in the workers (default: left at torch's default)"
    )
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"JSON file (default {DEFAULT_OUTPUT}); '' to skip")
    # internal: one measurement subprocess
    parser.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.worker:
        _worker(args)
        return None
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    preset = PRESETS[args.preset]
    overrides = {k: v for k, v in (("instances", args.instances), ("keypoints", args.keypoints)) if v is not None}
    if overrides:
        preset = replace(preset, **overrides)
    result = run_benchmark(
        preset,
        warmup=args.warmup,
        steps=args.steps,
        isolate=not args.no_isolate,
        device=args.device,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
        full_rows=not args.no_full_rows,
        adamw=args.adamw,
    )
    result["preset"] = args.preset + (f" ({', '.join(f'{k}={v}' for k, v in overrides.items())})" if overrides else "")
    print(format_markdown(result))
    if args.profile:
        result["profile"] = profile_overhead(preset, reps=args.steps, device=args.device, seed=args.seed)
        result["profile"]["preset"] = result["preset"]
        print("\n" + format_profile(result["profile"]))
    if args.output:
        output = Path(args.output)
        if args.output == DEFAULT_OUTPUT:  # the repository's results folder, wherever this runs from
            output = REPO_ROOT / DEFAULT_OUTPUT
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {output}")
    return result


if __name__ == "__main__":
    main()
