"""Every code block of README.md's "Use" section runs, verbatim but for the model folder, against a tiny
saved model: the python blocks in order in one namespace, each `python -m hub.predict` line with its
exact arguments."""

import json
import re
import shlex
from pathlib import Path

import pytest

from hub import predict
from tests.helpers import random_image

README = Path(__file__).resolve().parents[1] / "README.md"
FOLDER_IN_README = "runs/tiny/model"


def use_section_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block between "## Use" and the next "## " heading."""
    text = README.read_text()
    start = text.index("\n## Use\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```(\w+)\n(.*?)```", text[start:end], flags=re.S)


def test_the_use_section_has_python_and_command_line_blocks():
    languages = [language for language, _ in use_section_blocks()]
    assert "python" in languages and "bash" in languages
    assert all(FOLDER_IN_README in code for _, code in use_section_blocks())


@pytest.fixture()
def workspace(tiny, tmp_path, monkeypatch):
    """A tiny saved model and the images and COCO file the README names, in the working directory."""
    model, processor = tiny
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    random_image(80, 60, 1).save(tmp_path / "query.jpg")
    random_image(90, 70, 2).save(tmp_path / "query2.jpg")
    random_image(96, 80, 3).save(tmp_path / "support.jpg")
    coco = {
        "images": [{"id": 1, "file_name": "support.jpg", "width": 96, "height": 80}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 96, 80], "keypoints": [40, 30, 2, 60, 52, 2]}],
        "categories": [{"id": 1, "name": "thing", "keypoints": ["left eye", "nose"]}],
    }
    (tmp_path / "support.json").write_text(json.dumps(coco))
    monkeypatch.chdir(tmp_path)
    return folder


def test_python_blocks_run(workspace):
    code = "\n".join(code for language, code in use_section_blocks() if language == "python")
    namespace: dict = {"__name__": "__main__"}
    exec(compile(code.replace(FOLDER_IN_README, str(workspace)), "README.md (Use)", "exec"), namespace)
    # what the comments promise
    box = namespace["results"][0][1]
    assert box["keypoints"].shape == (3, 2) and box["bbox"].tolist() == [20, 10, 50, 40]
    assert [len(boxes) for boxes in namespace["results"]] == [2, 1]


def test_command_lines_run(workspace):
    commands = [line for language, code in use_section_blocks() if language == "bash" for line in code.splitlines() if line.strip()]
    assert len(commands) == 3
    for line in commands:
        argv = shlex.split(line.replace(FOLDER_IN_README, str(workspace)))
        assert argv[:3] == ["python", "-m", "hub.predict"], line
        report = predict.main(argv[3:])
        out = Path(argv[argv.index("--out") + 1])
        assert out.is_file() and json.loads(out.with_suffix(".json").read_text()) == json.loads(json.dumps(report))
