"""eval.py: the paper's protocols on a saved model, each number beside baselines from the same run."""

import json
import shutil

import pytest

from eval import EvalArguments, run_evaluation
from processing.coco import load_cross_supercategory, load_mp100


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, small_benchmark):
    """A tiny random model whose tokenizer knows every keypoint name of the small benchmark."""
    from processing.builders import build_tiny_model
    from processing.coco import load_ap10k
    from train import keypoint_vocabulary

    names = keypoint_vocabulary(
        load_mp100(small_benchmark, 1, "train"), load_mp100(small_benchmark, 1, "test"),
        load_ap10k(small_benchmark / "annotations" / "ap10k_train.json", small_benchmark / "images"),
    )
    model, processor = build_tiny_model(names, seed=0)
    folder = tmp_path_factory.mktemp("model") / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _args(saved_model, small_benchmark, tmp_path, **overrides) -> EvalArguments:
    defaults = dict(model=str(saved_model), data_dir=str(small_benchmark), episodes=1, queries=1, limit=3,
                    output_dir=str(tmp_path / "eval"), num_pictures=2)
    return EvalArguments(**{**defaults, **overrides})


def test_visual_prompt_pck_with_baselines_per_category_and_pictures(saved_model, small_benchmark, tmp_path):
    report = run_evaluation(_args(saved_model, small_benchmark, tmp_path, shots="1,2"))
    written = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert written["summary"] == report["summary"] and len(report["summary"]) == 2  # 1-shot and 2-shot
    for entry, shots in zip(report["summary"], (1, 2)):
        assert entry["metric"]["type"] == "pck" and 0.0 <= entry["metric"]["value"] <= 100.0
        assert set(entry["baselines"]) == {"support-copy", "mean-position", "cosine probe (KptLLM's z_p, z_q)"}
        assert entry["dataset"]["config"] == f"{shots}-shot"
        setting = report["details"]["settings"][f"split1_{shots}shot"]
        assert setting["episodes"] == 3
        counts = {scores["num_keypoints"] for scores in setting["results"].values()}
        assert len(counts) == 1  # model and baselines scored on the same keypoints
        assert setting["pck_per_category"]  # named categories
        assert all(isinstance(name, str) for name in setting["pck_per_category"])
        assert (tmp_path / "eval" / f"predictions_split1_{shots}shot.png").is_file()
    markdown = (tmp_path / "eval" / "results.md").read_text()
    assert "support-copy" in markdown and "mean over splits 1, 2-shot" in markdown


def test_the_matching_peer_beside_the_model_is_scored_with_it(saved_model, small_benchmark, tmp_path):
    from processing.matching_peer import MatchingPeer
    from transformers import AutoModel

    run = tmp_path / "run"
    shutil.copytree(saved_model, run / "model")
    MatchingPeer.from_stage0(AutoModel.from_pretrained(saved_model, trust_remote_code=True)).save_pretrained(run / "matching_peer")
    report = run_evaluation(_args(saved_model, small_benchmark, tmp_path, model=str(run / "model")))
    results = report["details"]["settings"]["split1_1shot"]["results"]
    assert list(results)[:3] == ["KptLLM", "matching peer", "cosine probe (KptLLM's z_p, z_q)"]
    assert "matching peer" in report["summary"][0]["baselines"]
    skipped = run_evaluation(_args(saved_model, small_benchmark, tmp_path, model=str(run / "model"), matching_peer="none"))
    assert "matching peer" not in skipped["details"]["settings"]["split1_1shot"]["results"]
    with pytest.raises(SystemExit, match="no model.safetensors"):
        run_evaluation(_args(saved_model, small_benchmark, tmp_path, matching_peer=str(tmp_path / "nowhere")))


def test_several_splits_need_a_model_per_split_and_are_averaged(saved_model, small_benchmark, tmp_path):
    with pytest.raises(SystemExit, match="one model per split"):
        run_evaluation(_args(saved_model, small_benchmark, tmp_path, splits="1,2"))
    template = str(tmp_path / "split{split}" / "model")
    for split in (1, 2):  # the same weights stand in for two per-split models
        shutil.copytree(saved_model, template.replace("{split}", str(split)))
    report = run_evaluation(_args(saved_model, small_benchmark, tmp_path, splits="1,2", model=template))
    per_split = [report["details"]["settings"][f"split{s}_1shot"]["results"]["KptLLM"]["pck"] for s in (1, 2)]
    assert report["details"]["mean_over_splits"]["1shot"]["KptLLM"] == pytest.approx(100 * sum(per_split) / 2)
    assert report["summary"][0]["dataset"]["split"] == "mean of splits 1,2"


