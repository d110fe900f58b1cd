"""KptLLM processor: crops instances, builds the `[z_q, z_p, t]` token sequences, maps predictions back.

One call handles one or more query instances (several images, several boxes per image) and K
keypoints, and returns K sequences (one per keypoint) per instance, so `model.detect_keypoints(**inputs)`
answers every keypoint of every instance in one batched call, and
`post_process_keypoint_detection(outputs)` maps the answers back to each image and box.
Coordinates given to and returned by the processor are pixels of the original images; inside the
model they are normalized to [0, 1] in the square crop around the instance's box.
This file ships to the Hub as remote code: relative imports only.
"""

import math
import numbers
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin

from .configuration_kptllm import read_json_file

IMAGE_TOKEN = "<image>"
KPT_PROMPT_TOKEN = "<kpt_prompt>"
KEYPOINT_TOKEN = "<keypoint>"
SPECIAL_TOKENS = (IMAGE_TOKEN, KPT_PROMPT_TOKEN, KEYPOINT_TOKEN)

DEFAULT_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
TASKS = ("semantic", "visual", "textual", "visual+textual")
QUESTIONS = {
    "semantic": "What is this keypoint?",
    "visual": "Find the corresponding keypoint.",
    "textual": "Where is the {name}?",
    "visual+textual": "Find the corresponding keypoint, the {name}.",
}
ANSWER_PATTERN = re.compile(r"(?:This|It) is the (.+?)\.")

Box = tuple[float, float, float]  # (x0, y0, side) of a square crop in original pixels
RETURN_TENSORS = (None, "pt", "np")  # the model takes "pt" (None: the same)
# JSON files a processor folder may hold: parsed first so that a damaged one is named (the tokenizer's own
# error is a bare JSONDecodeError)
PROCESSOR_JSON_FILES = (
    "processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.json",
)


