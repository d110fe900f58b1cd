"""The five-seed benchmark's reading of a run's log: the step at which the keypoint L1 leaves the mean predictor's level."""

import json

from benchmarks.embedded_default_seeds import break_away_step


def _log(tmp_path, losses: list[float]):
    path = tmp_path / "train_log.jsonl"
    records = [{"step": 25 * (i + 1), "keypoint_loss": value} for i, value in enumerate(losses)]
    records.insert(1, {"step": 30, "loss": 1.0})  # lines without the L1 (e.g. evaluation) are skipped
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_the_first_step_below_80_percent_of_the_first_two_values_is_the_break_away(tmp_path):
    # level 0.175; 0.8 x level = 0.14: 0.146 is still above it, 0.1267 (step 125) is the first below
    assert break_away_step(_log(tmp_path, [0.18, 0.17, 0.167, 0.146, 0.1267, 0.10])) == 125


def test_a_run_that_never_leaves_the_level_or_logs_too_little_has_none(tmp_path):
    assert break_away_step(_log(tmp_path, [0.18, 0.17, 0.172, 0.169, 0.171])) is None
    assert break_away_step(_log(tmp_path, [0.18, 0.05])) is None


def test_a_finished_seed_is_read_back_with_the_official_pairs_and_an_old_one_refused(tmp_path):
    import pytest

    from benchmarks.embedded_default_seeds import markdown, run_seed, summarize

    scores = {"KptLLM": {"pck": 0.8, "pck_ci95": [0.78, 0.82]}, "support-copy": {"pck": 0.3, "pck_ci95": [0.28, 0.32]}}
    report = {"pairs": 400, "global_step": 800, "wall_time_s": 600.0, "results_by_shots": {"1shot": scores}}
    (tmp_path / "results.json").write_text(json.dumps(report))
    _log(tmp_path, [0.18, 0.17, 0.1])
    run = run_seed(0, tmp_path, [])
    assert run["pck"] == {"1shot": {"KptLLM": 80.0, "support-copy": 30.0}} and run["kptllm_ci95"] == {"1shot": [78.0, 82.0]}
    table = markdown([run], summarize([run]))
    assert "mean over 400 support-query pairs" in table and "| 0 | 80.00 | 30.00 | [78.00, 82.00] |" in table
    del report["pairs"]
    (tmp_path / "results.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="before the official CAPE protocol"):
        run_seed(0, tmp_path, [])
