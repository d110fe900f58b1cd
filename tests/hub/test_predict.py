"""hub.predict: the command-line predictor writes a JSON (names, pixels, scores) and a picture; bad arguments
get one-line errors before any model is loaded."""

import json

import pytest
from PIL import Image

from hub.predict import main
from tests.helpers import random_image


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory):
    model, processor = tiny
    folder = tmp_path_factory.mktemp("predict") / "kptllm-tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture()
def files(tmp_path):
    random_image(80, 60, 1).save(tmp_path / "query.png")
    random_image(50, 70, 2).save(tmp_path / "support.png")
    coco = {
        "images": [{"id": 7, "file_name": "support.png", "width": 50, "height": 70}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [2, 4, 40, 60],
                         "keypoints": [10, 12, 2, 0, 0, 0, 30, 40, 1]}],
        "categories": [{"id": 3, "name": "fox", "keypoints": ["left eye", "nose", "tail tip"]}],
    }
    (tmp_path / "support.json").write_text(json.dumps(coco))
    return tmp_path


def test_visual_prompt_writes_json_and_picture(model_dir, files):
    report = main(["--model", str(model_dir), "--query", str(files / "query.png"), "--support", str(files / "support.png"),
                   "--kpts", "10,12; 30,40", "--query_bbox", "5,5,60,50", "--out", str(files / "out" / "pred.png"),
                   "--max_new_tokens", "6"])  # fmt: skip
    written = json.loads((files / "out" / "pred.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert written["bbox"] == [5, 5, 60, 50] and written["image_size"] == [80, 60]
    assert [k["label"] for k in written["keypoints"]] == [0, 1]
    assert all(set(k) == {"label", "name", "x", "y", "score"} for k in written["keypoints"])
    assert Image.open(files / "out" / "pred.png").size == (512, 384)  # the 80x60 query, enlarged for legible names


def test_textual_prompt_and_coco_support(model_dir, files):
    textual = main(["--model", str(model_dir), "--query", str(files / "query.png"), "--names", "nose;left eye",
                    "--out", str(files / "text.png"), "--json", str(files / "text_result.json"), "--max_new_tokens", "4"])
    assert len(textual["keypoints"]) == 2 and (files / "text_result.json").is_file()
    coco = main(["--model", str(model_dir), "--query", str(files / "query.png"), "--support_json", str(files / "support.json"),
                 "--out", str(files / "coco.png"), "--max_new_tokens", "4"])
    # the invisible keypoint (v = 0) is not prompted; labels and names are the COCO file's
    assert [(k["label"], k["annotated_name"]) for k in coco["keypoints"]] == [(0, "left eye"), (2, "tail tip")]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--query", "missing.png", "--names", "nose"], "--query missing.png: no such file"),
        (["--query", "{query}", "--support", "{support}", "--kpts", "10,12;30"], "--kpts: expected 'x,y;x,y;...'"),
        (["--query", "{query}", "--support", "{support}", "--kpts", "a,b"], "--kpts: expected 'x,y;x,y;...'"),
        (["--query", "{query}", "--kpts", "10,12"], "--kpts needs --support"),
        (["--query", "{query}", "--names", "nose;;eye"], "--names: expected 'name;name;...' without empty names"),
        (["--query", "{query}", "--names", "nose", "--query_bbox", "1,2,3"], "--query_bbox: expected 'x,y,w,h'"),
        (["--query", "{support_json}", "--names", "nose"], "not a readable image"),
        (["--query", "{query}", "--support_json", "{query}"], "not valid JSON"),
        (["--query", "{query}", "--names", "nose", "--query_bbox", "500,500,10,10"], "input refused: query_bbox .* lies outside"),
    ],
)
def test_bad_arguments_are_named(model_dir, files, arguments, message):
    paths = {"query": files / "query.png", "support": files / "support.png", "support_json": files / "support.json"}
    filled = [argument.format(**paths) for argument in arguments]
    with pytest.raises(SystemExit, match=message):
        main(["--model", str(model_dir), "--out", str(files / "bad.png"), *filled])
    assert not (files / "bad.png").exists()


def test_model_folder_and_prompt_are_checked(files, capsys):
    with pytest.raises(SystemExit, match="--model runs/nowhere/model: not a model folder"):
        main(["--model", "runs/nowhere/model", "--query", str(files / "query.png"), "--names", "nose"])
    with pytest.raises(SystemExit):  # argparse: one prompt only
        main(["--model", "m", "--query", str(files / "query.png"), "--names", "nose", "--kpts", "1,2"])
    assert "not allowed with argument" in capsys.readouterr().err
