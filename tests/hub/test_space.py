"""The Gradio Space in hub/space: input validation, the API through gradio_client, the page in Chromium.

The app is served on 127.0.0.1 (a free port) in this process with a tiny KptLLM built in code and
trained for a few seconds to write the answer format ("It is the nose. <keypoint>"), so the
results show names and positions; it loads from its saved folder with trust_remote_code, as on a
Space. The browser test drives Debian's chromium (scripts/install.sh installs it) through playwright.
"""

import importlib.util
import os
import shutil
import socket
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from processing.builders import build_tiny_model
from tests.helpers import KEYPOINT_NAMES

SPACE_DIR = Path(__file__).resolve().parents[2] / "hub" / "space"
sys.path.insert(0, str(SPACE_DIR))  # the Space's helper modules import each other by plain name

import space_inputs  # noqa: E402
from space_drawing import PALETTE, draw_keypoints  # noqa: E402
from space_inputs import InputError  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


# -- files ----------------------------------------------------------------------------------------
def creature(width: int, height: int, seed: int) -> Image.Image:
    """A cartoon animal on a gradient (a friendlier screenshot than noise)."""
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(image)
    shift = seed * 0.05
    body = (width * (0.25 + shift), height * 0.45, width * (0.75 + shift), height * 0.8)
    draw.ellipse(body, fill=(170, 120, 70), outline=(60, 40, 20), width=2)
    head_x, head_y, r = width * (0.3 + shift), height * 0.35, min(width, height) * 0.15
    draw.ellipse((head_x - r, head_y - r, head_x + r, head_y + r), fill=(190, 140, 90), outline=(60, 40, 20), width=2)
    for dx in (-0.4, 0.4):
        draw.ellipse((head_x + dx * r - 3, head_y - 0.2 * r - 3, head_x + dx * r + 3, head_y - 0.2 * r + 3), fill=(0, 0, 0))
    draw.line((body[2] - 4, (body[1] + body[3]) / 2, width * 0.95, height * 0.3), fill=(60, 40, 20), width=4)
    return image


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height but holds (almost) no pixels: a size check must refuse it unread."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("space_files")
    paths = {"query": folder / "query.png", "support": folder / "support.jpg", "text": folder / "notes.txt",
             "wide": folder / "wide.png", "transparent": folder / "transparent.png"}
    creature(200, 150, 0).save(paths["query"])
    creature(160, 120, 1).save(paths["support"], quality=90)
    paths["text"].write_text("keypoints: left eye, nose\n")
    paths["fake_png"] = folder / "photo.png"  # named like an image, so the browser uploads it
    paths["fake_png"].write_text("keypoints: left eye, nose\n")
    Image.new("1", (5000, 8)).save(paths["wide"])
    transparent = Image.new("RGBA", (20, 10), (255, 0, 0, 0))
    transparent.putpixel((3, 4), (0, 0, 255, 255))
    transparent.save(paths["transparent"])
    paths["many_pixels"] = png_header_only(folder / "many_pixels.png", 4096, 4000)
    paths["bomb"] = png_header_only(folder / "bomb.png", 20000, 20000)
    paths["truncated"] = png_header_only(folder / "truncated.png", 64, 64)
    return paths


# -- the Space's files -----------------------------------------------------------------------------
def test_space_card_and_requirements_match_what_is_tested():
    import importlib.metadata

    from huggingface_hub import SpaceCard
    from packaging.requirements import Requirement

    card = SpaceCard.load(SPACE_DIR / "README.md").data
    assert card.sdk == "gradio" and (SPACE_DIR / card.app_file).is_file()
    assert card.sdk_version == importlib.metadata.version("gradio")  # the Space runs the gradio these tests use
    assert len(card.short_description) <= 60  # the Hub refuses longer ones
    lines = [line.strip() for line in (SPACE_DIR / "requirements.txt").read_text().splitlines()]
    requirements = [Requirement(line) for line in lines if line and not line.startswith(("#", "--"))]
    assert {r.name for r in requirements} >= {"torch", "transformers", "pillow", "huggingface-hub"}
    assert "gradio" not in {r.name for r in requirements}  # sdk_version decides it on a Space
    for requirement in requirements:
        installed = importlib.metadata.version(requirement.name)
        assert requirement.specifier.contains(installed, prereleases=True), (requirement, installed)


