"""eval.py: a saved model is scored next to the baselines on the same fixed episodes."""

import json

import pytest

from eval import EvalArguments, run_visual_prompt


def test_eval_scores_a_saved_model_beside_the_baselines(tiny, small_benchmark, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    args = EvalArguments(model=str(tmp_path / "model"), data_dir=str(small_benchmark), queries_per_category=1,
                         limit=4, output_dir=str(tmp_path / "eval"))
    results = run_visual_prompt(args)
    assert set(results) == {"support-copy", "mean-position", "KptLLM"}
    assert all(0.0 <= scores["pck"] <= 1.0 for scores in results.values())
    assert len({scores["num_keypoints"] for scores in results.values()}) == 1  # the same keypoints scored
    written = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert written["episodes"] == 4 and (tmp_path / "eval" / "predictions.png").is_file()


def test_eval_refuses_a_folder_without_a_model(tmp_path):
    with pytest.raises(SystemExit, match="is not a KptLLM folder"):
        run_visual_prompt(EvalArguments(model=str(tmp_path)))
