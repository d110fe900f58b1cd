"""The paper's Tables 1-7 in miniature: every run they need, trained and scored on the embedded benchmark.

    python -m benchmarks.paper_tables --dry_run       # the planned runs, their commands and the time they take
    python -m benchmarks.paper_tables                 # all tables, runs/paper_tables/<run>, resumable
    python -m benchmarks.paper_tables --only 4,5      # the runs Tables 4 and 5 need (shared runs are reused)
    python -m benchmarks.paper_tables --only 3 --extra "--max_steps 2 --vision_pretraining_steps 2"   # smoke run

One trained model serves several tables: the split-1 default run is Table 2's split 1, the "with" row of the
Table 5 and 6 ablations, and the model eval.py scores for Table 1 (naming) and Table 7 (visual vs visual+textual).
The ablation runs differ from it in one train.py flag and are scored by their own final evaluation (the same
official episodes; the model trained without ItD with the prompt without ItD, as `eval.py --no_identify_then_detect`).
Runs go one after the other (two training processes on 2 cores slow each other many-fold); a run whose
`results.json` exists is read back, not rerun, and an interrupted training run continues from its last checkpoint.
Writes `benchmarks/results/paper_tables.{json,md}` from every finished run in `--runs_dir` (not only `--only`'s):
each miniature number beside the paper's, and for every ablation whether our ordering agrees with the paper's.
The numbers are not comparable in size (a tiny random-init model on a generated benchmark vs LLaVA-1.5-7B on
MP-100 / AP-10K); the orderings are the comparable part.
"""

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.run_records import ROOT, machine, run_recording_wall_time, write_json_and_markdown

RESULTS = Path(__file__).resolve().parent / "results"
TABLES = ("1", "2", "3", "4", "5", "6", "7")
SPLITS = (1, 2, 3, 4, 5)
# Table 3's first column; the embedded benchmark has a human_body super-category (one run, not four: time)
HELD_OUT_SUPERCATEGORY, HELD_OUT_COLUMN = "human_body", "Human Body"
CLAMP_PROTOCOLS = {"bovidae_to_canidae": "Bovidae -> Canidae", "canidae_to_felidae": "Canidae -> Felidae"}
ASSUMED_TRAINING_S = 9 * 60  # a default tiny run on 2 cores, when no measured wall time is at hand
ASSUMED_EVAL_S = 7 * 60  # eval.py's docstring: ~7 min per setting of 2,100 pairs on 2 cores

Cell = tuple[str, str, str]  # (table, row, column) as the paper prints them
# KptLLM's numbers in ../shared/paper/kptllm-paper.md (NeurIPS 2024), keyed by the table, row and column they stand in
PAPER: dict[Cell, float | None] = {
    ("Table 1", "KptLLM", "Accuracy (%)"): 83.0,  # MP-100 split 1; LLaVA 3, LLaVA* (LoRA) 72
    **{("Table 2", "KptLLM", f"1-shot Split{split}"): value for split, value in zip(SPLITS, (91.66, 86.58, 86.19, 84.76, 86.32))},
    ("Table 2", "KptLLM", "1-shot Mean"): 87.10,
    **{("Table 2", "KptLLM", f"5-shot Split{split}"): value for split, value in zip(SPLITS, (93.17, 89.45, 90.08, 88.74, 89.52))},
    ("Table 2", "KptLLM", "5-shot Mean"): 90.19,
    ("Table 3", "KptLLM", HELD_OUT_COLUMN): 83.91,  # 1-shot
    ("Table 4", "KptLLM, Bovidae -> Canidae", "AP"): 62.2,  # CLAMP 46.9
    ("Table 4", "KptLLM, Canidae -> Felidae", "AP"): 70.2,  # CLAMP 48.4
    ("Table 5", "w/o ItD", "PCK"): 87.68,  # MP-100 split 1, 1-shot
    ("Table 5", "w/ ItD", "PCK"): 91.66,
    ("Table 6", "Average Pooling", "PCK"): 89.78,
    ("Table 6", "Ours (cross-attention)", "PCK"): 91.66,
    # Table 7's body is missing from the paper's text (only its caption survived the extraction)
    ("Table 7", "visual prompt", "PCK"): None,
    ("Table 7", "visual + textual prompts", "PCK"): None,
}


