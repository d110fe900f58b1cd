"""KptLLM Gradio Space: visual-prompt detection, textual-prompt detection, keypoint naming.

    python hub/space/app.py                                  # the embedded default: runs/tiny/model
    KPTLLM_MODEL=user/kptllm-tiny python hub/space/app.py    # a Hub repo id or any KptLLM folder
    python hub/space/app.py --model DIR --port 7860

The model runs through the pipeline it ships with (`pipeline("keypoint-comprehension", model=...,
trust_remote_code=True)`), so the Space needs none of this repository's packages: only this folder
(app.py, space_inputs.py, space_drawing.py).
Which model: `--model`, else the `KPTLLM_MODEL` environment variable (on a Space: a variable in its
settings, e.g. the repo id that `python -m hub.export --push` wrote), else the folder `python
train.py` writes (`runs/tiny/model` in the repository). With none of them, the page says so.
"""

import functools
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# before gradio is imported: no usage statistics, no version check, no Hub telemetry
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from transformers import HfArgumentParser, pipeline  # noqa: E402

# `python app.py` (a Space) has this folder on sys.path already; the tests load app.py by its path
SPACE_DIR = Path(__file__).resolve().parent
if str(SPACE_DIR) not in sys.path:
    sys.path.insert(0, str(SPACE_DIR))

from space_drawing import RESULT_MIN_SIDE, draw_keypoints  # noqa: E402
from space_inputs import (  # noqa: E402
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
    MAX_KEYPOINTS,
    MAX_UPLOAD_MB,
    InputError,
    add_point,
    click_position,
    load_image,
    parse_names,
    parse_points,
)

logger = logging.getLogger("kptllm.space")

MODEL_ENV = "KPTLLM_MODEL"
EMBEDDED_DEFAULT_MODEL = SPACE_DIR.parent.parent / "runs" / "tiny" / "model"
TABLE_HEADERS = ["#", "keypoint", "x", "y", "score"]
TASK = "keypoint-comprehension"  # the pipeline a KptLLM folder names in config.json's custom_pipelines
MAX_NEW_TOKENS = 24  # "It is the front left paw. <keypoint>" is ~10 tokens with a Llama tokenizer


def default_model_source(environ: dict[str, str] | None = None) -> str | None:
    """`KPTLLM_MODEL` if set, else the embedded default folder if `python train.py` wrote it, else None."""
    environ = os.environ if environ is None else environ
    if environ.get(MODEL_ENV, "").strip():
        return environ[MODEL_ENV].strip()
    if (EMBEDDED_DEFAULT_MODEL / "config.json").is_file():
        return str(EMBEDDED_DEFAULT_MODEL)
    return None


