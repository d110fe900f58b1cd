"""Contact sheet: a grid of annotated instances, to check a keypoint dataset by eye.

Each tile shows one instance (one per category, cycling through the categories of the file),
enlarged with nearest-neighbour resampling so glyph pixels stay honest, its bbox, a small marker
and the name at every visible keypoint, and the names of the occluded ones (and of the hard embedded
variant's unglyphed ones) in the caption.
Works on any COCO keypoint file; the defaults point at the embedded benchmark::

    python -m processing.contact_sheet --data data/embedded --out contact_sheet.png \\
        --split 1 --subset test --n 24
    python -m processing.contact_sheet --data data/embedded --split ap10k --subset test
    python -m processing.contact_sheet --data data/embedded --beside data/embedded_hard --n 4 \\
        --out docs/contact_sheet_default_vs_hard.png   # the same instances, default above, hard below
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

TILE_SCALE = 3
CAPTION_H = 30
LABEL_COLOUR = (255, 255, 255)
BBOX_COLOUR = (255, 255, 255)


def annotation_path(data: Path, split: str, subset: str) -> Path:
    """``split`` is "1".."5" (MP-100 layout) or "ap10k"."""
    stem = "ap10k" if split == "ap10k" else f"mp100_split{split}"
    return data / "annotations" / f"{stem}_{subset}.json"


def pick_instances(coco: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Round-robin over categories so a sheet shows as many categories as possible."""
    by_cat: dict[int, list[dict[str, Any]]] = {}
    for ann in coco["annotations"]:
        by_cat.setdefault(ann["category_id"], []).append(ann)
    queues = [by_cat[c["id"]] for c in coco["categories"] if c["id"] in by_cat]
    picked: list[dict[str, Any]] = []
    depth = 0
    while len(picked) < n and any(depth < len(q) for q in queues):
        picked.extend(q[depth] for q in queues if depth < len(q))
        depth += 1
    return picked[:n]


def draw_tile(image: Image.Image, ann: dict[str, Any], category: dict[str, Any],
              font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> Image.Image:
    s = TILE_SCALE
    big = image.convert("RGB").resize((image.width * s, image.height * s), Image.NEAREST)
    tile = Image.new("RGB", (big.width, big.height + CAPTION_H), (20, 20, 20))
    tile.paste(big, (0, 0))
    draw = ImageDraw.Draw(tile)
    x, y, w, h = ann["bbox"]
    box = [x * s, y * s, (x + w) * s, (y + h) * s]
    draw.rectangle(box, outline=(0, 0, 0), width=3)
    draw.rectangle(box, outline=BBOX_COLOUR, width=1)
    names = category["keypoints"]
    kps = ann["keypoints"]
    occluded = []
    for k, name in enumerate(names):
        kx, ky, v = kps[3 * k: 3 * k + 3]
        if v == 0:
            occluded.append(name)
            continue
        px, py = kx * s, ky * s
        draw.line([px - 3, py, px + 3, py], fill=(0, 0, 0), width=1)
        draw.line([px, py - 3, px, py + 3], fill=(0, 0, 0), width=1)
        draw.text((px + 4, py - 11), name, fill=LABEL_COLOUR, font=font,
                  stroke_width=2, stroke_fill=(0, 0, 0))
    title = f"{category['name']} ({category['supercategory']})  img {ann['image_id']}"
    draw.text((4, big.height + 2), title, fill=(255, 255, 255), font=font)
    occ = "occluded: " + (", ".join(occluded) if occluded else "none")
    if category.get("unglyphed_keypoints"):  # the embedded benchmark's hard variant: joints drawn without a glyph
        occ += "; no glyph: " + ", ".join(category["unglyphed_keypoints"])
    draw.text((4, big.height + 15), occ, fill=(200, 200, 200), font=font)
    return tile


def make_contact_sheet(data: str | Path, out: str | Path, split: str = "1", subset: str = "test",
                       n: int = 24, columns: int = 6) -> Path:
    """Write a PNG grid of ``n`` annotated instances of one annotation file; returns its path."""
    data = Path(data)
    coco = json.loads(annotation_path(data, split, subset).read_text(encoding="utf-8"))
    images = {img["id"]: img for img in coco["images"]}
    categories = {c["id"]: c for c in coco["categories"]}
    font = ImageFont.load_default(size=11)
    tiles = []
    for ann in pick_instances(coco, n):
        with Image.open(data / "images" / images[ann["image_id"]]["file_name"]) as img:
            tiles.append(draw_tile(img, ann, categories[ann["category_id"]], font))
    if not tiles:
        raise ValueError(f"no annotations in {annotation_path(data, split, subset)}")
    tw, th = max(t.width for t in tiles), max(t.height for t in tiles)
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * tw, rows * th), (0, 0, 0))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * tw, (i // columns) * th))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def stack_sheets(sheets: list[Path], labels: list[str], out: str | Path) -> Path:
    """One PNG with the sheets one above the other, each under a title line (e.g. two variants' same instances)."""
    font = ImageFont.load_default(size=16)
    images = [Image.open(path).convert("RGB") for path in sheets]
    title_h = 24
    width = max(image.width for image in images)
    stacked = Image.new("RGB", (width, sum(image.height + title_h for image in images)), (0, 0, 0))
    draw = ImageDraw.Draw(stacked)
    top = 0
    for image, label in zip(images, labels, strict=True):
        draw.text((6, top + 3), label, fill=LABEL_COLOUR, font=font)
        stacked.paste(image, (0, top + title_h))
        top += image.height + title_h
    stacked.save(out)
    return Path(out)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Draw a grid of annotated keypoint instances.")
    parser.add_argument("--data", default="data/embedded", help="dataset root (annotations/, images/)")
    parser.add_argument("--out", default="contact_sheet.png")
    parser.add_argument("--split", default="1", choices=["1", "2", "3", "4", "5", "ap10k"])
    parser.add_argument("--subset", default="test", choices=["train", "val", "test"])
    parser.add_argument("--n", type=int, default=24, help="number of instances")
    parser.add_argument("--columns", type=int, default=6)
    parser.add_argument("--beside", help="a second dataset root with the same annotations (e.g. data/embedded_hard): "
                                         "its sheet of the same instances goes below the first")
    args = parser.parse_args(argv)
    path = make_contact_sheet(args.data, args.out, args.split, args.subset, args.n, args.columns)
    if args.beside:
        below = make_contact_sheet(args.beside, Path(args.out).with_suffix(".beside.png"), args.split, args.subset,
                                   args.n, args.columns)
        path = stack_sheets([path, below], [str(args.data), str(args.beside)], args.out)
        below.unlink()
    print(f"contact sheet written to {path}")
    return path


if __name__ == "__main__":
    main()
