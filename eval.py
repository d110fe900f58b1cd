"""Evaluate KptLLM.

Today: `python eval.py --demo` builds a tiny, randomly initialised KptLLM in code, runs
identify-then-detect on a synthetic query/support pair and draws the result, which shows the
whole inference path (processor -> detect_keypoints -> post-processing) without any download.
"""

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw
from transformers import HfArgumentParser

from processing.builders import build_tiny_model


@dataclass
class EvalArguments:
    demo: bool = field(default=False, metadata={"help": "run the tiny random-model inference demo"})
    output_dir: str = field(default="outputs/demo", metadata={"help": "where pictures and results go"})
    seed: int = field(default=0, metadata={"help": "seed of the random model and images"})


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


def main() -> None:
    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses()
    if not args.demo:
        raise SystemExit("only --demo is available so far; dataset evaluation is tracked in the evaluation issue")
    run_demo(args)


if __name__ == "__main__":
    main()