class KeypointService:
    """The model behind the page; every method takes and returns what the gradio components hold."""

    def __init__(self, source: str | None):
        self.source = source
        self.detector = self.to_rgb = None
        if source is None:
            self.problem = (
                f"No model to run: set {MODEL_ENV} to a KptLLM folder or Hub repo id, or run "
                "`python train.py` in the repository to write the embedded default (runs/tiny/model)."
            )
            return
        try:
            self.detector = pipeline(TASK, model=source, trust_remote_code=True)
            self.problem = None
            # the processor's own conversion: a 16-bit or float upload is rescaled as the training images were
            self.to_rgb = getattr(self.detector.processor, "to_rgb_image", None)
        except Exception as err:  # any failure to load is shown on the page, not as a crash
            logger.exception("loading %s failed", source)
            self.problem = f"Could not load the model from {source!r}: {type(err).__name__}: {str(err)[:300]}"

    @property
    def banner(self) -> str:
        if self.problem:
            return f"**⚠ {self.problem}**"
        return f"Model: `{self.source}` ({sum(p.numel() for p in self.detector.model.parameters()) / 1e6:.1f} M parameters)"

    def _require_model(self) -> None:
        if self.problem:
            raise InputError(self.problem)

    def _run(self, image, **processor_kwargs) -> list[dict]:
        """The pipeline's keypoints ({"label", "name", "x", "y", "score"}) of the whole image: one batched call."""
        try:
            with torch.inference_mode():
                (result,) = self.detector(query=image, max_new_tokens=MAX_NEW_TOKENS, **processor_kwargs)
        except (ValueError, TypeError) as err:  # the processor's own checks name the field
            raise InputError(f"input refused: {err}") from None
        return result["keypoints"]

    def _detection_outputs(self, query, results: list[dict], seconds: float):
        points = [None if r["x"] is None else (r["x"], r["y"]) for r in results]
        labels = [f"{i}. {r['name'] or '?'}" for i, r in enumerate(results, start=1)]
        rows = [
            [i, r["name"] or "(no name)", "" if r["x"] is None else f"{r['x']:.1f}", "" if r["y"] is None else f"{r['y']:.1f}",
             f"{r['score']:.3f}"]
            for i, r in enumerate(results, start=1)
        ]
        missing = sum(p is None for p in points)
        status = f"{len(results)} keypoints in {seconds:.2f} s"
        if missing:
            status += f"; the model wrote no `<keypoint>` for {missing} of them (no position)"
        return draw_keypoints(query, points, labels, min_side=RESULT_MIN_SIDE), rows, status

    # -- visual prompt ------------------------------------------------------------------------
    def detect_visual(self, query_path: str | None, support_path: str | None, points_text: str | None):
        """Query + support + support keypoints -> (query with predictions, table rows, status)."""
        self._require_model()
        query = load_image(query_path, "query image", self.to_rgb)
        support = load_image(support_path, "support image", self.to_rgb)
        points = parse_points(points_text, support.size, "support keypoints")
        start = time.perf_counter()
        results = self._run(query, support=support, kpts=points, task="visual")
        return self._detection_outputs(query, results, time.perf_counter() - start)

    # The support's events (upload, click, edit, clear) share one queue and read the unmarked image
    # and the list from gr.State, which the server reads when an event runs; component values are
    # captured by the page when an event is sent, so two quick events would both see the old list.
    def support_uploaded(self, support_path: str | None):
        """A new support: (shown, unmarked copy, unmarked state, keypoints text, keypoints state, size note)."""
        shown, plain, info = _checked_upload(support_path, "support image", "click on it to add keypoints")
        return shown, plain, plain, "", "", info

    def support_clicked(self, support_path: str | None, points_text: str | None, evt: gr.SelectData):
        """A click on the support adds a keypoint: (support with numbered dots, keypoints text, state)."""
        support = load_image(support_path, "support image", self.to_rgb)
        x, y = click_position(evt.index, support.size, "support click")
        points_text = add_point(points_text, x, y, "support keypoints")
        return self._marked_support(support, points_text), points_text, points_text

    def points_edited(self, support_path: str | None, points_text: str | None):
        """The list was typed in (or cleared): (support redrawn with it, keypoints state)."""
        if not support_path:
            return None, points_text
        support = load_image(support_path, "support image", self.to_rgb)
        try:
            return self._marked_support(support, points_text), points_text
        except InputError:  # a half-typed list: show the plain image, detection will name the problem
            return support, points_text

    @staticmethod
    def _marked_support(support, points_text: str | None):
        if not (points_text or "").strip():
            return support
        points = parse_points(points_text, support.size, "support keypoints")
        return draw_keypoints(support, points, [str(i) for i in range(1, len(points) + 1)])

    # -- textual prompt -----------------------------------------------------------------------
    def detect_textual(self, query_path: str | None, names_text: str | None):
        """Query + keypoint names -> (query with predictions, table rows, status)."""
        self._require_model()
        query = load_image(query_path, "query image", self.to_rgb)
        names = parse_names(names_text, "keypoint names")
        start = time.perf_counter()
        results = self._run(query, kpt_names=names, task="textual")
        return self._detection_outputs(query, results, time.perf_counter() - start)

    # -- semantic understanding ---------------------------------------------------------------
    def identify(self, query_path: str | None, point_text: str | None):
        """Query + one point -> (query with the point and its name, the name, status)."""
        self._require_model()
        query = load_image(query_path, "image", self.to_rgb)
        points = parse_points(point_text, query.size, "point", hint="click on the image to pick one")
        if len(points) != 1:
            raise InputError(f"point: {len(points)} points given; this task names one keypoint at a time")
        point = points[0]
        start = time.perf_counter()
        results = self._run(query, kpts=[point], task="semantic")
        name = results[0]["name"]
        answer = name if name else "(no name: the model's answer named no keypoint)"
        picture = draw_keypoints(query, [point], [name or "?"], min_side=RESULT_MIN_SIDE)
        return picture, answer, f"answered in {time.perf_counter() - start:.2f} s"

    def semantic_uploaded(self, image_path: str | None):
        """(shown, unmarked copy, unmarked state, point text, size note) for a new image."""
        shown, plain, info = _checked_upload(image_path, "image", "click a point to name it")
        return shown, plain, plain, "", info

    def semantic_clicked(self, image_path: str | None, evt: gr.SelectData):
        """A click picks the point to name (one at a time): (image with the point, point text)."""
        image = load_image(image_path, "image", self.to_rgb)
        x, y = click_position(evt.index, image.size, "click")
        return draw_keypoints(image, [(x, y)], [""]), f"{x:.1f}, {y:.1f}"


