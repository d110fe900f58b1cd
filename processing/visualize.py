"""Pictures of episodes: the support with its keypoints beside the query with predictions and names."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from datasets import Dataset
from PIL import Image, ImageDraw

from .coco import load_image
from .episodes import Episode

PANEL = 256
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)]


def _panel(row: dict, points: np.ndarray, labels: Sequence[str | None], truth: np.ndarray | None = None) -> Image.Image:
    """The instance's bbox region scaled to PANEL pixels, with numbered, coloured keypoints."""
    x, y, w, h = row["bbox"]
    side = max(w, h) * 1.2
    x0, y0 = x + w / 2 - side / 2, y + h / 2 - side / 2
    image = load_image(row["image_path"]).transform(
        (PANEL, PANEL), Image.Transform.EXTENT, data=(x0, y0, x0 + side, y0 + side), resample=Image.Resampling.BILINEAR
    )
    draw = ImageDraw.Draw(image)
    scale = PANEL / side
    for index, (point, label) in enumerate(zip(points, labels)):
        colour = PALETTE[index % len(PALETTE)]
        if truth is not None and not np.isnan(truth[index]).any():
            tx, ty = (truth[index] - (x0, y0)) * scale
            draw.rectangle((tx - 3, ty - 3, tx + 3, ty + 3), outline=colour)
        if np.isnan(point).any():
            continue
        px, py = (point - (x0, y0)) * scale
        draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=colour, outline=(0, 0, 0))
        if label:
            draw.text((px + 6, py - 6), label, fill=colour, stroke_width=1, stroke_fill=(0, 0, 0))
    return image


def save_episode_sheet(
    instances: Dataset,
    episodes: Sequence[Episode],
    predictions: Sequence[tuple[np.ndarray, Sequence[str | None]]],
    path: str | Path,
) -> Path:
    """One row per episode: support (ground-truth names) | query (predictions, names; squares = truth).

    `predictions` are the model's (pixels, names) per episode, as `evaluation.evaluate_visual_prompt` returns.
    """
    if len(predictions) != len(episodes):
        raise ValueError(f"{len(episodes)} episodes but {len(predictions)} predictions")
    rows = []
    for episode, (predicted, names) in zip(episodes, predictions):
        support = instances[episode.support_rows[0]]
        query = instances[episode.query_row]
        support_points = np.where(np.asarray(support["visible"])[:, None] > 0, np.asarray(support["keypoints"], float), np.nan)
        truth = np.where(np.asarray(query["visible"])[:, None] > 0, np.asarray(query["keypoints"], float), np.nan)
        rows.append((_panel(support, support_points, support["keypoint_names"]), _panel(query, predicted, names, truth)))
    sheet = Image.new("RGB", (2 * PANEL + 8, max(1, len(rows)) * (PANEL + 8)), (255, 255, 255))
    for i, (left, right) in enumerate(rows):
        sheet.paste(left, (0, i * (PANEL + 8)))
        sheet.paste(right, (PANEL + 8, i * (PANEL + 8)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


LOSS_PARTS = ("loss", "lm_loss", "keypoint_loss", "attention_loss")


def save_loss_curves(log_history: Sequence[dict], path: str | Path) -> Path | None:
    """One panel per logged loss part (Trainer's `log_history`) against the step; None when nothing was logged.

    The keypoint L1 panel carries the line a model that always predicts the mean position would sit on
    (its first logged value), so a run that never left it shows at a glance.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on CI or servers
    import matplotlib.pyplot as plt

    series = {part: [(r["step"], r[part]) for r in log_history if part in r and "step" in r] for part in LOSS_PARTS}
    series = {part: points for part, points in series.items() if points}
    if not series:
        return None
    figure, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3.2), squeeze=False)
    for axis, (part, points) in zip(axes[0], series.items()):
        steps, values = zip(*points)
        axis.plot(steps, values, linewidth=1.2)
        if part == "keypoint_loss":
            axis.axhline(values[0], color="grey", linestyle="--", linewidth=0.8, label="first logged (≈ mean predictor)")
            axis.legend(fontsize=7)
        axis.set_title(part)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