# -- validation (plain functions) -----------------------------------------------------------------
def test_load_image_accepts_images_and_flattens_transparency(files):
    image = space_inputs.load_image(files["support"], "support image")
    assert image.mode == "RGB" and image.size == (160, 120)
    flat = space_inputs.load_image(str(files["transparent"]), "image")
    assert flat.mode == "RGB"
    assert flat.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not black
    assert flat.getpixel((3, 4)) == (0, 0, 255)


@pytest.mark.parametrize(
    "name, message",
    [
        ("text", "'notes.txt' is not an image file"),
        ("truncated", "'truncated.png' could not be decoded"),
        ("wide", "the image is 5000x8; at most 4096 px on a side and 16 MP"),
        ("many_pixels", "the image is 4096x4000; at most 4096 px"),  # refused from the header, before decoding
        ("bomb", "far too large"),
    ],
)
def test_load_image_refuses_bad_files_with_a_message(files, name, message):
    with pytest.raises(InputError, match="^query image: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        space_inputs.load_image(files[name], "query image")


@pytest.mark.parametrize("path, message", [(None, "no image; upload one first"), ("", "no image"), ("/nonexistent/x.png", "'x.png' is gone")])
def test_load_image_missing(path, message):
    with pytest.raises(InputError, match=message):
        space_inputs.load_image(path, "support image")


def test_parse_points_accepts_the_usual_spellings():
    text = "10, 20\n\n(30.5, 40)\n  50 60 \n7;8\n1e1, .5"
    assert space_inputs.parse_points(text, (100, 80), "pts") == [[10, 20], [30.5, 40], [50, 60], [7, 8], [10, 0.5]]
    assert space_inputs.parse_points("100, 80", (100, 80), "pts") == [[100, 80]]  # the far pixel edge is on the image


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "pts: no keypoints; click on the support image"),
        ("  \n ", "no keypoints"),
        ("10, 20\nleft eye", "line 2 \\('left eye'\\) is not 'x, y'"),
        ("nan, 3", "line 1 .* is not 'x, y'"),
        ("101, 5", "keypoint 1: \\(101, 5\\) is outside the 100x80 image"),
        ("5, 5\n-1, 5", "keypoint 2: \\(-1, 5\\) is outside"),
        ("1e400, 5", "not a finite position"),
        ("1, 1\n" * 33, "33 keypoints, at most 32"),
    ],
)
def test_parse_points_refuses(text, message):
    with pytest.raises(InputError, match=message):
        space_inputs.parse_points(text, (100, 80), "pts")


def test_clicks_and_the_keypoint_cap():
    assert space_inputs.click_position([12, 30], (40, 30), "click") == (12.0, 30.0)
    with pytest.raises(InputError, match=r"click: \(41, 3\) is outside the 40x30 image"):
        space_inputs.click_position([41, 3], (40, 30), "click")
    with pytest.raises(InputError, match="carried no \\(x, y\\) position"):
        space_inputs.click_position(None, (40, 30), "click")
    text = ""
    for i in range(space_inputs.MAX_KEYPOINTS):
        text = space_inputs.add_point(text, i, 1.25, "pts")
    assert text.splitlines()[:2] == ["0.0, 1.2", "1.0, 1.2"] and len(text.splitlines()) == space_inputs.MAX_KEYPOINTS
    with pytest.raises(InputError, match="already 32 keypoints"):
        space_inputs.add_point(text, 1, 1, "pts")


def test_parse_names():
    assert space_inputs.parse_names(" left   eye,nose\n\n tail tip ,", "names") == ["left eye", "nose", "tail tip"]
    for text, message in [(" , \n", "no keypoint names"), (",".join(["a"] * 33), "33 names, at most 32"), ("x" * 65, "longer than 64")]:
        with pytest.raises(InputError, match=message):
            space_inputs.parse_names(text, "names")


def test_draw_keypoints_enlarges_small_images_and_marks_points():
    image = Image.new("RGB", (64, 32), (255, 255, 255))
    drawn = draw_keypoints(image, [(16, 8), None, (60, 30)], ["nose", "skipped", "tail"], min_side=512)
    assert drawn.size == (512, 256) and image.getpixel((16, 8)) == (255, 255, 255)  # a copy
    assert drawn.getpixel((128, 64)) == PALETTE[0]  # the first point, scaled by 8
    assert drawn.getpixel((480, 240)) == PALETTE[2]
    assert draw_keypoints(image, [(5, 5)], ["a"]).size == (64, 32)  # clickable pictures keep their pixels


