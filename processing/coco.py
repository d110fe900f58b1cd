"""Readers for COCO-keypoint annotation files (MP-100, AP-10K, and any COCO-format set).

Every dataset KptLLM trains or evaluates on is stored as COCO keypoints JSON. The readers here turn
one file into a flat :class:`datasets.Dataset` with one row per object instance, so that episode
sampling (:mod:`processing.episodes`), the collator and the metrics all index the same rows.

Real annotation files are messy; the policy is "a clear error for a broken file, a counted and
logged skip for an unusable instance":

* broken JSON, missing required fields, a keypoint array whose length is not ``3 * K``, NaN/inf
  numbers, unknown image/category references and duplicate ids raise :class:`ValueError` naming the
  file and the annotation, because silently dropping them would hide a corrupt file;
* instances that are well formed but unusable (crowd regions, empty boxes, boxes outside or far
  beyond their image, no visible keypoint, missing or oversized image file) are skipped and counted
  in a :class:`LoadReport`;
* a *visible* keypoint lying outside its bounding box (beyond a small tolerance) is marked
  invisible, not fatal to the instance: the model only ever sees the bbox crop, so such a point has
  no valid target inside the crop, while the instance's other keypoints are still good training
  and evaluation data. These are counted in ``LoadReport.keypoints_outside_bbox``.

Visibility follows COCO/MP-100 practice: ``v > 0`` (labelled, whether or not occluded) counts as
visible, ``v == 0`` (not labelled) as invisible, and the coordinates of invisible keypoints are
zeroed so that no downstream code can accidentally use them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import numpy as np
from datasets import Dataset, Features, List, Value
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from modeling_kptllm.processing_kptllm import box_problem, to_rgb_image

logger = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
"""Images larger than this (50 megapixels) are rejected: no keypoint benchmark needs them, and a
huge or decompression-bomb file would otherwise exhaust memory in a data-loader worker."""

DEFAULT_BBOX_TOLERANCE = 0.05
"""How far (as a fraction of the bbox side, at least one pixel) a visible keypoint may lie outside
its bbox before it is marked invisible; annotators' boxes are often a few pixels tight."""

MP100_SUBSETS = ("train", "val", "test")

CLAMP_PROTOCOLS: dict[str, tuple[str, str]] = {
    "bovidae_to_canidae": ("Bovidae", "Canidae"),
    "canidae_to_felidae": ("Canidae", "Felidae"),
}
"""CLAMP's cross-species protocols on AP-10K: name → (training family, test family)."""

AP10K_KEYPOINT_NAMES: tuple[str, ...] = (
    "left eye", "right eye", "nose", "neck", "root of tail",
    "left shoulder", "left elbow", "left front paw",
    "right shoulder", "right elbow", "right front paw",
    "left hip", "left knee", "left back paw",
    "right hip", "right knee", "right back paw",
)  # fmt: skip
"""AP-10K's 17 keypoints in annotation order (the order of :data:`AP10K_SIGMAS`)."""

AP10K_SIGMAS: tuple[float, ...] = (
    0.025, 0.025, 0.026, 0.035, 0.035,
    0.079, 0.072, 0.062, 0.079, 0.072, 0.062,
    0.107, 0.087, 0.089, 0.107, 0.087, 0.089,
)  # fmt: skip
"""AP-10K's per-keypoint OKS sigmas, in :data:`AP10K_KEYPOINT_NAMES` order (for pycocotools)."""

INSTANCE_FEATURES = Features(
    {
        "image_path": Value("string"),
        "image_id": Value("int64"),
        "annotation_id": Value("int64"),
        "category_id": Value("int64"),
        "category_name": Value("string"),
        "supercategory": Value("string"),
        "bbox": List(Value("float64")),
        "keypoints": List(List(Value("float64"))),
        "visible": List(Value("int64")),
        "keypoint_names": List(Value("string")),
        "width": Value("int64"),
        "height": Value("int64"),
    }
)
"""Row schema of every dataset returned by the readers in this module."""

_PROGRESS_THRESHOLD = 5000


