"""hub.model_card: front matter and model-index from the evaluation JSON, numbers-driven text, a snippet that runs."""

import copy
import json
import re
import textwrap
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from hub.export import export_folder
from hub.model_card import (
    EvalJsonError,
    build_model_card,
    card_revision,
    extract_python_snippet,
    load_eval_report,
    parse_eval_report,
    set_card_revision,
)
from tests.helpers import random_image, run_without_repo

REPORT = {
    "model": "runs/tiny/model",
    "benchmark": "embedded",
    "summary": [
        {
            "task": "Visual-prompt keypoint detection",
            "task_type": "keypoint-detection",
            "dataset": {"name": "KptLLM embedded MP-100-style", "type": "kptllm-embedded", "split": "split1-test", "config": "1-shot"},
            "metric": {"name": "PCK@0.2", "type": "pck", "value": 16.78},
            "baselines": {"support-copy": 29.12, "mean-position": 16.79},
            "setting": "100 fixed episodes, 805 keypoints",
        },
        {
            "task": "Textual-prompt keypoint detection",
            "task_type": "keypoint-detection",
            "dataset": {"name": "KptLLM embedded AP-10K-style", "type": "kptllm-embedded-ap10k", "split": "test"},
            "metric": {"name": "OKS AP", "type": "oks_ap", "value": 41.5},
            "baselines": {"mean-position": 12.25},
        },
        {
            "task": "Keypoint semantic understanding",
            "task_type": "image-text-to-text",
            "dataset": {"name": "KptLLM embedded MP-100-style", "type": "kptllm-embedded", "split": "split1-test"},
            "metric": {"name": "Accuracy", "type": "accuracy", "value": 63.0},
        },
    ],
    "details": {"anything": [1, 2]},
}


@pytest.fixture(scope="module")
def model_folder(tiny, tmp_path_factory) -> Path:
    model, processor = tiny
    folder = tmp_path_factory.mktemp("run") / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def front_matter(card_text: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card_text, re.DOTALL)
    assert match, "the card does not start with YAML front matter"
    return yaml.safe_load(match.group(1))


def test_front_matter_parses_back_with_the_model_index_of_the_json(model_folder, tmp_path):
    report = load_eval_report(write_json(tmp_path / "results.json", REPORT))
    card = build_model_card(report, model_folder, "someone/kptllm-tiny", base_model="someone/kptllm-base")
    card.save(tmp_path / "README.md")

    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.library_name == "transformers"
    assert loaded.data.pipeline_tag == "keypoint-detection"
    assert {"custom_code", "kptllm", "keypoint-detection", "multimodal"} <= set(loaded.data.tags)
    assert loaded.data.base_model == "someone/kptllm-base"
    assert loaded.data.datasets == ["kptllm-embedded", "kptllm-embedded-ap10k"]
    assert loaded.data.metrics == ["pck", "oks_ap", "accuracy"]
    assert loaded.data.model_name == "kptllm-tiny"
    results = [(r.task_name, r.task_type, r.dataset_type, r.dataset_split, r.dataset_config, r.metric_type, r.metric_name, r.metric_value)
               for r in loaded.data.eval_results]
    assert results == [
        (e["task"], e["task_type"], e["dataset"]["type"], e["dataset"]["split"], e["dataset"].get("config"),
         e["metric"]["type"], e["metric"]["name"], e["metric"]["value"])
        for e in REPORT["summary"]
    ]
    # the raw YAML, as the Hub reads it
    raw = front_matter((tmp_path / "README.md").read_text())
    assert raw["model-index"][0]["results"][1]["metrics"][0] == {"type": "oks_ap", "value": 41.5, "name": "OKS AP"}

    without_base = build_model_card(report, model_folder, "someone/kptllm-tiny")
    assert "base_model" not in front_matter(str(without_base))


