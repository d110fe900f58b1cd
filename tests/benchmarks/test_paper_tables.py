"""benchmarks/paper_tables.py: which runs each table needs (shared runs once), the ablation verdicts, the report
written from finished runs without rerunning them, the dry run's time, and one tiny table end to end (~20 s)."""

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks import paper_tables
from benchmarks.paper_tables import ABLATIONS, PAPER, all_runs, command, dry_run, miniature, plan, verdict

VISUAL_SCORES = {"KptLLM": {"pck": 0.8, "pck_ci95": [0.78, 0.82]}, "support-copy": {"pck": 0.3}}


def names(runs) -> list[str]:
    return [run.name for run in runs]


def test_each_table_plans_its_runs_and_the_split1_model_serves_five_tables():
    assert names(plan({"1"})) == ["split1", "eval_semantic"]  # naming is scored on the split-1 model
    assert names(plan({"7"})) == ["split1", "eval_visual", "eval_visual_textual"]
    assert names(plan({"4", "5"})) == ["split1", "ap10k_bovidae_to_canidae", "ap10k_canidae_to_felidae",
                                       "no_identify_then_detect"]
    assert names(plan({"3"})) == ["held_out_human_body"]
    everything = plan(set(paper_tables.TABLES))
    assert len(names(everything)) == len(set(names(everything))) == 13  # 10 trainings + 3 evaluations, none twice
    served = {table for run in everything if "split1" in (run.name, run.model_run) for table in run.tables}
    assert served == {"1", "2", "5", "6", "7"}
    for position, run in enumerate(everything):  # an evaluation comes after the training of its model
        if run.model_run:
            assert run.model_run in names(everything[:position])


def test_commands_resume_training_let_extra_win_and_share_the_data_with_eval():
    runs = {run.name: run for run in all_runs()}
    extra = ["--max_steps", "2", "--data_dir", "small", "--eval_episodes", "1", "--eval_queries", "3"]
    train = command(runs["no_identify_then_detect"], Path("out"), extra)
    assert train[1:] == ["train.py", "--identify_then_detect", "false", "--eval_shots", "1", "--output_dir",
                         "out/no_identify_then_detect", "--disable_tqdm", "true", "--resume", *extra]
    evaluation = command(runs["eval_visual_textual"], Path("out"), extra)
    assert evaluation[1:] == ["eval.py", "--model", "out/split1/model", "--task", "visual+textual", "--shots", "1",
                              "--data_dir", "small", "--episodes", "1", "--queries", "3", "--output_dir",
                              "out/eval_visual_textual"]
    assert command(runs["eval_semantic"], Path("out"), [])[1:] == [
        "eval.py", "--model", "out/split1/model", "--task", "semantic", "--output_dir", "out/eval_semantic"]


def test_every_paper_cell_has_a_miniature_source_and_nothing_run_reads_as_none(tmp_path):
    cells = miniature(tmp_path)
    assert list(cells) == list(PAPER) and all(value is None for value in cells.values())
    assert PAPER[("Table 2", "KptLLM", "1-shot Split1")] == PAPER[("Table 5", "w/ ItD", "PCK")] == 91.66


def test_ablation_verdicts_follow_the_numbers():
    itd, pooling, prompts = ABLATIONS
    values = {itd.better: 60.0, itd.worse: 50.0, pooling.better: 40.0, pooling.worse: 45.0,
              prompts.better: None, prompts.worse: 70.0}
    agreeing = verdict(itd, values)
    assert agreeing["paper"]["answer"] is True and agreeing["ours"] == {
        "answer": True, "better": 60.0, "worse": 50.0, "difference": 10.0} and agreeing["agrees"] is True
    disagreeing = verdict(pooling, values)
    assert disagreeing["ours"]["answer"] is False and disagreeing["agrees"] is False
    assert disagreeing["ours"]["difference"] == -5.0
    missing = verdict(prompts, values)  # not run yet; the paper's direction from its words (its numbers are lost)
    assert missing["agrees"] is None and missing["paper"]["answer"] is True and "says" in missing["paper"]
    tie = verdict(itd, {**values, itd.worse: 60.0})
    assert tie["agrees"] is False  # equal is not "better"


def _write(folder: Path, report: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(report))


def _fake_runs(runs_dir: Path) -> None:
    """Every run finished: 1-shot PCK 80 (split 1), ItD and pooling runs below it, visual+textual above visual."""
    for split in paper_tables.SPLITS:
        scores = {f"{shots}shot": {**VISUAL_SCORES, "KptLLM": {"pck": 0.8 - split / 100 + shots / 100}} for shots in (1, 5)}
        _write(runs_dir / f"split{split}", {"results_by_shots": scores, "wall_time_s": 500.0})
    scores = {"1shot": {**VISUAL_SCORES, "KptLLM": {"pck": 0.7}}}
    for name in ("held_out_human_body", "no_identify_then_detect", "avg_pool"):
        _write(runs_dir / name, {"results_by_shots": scores})
    for protocol in paper_tables.CLAMP_PROTOCOLS:
        _write(runs_dir / f"ap10k_{protocol}", {"results": {"KptLLM": {"AP": 0.5}, "KptLLM (constant score)": {"AP": 0.4}}})
    for name, value in (("eval_semantic", 55.0), ("eval_visual", 75.0), ("eval_visual_textual", 72.5)):
        details = {"mean_over_splits_ci95": {"1shot": {"KptLLM": [0.7, 0.8]}}} if name != "eval_semantic" else {}
        _write(runs_dir / name, {"summary": [{"metric": {"value": value}, "baselines": {"mean-position": 20.0}}],
                                 "details": details})