@dataclass(frozen=True)
class Ablation:
    table: str
    question: str
    better: Cell  # the paper's claim: this cell is above `worse`
    worse: Cell
    paper_says: str | None = None  # the paper's words, where its numbers are missing


ABLATIONS = (
    Ablation("Table 5", "ItD > no ItD?", ("Table 5", "w/ ItD", "PCK"), ("Table 5", "w/o ItD", "PCK")),
    Ablation("Table 6", "cross-attention > average pooling?", ("Table 6", "Ours (cross-attention)", "PCK"),
             ("Table 6", "Average Pooling", "PCK")),
    Ablation("Table 7", "visual+textual > visual?", ("Table 7", "visual + textual prompts", "PCK"),
             ("Table 7", "visual prompt", "PCK"),
             paper_says="§4.5: 'The improved results indicate that the textual prompt could provide valuable high-level "
                        "and semantically rich guidance, enhancing keypoint localization.'"),
)


@dataclass(frozen=True)
class Run:
    name: str  # its folder under --runs_dir
    script: str  # train.py | eval.py
    flags: tuple[str, ...]
    tables: tuple[str, ...]  # the tables its numbers go into
    model_run: str | None = None  # eval.py: the training run whose model it scores


def all_runs() -> list[Run]:
    """Every run of the seven tables, each training run before the evaluations of its model."""
    # the ablation runs and Table 3 are 1-shot in the paper: their 5-shot evaluation would only cost time
    return [
        Run("split1", "train.py", ("--split", "1"), ("2", "5", "6")),
        *(Run(f"split{split}", "train.py", ("--split", str(split)), ("2",)) for split in SPLITS[1:]),
        Run(f"held_out_{HELD_OUT_SUPERCATEGORY}", "train.py",
            ("--held_out_supercategory", HELD_OUT_SUPERCATEGORY, "--eval_shots", "1"), ("3",)),
        *(Run(f"ap10k_{protocol}", "train.py", ("--dataset", "ap10k", "--protocol", protocol), ("4",))
          for protocol in CLAMP_PROTOCOLS),
        Run("no_identify_then_detect", "train.py", ("--identify_then_detect", "false", "--eval_shots", "1"), ("5",)),
        Run("avg_pool", "train.py", ("--prompt_feature_extractor", "avg_pool", "--eval_shots", "1"), ("6",)),
        Run("eval_semantic", "eval.py", ("--task", "semantic"), ("1",), model_run="split1"),
        # both Table 7 rows from eval.py, so that they score the same episodes
        Run("eval_visual", "eval.py", ("--task", "visual", "--shots", "1"), ("7",), model_run="split1"),
        Run("eval_visual_textual", "eval.py", ("--task", "visual+textual", "--shots", "1"), ("7",), model_run="split1"),
    ]


def plan(tables: set[str]) -> list[Run]:
    """The runs `tables` need: the ones whose numbers go into them and the training runs their evaluations score."""
    runs = all_runs()
    chosen = {run.name for run in runs if tables & set(run.tables)}
    chosen |= {run.model_run for run in runs if run.name in chosen and run.model_run}
    return [run for run in runs if run.name in chosen]


def eval_flags_from_extra(extra: list[str]) -> list[str]:
    """The train.py flags of `--extra` that eval.py must share: the benchmark folder and the episode counts."""
    parser = argparse.ArgumentParser(add_help=False)
    for flag in ("--data_dir", "--eval_episodes", "--eval_queries"):
        parser.add_argument(flag)
    known, _ = parser.parse_known_args(extra)
    renamed = {"data_dir": "--data_dir", "eval_episodes": "--episodes", "eval_queries": "--queries"}
    return [item for key, flag in renamed.items() if getattr(known, key) is not None for item in (flag, getattr(known, key))]