def test_results_table_puts_the_baselines_beside_the_model(model_folder):
    card = str(build_model_card(parse_eval_report(REPORT), model_folder, "someone/kptllm-tiny"))
    header = next(line for line in card.splitlines() if line.startswith("| Task"))
    assert header.endswith("| KptLLM | support-copy | mean-position |")
    pck_row = next(line for line in card.splitlines() if line.startswith("| Visual-prompt"))
    assert pck_row.endswith("| PCK@0.2 | **16.78** | 29.12 | 16.79 |")
    assert "split1-test / 1-shot" in pck_row and "100 fixed episodes, 805 keypoints" in pck_row
    ap_row = next(line for line in card.splitlines() if line.startswith("| Textual-prompt"))
    assert ap_row.endswith("| **41.50** | – | 12.25 |")


def test_limitations_follow_the_numbers(model_folder):
    below = str(build_model_card(parse_eval_report(REPORT), model_folder, "someone/kptllm-tiny"))
    limitations = below.split("## Limitations")[1].split("## Citation")[0]
    assert "16.78 PCK@0.2, below support-copy (29.12, 12.34 points lower); on par with mean-position (16.79)" in limitations
    assert "does not beat the support-copy baseline yet" in limitations
    assert "41.50 OKS AP, above mean-position (12.25, 29.25 points higher)." in limitations
    assert "synthetic" in limitations  # benchmark "embedded"

    better = copy.deepcopy(REPORT)
    better["summary"][0]["metric"]["value"] = 35.0
    better["benchmark"] = "mp100"
    above = str(build_model_card(parse_eval_report(better), model_folder, "someone/kptllm-tiny"))
    limitations = above.split("## Limitations")[1]
    assert "35.00 PCK@0.2, above support-copy (29.12, 5.88 points higher); above mean-position" in limitations
    assert "does not beat" not in limitations and "synthetic" not in limitations


def test_training_details_come_from_train_py_records(model_folder, tmp_path):
    report = parse_eval_report(REPORT)
    card = str(build_model_card(report, model_folder, "someone/kptllm-tiny", training_notes="Trained on 2 CPU cores."))
    assert "No base model was named at export" in card and "Trained on 2 CPU cores." in card

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    for path in model_folder.iterdir():
        (run / "model" / path.name).write_bytes(path.read_bytes())
    write_json(run / "results.json", {
        "split": 1, "global_step": 1234, "train_runtime_s": 600.0,
        "model_args": {"preset": "tiny", "model_name_or_path": None, "use_lora": False},
        "data_args": {"dataset": "embedded", "split": 1, "task_mix": "visual=0.6,textual=0.2,semantic=0.2"},
    })
    write_json(run / "trainer_state.json", {"log_history": [{"loss": 7.5, "step": 25}, {"loss": 0.75, "step": 1225}, {"train_runtime": 600.0}]})
    write_json(run / "training_args.json", {"learning_rate": 0.001, "per_device_train_batch_size": 16, "output_dir": "x"})
    card = str(build_model_card(report, run / "model", "someone/kptllm-tiny"))
    training = card.split("## Training")[1].split("## Limitations")[0]
    assert "trained from random initialisation" in training
    assert "1234 optimizer steps in 10.0 min" in training
    assert "preset=`tiny`" in training and "task_mix=`visual=0.6,textual=0.2,semantic=0.2`" in training
    assert "learning_rate=`0.001`" in training and "per_device_train_batch_size=`16`" in training
    assert "Training loss: 7.5 at the first log, 0.75 at the last (2 logs)." in training
    assert "only knows the keypoint names" in card  # from scratch -> limitation


def _broken(path: str, value):
    data = copy.deepcopy(REPORT)
    *parents, last = path.split(".")
    target = data
    for key in parents:
        target = target[int(key)] if key.isdigit() else target[key]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return data