# -- the app ----------------------------------------------------------------------------------------
def teach_answer_format(model, processor, steps: int = 60, seed: int = 0) -> None:
    """A few seconds of training so that the tiny model answers in the task's format.

    Visual and textual prompts: "It is the <name>. <keypoint>"; semantic: "This is the <name>.".
    Prompts are drawn at random every step so that the format does not hang on one position.
    """
    rng = np.random.default_rng(seed)
    query, support = creature(80, 60, 0), creature(50, 70, 1)

    def points(image: Image.Image, count: int) -> list[list[float]]:
        return (rng.uniform(0, 1, (count, 2)) * image.size).tolist()

    def names(count: int) -> list[str]:
        return [str(name) for name in rng.choice(KEYPOINT_NAMES, count, replace=False)]

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batches = [
            processor(query=query, support=support, kpts=points(support, 3), task="visual", kpt_names=names(3),
                      query_kpts=points(query, 3), return_labels=True),
            processor(query=query, kpt_names=names(2), task="textual", query_kpts=points(query, 2), return_labels=True),
            processor(query=query, kpts=points(query, 2), kpt_names=names(2), task="semantic", return_labels=True),
        ]
        loss = sum(model(**batch).loss for batch in batches)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model, processor = build_tiny_model(KEYPOINT_NAMES, seed=0)
    teach_answer_format(model, processor)
    folder = tmp_path_factory.mktemp("space_model") / "kptllm-tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """hub/space/app.py as a module, loaded by path as a Space runs it (no package around it)."""
    saved = {key: os.environ.get(key) for key in ("GRADIO_ANALYTICS_ENABLED", "GRADIO_TEMP_DIR", "HF_HUB_OFFLINE")}
    os.environ.update(GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(tmp_path_factory.mktemp("gradio")), HF_HUB_OFFLINE="1")
    spec = importlib.util.spec_from_file_location("kptllm_space_app", SPACE_DIR / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(app, model_dir):
    """The Space served on 127.0.0.1 in a thread: its URL."""
    demo = app.build_demo(str(model_dir))
    _, url, _ = app.launch(demo, host="127.0.0.1", port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False, download_files=True)


def test_default_model_source(app, tmp_path, monkeypatch):
    assert app.default_model_source({"KPTLLM_MODEL": " user/kptllm-tiny "}) == "user/kptllm-tiny"
    monkeypatch.setattr(app, "EMBEDDED_DEFAULT_MODEL", tmp_path / "runs" / "tiny" / "model")
    assert app.default_model_source({}) is None
    (tmp_path / "runs" / "tiny" / "model").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "model" / "config.json").write_text("{}")
    assert app.default_model_source({"KPTLLM_MODEL": ""}) == str(tmp_path / "runs" / "tiny" / "model")
    assert app.EMBEDDED_DEFAULT_MODEL.parts[-3:] == ("runs", "tiny", "model")


def test_without_a_model_the_page_says_so(app, files, tmp_path):
    import gradio as gr

    for source, message in [(None, "No model to run: set KPTLLM_MODEL"), (str(tmp_path / "nowhere"), "Could not load the model from")]:
        service = app.KeypointService(source)
        assert message in service.banner
        with pytest.raises(gr.Error, match=message):
            app.shown_to_user(service.detect_textual)(str(files["query"]), "nose")
    demo = app.build_demo(None)  # the page still builds, with the message on it
    assert any("No model to run" in str(block.value) for block in demo.blocks.values() if getattr(block, "value", None))


def test_unexpected_errors_are_reported_without_details(app):
    import gradio as gr

    def broken():
        raise RuntimeError("secret internal state")

    with pytest.raises(gr.Error) as error:
        app.shown_to_user(broken)()
    assert error.value.message == "Something went wrong (RuntimeError); the Space log has the details."


def test_main_serves_the_model_named_by_the_environment(app, monkeypatch):
    served = {}
    monkeypatch.setattr(app, "build_demo", lambda source: served.setdefault("source", source))
    monkeypatch.setattr(app, "launch", lambda demo, host, port: served.update(host=host, port=port))
    monkeypatch.setenv("KPTLLM_MODEL", "user/kptllm-tiny")
    monkeypatch.setattr(sys, "argv", ["app.py", "--port", "7861"])
    app.main()
    assert served == {"source": "user/kptllm-tiny", "host": None, "port": 7861}
    monkeypatch.setattr(sys, "argv", ["app.py", "--model", "some/folder", "--host", "0.0.0.0"])
    served.clear()
    app.main()
    assert served == {"source": "some/folder", "host": "0.0.0.0", "port": None}


def _table(result) -> list[list]:
    return result["data"]


def _check_detections(rows, expected_count: int, image_size: tuple[int, int]):
    assert [row[0] for row in rows] == list(range(1, expected_count + 1))
    width, height = image_size
    side = max(width, height)  # the crop is the square around the whole image, centred on it
    for _, name, x, y, score in rows:
        assert name in KEYPOINT_NAMES and 0 < float(score) <= 1
        assert -(side - width) / 2 <= float(x) <= (side + width) / 2
        assert -(side - height) / 2 <= float(y) <= (side + height) / 2


def test_client_visual(client, files):
    from gradio_client import handle_file

    picture, table, status = client.predict(
        handle_file(files["query"]), handle_file(files["support"]), "40, 30\n120, 60\n10, 100", api_name="/detect_visual"
    )
    _check_detections(_table(table), 3, (200, 150))
    assert Image.open(picture).size == (512, 384)  # the 200x150 query, enlarged for legible names
    assert status.startswith("3 keypoints in") and "no `<keypoint>`" not in status


def test_client_textual(client, files):
    from gradio_client import handle_file

    picture, table, status = client.predict(handle_file(files["query"]), "nose,\nleft eye", api_name="/detect_textual")
    _check_detections(_table(table), 2, (200, 150))
    assert Image.open(picture).size == (512, 384) and status.startswith("2 keypoints")


def test_client_semantic(client, files):
    from gradio_client import handle_file

    picture, name, status = client.predict(handle_file(files["query"]), "60, 52", api_name="/identify_keypoint")
    assert name in KEYPOINT_NAMES and status.startswith("answered in")
    assert Image.open(picture).size == (512, 384)


@pytest.mark.parametrize(
    "api_name, inputs, message",
    [
        ("/detect_visual", ("text", "support", "1, 1"), "query image: 'notes.txt' is not an image file"),
        ("/detect_visual", ("query", "wide", "1, 1"), "support image: the image is 5000x8"),
        ("/detect_visual", ("query", "support", "170, 5"), r"support keypoints, keypoint 1: \(170, 5\) is outside the 160x120 image"),
        ("/detect_visual", ("query", "support", ""), "support keypoints: no keypoints"),
        ("/detect_visual", (None, "support", "1, 1"), "query image: no image"),
        ("/detect_textual", ("query", " , "), "keypoint names: no keypoint names"),
        ("/detect_textual", ("bomb", "nose"), "far too large"),
        ("/identify_keypoint", ("query", "1, 1\n2, 2"), "2 points given"),
        ("/identify_keypoint", ("query", ""), "point: no keypoints; click on the image"),
    ],
)
def test_client_bad_inputs_give_messages(client, files, api_name, inputs, message):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    args = [handle_file(files[value]) if value in files else value for value in inputs]
    with pytest.raises(AppError, match=message) as error:
        client.predict(*args, api_name=api_name)
    assert "Traceback" not in str(error.value)


def test_client_upload_cap(client, tmp_path):
    from gradio_client import handle_file

    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + bytes(21 * 2**20))  # over the 20 MB cap the server announces
    with pytest.raises(ValueError, match="exceeds the maximum file size of 20971520 bytes"):
        client.predict(handle_file(big), "nose", api_name="/detect_textual")


# -- the page in headless Chromium ------------------------------------------------------------------
def _wait_idle(page, selector: str) -> None:
    """Until no event is pending on the component (its status tracker hidden: it covers the image while shown)."""
    page.wait_for_function(
        f"() => [...document.querySelectorAll('{selector} [data-testid=status-tracker]')].every(e => e.classList.contains('hide'))",
        timeout=30_000,
    )


def _click_image(page, selector: str, width: int, fx: float, fy: float) -> None:
    """Click at (fx, fy) of the image, once it is loaded at its own size (an output may have just replaced it)."""
    page.wait_for_function(
        f"() => {{ const i = document.querySelector('{selector} img');"
        f" return i && i.complete && i.naturalWidth === {width} && i.getBoundingClientRect().width > 0; }}",
        timeout=30_000,
    )
    box = page.locator(f"{selector} img").bounding_box()
    page.mouse.click(box["x"] + fx * box["width"], box["y"] + fy * box["height"])


def _points_listed(page, count: int) -> None:
    page.wait_for_function(
        f"() => document.querySelector('#visual-points textarea').value.split('\\n').filter(l => l.trim()).length >= {count}",
        timeout=30_000,
    )


def test_browser_visual_and_semantic(server, files, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM.is_file(), "the browser test needs Debian's chromium: bash scripts/install.sh (or apt-get install -y chromium)"
    outside_requests = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            tmp_path / "profile", executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 1300},
        )
        try:
            page = browser.new_page()
            page.on("request", lambda r: None if r.url.startswith((server, "data:", "blob:")) else outside_requests.append(r.url))
            page.goto(server)
            expect(page.locator("#model-banner")).to_contain_text("kptllm-tiny")

            # visual prompt: upload, click two keypoints on the support, detect
            page.locator("#visual-query input[type=file]").set_input_files(files["query"])
            page.locator("#visual-support input[type=file]").set_input_files(files["support"])
            expect(page.locator("#visual-support-info")).to_contain_text("160x120 px", timeout=30_000)  # upload handled
            _wait_idle(page, "#visual-support")
            clicks = [(0.25, 0.25), (0.75, 0.5)]
            for count, (fx, fy) in enumerate(clicks, start=1):
                _click_image(page, "#visual-support", 160, fx, fy)
                _points_listed(page, count)
                _wait_idle(page, "#visual-support")  # a pending event covers the image: a click now would not reach it
            listed = space_inputs.parse_points(page.locator("#visual-points textarea").input_value(), (160, 120), "listed")
            assert listed == [[pytest.approx(fx * 160, abs=2), pytest.approx(fy * 120, abs=2)] for fx, fy in clicks]
            _wait_idle(page, "#visual-support")
            page.locator("#visual-detect").click()
            expect(page.locator("#visual-status")).to_contain_text("2 keypoints in", timeout=30_000)
            rows = page.locator("#visual-result-table [role=row][data-index]")  # the grid's body rows
            expect(rows).to_have_count(2)
            for row in range(2):
                values = [text.strip() for text in rows.nth(row).locator("[role=gridcell]").all_inner_texts()]
                assert values[0] == str(row + 1) and values[1] in KEYPOINT_NAMES, values
                float(values[2]), float(values[3])  # positions, not blanks
            expect(page.locator("#visual-result-image img")).to_be_visible()
            page.screenshot(path=tmp_path / "space_visual.png", full_page=True)
            if os.environ.get("KPTLLM_UPDATE_SPACE_SCREENSHOT") == "1":  # refresh the README's picture
                shutil.copy(tmp_path / "space_visual.png", SPACE_DIR / "screenshot.png")

            # clear: the list empties
            page.locator("#visual-clear").click()
            expect(page.locator("#visual-points textarea")).to_have_value("")

            # files that are not images: messages, not tracebacks
            page.get_by_role("tab", name="Textual prompt").click()
            page.locator("#textual-query input[type=file]").set_input_files(files["text"])  # refused by the page itself
            expect(page.get_by_text("Invalid file type: notes.txt").first).to_be_visible(timeout=30_000)
            page.locator("#textual-query input[type=file]").set_input_files(files["fake_png"])  # refused by the app
            page.locator("#textual-names textarea").fill("nose, left eye")
            page.locator("#textual-detect").click()
            expect(page.get_by_text("query image: 'photo.png' is not an image file").first).to_be_visible(timeout=30_000)
            assert "Traceback" not in page.content()

            # semantic: a click on the image is answered with a name
            page.get_by_role("tab", name="What is this keypoint?").click()
            page.locator("#semantic-image input[type=file]").set_input_files(files["query"])
            expect(page.locator("#semantic-image-info")).to_contain_text("200x150 px", timeout=30_000)
            _wait_idle(page, "#semantic-image")
            _click_image(page, "#semantic-image", 200, 0.3, 0.35)
            expect(page.locator("#semantic-status")).to_contain_text("answered in", timeout=30_000)
            assert page.locator("#semantic-name textarea, #semantic-name input").first.input_value() in KEYPOINT_NAMES
            page.screenshot(path=tmp_path / "space_semantic.png", full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "space_visual.png").stat().st_size > 10_000
    assert outside_requests == []  # the page phones nowhere