def command(run: Run, runs_dir: Path, extra: list[str]) -> list[str]:
    out_dir = runs_dir / run.name
    if run.script == "eval.py":
        model = runs_dir / run.model_run / "model"
        return [sys.executable, "eval.py", "--model", str(model), *run.flags, *eval_flags_from_extra(extra),
                "--output_dir", str(out_dir)]
    # --resume: an interrupted run continues from its last checkpoint (a fresh folder starts from scratch);
    # `extra` last, so that its flags win
    return [sys.executable, "train.py", *run.flags, "--output_dir", str(out_dir), "--disable_tqdm", "true", "--resume",
            *extra]


def execute(run: Run, runs_dir: Path, extra: list[str]) -> None:
    """Run it unless its results.json exists; record its wall time there (the next --dry_run's estimate reads it)."""
    report_path = ROOT / runs_dir / run.name / "results.json"
    if report_path.is_file():
        print(f"# {run.name}: done, read back from {report_path}", flush=True)
        return
    run_recording_wall_time(command(run, runs_dir, extra), report_path)


def measured_training_time(timing_from: Path) -> float | None:
    try:
        return float(json.loads(timing_from.read_text())["wall_time_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def dry_run(runs: list[Run], runs_dir: Path, extra: list[str], timing_from: Path) -> float:
    """Print each planned run, its command and its share of the time still to go; returns that time in seconds."""
    measured = measured_training_time(timing_from)
    training_s = measured or ASSUMED_TRAINING_S
    total = 0.0
    for run in runs:
        done = (ROOT / runs_dir / run.name / "results.json").is_file()
        seconds = 0.0 if done else training_s if run.script == "train.py" else ASSUMED_EVAL_S
        total += seconds
        status = "done" if done else f"~{seconds / 60:.0f} min"
        print(f"# {run.name} (Table {', '.join(run.tables)}) [{status}]\n"
              f"{shlex.join(['python', *command(run, runs_dir, extra)[1:]])}")
    basis = (f"a training run = {training_s / 60:.1f} min, measured in {timing_from}" if measured else
             f"a training run = {training_s / 60:.0f} min, an estimate ({timing_from} has no wall_time_s)")
    print(f"\n{sum(run.script == 'train.py' for run in runs)} training runs, "
          f"{sum(run.script == 'eval.py' for run in runs)} evaluations; about {total / 3600:.1f} h to go on "
          f"{os.cpu_count()} cores ({basis}; an evaluation = {ASSUMED_EVAL_S / 60:.0f} min, an estimate)")
    return total


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _percent(value: float) -> float:
    return round(100 * value, 2)


def training_pck(run_dir: Path, shots: int) -> dict | None:
    """KptLLM's official PCK of a train.py run (its final evaluation), with the other methods of the same run."""
    report = _read(run_dir / "results.json")
    scores = report and report.get("results_by_shots", {}).get(f"{shots}shot")
    if not scores:
        return None
    ours = scores["KptLLM"]
    return {"value": _percent(ours["pck"]), "ci95": [_percent(bound) for bound in ours.get("pck_ci95", [])] or None,
            "beside": {method: _percent(values["pck"]) for method, values in scores.items() if method != "KptLLM"},
            "run": run_dir.name}


def training_ap(run_dir: Path) -> dict | None:
    """KptLLM's OKS AP of a train.py --dataset ap10k run, with its constant-score and mean-position rows."""
    report = _read(run_dir / "results.json")
    if report is None:
        return None
    scores = report["results"]
    return {"value": _percent(scores["KptLLM"]["AP"]), "ci95": None,
            "beside": {method: _percent(values["AP"]) for method, values in scores.items() if method != "KptLLM"},
            "run": run_dir.name}


def evaluation_metric(run_dir: Path) -> dict | None:
    """The headline number of an eval.py run (its summary's first entry, in percent already)."""
    report = _read(run_dir / "results.json")
    if report is None:
        return None
    entry = report["summary"][0]
    interval = report["details"].get("mean_over_splits_ci95", {}).get("1shot", {}).get("KptLLM")
    return {"value": entry["metric"]["value"], "ci95": [_percent(bound) for bound in interval] if interval else None,
            "beside": entry["baselines"], "run": run_dir.name}


def miniature(runs_dir: Path) -> dict[Cell, dict | None]:
    """Our number for every cell of PAPER, from the finished runs in `runs_dir` (None: not run yet)."""
    cells: dict[Cell, dict | None] = {("Table 1", "KptLLM", "Accuracy (%)"): evaluation_metric(runs_dir / "eval_semantic")}
    for shots in (1, 5):
        per_split = [training_pck(runs_dir / f"split{split}", shots) for split in SPLITS]
        for split, measurement in zip(SPLITS, per_split):
            cells[("Table 2", "KptLLM", f"{shots}-shot Split{split}")] = measurement
        cells[("Table 2", "KptLLM", f"{shots}-shot Mean")] = None if None in per_split else {
            "value": round(sum(m["value"] for m in per_split) / len(SPLITS), 2), "ci95": None, "beside": {},
            "run": ",".join(m["run"] for m in per_split)}
    cells[("Table 3", "KptLLM", HELD_OUT_COLUMN)] = training_pck(runs_dir / f"held_out_{HELD_OUT_SUPERCATEGORY}", 1)
    for protocol, label in CLAMP_PROTOCOLS.items():
        cells[("Table 4", f"KptLLM, {label}", "AP")] = training_ap(runs_dir / f"ap10k_{protocol}")
    cells[("Table 5", "w/ ItD", "PCK")] = training_pck(runs_dir / "split1", 1)
    cells[("Table 5", "w/o ItD", "PCK")] = training_pck(runs_dir / "no_identify_then_detect", 1)
    cells[("Table 6", "Ours (cross-attention)", "PCK")] = training_pck(runs_dir / "split1", 1)
    cells[("Table 6", "Average Pooling", "PCK")] = training_pck(runs_dir / "avg_pool", 1)
    cells[("Table 7", "visual prompt", "PCK")] = evaluation_metric(runs_dir / "eval_visual")
    cells[("Table 7", "visual + textual prompts", "PCK")] = evaluation_metric(runs_dir / "eval_visual_textual")
    return {cell: cells[cell] for cell in PAPER}  # the paper's order of rows and columns


def verdict(ablation: Ablation, ours: dict[Cell, float | None]) -> dict:
    """Whether our ordering of the two cells is the paper's; the paper's own from its numbers, else its words."""
    paper_better, paper_worse = PAPER[ablation.better], PAPER[ablation.worse]
    paper_answer = paper_better > paper_worse if None not in (paper_better, paper_worse) else ablation.paper_says is not None
    ours_better, ours_worse = ours[ablation.better], ours[ablation.worse]
    our_answer = None if None in (ours_better, ours_worse) else ours_better > ours_worse
    return {
        "table": ablation.table, "question": ablation.question,
        "paper": {"answer": paper_answer, "better": paper_better, "worse": paper_worse,
                  **({"says": ablation.paper_says} if paper_better is None else {})},
        "ours": {"answer": our_answer, "better": ours_better, "worse": ours_worse,
                 "difference": None if our_answer is None else round(ours_better - ours_worse, 2)},
        "agrees": None if our_answer is None else our_answer == paper_answer,
    }


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _answer(value: bool | None) -> str:
    return "not run yet" if value is None else "yes" if value else "no"


def markdown(cells: dict[Cell, dict | None], verdicts: list[dict]) -> str:
    lines = ["Miniature: the tiny model on the embedded benchmark (`python -m benchmarks.paper_tables`); paper: "
             "LLaVA-1.5-7B on MP-100 / AP-10K. PCK@0.2 by the official CAPE scoring, OKS AP, naming accuracy, in %.", ""]
    for table in TABLES:
        lines += [f"### Table {table}", "", "| row | column | miniature | 95% CI | paper | beside it in our run |",
                  "|---|---|---|---|---|---|"]
        for (name, row, column), measurement in cells.items():
            if name != f"Table {table}":
                continue
            ours = measurement or {}
            interval = ours.get("ci95")
            beside = ", ".join(f"{method} {value:.2f}" for method, value in ours.get("beside", {}).items())
            lines.append(f"| {row} | {column} | {_number(ours.get('value'))} | "
                         f"{f'[{interval[0]:.2f}, {interval[1]:.2f}]' if interval else ''} | "
                         f"{_number(PAPER[(name, row, column)])} | {beside} |")
        lines.append("")
    lines += ["### Ablations: does our ordering agree with the paper's?", "",
              "| table | question | paper | miniature | miniature difference | agrees |", "|---|---|---|---|---|---|"]
    for item in verdicts:
        paper = item["paper"]
        paper_text = (f"{_answer(paper['answer'])} ({_number(paper['better'])} vs {_number(paper['worse'])})"
                      if paper["better"] is not None else f"{_answer(paper['answer'])} (numbers missing; text: {paper['says']})")
        ours = item["ours"]
        lines.append(f"| {item['table']} | {item['question']} | {paper_text} | {_answer(ours['answer'])} "
                     f"({_number(ours['better'])} vs {_number(ours['worse'])}) | {_number(ours['difference'])} | "
                     f"{_answer(item['agrees'])} |")
    return "\n".join(lines) + "\n"


def report(runs_dir: Path, extra: str) -> tuple[dict, str]:
    cells = miniature(ROOT / runs_dir)
    values = {cell: measurement and measurement["value"] for cell, measurement in cells.items()}
    verdicts = [verdict(ablation, values) for ablation in ABLATIONS]
    wall_times = {run.name: round(data["wall_time_s"], 1) for run in all_runs()
                  if (data := _read(ROOT / runs_dir / run.name / "results.json")) and "wall_time_s" in data}
    result = {
        "command": "python -m benchmarks.paper_tables" + (f" --extra {shlex.quote(extra)}" if extra else ""),
        "machine": machine(),
        "runs": {run.name: {"command": shlex.join(command(run, runs_dir, shlex.split(extra))[1:]),
                            "tables": list(run.tables), "wall_time_s": wall_times.get(run.name)} for run in all_runs()},
        "cells": [{"table": table, "row": row, "column": column, "paper": PAPER[(table, row, column)],
                   "miniature": measurement} for (table, row, column), measurement in cells.items()],
        "ablations": verdicts,
    }
    return result, markdown(cells, verdicts)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(TABLES), help="comma-separated table numbers, e.g. 4,5")
    parser.add_argument("--runs_dir", default="runs/paper_tables")
    parser.add_argument("--extra", default="", help="more train.py flags for every training run, quoted")
    parser.add_argument("--dry_run", action="store_true", help="print the planned runs, commands and time; run nothing")
    parser.add_argument("--timing_from", default="runs/seeds/seed0/results.json",
                        help="a default run's results.json whose wall_time_s times --dry_run's training runs")
    parser.add_argument("--output", default=str(RESULTS / "paper_tables.json"))
    args = parser.parse_args(argv)
    tables = {table.strip() for table in args.only.split(",")}
    if not tables <= set(TABLES):
        raise SystemExit(f"--only {args.only!r}: tables are {','.join(TABLES)}")
    # commands name --runs_dir as given (they run in the repository root); files are read from ROOT / runs_dir
    runs_dir, extra = Path(args.runs_dir), shlex.split(args.extra)
    runs = plan(tables)
    if args.dry_run:
        dry_run(runs, runs_dir, extra, ROOT / args.timing_from)
        return {}
    for run in runs:
        execute(run, runs_dir, extra)
    result, table = report(runs_dir, args.extra)
    print(table)
    write_json_and_markdown(Path(args.output), result, table)
    return result


if __name__ == "__main__":
    main()
