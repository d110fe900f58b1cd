"""Baseline table of the embedded benchmark: support-copy and mean-position PCK@0.2 on every split.

    python -m processing.baselines --data data/embedded [--shots 1 5] [--episodes 7 --queries 15] [--output baselines.md]

Each split's official CAPE test episodes (drawn as `eval.py` draws them, scored with the official PCK:
mean over support-query pairs) are scored, so the numbers printed here are the ones `eval.py` compares
a trained model with.
"""

import argparse
from pathlib import Path

import numpy as np

from .coco import load_mp100
from .embedded import ensure_embedded_benchmark
from .episodes import coco_file_order, sample_cape_episodes
from .evaluation import evaluate_baselines

METHODS = ("support-copy", "mean-position")


def baseline_table(
    data_dir: str | Path, shots: tuple[int, ...] = (1, 5), crop_padding: float = 1.25, episodes: int = 7, queries: int = 15
) -> tuple[dict, str]:
    """{shots: {method: [PCK per split]}} and the Markdown table (splits as columns, plus the mean)."""
    data_dir = Path(data_dir)
    scores: dict[int, dict[str, list[float]]] = {k: {m: [] for m in METHODS} for k in shots}
    for split in range(1, 6):
        train = load_mp100(data_dir, split, "train")
        test, report = load_mp100(data_dir, split, "test", return_report=True)
        orders = coco_file_order(report.annotation_file)
        for num_shots in shots:
            drawn = sample_cape_episodes(test, num_shots, queries, episodes, *orders)
            results = evaluate_baselines(test, [pair for episode in drawn for pair in episode.pairs()], train, crop_padding)
            for method in METHODS:
                scores[num_shots][method].append(100 * results[method]["pck"])
    lines = ["| method | shots | split 1 | split 2 | split 3 | split 4 | split 5 | mean |", "|---|---|---|---|---|---|---|---|"]
    for num_shots in shots:
        for method in METHODS:
            values = scores[num_shots][method]
            lines.append(f"| {method} | {num_shots} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {np.mean(values):.2f} |")
    return scores, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/embedded")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--crop-padding", type=float, default=1.25)
    parser.add_argument("--episodes", type=int, default=7, help="official episodes per test category")
    parser.add_argument("--queries", type=int, default=15, help="queries per episode, sharing its support")
    parser.add_argument("--output", help="also write the Markdown table here")
    args = parser.parse_args()
    ensure_embedded_benchmark(args.data)
    _, table = baseline_table(args.data, tuple(args.shots), args.crop_padding, args.episodes, args.queries)
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")


if __name__ == "__main__":
    main()
