"""Evaluate KptLLM.

    python eval.py --model runs/tiny/model --split 1 --shots 1       # PCK@0.2 next to the baselines
    python eval.py --demo                                             # tiny random model, inference path only

`--model` scores visual-prompt detection on a benchmark in MP-100 layout (the embedded one by
default, generated if absent) with the split's fixed test episodes, and prints the model's PCK next
to the support-copy and mean-position baselines measured on the same episodes. The paper's other
protocols (5-split averages, AP-10K OKS AP, semantic accuracy, ablation tables) are the evaluation
issue's work.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw
from transformers import HfArgumentParser

from processing.builders import build_tiny_model


@dataclass
class EvalArguments:
    model: str | None = field(default=None, metadata={"help": "a KptLLM folder (train.py writes OUTPUT_DIR/model)"})
    data_dir: str = field(default="data/embedded", metadata={"help": "benchmark in MP-100 layout (embedded: made if absent)"})
    split: int = field(default=1, metadata={"help": "split (1-5)"})
    shots: int = field(default=1, metadata={"help": "support shots per episode (1 or 5)"})
    queries_per_category: int = field(default=5, metadata={"help": "fixed test episodes per category"})
    limit: int | None = field(default=None, metadata={"help": "score only the first N episodes (quick runs)"})
    crop_padding: float = field(default=1.25, metadata={"help": "crop side = padding x max(bbox w, h), as in training"})
    demo: bool = field(default=False, metadata={"help": "run the tiny random-model inference demo"})
    output_dir: str = field(default="outputs/eval", metadata={"help": "where results and pictures go"})
    seed: int = field(default=0, metadata={"help": "seed of the demo's random model"})


def synthetic_pair() -> tuple[Image.Image, Image.Image, list[list[float]], list[str]]:
    """A support and a query image with three coloured landmarks, the query rotated by 90 degrees."""
    names = ["red dot", "green dot", "blue dot"]
    points = [[20.0, 20.0], [60.0, 30.0], [40.0, 60.0]]
    colours = [(230, 40, 40), (40, 200, 40), (40, 80, 230)]
    support = Image.new("RGB", (80, 80), (30, 30, 30))
    draw = ImageDraw.Draw(support)
    for (x, y), colour in zip(points, colours):
        draw.ellipse((x - 5, y - 5, x + 5, y + 5), fill=colour)
    return support.rotate(90), support, points, names


def draw_predictions(image: Image.Image, results: list[dict], scale: int = 4) -> Image.Image:
    canvas = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for result in results:
        if result["x"] is None:
            continue
        x, y = result["x"] * scale, result["y"] * scale
        draw.line((x - 6, y, x + 6, y), fill="white", width=2)
        draw.line((x, y - 6, x, y + 6), fill="white", width=2)
        draw.text((x + 8, y - 6), result["name"] or "?", fill="white")
    return canvas


def run_demo(args: EvalArguments) -> list[dict]:
    query, support, points, names = synthetic_pair()
    model, processor = build_tiny_model(names, seed=args.seed)
    model.eval()
    inputs = processor(query=query, support=support, kpts=points, task="visual")
    outputs = model.detect_keypoints(**inputs)
    results = processor.post_process_keypoints(outputs, image_size=query.size)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    draw_predictions(query, results).save(out_dir / "demo_predictions.png")
    for prompt, result in zip(points, results):
        print(f"support point {prompt} -> name={result['name']!r} at ({result['x']}, {result['y']})")
    print(f"untrained model: names and positions are random; picture in {out_dir / 'demo_predictions.png'}")
    return results


def run_visual_prompt(args: EvalArguments) -> dict:
    from modeling_kptllm import KptLlmForKeypointComprehension, KptLlmProcessor
    from processing.coco import load_mp100
    from processing.embedded import ensure_embedded_benchmark
    from processing.episodes import fixed_test_episodes
    from processing.evaluation import evaluate_visual_prompt, markdown_table, fixed_episode_file
    from processing.visualize import save_episode_sheet

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{model_dir} is not a KptLLM folder (no config.json)")
    if Path(args.data_dir) == Path("data/embedded"):
        ensure_embedded_benchmark(args.data_dir)
    model = KptLlmForKeypointComprehension.from_pretrained(model_dir).eval()
    processor = KptLlmProcessor.from_pretrained(model_dir, trust_remote_code=False)  # our own class: no remote code
    processor.crop_padding = args.crop_padding
    train = load_mp100(args.data_dir, args.split, "train")
    test = load_mp100(args.data_dir, args.split, "test")
    episodes = fixed_test_episodes(
        test, fixed_episode_file(args.data_dir, args.split, args.shots, args.queries_per_category),
        num_shots=args.shots, seed=0, num_queries_per_category=args.queries_per_category,
    )[: args.limit]
    results = evaluate_visual_prompt(model, processor, test, episodes, train)
    table = markdown_table(results, title=f"PCK@0.2, split {args.split} test, {args.shots}-shot")
    print(table)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = {method: {k: v for k, v in s.items() if k != "pck_per_category"} for method, s in results.items()}
    (out_dir / "results.json").write_text(json.dumps({"model": str(model_dir), "episodes": len(episodes), "results": scores}, indent=2))
    (out_dir / "results.md").write_text(table + "\n")
    save_episode_sheet(model, processor, test, episodes[:: max(1, len(episodes) // 6)][:6], out_dir / "predictions.png")
    return results


def main() -> None:
    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses()
    if args.demo:
        run_demo(args)
    elif args.model:
        run_visual_prompt(args)
    else:
        raise SystemExit("pass --model DIR (a KptLLM folder) or --demo")


if __name__ == "__main__":
    main()