def test_cross_super_category_protocol_holds_out_whole_super_categories(saved_model, small_benchmark, tmp_path):
    train, test = load_cross_supercategory(small_benchmark, "vehicle")
    assert set(test["supercategory"]) == {"vehicle"} and "vehicle" not in set(train["supercategory"])
    assert not set(train["category_id"]) & set(test["category_id"])
    every = sum(len(load_mp100(small_benchmark, 1, subset)) for subset in ("train", "val", "test"))
    assert len(train) + len(test) == every
    report = run_evaluation(_args(saved_model, small_benchmark, tmp_path, held_out_supercategory="vehicle"))
    assert "held-out super-category vehicle" in report["summary"][0]["setting"]
    with pytest.raises(ValueError, match="not in MP-100 split 1"):
        load_cross_supercategory(small_benchmark, "spaceship")


def test_ap10k_oks_ap_and_naming_accuracy(saved_model, small_benchmark, tmp_path):
    report = run_evaluation(_args(saved_model, small_benchmark, tmp_path, dataset="ap10k", protocol="all", limit=2))
    assert {entry["metric"]["type"] for entry in report["summary"]} == {"oks_ap"}
    assert len(report["summary"]) == 2  # both CLAMP protocols
    assert all("mean-position" in entry["baselines"] for entry in report["summary"])
    report = run_evaluation(_args(saved_model, small_benchmark, tmp_path, dataset="ap10k", task="semantic",
                                  protocol="bovidae_to_canidae", limit=2))
    (entry,) = report["summary"]
    assert entry["metric"]["type"] == "accuracy" and set(entry["baselines"]) == {"most-frequent", "nearest-mean-position"}


def test_ap10k_scores_the_protocol_the_model_was_trained_under(saved_model, small_benchmark, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved_model, run / "model")
    (run / "results.json").write_text(json.dumps({"data_args": {"dataset": "ap10k", "protocol": "canidae_to_felidae"}}))
    report = run_evaluation(_args(saved_model, small_benchmark, tmp_path, model=str(run / "model"), dataset="ap10k", limit=2))
    (entry,) = report["summary"]  # train.py's record beside the model folder chose the protocol
    assert entry["dataset"]["config"] == "canidae_to_felidae" and "every score 1.0" in entry["setting"]
    assert "KptLLM (constant score)" not in entry["baselines"] and "KptLLM (constant score)" in report["details"]["canidae_to_felidae"]
    with pytest.raises(SystemExit, match="trained on Canidae"):  # bovidae_to_canidae would test on the training family
        run_evaluation(_args(saved_model, small_benchmark, tmp_path, model=str(run / "model"), dataset="ap10k", protocol="all"))


def test_semantic_naming_and_visual_textual_on_mp100(saved_model, small_benchmark, tmp_path):
    report = run_evaluation(_args(saved_model, small_benchmark, tmp_path, task="semantic", limit=2))
    assert report["summary"][0]["metric"]["name"] == "Naming accuracy"
    report = run_evaluation(_args(saved_model, small_benchmark, tmp_path, task="visual+textual", num_pictures=0))
    assert report["summary"][0]["task"] == "Visual+textual-prompt keypoint detection"


def test_no_itd_ablation_switch_is_recorded(saved_model, small_benchmark, tmp_path):
    report = run_evaluation(_args(saved_model, small_benchmark, tmp_path, identify_then_detect=False, num_pictures=0))
    assert "identify-then-detect off" in report["summary"][0]["setting"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(dataset="coco"), "--dataset 'coco'"),
        (dict(task="textual"), "is not evaluated on embedded"),
        (dict(dataset="ap10k", task="visual+textual"), "is not evaluated on ap10k"),
        (dict(splits="0"), "within 1..5"),
        (dict(shots="one"), "comma-separated integers"),
        (dict(limit=0), "at least 1"),
        (dict(dataset="ap10k", protocol="cats_to_dogs"), "--protocol"),
    ],
)
def test_bad_arguments_are_refused_with_a_message(saved_model, small_benchmark, tmp_path, overrides, message):
    with pytest.raises(SystemExit, match=message):
        run_evaluation(_args(saved_model, small_benchmark, tmp_path, **overrides))


def test_eval_refuses_a_folder_without_a_model(small_benchmark, tmp_path):
    with pytest.raises(SystemExit, match="is not a KptLLM folder"):
        run_evaluation(EvalArguments(model=str(tmp_path), data_dir=str(small_benchmark), output_dir=str(tmp_path / "e")))


def test_the_written_results_feed_the_model_card(saved_model, small_benchmark, tmp_path):
    """eval.py's results.json is what hub/model_card.py reads: the two must agree on the schema."""
    from huggingface_hub import ModelCard

    from hub.model_card import build_model_card, load_eval_report

    run_evaluation(_args(saved_model, small_benchmark, tmp_path, shots="1,2", num_pictures=0))
    report = load_eval_report(tmp_path / "eval" / "results.json")
    card = ModelCard(str(build_model_card(report, saved_model, "someone/kptllm-tiny")))
    results = card.data.to_dict()["model-index"][0]["results"]
    written = json.loads((tmp_path / "eval" / "results.json").read_text())["summary"]
    assert [r["metrics"][0]["value"] for r in results] == [entry["metric"]["value"] for entry in written]