def test_finished_runs_are_read_back_without_a_subprocess_and_written_as_json_and_markdown(tmp_path, monkeypatch):
    real_run = subprocess.run

    def refuse_runs(argv, *args, **kwargs):  # platform.platform() runs `uname -p`: let that through
        if {"train.py", "eval.py"} & set(map(str, argv)):
            raise AssertionError(f"a finished run was started again: {argv}")
        return real_run(argv, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", refuse_runs)
    runs_dir, output = tmp_path / "runs", tmp_path / "out" / "paper_tables.json"
    _fake_runs(runs_dir)
    result = paper_tables.main(["--runs_dir", str(runs_dir), "--output", str(output)])
    cells = {(c["table"], c["row"], c["column"]): c for c in result["cells"]}
    assert cells[("Table 2", "KptLLM", "1-shot Split1")]["miniature"] == {
        "value": 80.0, "ci95": None, "beside": {"support-copy": 30.0}, "run": "split1"}
    assert cells[("Table 2", "KptLLM", "5-shot Mean")]["miniature"]["value"] == 82.0  # mean of 84, 83, 82, 81, 80
    assert cells[("Table 4", "KptLLM, Bovidae -> Canidae", "AP")]["miniature"]["beside"] == {"KptLLM (constant score)": 40.0}
    assert cells[("Table 7", "visual prompt", "PCK")]["miniature"]["ci95"] == [70.0, 80.0]
    assert [(a["table"], a["agrees"]) for a in result["ablations"]] == [("Table 5", True), ("Table 6", True), ("Table 7", False)]
    assert result["runs"]["split1"]["wall_time_s"] == 500.0 and result["runs"]["split1"]["tables"] == ["2", "5", "6"]
    assert json.loads(output.read_text()) == result
    table = output.with_suffix(".md").read_text()
    assert "| KptLLM | 1-shot Split1 | 80.00 |  | 91.66 | support-copy 30.00 |" in table
    assert "| Table 7 | visual+textual > visual? | yes (numbers missing; text: §4.5" in table
    assert "| no (72.50 vs 75.00) | -2.50 | no |" in table


def test_the_dry_run_counts_only_what_is_left_at_the_measured_time(tmp_path, capsys):
    runs_dir = tmp_path / "runs"
    _write(runs_dir / "split1", {"results_by_shots": {}})
    timing = tmp_path / "seed0.json"
    timing.write_text(json.dumps({"wall_time_s": 600.0}))
    runs = plan({"5"})  # split1 (done) + no_identify_then_detect
    assert dry_run(runs, runs_dir, [], timing) == 600.0
    printed = capsys.readouterr().out
    assert "# split1 (Table 2, 5, 6) [done]" in printed and "measured in" in printed
    assert dry_run(plan({"1"}), tmp_path / "empty", [], tmp_path / "absent.json") == (
        paper_tables.ASSUMED_TRAINING_S + paper_tables.ASSUMED_EVAL_S)
    assert "an estimate (" in capsys.readouterr().out


def test_unknown_tables_are_refused():
    with pytest.raises(SystemExit, match="tables are 1,2,3,4,5,6,7"):
        paper_tables.main(["--only", "8", "--dry_run"])


def test_table_3_end_to_end_on_the_small_benchmark(small_benchmark, tmp_path):
    tiny = ("--max_steps 2 --vision_pretraining_steps 2 --matching_peer_steps 0 --eval_episodes 1 --eval_queries 1 "
            "--image_size 32 --patch_size 8 --vision_hidden_size 32 --vision_layers 2 --text_hidden_size 32 "
            "--text_layers 2 --per_device_train_batch_size 2")
    runs_dir = tmp_path / "runs"
    result = paper_tables.main(["--only", "3", "--runs_dir", str(runs_dir), "--output", str(tmp_path / "tables.json"),
                                "--extra", f"--dataset mp100 --data_dir {small_benchmark} {tiny}"])
    (cell,) = [c for c in result["cells"] if c["table"] == "Table 3"]
    assert 0 <= cell["miniature"]["value"] <= 100 and cell["paper"] == 83.91
    assert result["runs"]["held_out_human_body"]["wall_time_s"] > 0
    assert sorted(path.name for path in runs_dir.iterdir()) == ["held_out_human_body"]