@dataclass
class LoadReport:
    """What a reader kept and what it skipped, and why; returned with ``return_report=True``."""

    annotation_file: str
    num_annotations: int = 0
    """Annotations in the file that belong to the selected categories."""
    num_instances: int = 0
    """Rows in the returned dataset."""
    skipped_crowd: int = 0
    skipped_empty_bbox: int = 0
    skipped_no_visible_keypoints: int = 0
    skipped_missing_image: int = 0
    skipped_oversized_image: int = 0
    skipped_implausible_bbox: int = 0
    """Boxes that lie outside their image or reach far beyond it (``box_problem``); each is logged by id."""
    keypoints_outside_bbox: int = 0
    """Visible keypoints outside their bbox that were marked invisible (counted for every
    non-crowd instance with a non-empty bbox, including instances then skipped for another
    reason, e.g. because no visible keypoint was left)."""
    missing_images: list[str] = field(default_factory=list)
    """Paths of the missing image files (one entry per image, not per instance)."""

    @property
    def num_skipped(self) -> int:
        return (
            self.skipped_crowd
            + self.skipped_empty_bbox
            + self.skipped_no_visible_keypoints
            + self.skipped_missing_image
            + self.skipped_oversized_image
            + self.skipped_implausible_bbox
        )

    def summary(self) -> str:
        parts = [
            f"{name.removeprefix('skipped_')}={getattr(self, name)}"
            for name in (
                "skipped_crowd",
                "skipped_empty_bbox",
                "skipped_no_visible_keypoints",
                "skipped_missing_image",
                "skipped_oversized_image",
                "skipped_implausible_bbox",
            )
            if getattr(self, name)
        ]
        text = f"{self.annotation_file}: kept {self.num_instances}/{self.num_annotations} instances"
        if parts:
            text += f", skipped {self.num_skipped} ({', '.join(parts)})"
        if self.keypoints_outside_bbox:
            text += f", {self.keypoints_outside_bbox} keypoints outside their bbox marked invisible"
        return text


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def load_image(
    path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> Image.Image:
    """Open an image as an upright 8-bit RGB :class:`PIL.Image.Image`.

    The vision tower expects RGB, and keypoint annotations refer to the image as displayed, so
    EXIF orientation is applied. Transparent images are composited on white (not on black, which
    is what a plain ``convert("RGB")`` produces and which hides dark objects). The pixel count is
    checked from the header before decoding so that a huge file is refused without being loaded.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable image, is truncated, or has more than
            ``max_pixels`` pixels; the message names the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image file not found: {path}")
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            if width * height > max_pixels:
                raise ValueError(
                    f"Image {path} is {width}x{height} = {width * height} pixels, more than the "
                    f"limit of {max_pixels} pixels"
                )
            opened.load()
            # the processor's conversion (16-bit and float images rescaled, transparency on white), so
            # that the readers, the processor and the Space see the same pixels
            return to_rgb_image(ImageOps.exif_transpose(opened), f"Image {path}")
    except Image.DecompressionBombError as error:
        raise ValueError(
            f"Image {path} is too large (decompression bomb guard): {error}"
        ) from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        # OSError covers truncated files ("image file is truncated"); SyntaxError is what some
        # PIL plugins raise on malformed headers.
        raise ValueError(f"Cannot read image {path}: {error}") from error


class DecodedImageCache:
    """`load_image` with the decoded images kept, least recently used first out, within `max_bytes`.

    Training draws every image many times (stage 0 decodes 32 crops' images per step: ~8% of its
    step on the embedded benchmark, whose 2,100 training images take ~100 MB decoded). The budget
    bounds memory on datasets of large photographs; an image larger than the budget is not kept.
    """

    def __init__(self, max_bytes: int = 512 * 2**20):
        self.max_bytes = max_bytes
        self._images: OrderedDict[str, Image.Image] = OrderedDict()
        self._bytes = 0

    def __call__(self, path: str | os.PathLike[str]) -> Image.Image:
        key = os.fspath(path)
        image = self._images.get(key)
        if image is not None:
            self._images.move_to_end(key)
            return image
        image = load_image(key)
        size = image.width * image.height * len(image.getbands())
        if size <= self.max_bytes:
            self._images[key] = image
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, dropped = self._images.popitem(last=False)
                self._bytes -= dropped.width * dropped.height * len(dropped.getbands())
        return image


# --------------------------------------------------------------------------------------------
# JSON parsing and validation helpers
# --------------------------------------------------------------------------------------------


def read_json(path: str) -> Any:
    """Parse a JSON file, turning decoder errors into a ValueError that names file and position.

    Shared with :mod:`processing.episodes`, whose episode files need the same clear errors.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"JSON file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: invalid JSON at line {error.lineno}, column {error.colno} "
            f"(char {error.pos}): {error.msg}"
        ) from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}): {error.reason}") from None


