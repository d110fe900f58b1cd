#!/usr/bin/env python
"""Fast identify-then-detect decoding: K keypoints of one instance, three ways, same answers.

* naive:          one HF `model.generate()` per keypoint (stopping at `<keypoint>` or eos), then one
                  forward pass over prompt + answer to read that keypoint's coordinates: the loop a
                  user writes with the generic API;
* batched:        `model.detect_keypoints(**inputs, share_prefix=False)`: the K rows decoded as one
                  greedy batch with a KV cache, every row prefilling its own copy of the query image;
* shared_prefix:  `model.detect_keypoints(**inputs)`: the rows' common prefix (system text + query
                  image) prefilled once with batch 1 and its KV cache shared by the K rows; the query
                  crop and the support crop each go through the vision tower once.

All three run in the same process on the same inputs, interleaved (the order rotates every repeat so
that load changes on a shared machine hit all three), after warm-up; the median of the repeats gives
keypoints/s and the speedups. The benchmark first checks that the three give the same answers
(names and tokens identical, coordinates within 1e-4) and exits with status 1 if they do not.

The model is a tiny random KptLLM built in code (`processing.builders`), fitted for a few seconds to
this one instance so that it answers like a trained model ("It is the left eye. <keypoint>", rows of
different lengths); `--model_dir` benchmarks a saved model instead. Processor work is done once,
outside the timed region, for all three (the naive loop gets each row's inputs, padding dropped).

    python benchmarks/fast_decoding.py                                   # tiny, K = 17, writes benchmarks/results/fast_decoding.json
    python benchmarks/fast_decoding.py --preset small --output benchmarks/results/fast_decoding_small.json
    python benchmarks/fast_decoding.py --profile                         # + prefill/decode split and top ops per method
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import HfArgumentParser

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from processing.builders import build_tiny_model  # noqa: E402
from processing.coco import AP10K_KEYPOINT_NAMES  # noqa: E402

METHODS = ("naive", "batched", "shared_prefix")
LABELS = {
    "naive": "one generate() per keypoint + forward for (x, y)",
    "batched": "detect_keypoints(share_prefix=False)",
    "shared_prefix": "detect_keypoints() (shared prefix KV cache)",
}
TARGET_SPEEDUP = 8.0
COORDINATE_TOLERANCE = 1e-4
DEFAULT_OUTPUT = "benchmarks/results/fast_decoding.json"
TASKS = ("visual", "textual", "semantic", "visual+textual")


@dataclass(frozen=True)
class Preset:
    """Backbone sizes (`processing.builders.tiny_config` arguments) and the fitting that precedes timing."""

    model: dict
    fit_steps: int


PRESETS = {
    # build_tiny_model's defaults: CLIP 32 px / patch 8 (16 image tokens), hidden 64 x 2 layers; Llama 64 x 2
    "tiny": Preset(model={}, fit_steps=40),
    # train_step_overhead.py's "design" backbones: CLIP 224 / 14 (256 image tokens), hidden 128 x 4; Llama 256 x 4
    "small": Preset(
        model={
            "image_size": 224, "patch_size": 14, "vision_hidden_size": 128, "vision_layers": 4,
            "text_hidden_size": 256, "text_layers": 4, "num_heads": 4,
        },
        fit_steps=12,  # ~1 min on one busy core; enough for the answer template, not for telling keypoints apart
    ),  # fmt: skip
    # the quick test's
    "micro": Preset(model={}, fit_steps=2),
}


@dataclass
class BenchmarkArguments:
    preset: str = field(default="tiny", metadata={"help": f"backbone sizes: {', '.join(PRESETS)}"})
    keypoints: int = field(default=17, metadata={"help": "K: keypoints of the one instance (AP-10K names; at most 17)"})
    task: str = field(default="visual", metadata={"help": f"one of {', '.join(TASKS)}"})
    shots: int = field(default=1, metadata={"help": "support images (visual tasks)"})
    repeats: int = field(default=7, metadata={"help": "timed repeats per method (the median is reported)"})
    warmup: int = field(default=2, metadata={"help": "untimed repeats per method first"})
    max_new_tokens: int = field(default=24, metadata={"help": "answer length cap, the same for every method"})
    fit_steps: int | None = field(default=None, metadata={"help": "AdamW steps fitting the model to the answer template (preset's if unset; 0: random model)"})
    model_dir: str | None = field(default=None, metadata={"help": "benchmark a saved KptLLM folder instead of building one"})
    seed: int = field(default=0, metadata={"help": "model initialisation, images and keypoints"})
    profile: bool = field(default=False, metadata={"help": "also time prefill vs decode and list the top ops per method"})
    output: str = field(default=DEFAULT_OUTPUT, metadata={"help": "JSON result path ('' skips it)"})


# -- inputs and model ---------------------------------------------------------------------------


def _random_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def build_scene(num_keypoints: int, shots: int, seed: int) -> dict:
    """One query instance and its support shots: random pictures and keypoints (pixels), AP-10K names."""
    if not 1 <= num_keypoints <= len(AP10K_KEYPOINT_NAMES):
        raise ValueError(f"keypoints must be in 1..{len(AP10K_KEYPOINT_NAMES)}, got {num_keypoints}")
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    rng = np.random.default_rng(seed)
    query = _random_image(rng, 96, 80)
    supports = [_random_image(rng, 88, 96) for _ in range(shots)]
    return {
        "names": list(AP10K_KEYPOINT_NAMES[:num_keypoints]),
        "query": query,
        "supports": supports,
        "support_kpts": [(rng.uniform(0.05, 0.95, (num_keypoints, 2)) * s.size).tolist() for s in supports],
        "query_kpts": (rng.uniform(0.05, 0.95, (num_keypoints, 2)) * query.size).tolist(),
    }


def task_inputs(processor, scene: dict, task: str, **extra):
    """The processor's one-call inputs for all K keypoints of the instance (K rows)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}; expected one of {TASKS}")
    kwargs: dict = {"query": scene["query"], "task": task}
    if task == "semantic":
        kwargs["kpts"] = scene["query_kpts"]
    if task in ("textual", "visual+textual"):
        kwargs["kpt_names"] = scene["names"]
    if task in ("visual", "visual+textual"):
        many = len(scene["supports"]) > 1
        kwargs["support"] = scene["supports"] if many else scene["supports"][0]
        kwargs["kpts"] = scene["support_kpts"] if many else scene["support_kpts"][0]
    return processor(**{**kwargs, **extra})


