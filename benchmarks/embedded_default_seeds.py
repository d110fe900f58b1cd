"""The embedded default (`python train.py`) over several seeds: PCK spread, break-away step, wall time.

    python -m benchmarks.embedded_default_seeds                    # seeds 0-4, runs/seeds/seed{N}, resumable
    python -m benchmarks.embedded_default_seeds --seeds 0,1 --extra "--max_steps 200"   # quick look

Each seed is one full `train.py` run (stage 0, matching peer, KptLLM training, evaluation 1/5-shot)
in its own process, one after the other (two training processes on 2 cores slow each other many-fold).
A seed whose `results.json` exists is read back, not rerun (one scored before the official CAPE protocol,
without `pairs` in it, is refused: pass another `--runs_dir`). Writes
`benchmarks/results/embedded_default_seeds.{json,md}`: per seed the official PCK (mean over the same
support-query pairs, `train.py --eval_episodes/--eval_queries`) of every method with KptLLM's 95% bootstrap
interval, the wall time, and the step at which the keypoint L1 left the mean predictor's level (the
first logged step whose L1 is below 80% of the mean of the first two logged values, steps 1-50,
which sit at the mean predictor's level in every run); then the mean, min, max and spread (max - min) per method.
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

from benchmarks.run_records import ROOT, machine, run_recording_wall_time, write_json_and_markdown

RESULTS = Path(__file__).resolve().parent / "results"


def break_away_step(log_path: Path, fraction: float = 0.8) -> int | None:
    """First logged step whose keypoint L1 is below `fraction` of the first two logged values' mean.

    Two, not more: since stage 0 also teaches the LLM's first layer the match, the L1 starts falling
    from step ~75, so later values would no longer be the mean predictor's level.
    """
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    losses = [(r["step"], r["keypoint_loss"]) for r in records if "keypoint_loss" in r]
    if len(losses) < 3:
        return None
    level = sum(value for _, value in losses[:2]) / 2
    return next((step for step, value in losses[2:] if value < fraction * level), None)


def run_seed(seed: int, out_dir: Path, extra: list[str]) -> dict:
    report_path = out_dir / "results.json"
    if not report_path.is_file():
        command = [sys.executable, "train.py", "--seed", str(seed), "--output_dir", str(out_dir), "--disable_tqdm", "true", *extra]
        run_recording_wall_time(command, report_path)
    report = json.loads(report_path.read_text())
    if "pairs" not in report:
        raise SystemExit(f"{report_path} was scored before the official CAPE protocol (no 'pairs'): pass another --runs_dir")
    scores = {
        shots: {method: round(100 * values["pck"], 2) for method, values in by_method.items()}
        for shots, by_method in report["results_by_shots"].items()
    }
    intervals = {
        shots: [round(100 * bound, 2) for bound in by_method["KptLLM"]["pck_ci95"]]
        for shots, by_method in report["results_by_shots"].items()
    }
    return {
        "seed": seed,
        "pairs": report["pairs"],
        "pck": scores,
        "kptllm_ci95": intervals,
        "break_away_step": break_away_step(out_dir / "train_log.jsonl"),
        "wall_time_s": round(report.get("wall_time_s", float("nan")), 1),
        "global_step": report["global_step"],
    }


def summarize(runs: list[dict]) -> dict:
    summary = {}
    for shots in runs[0]["pck"]:
        for method in runs[0]["pck"][shots]:
            values = [run["pck"][shots][method] for run in runs]
            summary.setdefault(shots, {})[method] = {
                "mean": round(sum(values) / len(values), 2), "min": min(values), "max": max(values),
                "spread": round(max(values) - min(values), 2),
            }
    return summary


def markdown(runs: list[dict], summary: dict) -> str:
    lines = []
    for shots, methods in summary.items():
        names = list(methods)
        lines += [f"### PCK@0.2 (official CAPE scoring: mean over {runs[0]['pairs']} support-query pairs), split 1 test, "
                  f"{shots.replace('shot', '-shot')}", "",
                  "| seed | " + " | ".join(names) + " | KptLLM 95% CI | L1 break-away step | wall time |",
                  "|---|" + "---|" * (len(names) + 3)]
        for run in runs:
            low, high = run["kptllm_ci95"][shots]
            lines.append(f"| {run['seed']} | " + " | ".join(f"{run['pck'][shots][n]:.2f}" for n in names)
                         + f" | [{low:.2f}, {high:.2f}] | {run['break_away_step']} | {run['wall_time_s'] / 60:.1f} min |")
        for stat in ("mean", "min", "max", "spread"):
            lines.append(f"| {stat} | " + " | ".join(f"{methods[n][stat]:.2f}" for n in names) + " | | | |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--runs_dir", default="runs/seeds")
    parser.add_argument("--extra", default="", help="more train.py flags, quoted")
    parser.add_argument("--output", default=str(RESULTS / "embedded_default_seeds.json"))
    args = parser.parse_args(argv)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    runs = [run_seed(seed, ROOT / args.runs_dir / f"seed{seed}", shlex.split(args.extra)) for seed in seeds]
    summary = summarize(runs)
    result = {
        "command": "python train.py --seed N" + (f" {args.extra}" if args.extra else ""),
        "machine": machine(),
        "runs": runs,
        "summary": summary,
    }
    table = markdown(runs, summary)
    print(table)
    if args.output:
        write_json_and_markdown(Path(args.output), result, table)
    return result


if __name__ == "__main__":
    main()