@pytest.mark.parametrize(
    "data, message",
    [
        (_broken("summary", KeyError), r"summary is missing"),
        (_broken("summary", []), r"summary is empty"),
        (_broken("summary.0.metric.value", "16.78"), r"summary\[0\]\.metric\.value must be int or float, got '16.78'"),
        (_broken("summary.0.metric.value", True), r"summary\[0\]\.metric\.value must be int or float"),
        (_broken("summary.1.metric.value", 4150.0), r"summary\[1\]\.metric\.value = 4150.0 is not a percentage"),
        (_broken("summary.0.dataset.name", KeyError), r"summary\[0\]\.dataset\.name is missing"),
        (_broken("summary.2.task", " "), r"summary\[2\]\.task must not be empty"),
        (_broken("summary.0.baselines", {"support-copy": None}), r"summary\[0\]\.baselines\.support-copy is missing"),
        (_broken("summary.0.metric", [16.78]), r"summary\[0\]\.metric must be dict"),
        (_broken("benchmark", 3), r"benchmark must be str, got 3"),
        ([REPORT], r"the top level must be an object"),
    ],
)
def test_malformed_eval_json_names_the_file_and_field(tmp_path, data, message):
    path = write_json(tmp_path / "results.json", data)
    with pytest.raises(EvalJsonError, match=re.escape(str(path)) + ": " + message):
        load_eval_report(path)


def test_unreadable_eval_json_is_a_clear_error(tmp_path):
    with pytest.raises(EvalJsonError, match="no such evaluation JSON"):
        load_eval_report(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EvalJsonError, match=r"bad\.json: not valid JSON"):
        load_eval_report(tmp_path / "bad.json")


def test_revision_is_a_placeholder_until_pinned(model_folder):
    card = str(build_model_card(parse_eval_report(REPORT), model_folder, "someone/kptllm-tiny"))
    assert card_revision(card) == "main" and "not pinned yet" in card
    pinned = set_card_revision(card, "c" * 40)
    assert card_revision(pinned) == "c" * 40 and "not pinned yet" not in pinned
    assert pinned.replace("c" * 40, "main").split("revision = ")[0] == card.split("revision = ")[0]
    given = str(build_model_card(parse_eval_report(REPORT), model_folder, "someone/kptllm-tiny", revision="d" * 40))
    assert card_revision(given) == "d" * 40
    with pytest.raises(ValueError, match="no single"):
        set_card_revision("# a card without a snippet", "c" * 40)


SNIPPET_RUNNER = textwrap.dedent(
    """
    exec(compile(open(sys.argv[1]).read(), "model-card-snippet", "exec"), {"__name__": "__main__"})
    """
)


@pytest.mark.slow  # ~20-30 s on 2 busy cores: a fresh interpreter imports torch + transformers
def test_card_usage_snippet_runs_against_the_exported_folder(model_folder, tmp_path):
    """The README's python block, verbatim except the repo id (-> the local folder; revision is ignored locally)."""
    eval_json = write_json(tmp_path / "results.json", REPORT)
    folder = export_folder(model_folder, tmp_path / "kptllm-tiny", eval_json, repo_id="someone/kptllm-tiny", revision="e" * 40, load_check=False).folder
    snippet = extract_python_snippet((folder / "README.md").read_text())
    assert 'revision = "' + "e" * 40 + '"' in snippet and "trust_remote_code=True" in snippet
    local = snippet.replace('repo_id = "someone/kptllm-tiny"', f"repo_id = {str(folder)!r}")
    assert local != snippet
    (tmp_path / "snippet.py").write_text(local)
    random_image(80, 60, 1).save(tmp_path / "query.jpg")
    random_image(96, 80, 2).save(tmp_path / "support.jpg")

    result = run_without_repo(SNIPPET_RUNNER, [str(tmp_path / "snippet.py")], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    printed = result.stdout.splitlines()
    # the pipeline (visual, textual): one box of two keypoints each; then the names, pixels and scores of two
    # instances (two images, one box each: the whole image and [0, 0, 60, 50]); semantic: one name
    assert all(printed[line].startswith("[{'bbox': ") and printed[line].count("'label'") == 2 for line in (0, 1)), printed
    assert sum(bool(re.match(r"^\[.*\] tensor\(", line)) for line in printed) == 2, printed
    assert re.match(r"^\[('.*'|None)\]$", printed[-1]), printed