def fit_to_template(model, processor, scene: dict, task: str, steps: int, seed: int) -> list[float]:
    """A few AdamW steps on this instance's answers to `task`, so that rows answer "It is the <name>.
    <keypoint>" (semantic: "This is the <name>.") as a trained model does; returns the losses."""
    if steps <= 0:
        return []
    targets = {} if task == "semantic" else {"query_kpts": scene["query_kpts"]}
    batch = task_inputs(processor, scene, task, kpt_names=scene["names"], return_labels=True, **targets)
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def load_model(args: BenchmarkArguments, scene: dict):
    if args.model_dir:
        from modeling_kptllm import KptLlmForKeypointComprehension, KptLlmProcessor

        model = KptLlmForKeypointComprehension.from_pretrained(args.model_dir)
        processor = KptLlmProcessor.from_pretrained(args.model_dir)
        return model.eval(), processor, []
    if args.preset not in PRESETS:
        raise ValueError(f"preset={args.preset!r}; expected one of {', '.join(PRESETS)}")
    preset = PRESETS[args.preset]
    model, processor = build_tiny_model(AP10K_KEYPOINT_NAMES, seed=args.seed, **preset.model)
    steps = preset.fit_steps if args.fit_steps is None else args.fit_steps
    losses = fit_to_template(model, processor, scene, args.task, steps, args.seed)
    return model.eval(), processor, losses


# -- the three methods --------------------------------------------------------------------------


