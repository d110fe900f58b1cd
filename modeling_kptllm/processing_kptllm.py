"""KptLLM processor: crops instances, builds the `[z_q, z_p, t]` token sequences, maps predictions back.

One call handles one query instance and K keypoints and returns K sequences (one per keypoint), so
`model.detect_keypoints(**inputs)` answers all keypoints of the instance in one batched call.
Coordinates given to and returned by the processor are pixels of the original images; inside the
model they are normalized to [0, 1] in the square crop around the instance's box.
This file ships to the Hub as remote code: relative imports only.
"""

import math
import numbers
import os
import re
from collections import deque
from collections.abc import Sequence
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
RECENT_QUERY_SIZES = 64  # query sizes post_process_keypoints checks image_size against


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
        # sizes of the queries prepared lately: post_process_keypoints(image_size=...) must name one of them
        self._recent_query_sizes: deque[tuple[int, int]] = deque(maxlen=RECENT_QUERY_SIZES)

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
        query_bbox: Sequence[float] | None = None,
        support_bbox=None,
        support_visible=None,
        query_kpts=None,
        query_visible=None,
        return_labels: bool = False,
        identify_then_detect: bool = True,
        **kwargs,
    ) -> BatchFeature:
        """Inputs for one query instance and K keypoints (K sequences).

        Args:
            query: the query image (PIL or uint8 array).
            support: support image, or a list of them (K-shot) for `task="visual"`/"visual+textual".
            kpts: (K, 2) pixel keypoints on the support image (a list of them for several shots); for
                `task="semantic"` the points on the query image to name.
            task: "visual", "textual", "semantic" or "visual+textual".
            kpt_names: K keypoint names: the textual prompt, and the answers when `return_labels`.
            text: K descriptions to ask for instead of the names in textual tasks.
            query_bbox / support_bbox: [x, y, w, h] instance boxes (None: the whole image); one per shot.
            support_visible: (S, K) or (K,) flags; invisible shots are left out of a keypoint's prompt.
            query_kpts / query_visible: (K, 2) pixel targets on the query (training and evaluation).
            return_labels: also return `labels` holding the answers (needs `kpt_names`).
            identify_then_detect: False builds the no-ItD ablation (answer is `<keypoint>` alone).
        """
        if task not in TASKS:
            raise ValueError(f"task={task!r}; expected one of {TASKS}")
        return_tensors = kwargs.get("return_tensors")
        if return_tensors not in RETURN_TENSORS:
            raise ValueError(f"return_tensors={return_tensors!r}; expected 'pt' (what the model takes) or 'np'")
        query_image = self._load(query, "query")
        query_box = square_crop_box(query_bbox, query_image.size, self.crop_padding, "query_bbox")
        data: dict[str, torch.Tensor] = {"pixel_values": self._pixel_values([self._crop(query_image, query_box)])}

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
        self._recent_query_sizes.append(query_image.size)
        if return_tensors == "np":
            data = {key: value.numpy() for key, value in data.items()}
        return BatchFeature(data=data, tensor_type=return_tensors)

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

    def post_process_keypoints(
        self, outputs, image_size: tuple[int, int], query_bbox: Sequence[float] | None = None
    ) -> list[dict]:
        """Model outputs -> [{"name", "x", "y"}] in pixels of the original query image.

        `image_size` is the query's (width, height) and `query_bbox` the box used for the inputs;
        x and y are None where the model emitted no `<keypoint>`, name is None where no name was written.
        Without `query_bbox` the crop is the whole image, so `image_size` must be the size of a query this
        processor prepared (one of the last 64): another size would silently scale every point wrongly.
        """
        try:
            width, height = (int(v) for v in image_size)
        except (TypeError, ValueError):
            raise ValueError(f"image_size must be the query's (width, height), got {image_size!r}") from None
        if (width, height) != tuple(image_size) or width < 1 or height < 1:
            raise ValueError(f"image_size must be the query's (width, height) in whole pixels, got {image_size!r}")
        recent = getattr(self, "_recent_query_sizes", ())
        if query_bbox is None and recent and (width, height) not in recent:
            raise ValueError(
                f"image_size={(width, height)} is not the size of the query this processor prepared "
                f"({recent[-1][0]}x{recent[-1][1]} last): pass image_size=query.size (and the query_bbox used)"
            )
        box = square_crop_box(query_bbox, image_size, self.crop_padding, "query_bbox")
        names = self.decode_names(outputs.sequences)
        points = denormalize_points(outputs.pred_keypoints.float().cpu().numpy(), box)
        results = []
        for name, (x, y), found in zip(names, points, outputs.keypoint_found.tolist()):
            results.append({"name": name, "x": float(x) if found else None, "y": float(y) if found else None})
        return results


__all__ = ["KptLlmProcessor"]