def to_rgb_image(image: Image.Image, field: str = "image") -> Image.Image:
    """Any PIL image as 8-bit RGB: high bit depths rescaled, transparency composited on white.

    Pillow's `convert("RGB")` clips 16-bit and 32-bit images at 255 (a 16-bit photo turns ~white)
    and truncates float images (a [0, 1] float image turns black), so those are rescaled first:
    16-bit by dropping the low byte, 32-bit integers by their range (8 or 16 bits), floats as [0, 1]
    or [0, 255] intensities. Transparent pixels go on white, not black, which would hide dark
    objects. The COCO readers, this processor and the Space all convert with this one function.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"{field}: the {image.mode}-mode image contains NaN or infinity")
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if image.mode == "F" and low >= 0 and high <= 1:
            values = values * 255  # [0, 1] intensities (the usual float image)
        elif image.mode == "I" and 255 < high <= 65535 and low >= 0:
            values = values / 257  # 16-bit content in a 32-bit image (some PNG and TIFF decoders)
        elif low < 0 or high > 255:
            raise ValueError(
                f"{field}: the {image.mode}-mode image holds values in [{low:g}, {high:g}]; expected intensities in "
                + ("[0, 1] or [0, 255]" if image.mode == "F" else "[0, 255] or [0, 65535]")
            )
        return Image.fromarray(np.round(values).astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _to_rgb_image(image, field: str) -> Image.Image:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise TypeError(f"{field}: numpy images must be uint8 HxW or HxWxC, got {image.dtype} {image.shape}")
        if image.ndim == 3 and image.shape[2] not in (1, 3, 4):
            raise ValueError(
                f"{field}: a HxWxC uint8 array needs C = 1 (grey), 3 (RGB) or 4 (RGBA) channels, got shape {image.shape}"
            )
        if 0 in image.shape[:2]:
            raise ValueError(f"{field}: the image is empty ({image.shape[1]}x{image.shape[0]} pixels)")
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"{field} must be a PIL.Image.Image or a uint8 numpy array, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"{field}: the image is empty ({image.width}x{image.height} pixels)")
    return to_rgb_image(image, field)


def _as_points(points, field: str, num: int | None = None) -> np.ndarray:
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{field} must be a sequence of (x, y) pairs: {err}") from None
    if array.ndim != 2 or array.shape[1] != 2 or len(array) == 0:
        raise ValueError(f"{field} must have shape (K, 2) with K >= 1, got {array.shape}")
    if num is not None and len(array) != num:
        raise ValueError(f"{field} has {len(array)} keypoints, expected {num}")
    return array


def _as_flags(flags, field: str, num: int) -> np.ndarray:
    array = np.ones(num, dtype=bool) if flags is None else np.asarray(flags).astype(bool).reshape(-1)
    if len(array) != num:
        raise ValueError(f"{field} has {len(array)} entries, expected {num}")
    return array


def box_problem(bbox: Sequence[float], image_size: tuple[int, int]) -> str | None:
    """Why `bbox` ([x, y, w, h] pixels) cannot be an instance box on an image of `image_size` (None: it can).

    A box may stick out of its image a little (annotators' boxes often do), but one that reaches more
    than the image's own size beyond an edge is in another image's pixels or a typo (a 2e9 px box
    would make the whole image a speck in the crop), so it is refused rather than cropped.
    """
    width, height = image_size
    x, y, w, h = bbox
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return "contains NaN or infinity"
    if w <= 0 or h <= 0:
        return f"is empty (w={w:g}, h={h:g})"
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return f"lies outside the {width}x{height} image"
    if x < -width or y < -height or x + w > 2 * width or y + h > 2 * height:
        return f"reaches more than the image's own size beyond the {width}x{height} image (pixels of another image?)"
    return None


def check_crop_padding(padding: float) -> None:
    if isinstance(padding, bool) or not isinstance(padding, numbers.Real) or not math.isfinite(padding) or padding <= 0:
        raise ValueError(f"crop_padding must be a positive number (the crop side is crop_padding x the box side), got {padding!r}")


def square_crop_box(bbox: Sequence[float] | None, image_size: tuple[int, int], padding: float, field: str) -> Box:
    """The square crop around `bbox` ([x, y, w, h] pixels; None = whole image), scaled by `padding`.

    Square (the long side of the box) so that resizing keeps the aspect ratio, as mmpose's top-down
    affine does; parts outside the image are filled with black.
    """
    check_crop_padding(padding)
    width, height = image_size
    if width < 1 or height < 1:
        raise ValueError(f"the image of {field} is empty ({width}x{height} pixels)")
    if bbox is None:
        bbox = (0.0, 0.0, float(width), float(height))
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise ValueError(f"{field} must be [x, y, w, h], got {bbox!r}") from None
    problem = box_problem((x, y, w, h), (width, height))
    if problem:
        raise ValueError(f"{field} {list(bbox)!r} {problem}")
    side = max(w, h) * padding
    return (x + w / 2 - side / 2, y + h / 2 - side / 2, side)


def normalize_points(points: np.ndarray, box: Box) -> np.ndarray:
    x0, y0, side = box
    return (points - np.array([x0, y0])) / side


def denormalize_points(points: np.ndarray, box: Box) -> np.ndarray:
    x0, y0, side = box
    return np.asarray(points, dtype=np.float64) * side + np.array([x0, y0])


def _is_box(value) -> bool:
    """A single [x, y, w, h] (not a list of boxes)."""
    return isinstance(value, (Sequence, np.ndarray, torch.Tensor)) and not isinstance(value, str) and len(value) == 4 and all(
        isinstance(v, numbers.Real) or (isinstance(v, (np.ndarray, torch.Tensor)) and v.ndim == 0) for v in value
    )


def boxes_per_image(query_bbox, num_images: int, batched: bool, field: str = "query_bbox") -> list[list]:
    """`query_bbox` as one list of boxes ([x, y, w, h] or None: the whole image) per query image.

    One image takes None, a box or a list of boxes; a list of images takes a list with one such entry
    per image (or None: every image whole).
    """
    def of_one_image(value, name: str) -> list:
        if value is None or _is_box(value):
            return [value]
        if isinstance(value, (Sequence, np.ndarray, torch.Tensor)) and not isinstance(value, str) and len(value) > 0:
            if all(_is_box(box) for box in value):
                return list(value)
        raise ValueError(f"{name} must be [x, y, w, h], a list of such boxes or None, got {value!r}")

    if not batched:
        return [of_one_image(query_bbox, field)]
    if query_bbox is None:
        return [[None] for _ in range(num_images)]
    if isinstance(query_bbox, str) or not isinstance(query_bbox, (Sequence, np.ndarray)) or len(query_bbox) != num_images:
        raise ValueError(
            f"{field} must hold one entry per query image ({num_images}): None, [x, y, w, h] or a list of boxes"
        )
    return [of_one_image(value, f"{field}[{index}]") for index, value in enumerate(query_bbox)]


@dataclass(frozen=True)
class KeypointLayout:
    """Where the rows of one processor call came from: what `post_process_keypoint_detection` needs.

    Rows are instance-major (K per instance), instances image-major (an image's boxes in order).
    """

    image_sizes: list[tuple[int, int]]  # (height, width) of each query image, transformers' convention
    boxes: list[list[list[float]]]  # per image, its instance boxes [x, y, w, h] (the whole image where none was given)
    crop_boxes: list[Box]  # per instance, the square crop (x0, y0, side) its coordinates are normalized in
    num_keypoints: int  # K: rows per instance


class KptLlmProcessor(ProcessorMixin):
    r"""Builds KptLLM inputs for the three tasks.

    Args:
        image_processor: normalizes crops (a CLIP image processor); its crop size is the model's input size.
        tokenizer: a tokenizer that knows `<image>`, `<kpt_prompt>` and `<keypoint>` as special tokens.
        image_seq_length: placeholders per query image (patches of the vision tower; 576 in the paper).
        crop_padding: the crop side is `crop_padding * max(w, h)` of the instance box.
        system_prompt: Vicuna-v1 system prompt that starts every sequence.
        max_image_pixels: larger inputs are refused (decompression bombs, accidental huge uploads).
        shot_fusion: as the model config's: "mean" writes one `<kpt_prompt>` per sequence, "per_shot"
            one per support shot.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_seq_length: int = 576,
        crop_padding: float = 1.0,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        max_image_pixels: int = 64_000_000,
        shot_fusion: str = "mean",
        chat_template=None,
        **kwargs,
    ):
        check_crop_padding(crop_padding)
        self.image_seq_length = image_seq_length
        self.crop_padding = crop_padding
        self.system_prompt = system_prompt
        self.max_image_pixels = max_image_pixels
        if shot_fusion not in ("mean", "per_shot"):
            raise ValueError(f"shot_fusion={shot_fusion!r}; expected 'mean' or 'per_shot'")
        self.shot_fusion = shot_fusion
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        missing = [t for t in SPECIAL_TOKENS if t not in self.tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"the tokenizer lacks the special tokens {missing}; add them with add_special_tokens")
        self.image_token_id, self.kpt_prompt_token_id, self.keypoint_token_id = (
            self.tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        source = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(source):
            for name in PROCESSOR_JSON_FILES:
                if (Path(source) / name).is_file():
                    read_json_file(Path(source) / name)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    # the one conversion to 8-bit RGB, for callers that prepare images themselves (the Space draws on them)
    to_rgb_image = staticmethod(to_rgb_image)

    @property
    def image_size(self) -> int:
        crop = self.image_processor.crop_size
        return crop["height"] if isinstance(crop, dict) else crop.height

    # -- images -----------------------------------------------------------------------------
    def _load(self, image, field: str) -> Image.Image:
        image = _to_rgb_image(image, field)
        if image.width * image.height > self.max_image_pixels:
            raise ValueError(
                f"{field} is {image.width}x{image.height} pixels, over max_image_pixels={self.max_image_pixels}"
            )
        return image

    def _crop(self, image: Image.Image, box: Box) -> Image.Image:
        x0, y0, side = box
        size = self.image_size
        return image.transform(
            (size, size), Image.Transform.EXTENT, data=(x0, y0, x0 + side, y0 + side), resample=Image.Resampling.BICUBIC
        )

    def _pixel_values(self, crops: list[Image.Image]) -> torch.Tensor:
        processed = self.image_processor(
            crops, do_resize=False, do_center_crop=False, return_tensors="pt"
        )
        return processed["pixel_values"]

    def _points_in_image(self, points: np.ndarray, visible: np.ndarray, image: Image.Image, field: str) -> None:
        if not np.isfinite(points[visible]).all():
            raise ValueError(f"{field} contains NaN or infinity")
        outside = visible & ((points < 0).any(1) | (points[:, 0] > image.width) | (points[:, 1] > image.height))
        if outside.any():
            index = int(np.flatnonzero(outside)[0])
            raise ValueError(
                f"{field}[{index}] = {points[index].tolist()} lies outside the {image.width}x{image.height} image"
            )

    def _points_in_crop(self, normalized: np.ndarray, visible: np.ndarray, field: str) -> None:
        outside = visible & ((normalized < 0) | (normalized > 1)).any(1)
        if outside.any():
            index = int(np.flatnonzero(outside)[0])
            raise ValueError(
                f"{field}[{index}] lies outside the instance box crop; pass a bbox that contains it "
                "(or mark the keypoint invisible)"
            )

    # -- text -------------------------------------------------------------------------------
    def _check_texts(self, texts: Sequence[str], field: str) -> None:
        """Names and descriptions are plain text: a control token inside one would be read as that token
        (a name holding `<keypoint>` would end the answer early, `</s>` end the sequence), so it is refused."""
        controls = sorted(set(SPECIAL_TOKENS) | set(self.tokenizer.all_special_tokens))
        for index, text in enumerate(texts):
            found = [token for token in controls if token in text]
            if found:
                raise ValueError(
                    f"{field}[{index}] = {text[:60]!r} contains the control token {found[0]!r}; keypoint names and "
                    f"descriptions may not contain any of {controls}"
                )

    def build_prompt(self, task: str, question_name: str | None = None, num_shots: int = 1) -> str:
        """The user turn up to "ASSISTANT:" with `<image>` expanded to `image_seq_length` placeholders."""
        parts = [IMAGE_TOKEN * self.image_seq_length]
        if task != "textual":
            parts.append(KPT_PROMPT_TOKEN * (num_shots if self.shot_fusion == "per_shot" else 1))
        parts.append(QUESTIONS[task].format(name=question_name))
        return f"{self.system_prompt} USER: " + "\n".join(parts) + " ASSISTANT:"

    @staticmethod
    def build_answer(task: str, name: str | None, identify_then_detect: bool = True) -> str:
        if task == "semantic":
            return f" This is the {name}."
        if not identify_then_detect:
            return f" {KEYPOINT_TOKEN}"
        return f" It is the {name}. {KEYPOINT_TOKEN}"

    def _tokenize(self, prompts: list[str], answers: list[str] | None, prefill: list[str] | None) -> dict:
        """Prompt ids (+ answer ids and eos), left-padded; labels are -100 everywhere but the answer."""
        sequences, label_rows = [], []
        for i, prompt in enumerate(prompts):
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            labels = [-100] * len(ids)
            if prefill is not None:  # no-ItD inference: <keypoint> is forced right after the prompt
                ids = ids + self.tokenizer(prefill[i], add_special_tokens=False)["input_ids"]
            if answers is not None:
                answer = self.tokenizer(answers[i], add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
                ids, labels = ids + answer, labels + answer
            sequences.append(ids)
            label_rows.append(labels)
        length = max(len(s) for s in sequences)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = {
            "input_ids": torch.tensor([[pad_id] * (length - len(s)) + s for s in sequences]),
            "attention_mask": torch.tensor([[0] * (length - len(s)) + [1] * len(s) for s in sequences]),
        }
        if answers is not None:
            out["labels"] = torch.tensor([[-100] * (length - len(s)) + s for s in label_rows])
        return out

    # -- the call ---------------------------------------------------------------------------
    def __call__(
        self,
        query=None,
        support=None,
        kpts=None,
        *,
        task: str = "visual",
        kpt_names: Sequence[str] | None = None,
        text: Sequence[str] | None = None,
        query_bbox=None,
        support_bbox=None,
        support_visible=None,
        query_kpts=None,
        query_visible=None,
        return_labels: bool = False,
        identify_then_detect: bool = True,
        **kwargs,
    ) -> BatchFeature:
        """Inputs for one or more query instances and K keypoints (K sequences per instance).

        Args:
            query: the query image (PIL or uint8 array), or a list of them; every instance is asked for
                the same K keypoints (the same support and kpts, or the same names).
            support: support image, or a list of them (K-shot) for `task="visual"`/"visual+textual".
            kpts: (K, 2) pixel keypoints on the support image (a list of them for several shots); for
                `task="semantic"` the points on the query image to name.
            task: "visual", "textual", "semantic" or "visual+textual".
            kpt_names: K keypoint names: the textual prompt, and the answers when `return_labels`.
            text: K descriptions to ask for instead of the names in textual tasks.
            query_bbox: [x, y, w, h] instance box (None: the whole image) or a list of boxes (several
                instances on the image); for a list of queries, one such entry per image.
            support_bbox: [x, y, w, h] instance box on the support (None: the whole image); one per shot.
            support_visible: (S, K) or (K,) flags; invisible shots are left out of a keypoint's prompt.
            query_kpts / query_visible: (K, 2) pixel targets on the query (training and evaluation).
            return_labels: also return `labels` holding the answers (needs `kpt_names`).
            identify_then_detect: False builds the no-ItD ablation (answer is `<keypoint>` alone).

        Besides the model inputs, the result holds `keypoint_layout` (image sizes and boxes), which
        `detect_keypoints` passes on to its output so that `post_process_keypoint_detection(outputs)` maps
        every row back to its image and box, and, for several instances, `query_index` (the query crop of
        each row, a model input).
        """
        if task not in TASKS:
            raise ValueError(f"task={task!r}; expected one of {TASKS}")
        return_tensors = kwargs.get("return_tensors")
        if return_tensors not in RETURN_TENSORS:
            raise ValueError(f"return_tensors={return_tensors!r}; expected 'pt' (what the model takes) or 'np'")
        batched = isinstance(query, (list, tuple))
        queries = list(query) if batched else [query]
        if not queries:
            raise ValueError("query is an empty list: pass at least one query image")
        query_images = [self._load(image, f"query[{i}]" if batched else "query") for i, image in enumerate(queries)]
        per_image = boxes_per_image(query_bbox, len(query_images), batched)
        crops, crop_boxes, boxes = [], [], []
        for index, (image, image_boxes) in enumerate(zip(query_images, per_image)):
            boxes.append([])
            for number, bbox in enumerate(image_boxes):
                field = "query_bbox" + (f"[{index}]" if batched else "") + (f"[{number}]" if len(image_boxes) > 1 else "")
                crop_box = square_crop_box(bbox, image.size, self.crop_padding, field)
                crops.append(self._crop(image, crop_box))
                crop_boxes.append(crop_box)
                boxes[-1].append([float(v) for v in bbox] if bbox is not None else [0.0, 0.0, float(image.width), float(image.height)])
        num_instances = len(crops)
        if num_instances > 1 and task == "semantic":
            raise ValueError("the semantic task names points of one query instance: call the processor once per instance")
        if num_instances > 1 and query_kpts is not None:
            raise ValueError("query_kpts (training targets) need a single query instance: call the processor once per instance")
        query_image, query_box = query_images[0], crop_boxes[0]  # the semantic task's and the targets' one instance
        data: dict[str, torch.Tensor] = {"pixel_values": self._pixel_values(crops)}  # (I, 3, H, W)

        num_kpts = None
        if task in ("semantic", "visual", "visual+textual"):
            if kpts is None:
                raise ValueError(f"task={task!r} needs kpts (the keypoint prompt positions)")
            if task == "semantic":
                points = _as_points(kpts, "kpts")
                num_kpts = len(points)
                self._points_in_image(points, np.ones(num_kpts, bool), query_image, "kpts")
                coords = normalize_points(points, query_box)
                self._points_in_crop(coords, np.ones(num_kpts, bool), "kpts")
                data["support_pixel_values"] = data["pixel_values"]
                data["prompt_coords"] = torch.tensor(coords, dtype=torch.float32)[:, None]  # (K, 1, 2)
                data["prompt_visible"] = torch.ones(num_kpts, 1, dtype=torch.long)
            else:
                data.update(self._support_inputs(support, kpts, support_bbox, support_visible))
                num_kpts = data["prompt_coords"].shape[0]
        names_in_question = task in ("textual", "visual+textual")
        if names_in_question or return_labels:
            if kpt_names is None:
                raise ValueError(f"task={task!r} needs kpt_names" if names_in_question else "return_labels needs kpt_names")
            if isinstance(kpt_names, str) or not all(isinstance(n, str) and n.strip() for n in kpt_names):
                raise TypeError("kpt_names must be a list of non-empty strings")
            if num_kpts is not None and len(kpt_names) != num_kpts:
                raise ValueError(f"kpt_names has {len(kpt_names)} names for {num_kpts} keypoints")
            self._check_texts(kpt_names, "kpt_names")
            num_kpts = len(kpt_names)
        if text is not None and (isinstance(text, str) or len(text) != num_kpts):
            raise ValueError(f"text must be a list of {num_kpts} descriptions")
        if text is not None:
            if not all(isinstance(t, str) and t.strip() for t in text):
                raise TypeError("text must be a list of non-empty strings")
            self._check_texts(text, "text")
        question_names = list(text) if text is not None else (list(kpt_names) if kpt_names is not None else [None] * num_kpts)

        num_shots = data["prompt_coords"].shape[1] if "prompt_coords" in data else 1
        prompts = [self.build_prompt(task, name, num_shots) for name in question_names]
        answers = prefill = None
        if return_labels:
            answers = [self.build_answer(task, name, identify_then_detect) for name in kpt_names]
        elif not identify_then_detect and task != "semantic":
            prefill = [self.build_answer(task, None, identify_then_detect=False)] * num_kpts
        data.update(self._tokenize(prompts, answers, prefill))

        if query_kpts is not None:
            targets = _as_points(query_kpts, "query_kpts", num_kpts)
            visible = _as_flags(query_visible, "query_visible", num_kpts)
            self._points_in_image(targets, visible, query_image, "query_kpts")
            normalized = normalize_points(targets, query_box)
            self._points_in_crop(normalized, visible, "query_kpts")
            normalized[~visible] = 0.0
            data["keypoint_labels"] = torch.tensor(normalized, dtype=torch.float32)
            data["keypoint_visible"] = torch.tensor(visible, dtype=torch.long)
        if num_instances > 1:  # every instance asks the same K rows, instance after instance
            for key in ("input_ids", "attention_mask", "labels", "prompt_coords", "prompt_visible"):
                if key in data:
                    data[key] = data[key].repeat(num_instances, *[1] * (data[key].ndim - 1))
            data["query_index"] = torch.arange(num_instances).repeat_interleave(num_kpts)  # (I*K,)
        if return_tensors == "np":
            data = {key: value.numpy() for key, value in data.items()}
        layout = KeypointLayout(
            image_sizes=[(image.height, image.width) for image in query_images], boxes=boxes, crop_boxes=crop_boxes,
            num_keypoints=num_kpts,
        )
        return BatchFeature(data={**data, "keypoint_layout": layout}, tensor_type=return_tensors)

    def _support_inputs(self, support, kpts, support_bbox, support_visible) -> dict[str, torch.Tensor]:
        if support is None:
            raise ValueError("the visual task needs a support image")
        many = isinstance(support, (list, tuple))
        images = list(support) if many else [support]
        point_sets = list(kpts) if many else [kpts]
        boxes = list(support_bbox) if many and support_bbox is not None else [support_bbox] * len(images)
        if len(point_sets) != len(images) or len(boxes) != len(images):
            raise ValueError(
                f"{len(images)} support images need as many kpts arrays and support_bbox entries "
                f"(got {len(point_sets)} and {len(boxes)})"
            )
        num_shots = len(images)
        num_kpts = len(_as_points(point_sets[0], "kpts[0]" if many else "kpts"))
        visible = np.ones((num_shots, num_kpts), bool) if support_visible is None else np.asarray(support_visible, bool)
        if visible.size != num_shots * num_kpts:
            raise ValueError(f"support_visible must have {num_shots} x {num_kpts} entries, got shape {visible.shape}")
        visible = visible.reshape(num_shots, num_kpts)
        crops, coords = [], []
        for shot, (image, points, bbox) in enumerate(zip(images, point_sets, boxes)):
            suffix = f"[{shot}]" if many else ""
            image = self._load(image, f"support{suffix}")
            points = _as_points(points, f"kpts{suffix}", num_kpts)
            self._points_in_image(points, visible[shot], image, f"kpts{suffix}")
            box = square_crop_box(bbox, image.size, self.crop_padding, f"support_bbox{suffix}")
            normalized = normalize_points(points, box)
            self._points_in_crop(normalized, visible[shot], f"kpts{suffix}")
            normalized[~visible[shot]] = 0.5  # ignored by the model: the shot's weight is 0
            crops.append(self._crop(image, box))
            coords.append(normalized)
        if not visible.any(0).all():
            index = int(np.flatnonzero(~visible.any(0))[0])
            raise ValueError(f"keypoint {index} is invisible in every support shot; it cannot be prompted")
        return {
            "support_pixel_values": self._pixel_values(crops),  # (S, 3, H, W)
            "prompt_coords": torch.tensor(np.stack(coords, axis=1), dtype=torch.float32),  # (K, S, 2)
            "prompt_visible": torch.tensor(visible.T, dtype=torch.long),  # (K, S)
        }

    # -- outputs ----------------------------------------------------------------------------
    def decode_names(self, sequences: torch.Tensor) -> list[str | None]:
        """Keypoint names from generated answers ("It is the left eye. <keypoint>" -> "left eye")."""
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        names = []
        for text in texts:
            match = ANSWER_PATTERN.search(text)
            names.append(match.group(1).strip() if match else None)
        return names

    def post_process_keypoint_detection(
        self, outputs, target_sizes: Sequence[Sequence[int]] | torch.Tensor | None = None, boxes=None
    ) -> list[list[dict]]:
        """`detect_keypoints` outputs -> per query image, one dict per box, in original pixels.

        Each dict holds "keypoints" (K, 2) float tensor of (x, y) pixels (NaN where the model emitted no
        `<keypoint>`), "scores" (K,) (the model's `keypoint_scores`: p(`<keypoint>`) times the geometric
        mean of the probabilities of the naming tokens before it; 0 where no `<keypoint>`), "labels" (K,)
        (the keypoint's index in the prompt: support kpts or kpt_names order), "names" (the K names the
        model wrote, None where none could be read) and "bbox" ([x, y, w, h] tensor: the instance box).

        The image sizes and boxes of the processor call travel with the outputs (`keypoint_layout`), so
        neither argument is needed for `detect_keypoints(**processor(...))`. Given, each replaces the
        recorded value, as in transformers' VitPose/SuperPoint post-processing: `target_sizes` the
        (height, width) of each query image, `boxes` per image a list of [x, y, w, h] (None: the whole image).
        """
        # read as a mapping: a pipeline hands the outputs on as a plain ModelOutput
        layout = outputs.get("keypoint_layout")
        if target_sizes is None and layout is None:
            raise ValueError(
                "these outputs carry no keypoint_layout (they did not come from detect_keypoints(**processor(...))): "
                "pass target_sizes=[(height, width), ...] of the query images, and boxes if the inputs used any"
            )
        if outputs.get("keypoint_scores") is None:
            raise ValueError("outputs lack keypoint_scores: pass what model.detect_keypoints returns")
        sizes = layout.image_sizes if target_sizes is None else self._target_sizes(target_sizes)
        if boxes is not None:
            per_image = boxes_per_image(boxes, len(sizes), batched=True, field="boxes")
        elif layout is not None:
            per_image = layout.boxes
        else:
            per_image = [[None] for _ in sizes]
        if len(per_image) != len(sizes):
            raise ValueError(f"{len(sizes)} image sizes but boxes for {len(per_image)} images")
        if layout is not None and target_sizes is None and boxes is None:
            crop_boxes = layout.crop_boxes
        else:
            crop_boxes = [
                square_crop_box(box, (width, height), self.crop_padding, f"boxes[{index}]")
                for index, ((height, width), image_boxes) in enumerate(zip(sizes, per_image)) for box in image_boxes
            ]
            per_image = [
                [[0.0, 0.0, float(width), float(height)] if box is None else [float(v) for v in box] for box in image_boxes]
                for (height, width), image_boxes in zip(sizes, per_image)
            ]
        num_rows, num_instances = outputs["sequences"].shape[0], len(crop_boxes)
        if num_rows % num_instances or (layout is not None and num_rows != num_instances * layout.num_keypoints):
            raise ValueError(f"{num_rows} keypoint rows do not split into {num_instances} instances of equal size")
        num_kpts = num_rows // num_instances
        names = self.decode_names(outputs["sequences"])
        normalized = outputs["pred_keypoints"].float().cpu().numpy()  # (B, 2), NaN where not found
        found = outputs["keypoint_found"].cpu()
        scores = torch.where(found, outputs["keypoint_scores"].float().cpu(), 0.0)
        found = found.numpy()
        results, instance = [], 0
        for image_boxes in per_image:
            image_results = []
            for box in image_boxes:
                rows = slice(instance * num_kpts, (instance + 1) * num_kpts)
                points = denormalize_points(normalized[rows], crop_boxes[instance])
                points[~found[rows]] = np.nan
                image_results.append({
                    "keypoints": torch.tensor(points, dtype=torch.float32),
                    "scores": scores[rows].clone(),
                    "labels": torch.arange(num_kpts),
                    "names": names[rows],
                    "bbox": torch.tensor(box, dtype=torch.float32),
                })
                instance += 1
            results.append(image_results)
        return results

    @staticmethod
    def _target_sizes(target_sizes) -> list[tuple[int, int]]:
        """(height, width) pairs of whole, positive pixels (a list of pairs or an (N, 2) tensor)."""
        sizes = target_sizes.tolist() if isinstance(target_sizes, (torch.Tensor, np.ndarray)) else target_sizes
        checked = []
        for size in sizes:
            try:
                height, width = size
            except (TypeError, ValueError):
                raise ValueError(f"target_sizes must hold (height, width) per query image, got {size!r}") from None
            if not all(isinstance(v, numbers.Real) and float(v).is_integer() and v >= 1 for v in (height, width)):
                raise ValueError(f"target_sizes must hold (height, width) in whole, positive pixels, got {size!r}")
            checked.append((int(height), int(width)))
        if not checked:
            raise ValueError("target_sizes is empty: pass the (height, width) of each query image")
        return checked


__all__ = ["KeypointLayout", "KptLlmProcessor"]