def per_row_inputs(inputs) -> list[dict]:
    """Each row's own inputs, left padding dropped: what the naive loop feeds `generate()`."""
    rows = []
    for row in range(inputs["input_ids"].shape[0]):
        ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()][None]  # (1, L_row)
        row_inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": inputs["pixel_values"]}
        if "support_pixel_values" in inputs:
            row_inputs["support_pixel_values"] = inputs["support_pixel_values"]
            row_inputs["prompt_coords"] = inputs["prompt_coords"][row : row + 1]
            row_inputs["prompt_visible"] = inputs["prompt_visible"][row : row + 1]
        rows.append(row_inputs)
    return rows


@torch.no_grad()
def naive_detect(model, rows: list[dict], max_new_tokens: int) -> dict:
    """One `generate()` per keypoint, stopping at `<keypoint>` or eos; then a forward pass over prompt +
    answer whose `<keypoint>` hidden state gives the coordinates (`generate` does not return them)."""
    kpt_id = model.config.keypoint_token_id
    stop_ids = [*model._eos_token_ids(), kpt_id]
    answers, points = [], []
    for row_inputs in rows:
        prompt = row_inputs["input_ids"]
        answer = prompt.new_zeros(1, 0)
        if prompt[0, -1] != kpt_id:  # the no-ItD prompt already ends with <keypoint>
            generated = model.generate(**row_inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids)
            answer = generated[:, prompt.shape[1] :]
        point = torch.full((2,), float("nan"))
        full = torch.cat([prompt, answer], dim=1)
        if full[0, -1] == kpt_id:
            out = model(**dict(row_inputs, input_ids=full, attention_mask=torch.ones_like(full)))
            point = out.pred_keypoints[0]
        answers.append(answer[0].tolist())
        points.append(point)
    return {"answers": answers, "pred_keypoints": torch.stack(points)}


def run_method(method: str, model, inputs, rows: list[dict], max_new_tokens: int):
    if method == "naive":
        return naive_detect(model, rows, max_new_tokens)
    return model.detect_keypoints(**inputs, max_new_tokens=max_new_tokens, share_prefix=method == "shared_prefix")


# -- checks and timing --------------------------------------------------------------------------


def compare_outputs(processor, pad_id: int, naive: dict, batched, shared) -> dict:
    """Names and tokens identical, `<keypoint>` found alike, coordinates within tolerance, all three."""
    trimmed = {"batched": [], "shared_prefix": []}
    padded_after_answer = True
    for method, out in (("batched", batched), ("shared_prefix", shared)):
        for row, answer in enumerate(naive["answers"]):
            tokens = out.sequences[row].tolist()
            trimmed[method].append(tokens[: len(answer)])
            padded_after_answer &= all(token == pad_id for token in tokens[len(answer) :])
    tokens_identical = trimmed["batched"] == naive["answers"] == trimmed["shared_prefix"] and padded_after_answer
    names = {
        "naive": processor.decode_names(naive["answers"]),
        "batched": processor.decode_names(batched.sequences),
        "shared_prefix": processor.decode_names(shared.sequences),
    }
    found = {
        "naive": (~naive["pred_keypoints"].isnan().any(-1)).tolist(),
        "batched": batched.keypoint_found.tolist(),
        "shared_prefix": shared.keypoint_found.tolist(),
    }
    points = {"naive": naive["pred_keypoints"].float(), "batched": batched.pred_keypoints.float(), "shared_prefix": shared.pred_keypoints.float()}
    same_nan = all(torch.equal(points["naive"].isnan(), p.isnan()) for p in points.values())
    differences = [
        (points[a] - points[b]).abs().nan_to_num(0.0).max().item() if points[a].numel() else 0.0
        for a, b in (("naive", "batched"), ("naive", "shared_prefix"), ("batched", "shared_prefix"))
    ]
    max_difference = max(differences) if same_nan else math.inf
    result = {
        "names_identical": names["naive"] == names["batched"] == names["shared_prefix"],
        "tokens_identical": bool(tokens_identical),
        "keypoint_found_identical": found["naive"] == found["batched"] == found["shared_prefix"],
        "max_coordinate_difference": max_difference,
        "coordinate_tolerance": COORDINATE_TOLERANCE,
        "coordinates_within_tolerance": max_difference <= COORDINATE_TOLERANCE,
        "names": names["shared_prefix"],
        "keypoints_found": int(sum(found["shared_prefix"])),
        "answer_tokens": [len(answer) for answer in naive["answers"]],
        # the shared path's (x, y) per row, normalized to the query crop; None where no <keypoint> came
        "pred_keypoints": [None if math.isnan(x) else [x, y] for x, y in points["shared_prefix"].tolist()],
    }
    result["all_equal"] = all(
        result[key] for key in ("names_identical", "tokens_identical", "keypoint_found_identical", "coordinates_within_tolerance")
    )
    return result