def _checked_upload(path: str | None, field: str, hint: str) -> tuple[str | None, str | None, str]:
    """(shown image, unmarked copy, size note) for an upload; a bad file is taken off the page with a warning."""
    if path is None:  # the upload was cleared
        return None, None, ""
    try:
        image = load_image(path, field)
    except InputError as err:
        gr.Warning(str(err))
        return None, None, ""
    return path, path, f"{field.capitalize()}: {image.width}x{image.height} px; {hint}."


def shown_to_user(fn: Callable) -> Callable:
    """Input problems become a short gr.Error message; anything else a generic one (details in the log)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        try:
            return fn(*args, **kwargs)
        except InputError as err:
            raise gr.Error(str(err), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as err:
            logger.exception("%s failed", fn.__name__)
            raise gr.Error(f"Something went wrong ({type(err).__name__}); the Space log has the details.") from None

    return wrapper


def detection_results(tab: str, picture_label: str) -> tuple[gr.Image, gr.Dataframe, gr.Markdown]:
    """The picture, table and status that a detection tab shows, side by side; ids start with `tab`."""
    with gr.Row():
        picture = gr.Image(format="png", label=picture_label, interactive=False, elem_id=f"{tab}-result-image")
        with gr.Column():
            table = gr.Dataframe(headers=TABLE_HEADERS, label="Predictions", interactive=False, elem_id=f"{tab}-result-table")
            status = gr.Markdown(label="Status", elem_id=f"{tab}-status")
    return picture, table, status


def uploaded_image(**kwargs: Any) -> gr.Image:
    """gr.Image(type="filepath") that hands over the uploaded file's path unopened.

    gr.Image itself opens every upload with Pillow before the app sees it, so a non-image file
    would fail inside gradio with a bare "Error"; `space_inputs.load_image` checks it instead (size
    caps on the header, before decoding) and says why. Overridden on the instance: a gr.Image
    subclass would make gradio write a .pyi stub beside this file at import time.
    """
    component = gr.Image(type="filepath", format="png", **kwargs)
    default_preprocess = component.preprocess

    def preprocess(payload):
        if payload is None or payload.path is None:  # nothing, or a data: URL
            return default_preprocess(payload)
        return str(payload.path)

    component.preprocess = preprocess
    return component


INTRO = f"""# KptLLM: keypoint comprehension with a multimodal LLM
Identify-then-detect: the model writes the keypoint's name, then `<keypoint>`, whose hidden state
is regressed to a position. The whole image is the instance box, so crop to one object first.
Limits: images up to {MAX_IMAGE_SIDE} px a side and {MAX_IMAGE_PIXELS / 1e6:g} MP, uploads up to
{MAX_UPLOAD_MB} MB, at most {MAX_KEYPOINTS} keypoints per request."""


def build_demo(model_dir: str | None) -> gr.Blocks:
    """The Space's page for the KptLLM at `model_dir` (a folder or Hub repo id; None: none available)."""
    service = KeypointService(model_dir)
    guard = shown_to_user
    # one model call at a time, whichever tab asks: on a CPU Space parallel calls only slow each other down
    model_queue = {"concurrency_id": "model", "concurrency_limit": 1}
    with gr.Blocks(title="KptLLM", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(service.banner, elem_id="model-banner")
        with gr.Tab("Visual prompt", id="visual"):
            gr.Markdown("Upload a query and a support image, click keypoints on the support, press **Detect**.")
            with gr.Row():
                query = uploaded_image(label="Query image", elem_id="visual-query")
                support = uploaded_image(label="Support image: click to add keypoints", elem_id="visual-support")
            # the unmarked support: the visible one shows numbered dots once clicked
            support_plain = uploaded_image(visible=False, label="Support image (unmarked)")
            support_info = gr.Markdown(elem_id="visual-support-info")
            points = gr.Textbox(label="Support keypoints (x, y per line; click or type)", lines=4, elem_id="visual-points")
            with gr.Row():
                clear = gr.Button("Clear keypoints", elem_id="visual-clear")
                detect = gr.Button("Detect", variant="primary", elem_id="visual-detect")
            visual_picture, visual_table, visual_status = detection_results("visual", "Predictions on the query")
            support_state, points_state = gr.State(None), gr.State("")  # what the click handlers read
            one_queue = {"concurrency_id": "visual-support", "concurrency_limit": 1, "api_visibility": "private"}
            support.upload(
                guard(service.support_uploaded), support, [support, support_plain, support_state, points, points_state, support_info],
                **one_queue,
            )
            support.clear(lambda: (None, None, "", "", ""), None, [support_plain, support_state, points, points_state, support_info], **one_queue)
            support.select(guard(service.support_clicked), [support_state, points_state], [support, points, points_state], **one_queue)
            clear.click(lambda: "", None, points, **one_queue).then(
                guard(service.points_edited), [support_state, points], [support, points_state], **one_queue
            )
            points.blur(guard(service.points_edited), [support_state, points], [support, points_state], **one_queue)
            detect.click(
                guard(service.detect_visual), [query, support_plain, points], [visual_picture, visual_table, visual_status],
                api_name="detect_visual", **model_queue,
            )

        with gr.Tab("Textual prompt", id="textual"):
            gr.Markdown("Upload an image, type keypoint names (commas or new lines), press **Detect**.")
            with gr.Row():
                text_query = uploaded_image(label="Query image", elem_id="textual-query")
                names = gr.Textbox(label="Keypoint names", lines=4, placeholder="left eye, nose, tail tip", elem_id="textual-names")
            text_detect = gr.Button("Detect", variant="primary", elem_id="textual-detect")
            text_picture, text_table, text_status = detection_results("textual", "Predictions")
            text_detect.click(
                guard(service.detect_textual), [text_query, names], [text_picture, text_table, text_status], api_name="detect_textual",
                **model_queue,
            )

        with gr.Tab("What is this keypoint?", id="semantic"):
            gr.Markdown("Upload an image and click a point: the model names it.")
            with gr.Row():
                sem_image = uploaded_image(label="Image: click a point", elem_id="semantic-image")
                with gr.Column():
                    sem_point = gr.Textbox(label="Point (x, y)", elem_id="semantic-point")
                    ask = gr.Button("What is this keypoint?", variant="primary", elem_id="semantic-ask")
                    sem_name = gr.Textbox(label="Keypoint name", interactive=False, elem_id="semantic-name")
                    sem_status = gr.Markdown(label="Status", elem_id="semantic-status")
            sem_info = gr.Markdown(elem_id="semantic-image-info")
            sem_plain = uploaded_image(visible=False, label="Image (unmarked)")
            sem_picture = gr.Image(format="png", label="Answer", interactive=False, elem_id="semantic-result-image")
            identify = guard(service.identify)
            sem_state = gr.State(None)
            sem_queue = {"concurrency_id": "semantic-image", "concurrency_limit": 1, "api_visibility": "private"}
            sem_image.upload(
                guard(service.semantic_uploaded), sem_image, [sem_image, sem_plain, sem_state, sem_point, sem_info], **sem_queue
            )
            sem_image.clear(lambda: (None, None, "", ""), None, [sem_plain, sem_state, sem_point, sem_info], **sem_queue)
            sem_image.select(guard(service.semantic_clicked), sem_state, [sem_image, sem_point], **sem_queue).success(
                identify, [sem_plain, sem_point], [sem_picture, sem_name, sem_status], api_visibility="private", **model_queue
            )
            ask.click(
                identify, [sem_plain, sem_point], [sem_picture, sem_name, sem_status], api_name="identify_keypoint", **model_queue
            )
    return demo


@dataclass
class SpaceArguments:
    model: str | None = field(default=None, metadata={"help": f"KptLLM folder or Hub repo id; unset: ${MODEL_ENV}, else runs/tiny/model"})
    host: str | None = field(default=None, metadata={"help": "address to serve on; unset: gradio's (127.0.0.1, or 0.0.0.0 on a Space)"})
    port: int | None = field(default=None, metadata={"help": "port; unset: gradio's (7860)"})


def launch(demo: gr.Blocks, host: str | None = None, port: int | None = None, **kwargs):
    """Serve `demo` with the Space's upload cap, no share link, no server-side rendering (no Node)."""
    return demo.launch(
        server_name=host, server_port=port, share=False, ssr_mode=False, max_file_size=f"{MAX_UPLOAD_MB}mb",
        mcp_server=False, **kwargs,
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    (args,) = HfArgumentParser(SpaceArguments).parse_args_into_dataclasses()
    source = args.model or default_model_source()
    launch(build_demo(source), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
