"""Keypoints on one query image from the command line: a JSON of names, pixels and scores, and a picture.

    python -m hub.predict --model DIR --query q.jpg --support s.jpg --kpts "x,y;x,y" --out pred.png
    python -m hub.predict --model DIR --query q.jpg --names "left eye;nose" --out pred.png
    python -m hub.predict --model DIR --query q.jpg --support_json support.json --out pred.png

The support keypoints come as `--kpts` (pixels of `--support`) or as `--support_json`, a COCO keypoint
file: its first annotation with a visible keypoint is the support instance (its bbox is the support
box, keypoints with v = 0 are not prompted), its image is `--support` or, without it, the JSON's
`file_name` next to the JSON; the category's keypoint names label the output. `--names` asks for
keypoints by name instead. `--query_bbox x,y,w,h` restricts the query to one instance (default: the
whole image). The model runs through the pipeline its folder ships (`trust_remote_code=True`), so
`--model` may be a folder or a Hub repo id. Writes `--out` (the query with the keypoints drawn) and
the JSON beside it (`--json`, default: `--out` with `.json`).
"""

import argparse
import json
import math
import sys
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from hub.space.space_drawing import draw_keypoints

TASK = "keypoint-comprehension"


class PredictError(ValueError):
    """A bad argument: reported as one line, without a traceback."""


def parse_floats(text: str, count: int, flag: str, form: str) -> list[float]:
    parts = [part.strip() for part in text.split(",")]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise PredictError(f"{flag}: expected {form}, got {text!r}")
    return values


def parse_kpts(text: str) -> list[list[float]]:
    """"x,y;x,y" -> [[x, y], [x, y]]."""
    points = [parse_floats(part, 2, "--kpts", "'x,y;x,y;...' (numbers, pixels of the support image)") for part in text.split(";") if part.strip()]
    if not points:
        raise PredictError("--kpts is empty: expected 'x,y;x,y;...'")
    return points


def parse_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(";")]
    if not names or not all(names):
        raise PredictError(f"--names: expected 'name;name;...' without empty names, got {text!r}")
    return names


def open_image(path: str | Path, flag: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise PredictError(f"{flag} {path}: no such file")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (UnidentifiedImageError, OSError) as error:
        raise PredictError(f"{flag} {path}: not a readable image ({error})") from None


def read_support_json(path: str | Path, support: str | None) -> dict:
    """The support instance of a COCO keypoint file: image path, visible keypoints, bbox, their indices and names."""
    path = Path(path)
    if not path.is_file():
        raise PredictError(f"--support_json {path}: no such file")
    try:
        coco = json.loads(path.read_text())
        annotation = next(a for a in coco["annotations"] if any(v > 0 for v in a["keypoints"][2::3]))
        image = next(i for i in coco["images"] if i["id"] == annotation["image_id"])
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PredictError(f"--support_json {path}: not valid JSON ({error})") from None
    except (KeyError, TypeError, StopIteration):
        raise PredictError(
            f"--support_json {path}: expected COCO keypoints (images, annotations with keypoints [x, y, v, ...] "
            "and image_id, at least one visible keypoint)"
        ) from None
    triples = annotation["keypoints"]
    if len(triples) % 3:
        raise PredictError(f"--support_json {path}: annotation {annotation.get('id')} has {len(triples)} keypoint values, not x, y, v triples")
    visible = [index for index in range(len(triples) // 3) if triples[3 * index + 2] > 0]
    category = next((c for c in coco.get("categories", []) if c.get("id") == annotation.get("category_id")), {})
    names = category.get("keypoints") or [None] * (len(triples) // 3)
    return {
        "image": support or str(path.parent / image["file_name"]),
        "kpts": [[float(triples[3 * i]), float(triples[3 * i + 1])] for i in visible],
        "bbox": annotation.get("bbox"),
        "indices": visible,
        "names": [names[i] if i < len(names) else None for i in visible],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hub.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="KptLLM folder or Hub repo id")
    parser.add_argument("--query", required=True, help="the image to find keypoints in")
    parser.add_argument("--support", help="the support image (with --kpts, or instead of --support_json's file_name)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--kpts", help="support keypoints 'x,y;x,y;...' in support-image pixels (visual prompt)")
    prompt.add_argument("--support_json", help="COCO keypoint JSON of the support instance (visual prompt)")
    prompt.add_argument("--names", help="keypoint names 'left eye;nose' (textual prompt)")
    parser.add_argument("--query_bbox", help="x,y,w,h: the query instance's box (default: the whole image)")
    parser.add_argument("--out", default="prediction.png", help="the picture to write (default: prediction.png)")
    parser.add_argument("--json", help="the JSON to write (default: --out with .json)")
    parser.add_argument("--max_new_tokens", type=int, default=24, help="answer budget per keypoint")
    return parser


def predict(args: argparse.Namespace) -> dict:
    """Checks every argument, runs the pipeline, writes the JSON and the picture; returns what the JSON holds."""
    query = open_image(args.query, "--query")
    query_bbox = parse_floats(args.query_bbox, 4, "--query_bbox", "'x,y,w,h' (numbers, pixels)") if args.query_bbox else None
    labels = names_given = None
    if args.names:
        call = {"kpt_names": parse_names(args.names), "task": "textual"}
    elif args.kpts:
        if not args.support:
            raise PredictError("--kpts needs --support (the image the keypoints are on)")
        call = {"support": open_image(args.support, "--support"), "kpts": parse_kpts(args.kpts), "task": "visual"}
    else:
        support = read_support_json(args.support_json, args.support)
        call = {"support": open_image(support["image"], "--support"), "kpts": support["kpts"], "support_bbox": support["bbox"], "task": "visual"}
        labels, names_given = support["indices"], support["names"]
    if args.max_new_tokens < 1:
        raise PredictError(f"--max_new_tokens must be positive, got {args.max_new_tokens}")
    # a Hub repo id is "owner/name"; anything else that names no existing repo is meant as a folder
    model_dir = Path(args.model)
    if (model_dir.exists() or args.model.count("/") != 1) and not (model_dir / "config.json").is_file():
        raise PredictError(f"--model {args.model}: not a model folder (no config.json)")

    from transformers import pipeline  # after the checks: a typo is reported before torch and the model load

    detector = pipeline(TASK, model=args.model, trust_remote_code=True)
    rgb = detector.processor.to_rgb_image(query)
    try:
        (result,) = detector(query=rgb, query_bbox=query_bbox, max_new_tokens=args.max_new_tokens, **call)
    except (ValueError, TypeError) as error:  # the processor names the field it refuses
        raise PredictError(f"input refused: {error}") from None
    for keypoint, label, given in zip(result["keypoints"], labels or [], names_given or []):
        keypoint["label"], keypoint["annotated_name"] = label, given  # indices and names of the COCO file
    report = {"model": args.model, "query": str(args.query), "image_size": [query.width, query.height], **result}

    out = Path(args.out)
    json_path = Path(args.json) if args.json else out.with_suffix(".json")
    for path in (out, json_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    points = [None if k["x"] is None else (k["x"], k["y"]) for k in result["keypoints"]]
    captions = [f"{k['name'] or '?'} {k['score']:.2f}" for k in result["keypoints"]]
    draw_keypoints(rgb, points, captions, min_side=512).save(out)
    print(f"{sum(p is not None for p in points)} of {len(points)} keypoints placed; wrote {json_path} and {out}")
    return report


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        return predict(args)
    except PredictError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