def _records(coco: Mapping[str, Any], key: str, path: str) -> list[dict[str, Any]]:
    """The top-level list ``coco[key]``, checked to be a list of JSON objects."""
    records = _require(coco, key, path)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: field '{key}' must be a list of JSON objects")
    return records


def _require(record: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in record:
        raise ValueError(f"{where}: missing required field '{key}'")
    return record[key]


def _as_id(value: Any, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: field '{key}' must be an integer id, got {value!r}")
    return value


def _as_finite(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: field '{key}' must contain numbers, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{where}: field '{key}' contains a non-finite value ({value!r})")
    return number


def _read_names_override(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Read a ``{category name: [keypoint names]}`` JSON file (e.g. X-Pose's MP-100 names)."""
    path = os.fspath(path)
    data = read_json(path)
    if not isinstance(data, dict) or not all(
        isinstance(names, list) and all(isinstance(name, str) for name in names)
        for names in data.values()
    ):
        raise ValueError(
            f"{path}: a names override must map each category name to a list of keypoint names"
        )
    return data


@dataclass(frozen=True)
class _Category:
    id: int
    name: str
    supercategory: str
    keypoint_names: tuple[str, ...]


def _parse_categories(
    coco: Mapping[str, Any], path: str, overrides: Mapping[str, list[str]] | None
) -> dict[int, _Category]:
    categories: dict[int, _Category] = {}
    for raw in _records(coco, "categories", path):
        where = f"{path}: category {raw.get('id', '?')!r}"
        category_id = _as_id(_require(raw, "id", where), where, "id")
        name = str(_require(raw, "name", where))
        if category_id in categories:
            raise ValueError(f"{path}: duplicate category id {category_id}")
        names = raw.get("keypoints")
        if overrides is not None and name in overrides:
            override = overrides[name]
            if names is not None and len(override) != len(names):
                raise ValueError(
                    f"{where} ('{name}'): the names override has {len(override)} keypoint names "
                    f"but the category defines {len(names)} keypoints"
                )
            names = override
        if names is None:
            raise ValueError(f"{where} ('{name}'): missing required field 'keypoints'")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{where} ('{name}'): field 'keypoints' must be a list of names")
        categories[category_id] = _Category(
            id=category_id,
            name=name,
            supercategory=str(raw.get("supercategory", "")),
            keypoint_names=tuple(names),
        )
    if overrides is not None:
        unused = sorted(set(overrides) - {c.name for c in categories.values()})
        if unused:
            # Normal for MP-100: one override file covers all 100 categories, one split file
            # holds only some of them.
            logger.debug("%s: names override entries for absent categories: %s", path, unused)
    return categories


@dataclass(frozen=True)
class _ImageInfo:
    path: str
    width: int | None
    height: int | None


def _parse_images(coco: Mapping[str, Any], path: str, image_root: str) -> dict[int, _ImageInfo]:
    images: dict[int, _ImageInfo] = {}
    for raw in _records(coco, "images", path):
        where = f"{path}: image {raw.get('id', '?')!r}"
        image_id = _as_id(_require(raw, "id", where), where, "id")
        if image_id in images:
            raise ValueError(f"{path}: duplicate image id {image_id}")
        file_name = str(_require(raw, "file_name", where))
        width, height = raw.get("width"), raw.get("height")
        images[image_id] = _ImageInfo(
            path=os.path.abspath(os.path.join(image_root, file_name)),
            width=None if width is None else _as_id(width, where, "width"),
            height=None if height is None else _as_id(height, where, "height"),
        )
    return images


# --------------------------------------------------------------------------------------------
# The generic reader
# --------------------------------------------------------------------------------------------


def _build_dataset(
    coco: Mapping[str, Any],
    path: str,
    image_root: str,
    categories: Mapping[int, _Category],
    keep_category_ids: Collection[int] | None,
    max_image_pixels: int,
    strict: bool,
    bbox_tolerance: float,
) -> tuple[Dataset, LoadReport]:
    images = _parse_images(coco, path, image_root)
    report = LoadReport(annotation_file=path)
    columns: dict[str, list[Any]] = {name: [] for name in INSTANCE_FEATURES}
    # image id -> (width, height) of a usable image, or "missing" / "oversized"
    image_status: dict[int, tuple[int, int] | str] = {}
    seen_annotation_ids: set[int] = set()
    annotations = _records(coco, "annotations", path)

    for raw in tqdm(
        annotations,
        desc=f"Reading {os.path.basename(path)}",
        disable=len(annotations) < _PROGRESS_THRESHOLD,
    ):
        where = f"{path}: annotation {raw.get('id', '?')!r}"
        annotation_id = _as_id(_require(raw, "id", where), where, "id")
        category_id = _as_id(_require(raw, "category_id", where), where, "category_id")
        if category_id not in categories:
            raise ValueError(f"{where}: unknown category_id {category_id}")
        if keep_category_ids is not None and category_id not in keep_category_ids:
            continue
        report.num_annotations += 1
        if annotation_id in seen_annotation_ids:
            # Episodes refer to instances by annotation id, so ids must be unique.
            raise ValueError(f"{where}: duplicate annotation id")
        seen_annotation_ids.add(annotation_id)
        image_id = _as_id(_require(raw, "image_id", where), where, "image_id")
        if image_id not in images:
            raise ValueError(f"{where}: unknown image_id {image_id}")
        if raw.get("iscrowd", 0):
            report.skipped_crowd += 1
            logger.debug("%s: skipped (crowd region)", where)
            continue
        category = categories[category_id]
        bbox, keypoints, visible, outside = _parse_instance(raw, where, category, bbox_tolerance)
        if bbox[2] <= 0 or bbox[3] <= 0:
            report.skipped_empty_bbox += 1
            logger.debug("%s: skipped (empty bbox %s)", where, bbox)
            continue
        report.keypoints_outside_bbox += outside
        if not any(visible):
            report.skipped_no_visible_keypoints += 1
            logger.debug("%s: skipped (no visible keypoint)", where)
            continue

        if image_id not in image_status:
            image_status[image_id] = _check_image(
                images[image_id], image_id, path, max_image_pixels, strict, report
            )
        status = image_status[image_id]
        if isinstance(status, str):
            if status == "missing":
                report.skipped_missing_image += 1
            else:
                report.skipped_oversized_image += 1
            continue

        width, height = status
        problem = box_problem(bbox, (width, height))
        if problem:
            # a typo'd box (e.g. 2e9 px) would otherwise crop the whole image to a speck and move the scores
            report.skipped_implausible_bbox += 1
            logger.warning("%s: skipped: bbox %s %s", where, bbox, problem)
            continue
        columns["image_path"].append(images[image_id].path)
        columns["image_id"].append(image_id)
        columns["annotation_id"].append(annotation_id)
        columns["category_id"].append(category_id)
        columns["category_name"].append(category.name)
        columns["supercategory"].append(category.supercategory)
        columns["bbox"].append(bbox)
        columns["keypoints"].append(keypoints)
        columns["visible"].append(visible)
        columns["keypoint_names"].append(list(category.keypoint_names))
        columns["width"].append(width)
        columns["height"].append(height)

    report.num_instances = len(columns["annotation_id"])
    if report.num_skipped or report.keypoints_outside_bbox:
        logger.warning(report.summary())
    else:
        logger.info(report.summary())
    return Dataset.from_dict(columns, features=INSTANCE_FEATURES), report


def _parse_instance(
    raw: Mapping[str, Any], where: str, category: _Category, bbox_tolerance: float
) -> tuple[list[float], list[list[float]], list[int], int]:
    """Validate one annotation's bbox and keypoints.

    Returns ``(bbox, keypoints K×2, visible K, number of visible keypoints marked invisible
    because they lie outside the bbox)``.
    """
    raw_bbox = _require(raw, "bbox", where)
    if not isinstance(raw_bbox, list) or len(raw_bbox) != 4:
        raise ValueError(f"{where}: field 'bbox' must be [x, y, w, h], got {raw_bbox!r}")
    bbox = [_as_finite(value, where, "bbox") for value in raw_bbox]

    raw_keypoints = _require(raw, "keypoints", where)
    num_keypoints = len(category.keypoint_names)
    if not isinstance(raw_keypoints, list) or len(raw_keypoints) != 3 * num_keypoints:
        length = len(raw_keypoints) if isinstance(raw_keypoints, list) else type(raw_keypoints)
        raise ValueError(
            f"{where}: field 'keypoints' has length {length}, expected 3 * {num_keypoints} = "
            f"{3 * num_keypoints} for category '{category.name}'"
        )
    x0, y0, w, h = bbox
    tol_x = max(bbox_tolerance * w, 1.0)
    tol_y = max(bbox_tolerance * h, 1.0)
    keypoints: list[list[float]] = []
    visible: list[int] = []
    outside = 0
    for k in range(num_keypoints):
        x = _as_finite(raw_keypoints[3 * k], where, "keypoints")
        y = _as_finite(raw_keypoints[3 * k + 1], where, "keypoints")
        v = raw_keypoints[3 * k + 2]
        if v not in (0, 1, 2) or isinstance(v, bool):
            raise ValueError(f"{where}: keypoint {k} has visibility {v!r}, expected 0, 1 or 2")
        is_visible = v > 0
        if is_visible and w > 0 and h > 0:
            inside = x0 - tol_x <= x <= x0 + w + tol_x and y0 - tol_y <= y <= y0 + h + tol_y
            if not inside:
                outside += 1
                is_visible = False
                logger.debug(
                    "%s: keypoint %d (%s) at (%.1f, %.1f) lies outside bbox %s; marked invisible",
                    where, k, category.keypoint_names[k], x, y, bbox,
                )  # fmt: skip
        keypoints.append([x, y] if is_visible else [0.0, 0.0])
        visible.append(int(is_visible))
    return bbox, keypoints, visible, outside


def _check_image(
    image: _ImageInfo,
    image_id: int,
    path: str,
    max_image_pixels: int,
    strict: bool,
    report: LoadReport,
) -> tuple[int, int] | str:
    """The (width, height) of a usable image, else "missing" or "oversized" (raises if strict)."""
    if not os.path.isfile(image.path):
        message = f"{path}: image {image_id} file not found: {image.path}"
        if strict:
            raise FileNotFoundError(message)
        logger.warning("%s; its instances are skipped", message)
        report.missing_images.append(image.path)
        return "missing"
    width, height = _image_size(image)
    if width * height > max_image_pixels:
        message = (
            f"{path}: image {image_id} ({image.path}) has {width}x{height} pixels, more than "
            f"max_image_pixels={max_image_pixels}"
        )
        if strict:
            raise ValueError(message)
        logger.warning("%s; its instances are skipped", message)
        return "oversized"
    return width, height


def _image_size(image: _ImageInfo) -> tuple[int, int]:
    """The image size from the JSON, or from the file header when the JSON omits it."""
    if image.width is not None and image.height is not None:
        return image.width, image.height
    try:
        with Image.open(image.path) as handle:
            return handle.size
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"Cannot read the size of image {image.path}: {error}") from error


# --------------------------------------------------------------------------------------------
# Public readers
# --------------------------------------------------------------------------------------------


@overload
def load_keypoint_annotations(
    annotation_file: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    names_override: str | os.PathLike[str] | None = ...,
    max_image_pixels: int = ...,
    *,
    strict: bool = ...,
    bbox_tolerance: float = ...,
    return_report: Literal[False] = ...,
) -> Dataset: ...
@overload
def load_keypoint_annotations(
    annotation_file: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    names_override: str | os.PathLike[str] | None = ...,
    max_image_pixels: int = ...,
    *,
    strict: bool = ...,
    bbox_tolerance: float = ...,
    return_report: Literal[True],
) -> tuple[Dataset, LoadReport]: ...
def load_keypoint_annotations(
    annotation_file: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    names_override: str | os.PathLike[str] | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    *,
    strict: bool = False,
    bbox_tolerance: float = DEFAULT_BBOX_TOLERANCE,
    return_report: bool = False,
) -> Dataset | tuple[Dataset, LoadReport]:
    """Read a COCO-keypoints JSON file into a dataset with one row per usable instance.

    Args:
        annotation_file: the COCO JSON file.
        image_root: directory that the images' ``file_name`` entries are relative to.
        names_override: optional JSON file ``{category name: [keypoint names]}`` replacing the
            categories' ``keypoints`` names (e.g. human-readable names for the textual and
            semantic tasks); each list must have the category's number of keypoints.
        max_image_pixels: instances on larger images (per the JSON's width × height) are skipped.
        strict: raise on a missing or oversized image file instead of skipping its instances.
        bbox_tolerance: see :data:`DEFAULT_BBOX_TOLERANCE`.
        return_report: also return the :class:`LoadReport` with the skip counts.

    Returns:
        A dataset with :data:`INSTANCE_FEATURES` columns (and the report if requested).
    """
    path = os.fspath(annotation_file)
    coco = read_json(path)
    if not isinstance(coco, dict):
        raise ValueError(f"{path}: expected a JSON object with images/annotations/categories")
    overrides = None if names_override is None else _read_names_override(names_override)
    categories = _parse_categories(coco, path, overrides)
    dataset, report = _build_dataset(
        coco,
        path,
        os.fspath(image_root),
        categories,
        None,
        max_image_pixels,
        strict,
        bbox_tolerance,
    )
    return (dataset, report) if return_report else dataset


@overload
def load_mp100(
    root: str | os.PathLike[str],
    split: int,
    subset: str,
    names_override: str | os.PathLike[str] | None = ...,
    max_image_pixels: int = ...,
    *,
    strict: bool = ...,
    bbox_tolerance: float = ...,
    return_report: Literal[False] = ...,
) -> Dataset: ...
@overload
def load_mp100(
    root: str | os.PathLike[str],
    split: int,
    subset: str,
    names_override: str | os.PathLike[str] | None = ...,
    max_image_pixels: int = ...,
    *,
    strict: bool = ...,
    bbox_tolerance: float = ...,
    return_report: Literal[True],
) -> tuple[Dataset, LoadReport]: ...
def load_mp100(
    root: str | os.PathLike[str],
    split: int,
    subset: str,
    names_override: str | os.PathLike[str] | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    *,
    strict: bool = False,
    bbox_tolerance: float = DEFAULT_BBOX_TOLERANCE,
    return_report: bool = False,
) -> Dataset | tuple[Dataset, LoadReport]:
    """Read one MP-100 split: ``root/annotations/mp100_split{split}_{subset}.json``.

    MP-100's five splits each divide its 100 categories into 70 train / 10 val / 20 test,
    disjoint; images live under ``root/images`` (``file_name`` includes the category folder).
    Other arguments are those of :func:`load_keypoint_annotations`.
    """
    if isinstance(split, bool) or split not in (1, 2, 3, 4, 5):
        raise ValueError(f"MP-100 split must be one of 1..5, got {split!r}")
    if subset not in MP100_SUBSETS:
        raise ValueError(f"MP-100 subset must be one of {MP100_SUBSETS}, got {subset!r}")
    root = os.fspath(root)
    annotation_file = os.path.join(root, "annotations", f"mp100_split{split}_{subset}.json")
    return load_keypoint_annotations(  # type: ignore[call-overload]
        annotation_file,
        os.path.join(root, "images"),
        names_override,
        max_image_pixels,
        strict=strict,
        bbox_tolerance=bbox_tolerance,
        return_report=return_report,
    )


def load_cross_supercategory(
    root: str | os.PathLike[str], supercategory: str, split: int = 1
) -> tuple[Dataset, Dataset]:
    """MP-100's cross-super-category protocol (paper Table 3): (train, test) over all 100 categories.

    The split's train/val/test files together hold every category once; the test set is the
    categories of ``supercategory``, the training set every other category.
    """
    from datasets import concatenate_datasets

    parts = [load_mp100(root, split, subset) for subset in MP100_SUBSETS]
    everything = concatenate_datasets(parts)
    supercategories = sorted(set(everything["supercategory"]))
    if supercategory not in supercategories:
        raise ValueError(f"super-category {supercategory!r} is not in MP-100 split {split}: one of {supercategories}")
    is_held_out = [value == supercategory for value in everything["supercategory"]]
    test = everything.select([i for i, held_out in enumerate(is_held_out) if held_out])
    train = everything.select([i for i, held_out in enumerate(is_held_out) if not held_out])
    return train, test


@overload
def load_ap10k(
    annotation_file: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    families: list[str] | None = ...,
    species: list[str] | None = ...,
    *,
    names_override: str | os.PathLike[str] | None = ...,
    max_image_pixels: int = ...,
    strict: bool = ...,
    bbox_tolerance: float = ...,
    return_report: Literal[False] = ...,
) -> Dataset: ...
@overload
def load_ap10k(
    annotation_file: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    families: list[str] | None = ...,
    species: list[str] | None = ...,
    *,
    names_override: str | os.PathLike[str] | None = ...,
    max_image_pixels: int = ...,
    strict: bool = ...,
    bbox_tolerance: float = ...,
    return_report: Literal[True],
) -> tuple[Dataset, LoadReport]: ...
def load_ap10k(
    annotation_file: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    families: list[str] | None = None,
    species: list[str] | None = None,
    *,
    names_override: str | os.PathLike[str] | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    strict: bool = False,
    bbox_tolerance: float = DEFAULT_BBOX_TOLERANCE,
    return_report: bool = False,
) -> Dataset | tuple[Dataset, LoadReport]:
    """Read an AP-10K annotation file, optionally restricted to animal families and/or species.

    AP-10K's categories are species whose ``supercategory`` is the family, so CLAMP's
    cross-species protocols (:data:`CLAMP_PROTOCOLS`) select training and test data by family,
    e.g. ``load_ap10k(train_json, images, families=["Bovidae"])``. Names match case-insensitively;
    with both ``families`` and ``species`` a category must match both. An unknown name raises
    (listing the available ones) rather than silently yielding an empty dataset.

    Every selected category must have AP-10K's 17 keypoints, since :data:`AP10K_SIGMAS` is indexed
    by keypoint. Other arguments are those of :func:`load_keypoint_annotations`.
    """
    path = os.fspath(annotation_file)
    coco = read_json(path)
    if not isinstance(coco, dict):
        raise ValueError(f"{path}: expected a JSON object with images/annotations/categories")
    overrides = None if names_override is None else _read_names_override(names_override)
    categories = _parse_categories(coco, path, overrides)

    selected = set(categories)
    for wanted, attribute, label in (
        (families, "supercategory", "families"),
        (species, "name", "species"),
    ):
        if wanted is None:
            continue
        available = {
            getattr(c, attribute).lower(): getattr(c, attribute) for c in categories.values()
        }
        unknown = [name for name in wanted if name.lower() not in available]
        if unknown:
            raise ValueError(
                f"{path}: unknown AP-10K {label} {unknown}; available: {sorted(available.values())}"
            )
        lowered = {name.lower() for name in wanted}
        selected &= {c.id for c in categories.values() if getattr(c, attribute).lower() in lowered}
    for category_id in sorted(selected):
        category = categories[category_id]
        if len(category.keypoint_names) != len(AP10K_SIGMAS):
            raise ValueError(
                f"{path}: category '{category.name}' has {len(category.keypoint_names)} keypoints, "
                f"AP-10K has {len(AP10K_SIGMAS)}"
            )

    dataset, report = _build_dataset(
        coco,
        path,
        os.fspath(image_root),
        categories,
        selected,
        max_image_pixels,
        strict,
        bbox_tolerance,
    )
    return (dataset, report) if return_report else dataset
