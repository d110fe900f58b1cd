"""Pictures for the Space: numbered clicks on the support, predictions with names on the query."""

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)]
RESULT_MIN_SIDE = 512  # small query images are enlarged for the result so that names stay legible


def draw_keypoints(
    image: Image.Image, points: Sequence[Sequence[float] | None], labels: Sequence[str], min_side: int = 0
) -> Image.Image:
    """A copy of `image` with a coloured dot and a label per point (None points are skipped).

    `min_side` > 0 enlarges small images first (the result panel). Clickable images keep their size
    (min_side=0): gradio reports clicks in the displayed image's pixels, which must be the original's.
    """
    scale = max(1.0, min_side / max(image.size)) if min_side else 1.0
    canvas = image.convert("RGB")
    if scale > 1:
        canvas = canvas.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    side = max(canvas.size)
    radius = max(3.0, side / 60)
    font = ImageFont.load_default(size=max(9, round(side / 32)))
    draw = ImageDraw.Draw(canvas)
    for index, (point, label) in enumerate(zip(points, labels)):
        if point is None:
            continue
        x, y = point[0] * scale, point[1] * scale
        colour = PALETTE[index % len(PALETTE)]
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour, outline=(0, 0, 0), width=max(1, round(radius / 3)))
        if label:
            draw.text((x + radius * 1.5, y - radius * 1.5), label, fill=colour, font=font, stroke_width=max(1, round(radius / 3)), stroke_fill=(0, 0, 0))
    return canvas
