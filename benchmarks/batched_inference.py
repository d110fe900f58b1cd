#!/usr/bin/env python
"""Batched inference: query instances per second at 1 vs 8 instances per processor / detect_keypoints call.

A user with many photographs and boxes either loops over instances (one `processor(...)`, one
`detect_keypoints`, one `post_process_keypoint_detection` per instance) or hands several query images
and boxes to one call. Both ways run here on the same `--total` instances (distinct query images, one
support, K keypoints each; half of the images carry two boxes), end to end: processor, model and
post-processing are all timed, as a user sees them. The two are interleaved (the order alternates
every repeat, so that load changes on a shared machine hit both), after warm-up; the median of the
repeats gives instances/s. First the benchmark checks that every instance gets the same answers both
ways (names identical, pixels within 1e-3, scores within 1e-5) and exits with status 1 if not.

The model is the tiny random KptLLM built in code (`processing.builders`), fitted for a few seconds so
that it answers like a trained model ("It is the left eye. <keypoint>"): what it writes does not matter.

    OMP_NUM_THREADS=1 python benchmarks/batched_inference.py          # writes benchmarks/results/batched_inference.json
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
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

DEFAULT_OUTPUT = "benchmarks/results/batched_inference.json"
PIXEL_TOLERANCE = 1e-3
SCORE_TOLERANCE = 1e-5


@dataclass
class BenchmarkArguments:
    per_call: str = field(default="1,8", metadata={"help": "comma-separated instances per call to compare (the first is the baseline)"})
    total: int = field(default=8, metadata={"help": "query instances handled per repeat (a multiple of every --per_call)"})
    keypoints: int = field(default=17, metadata={"help": "K keypoints per instance (AP-10K has 17)"})
    max_new_tokens: int = field(default=16, metadata={"help": "answer budget per keypoint"})
    fit_steps: int = field(default=30, metadata={"help": "fitting steps before timing, so that rows answer in the template"})
    warmup: int = field(default=1, metadata={"help": "untimed rounds of each way"})
    repeats: int = field(default=5, metadata={"help": "timed rounds of each way (median reported)"})
    seed: int = field(default=0, metadata={"help": "seed of the model, images and keypoints"})
    output: str = field(default=DEFAULT_OUTPUT, metadata={"help": "where the JSON result goes"})


def parse_per_call(text: str, total: int) -> list[int]:
    try:
        sizes = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise SystemExit(f"--per_call takes comma-separated integers, got {text!r}") from None
    if not sizes or any(size < 1 or total % size for size in sizes):
        raise SystemExit(f"--per_call {text!r}: every entry must be a positive divisor of --total {total}")
    return sizes


def build_scene(args: BenchmarkArguments) -> dict:
    """`total` query instances on distinct images: image i carries two boxes when i is odd."""
    rng = np.random.default_rng(args.seed)

    def image(width: int, height: int) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))

    instances, index = [], 0
    while len(instances) < args.total:
        picture = image(96 + 8 * index, 72 + 4 * index)
        boxes = [None] if index % 2 == 0 else [[0, 0, picture.width * 0.6, picture.height * 0.8], [picture.width * 0.3, 10, picture.width * 0.6, picture.height * 0.7]]
        instances += [(picture, box) for box in boxes][: args.total - len(instances)]
        index += 1
    support = image(80, 80)
    kpts = rng.uniform(2, 78, size=(args.keypoints, 2)).round(1).tolist()
    return {"instances": instances, "support": support, "kpts": kpts}


def fit_model(args: BenchmarkArguments, scene: dict):
    """The tiny model, fitted briefly to answer "It is the <name>. <keypoint>" on the support itself."""
    names = list(AP10K_KEYPOINT_NAMES[: args.keypoints]) + [f"point {i}" for i in range(args.keypoints - len(AP10K_KEYPOINT_NAMES))]
    model, processor = build_tiny_model(names, seed=args.seed)
    batch = processor(
        query=scene["support"], support=scene["support"], kpts=scene["kpts"], task="visual", kpt_names=names,
        query_kpts=scene["kpts"], return_labels=True,
    )
    torch.manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(args.fit_steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return model.eval(), processor


def group_by_image(instances: list[tuple]) -> tuple[list, list]:
    """Consecutive instances of one image become one query entry with its list of boxes."""
    images, boxes = [], []
    for image, box in instances:
        if images and images[-1] is image:
            boxes[-1].append(box)
        else:
            images.append(image)
            boxes.append([box])
    return images, [None if entry == [None] else entry for entry in boxes]


def run_way(model, processor, scene: dict, per_call: int, max_new_tokens: int) -> list[dict]:
    """Every instance through calls of `per_call` instances each -> one post-processed dict per instance."""
    results = []
    for start in range(0, len(scene["instances"]), per_call):
        images, boxes = group_by_image(scene["instances"][start : start + per_call])
        inputs = processor(query=images, query_bbox=boxes, support=scene["support"], kpts=scene["kpts"], task="visual")
        outputs = model.detect_keypoints(**inputs, max_new_tokens=max_new_tokens)
        results += [result for image_results in processor.post_process_keypoint_detection(outputs) for result in image_results]
    return results


def compare(reference: list[dict], other: list[dict]) -> dict:
    """How far `other` is from `reference`, instance by instance (pixels and scores as max differences)."""
    names_identical = [a["names"] for a in reference] == [b["names"] for b in other]
    pixels = max(
        (float(np.nanmax(np.abs(a["keypoints"].numpy() - b["keypoints"].numpy()), initial=0.0)) for a, b in zip(reference, other)),
        default=0.0,
    )
    nan_layout = all(torch.equal(a["keypoints"].isnan(), b["keypoints"].isnan()) for a, b in zip(reference, other))
    scores = max((float((a["scores"] - b["scores"]).abs().max()) for a, b in zip(reference, other)), default=0.0)
    same = names_identical and nan_layout and len(reference) == len(other) and pixels <= PIXEL_TOLERANCE and scores <= SCORE_TOLERANCE
    return {
        "names_identical": names_identical, "missing_keypoints_identical": nan_layout, "max_pixel_difference": pixels,
        "max_score_difference": scores, "same": same,
    }


def run_benchmark(args: BenchmarkArguments) -> dict:
    sizes = parse_per_call(args.per_call, args.total)
    scene = build_scene(args)
    model, processor = fit_model(args, scene)
    with torch.inference_mode():
        answers = {size: run_way(model, processor, scene, size, args.max_new_tokens) for size in sizes}
        checks = {str(size): compare(answers[sizes[0]], answers[size]) for size in sizes[1:]}
        for _ in range(args.warmup):
            for size in sizes:
                run_way(model, processor, scene, size, args.max_new_tokens)
        times: dict[int, list[float]] = {size: [] for size in sizes}
        for repeat in range(args.repeats):
            for size in sizes if repeat % 2 == 0 else reversed(sizes):
                start = time.perf_counter()
                run_way(model, processor, scene, size, args.max_new_tokens)
                times[size].append(time.perf_counter() - start)
    found = float(np.mean([bool(torch.isfinite(r["keypoints"]).all(1).any()) for r in answers[sizes[0]]]))
    per_call = {
        str(size): {
            "calls": args.total // size, "seconds": times[size], "median_seconds": statistics.median(times[size]),
            "instances_per_second": args.total / statistics.median(times[size]),
        }
        for size in sizes
    }
    baseline = per_call[str(sizes[0])]["instances_per_second"]
    return {
        "benchmark": "batched_inference",
        "setup": {
            "total_instances": args.total, "keypoints": args.keypoints, "max_new_tokens": args.max_new_tokens,
            "fit_steps": args.fit_steps, "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed,
            "parameters": sum(p.numel() for p in model.parameters()), "image_tokens": processor.image_seq_length,
            "instances_with_a_keypoint": found,
        },
        "machine": {
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        },
        "per_call": per_call,
        "speedup_vs_first": {str(size): per_call[str(size)]["instances_per_second"] / baseline for size in sizes},
        "same_answers": checks,
    }


def format_markdown(result: dict) -> str:
    setup = result["setup"]
    lines = [
        f"Batched inference, {setup['total_instances']} query instances x K = {setup['keypoints']} keypoints, tiny model "
        f"({setup['parameters'] / 1e6:.2f} M parameters), {result['machine']['torch_threads']} torch thread(s):",
        "",
        "| instances per call | calls | median s | instances/s | speedup |",
        "|---:|---:|---:|---:|---:|",
    ]
    for size, row in result["per_call"].items():
        lines.append(
            f"| {size} | {row['calls']} | {row['median_seconds']:.3f} | {row['instances_per_second']:.2f} | "
            f"{result['speedup_vs_first'][size]:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(args=argv)
    result = run_benchmark(args)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(format_markdown(result))
    print(f"written to {output}")
    different = {size: check for size, check in result["same_answers"].items() if not check["same"]}
    if different:
        print(f"the batched calls do not give the per-instance answers: {different}", file=sys.stderr)
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