def summarize(times: list[float], keypoints: int) -> dict:
    quartiles = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    median = statistics.median(times)
    return {
        "median_s": median,
        "q1_s": quartiles[0],
        "q3_s": quartiles[2],
        "min_s": min(times),
        "times_s": times,
        "keypoints_per_s": keypoints / median,
    }


def time_methods(model, inputs, rows: list[dict], max_new_tokens: int, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Interleaved timing: each repeat runs all methods, in an order that rotates every repeat."""
    times: dict[str, list[float]] = {method: [] for method in METHODS}
    for repeat in range(warmup + repeats):
        shift = repeat % len(METHODS)
        for method in METHODS[shift:] + METHODS[:shift]:
            start = time.perf_counter()
            run_method(method, model, inputs, rows, max_new_tokens)
            seconds = time.perf_counter() - start
            if repeat >= warmup:
                times[method].append(seconds)
    return times


def profile_methods(model, inputs, rows: list[dict], max_new_tokens: int) -> dict:
    """Where the time goes: prefill vs decode of each batched path, and the top ops of each method."""
    from torch.profiler import ProfilerActivity, profile

    breakdown = {}
    for method in ("batched", "shared_prefix"):
        calls = []
        decoder = model.get_decoder()

        def record(module, args, kwargs, output, calls=calls):
            calls.append((time.perf_counter(), tuple(kwargs["inputs_embeds"].shape[:2])))

        handle = decoder.register_forward_hook(record, with_kwargs=True)
        start = time.perf_counter()
        run_method(method, model, inputs, rows, max_new_tokens)
        total = time.perf_counter() - start
        handle.remove()
        # the prefill ends with the last decoder call that processes more than one token per row
        prefill_calls = [i for i, (_, shape) in enumerate(calls) if shape[1] > 1]
        prefill_end = calls[prefill_calls[-1]][0] if prefill_calls else start
        breakdown[method] = {
            "total_s": total,
            "prefill_s": prefill_end - start,
            "decode_s": total - (prefill_end - start),
            "decoder_calls": [list(shape) for _, shape in calls[: len(prefill_calls) + 1]] + [["...", len(calls) - len(prefill_calls) - 1]],
        }
    top_ops = {}
    for method in METHODS:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_method(method, model, inputs, rows, max_new_tokens)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        top_ops[method] = table
    return {"prefill_decode": breakdown, "top_ops": top_ops}


def run_benchmark(args: BenchmarkArguments) -> dict:
    scene = build_scene(args.keypoints, args.shots, args.seed)
    model, processor, fit_losses = load_model(args, scene)
    inputs = task_inputs(processor, scene, args.task)
    rows = per_row_inputs(inputs)
    num_keypoints = inputs["input_ids"].shape[0]
    pad_id = model.generation_config.pad_token_id

    with torch.no_grad():
        outputs = {method: run_method(method, model, inputs, rows, args.max_new_tokens) for method in METHODS}
    equality = compare_outputs(processor, pad_id, outputs["naive"], outputs["batched"], outputs["shared_prefix"])
    prefix_length = model._shared_prefix_length(
        inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
        inputs.get("support_pixel_values"), inputs.get("prompt_coords"),
    )

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with torch.no_grad():
        times = time_methods(model, inputs, rows, args.max_new_tokens, args.warmup, args.repeats)
    results = {method: summarize(times[method], num_keypoints) for method in METHODS}
    naive, batched, shared = (results[m]["median_s"] for m in METHODS)
    lengths = inputs["attention_mask"].sum(-1)
    config = model.config
    result = {
        "arguments": asdict(args),
        "model": {
            "source": args.model_dir or f"processing.builders.build_tiny_model(AP10K names, **PRESETS[{args.preset!r}].model)",
            "parameters": sum(p.numel() for p in model.parameters()),
            "vision": {k: getattr(config.vision_config, k) for k in ("image_size", "patch_size", "hidden_size", "num_hidden_layers")},
            "text": {k: getattr(config.text_config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")},
            "attention": config.text_config._attn_implementation,
            "fit_losses": fit_losses,
        },
        "inputs": {
            "task": args.task,
            "keypoints": num_keypoints,
            "shots": args.shots,
            "image_tokens": processor.image_seq_length,
            "row_tokens": lengths.tolist(),
            "shared_prefix_tokens": prefix_length,
            "prefill_tokens": {
                "batched": int(lengths.sum()),
                "shared_prefix": prefix_length + int((lengths - prefix_length).sum()) if prefix_length else int(lengths.sum()),
            },
        },
        "equal_outputs": equality,
        "methods": {method: {"label": LABELS[method], **results[method]} for method in METHODS},
        "speedup": {
            "shared_prefix_vs_naive": naive / shared,
            "batched_vs_naive": naive / batched,
            "shared_prefix_vs_batched": batched / shared,
        },
        "target": {"speedup_vs_naive": TARGET_SPEEDUP, "met": naive / shared >= TARGET_SPEEDUP},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "cpu_count": os.cpu_count(),
            "load_average_1m_before": load_before,
            "load_average_1m_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "platform": platform.platform(),
        },
    }
    if args.profile:
        with torch.no_grad():
            result["profile"] = profile_methods(model, inputs, rows, args.max_new_tokens)
    return result


def format_markdown(result: dict) -> str:
    inputs, equal = result["inputs"], result["equal_outputs"]
    lines = [
        f"K = {inputs['keypoints']} keypoints ({inputs['task']}, {inputs['shots']} shot), "
        f"{inputs['image_tokens']} image tokens, rows of {min(inputs['row_tokens'])}-{max(inputs['row_tokens'])} tokens, "
        f"shared prefix {inputs['shared_prefix_tokens']} tokens; "
        f"{result['environment']['torch_threads']} torch thread(s)",
        "",
        "| method | median s (IQR) | keypoints/s | speedup vs naive |",
        "|---|---:|---:|---:|",
    ]
    naive = result["methods"]["naive"]["median_s"]
    for method, row in result["methods"].items():
        lines.append(
            f"| {row['label']} | {row['median_s']:.4f} ({row['q1_s']:.4f}-{row['q3_s']:.4f}) | "
            f"{row['keypoints_per_s']:.1f} | {naive / row['median_s']:.2f}x |"
        )
    lines += [
        "",
        f"shared prefix vs batched: {result['speedup']['shared_prefix_vs_batched']:.2f}x; "
        f"target >= {TARGET_SPEEDUP:.0f}x vs naive: {'met' if result['target']['met'] else 'NOT met'}",
        f"outputs: names identical {equal['names_identical']}, tokens identical {equal['tokens_identical']}, "
        f"max coordinate difference {equal['max_coordinate_difference']:.2e} (tolerance {equal['coordinate_tolerance']:.0e}), "
        f"{equal['keypoints_found']}/{inputs['keypoints']} rows emitted <keypoint>",
    ]
    if "profile" in result:
        for method, split in result["profile"]["prefill_decode"].items():
            lines.append(
                f"{method}: prefill {split['prefill_s']:.4f} s, decode {split['decode_s']:.4f} s; first decoder calls {split['decoder_calls']}"
            )
        for method, table in result["profile"]["top_ops"].items():
            lines += ["", f"top ops, {method}:", table]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(args=argv)
    result = run_benchmark(args)
    print(format_markdown(result))
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {output}")
    if not result["equal_outputs"]["all_equal"]:
        raise SystemExit("the three methods disagree (see equal_outputs): the timings compare different work")
    return result


if __name__ == "__main__":
    main()
