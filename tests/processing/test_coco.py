"""Tests for processing/coco.py on small real-format COCO-keypoint fixtures written to tmp_path."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from processing.coco import (
    AP10K_KEYPOINT_NAMES,
    AP10K_SIGMAS,
    CLAMP_PROTOCOLS,
    INSTANCE_FEATURES,
    LoadReport,
    load_ap10k,
    load_image,
    load_keypoint_annotations,
    load_mp100,
)

# --------------------------------------------------------------------------------------------
# Fixture builders
# --------------------------------------------------------------------------------------------

CATEGORIES = [
    {"id": 1, "name": "cat", "supercategory": "animal", "keypoints": ["nose", "left_ear", "tail"],
     "skeleton": [[1, 2]]},
    {"id": 2, "name": "chair", "supercategory": "furniture", "keypoints": ["seat", "back"],
     "skeleton": []},
]  # fmt: skip


def annotation(
    ann_id: int, image_id: int, category_id: int, bbox: Sequence[float], keypoints: Sequence[float]
) -> dict[str, Any]:
    visible = sum(1 for v in keypoints[2::3] if v > 0)
    return {
        "id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
        "keypoints": keypoints, "num_keypoints": visible, "iscrowd": 0, "area": bbox[2] * bbox[3],
    }  # fmt: skip


def write_image(path: Path, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)


def write_coco(
    directory: Path,
    annotations: list[dict[str, Any]],
    categories: list[dict[str, Any]] = CATEGORIES,
    images: list[dict[str, Any]] | None = None,
    name: str = "annotations.json",
    create_images: bool = True,
) -> tuple[Path, Path]:
    """Write a COCO file (and its PNG images under directory/images); returns (json, image root)."""
    image_root = directory / "images"
    if images is None:
        image_ids = sorted({a["image_id"] for a in annotations})
        images = [
            {"id": i, "file_name": f"img_{i}.png", "width": 64, "height": 48} for i in image_ids
        ]
    if create_images:
        for image in images:
            write_image(
                image_root / image["file_name"], (image.get("width", 64), image.get("height", 48))
            )
    path = directory / name
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path, image_root


def basic_annotations() -> list[dict[str, Any]]:
    return [
        annotation(10, 1, 1, [10, 10, 30, 20], [15, 12, 2, 20, 15, 1, 35, 25, 2]),
        annotation(11, 2, 1, [0, 0, 40, 40], [5, 5, 2, 0, 0, 0, 30, 30, 2]),
        annotation(12, 3, 2, [5, 5, 20, 20], [10, 10, 2, 20, 20, 2]),
    ]


# --------------------------------------------------------------------------------------------
# The generic reader
# --------------------------------------------------------------------------------------------


def test_rows_follow_the_schema(tmp_path: Path) -> None:
    path, root = write_coco(tmp_path, basic_annotations())
    dataset, report = load_keypoint_annotations(path, root, return_report=True)

    assert dataset.features == INSTANCE_FEATURES
    assert len(dataset) == 3 and report.num_instances == 3 and report.num_skipped == 0
    row = dataset[0]
    assert row["image_path"] == os.path.abspath(root / "img_1.png") and os.path.isabs(
        row["image_path"]
    )
    assert (row["image_id"], row["annotation_id"], row["category_id"]) == (1, 10, 1)
    assert (row["category_name"], row["supercategory"]) == ("cat", "animal")
    assert row["bbox"] == [10.0, 10.0, 30.0, 20.0]
    assert row["keypoints"] == [[15.0, 12.0], [20.0, 15.0], [35.0, 25.0]]
    assert row["visible"] == [1, 1, 1]  # v=1 (labelled, occluded) counts as visible
    assert row["keypoint_names"] == ["nose", "left_ear", "tail"]
    assert (row["width"], row["height"]) == (64, 48)
    assert dataset[2]["keypoint_names"] == ["seat", "back"]
    # Without return_report, just the dataset.
    assert len(load_keypoint_annotations(path, root)) == 3


def test_v0_keypoints_are_kept_invisible_with_zeroed_coordinates(tmp_path: Path) -> None:
    annotations = [annotation(1, 1, 1, [0, 0, 40, 40], [5, 5, 2, 17, 23, 0, 30, 30, 2])]
    path, root = write_coco(tmp_path, annotations)
    row = load_keypoint_annotations(path, root)[0]
    assert row["visible"] == [1, 0, 1]
    assert row["keypoints"][1] == [0.0, 0.0]


def test_keypoints_outside_bbox_are_marked_invisible_and_counted(tmp_path: Path) -> None:
    annotations = [
        # keypoint 1 is far outside; keypoint 2 is 1 px outside, within the tolerance.
        annotation(1, 1, 1, [10, 10, 20, 20], [15, 15, 2, 60, 45, 2, 31, 20, 2]),
        # every visible keypoint outside: nothing left, so the instance is skipped.
        annotation(2, 1, 1, [10, 10, 5, 5], [50, 40, 2, 0, 0, 0, 1, 1, 2]),
    ]
    path, root = write_coco(tmp_path, annotations)
    dataset, report = load_keypoint_annotations(path, root, return_report=True)
    assert len(dataset) == 1
    assert dataset[0]["visible"] == [1, 0, 1]
    assert dataset[0]["keypoints"] == [[15.0, 15.0], [0.0, 0.0], [31.0, 20.0]]
    assert report.keypoints_outside_bbox == 3
    assert report.skipped_no_visible_keypoints == 1


def test_empty_bbox_zero_visible_and_crowd_are_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    annotations = [
        *basic_annotations(),
        annotation(20, 1, 1, [10, 10, 0, 20], [15, 12, 2, 20, 15, 2, 25, 25, 2]),
        annotation(21, 1, 1, [10, 10, 20, -3], [15, 12, 2, 20, 15, 2, 25, 25, 2]),
        annotation(22, 2, 2, [5, 5, 20, 20], [0, 0, 0, 0, 0, 0]),
        {**annotation(23, 2, 2, [5, 5, 20, 20], [10, 10, 2, 20, 20, 2]), "iscrowd": 1},
    ]
    path, root = write_coco(tmp_path, annotations)
    with caplog.at_level(logging.WARNING, logger="processing.coco"):
        dataset, report = load_keypoint_annotations(path, root, return_report=True)
    assert sorted(dataset["annotation_id"][:]) == [10, 11, 12]
    assert (
        report.skipped_empty_bbox,
        report.skipped_no_visible_keypoints,
        report.skipped_crowd,
    ) == (2, 1, 1)
    assert report.num_annotations == 7 and report.num_instances == 3
    assert "skipped 4" in caplog.text


def test_missing_image_is_skipped_or_raises_when_strict(tmp_path: Path) -> None:
    path, root = write_coco(tmp_path, basic_annotations())
    (root / "img_2.png").unlink()
    dataset, report = load_keypoint_annotations(path, root, return_report=True)
    assert sorted(dataset["annotation_id"][:]) == [10, 12]
    assert report.skipped_missing_image == 1
    assert report.missing_images == [os.path.abspath(root / "img_2.png")]
    with pytest.raises(FileNotFoundError, match="img_2.png"):
        load_keypoint_annotations(path, root, strict=True)


def test_oversized_images_are_skipped_at_load_time(tmp_path: Path) -> None:
    images = [
        {"id": 1, "file_name": "small.png", "width": 10, "height": 10},
        {"id": 2, "file_name": "big.png", "width": 64, "height": 48},
    ]
    annotations = [
        annotation(1, 1, 2, [0, 0, 8, 8], [1, 1, 2, 5, 5, 2]),
        annotation(2, 2, 2, [0, 0, 8, 8], [1, 1, 2, 5, 5, 2]),
    ]
    path, root = write_coco(tmp_path, annotations, images=images)
    dataset, report = load_keypoint_annotations(
        path, root, max_image_pixels=1000, return_report=True
    )
    assert dataset["annotation_id"][:] == [1]
    assert report.skipped_oversized_image == 1
    with pytest.raises(ValueError, match="big.png"):
        load_keypoint_annotations(path, root, max_image_pixels=1000, strict=True)


def test_image_size_is_read_from_the_file_when_the_json_omits_it(tmp_path: Path) -> None:
    images = [{"id": 1, "file_name": "a.png"}]
    annotations = [annotation(1, 1, 2, [0, 0, 8, 8], [1, 1, 2, 5, 5, 2])]
    path, root = write_coco(tmp_path, annotations, images=images, create_images=False)
    write_image(root / "a.png", (33, 21))
    row = load_keypoint_annotations(path, root)[0]
    assert (row["width"], row["height"]) == (33, 21)


def test_corrupted_json_names_file_and_position(tmp_path: Path) -> None:
    path, root = write_coco(tmp_path, basic_annotations())
    text = path.read_text()
    path.write_text(text[: len(text) // 2])  # truncated
    with pytest.raises(ValueError, match=r"annotations\.json: invalid JSON at line 1, column \d+"):
        load_keypoint_annotations(path, root)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="annotations.json"):
        load_keypoint_annotations(path, root)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_keypoint_annotations(tmp_path / "nope.json", root)


@pytest.mark.parametrize("field", ["bbox", "keypoints", "image_id", "category_id"])
def test_missing_annotation_field_names_file_annotation_and_field(
    tmp_path: Path, field: str
) -> None:
    annotations = basic_annotations()
    del annotations[1][field]
    path, root = write_coco(tmp_path, annotations, images=[
        {"id": i, "file_name": f"img_{i}.png", "width": 64, "height": 48} for i in (1, 2, 3)
    ])  # fmt: skip
    with pytest.raises(
        ValueError, match=rf"annotations\.json: annotation 11: missing required field '{field}'"
    ):
        load_keypoint_annotations(path, root)


def test_missing_top_level_and_category_fields(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(ValueError, match=r"a\.json: missing required field 'annotations'"):
        load_keypoint_annotations(path, tmp_path)
    path.write_text(
        json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}]})
    )
    with pytest.raises(ValueError, match=r"category 1 \('x'\): missing required field 'keypoints'"):
        load_keypoint_annotations(path, tmp_path)
    path.write_text(
        json.dumps(
            {
                "images": [],
                "annotations": [],
                "categories": [{"id": 1, "name": "x", "keypoints": "ab"}],
            }
        )
    )
    with pytest.raises(
        ValueError, match=r"category 1 \('x'\): field 'keypoints' must be a list of names"
    ):
        load_keypoint_annotations(path, tmp_path)
    path.write_text(json.dumps({"images": {}, "annotations": [], "categories": []}))
    with pytest.raises(ValueError, match="field 'images' must be a list of JSON objects"):
        load_keypoint_annotations(path, tmp_path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_keypoint_annotations(path, tmp_path)


def test_keypoint_array_of_wrong_length_names_the_annotation(tmp_path: Path) -> None:
    annotations = [annotation(7, 1, 1, [0, 0, 40, 40], [5, 5, 2, 6, 6, 2])]  # 2 keypoints, K=3
    path, root = write_coco(tmp_path, annotations)
    with pytest.raises(
        ValueError, match=r"annotation 7: field 'keypoints' has length 6, expected 3 \* 3 = 9"
    ):
        load_keypoint_annotations(path, root)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_coordinates_name_the_annotation(tmp_path: Path, bad: float) -> None:
    annotations = [annotation(8, 1, 2, [0, 0, 40, 40], [5, bad, 2, 6, 6, 2])]
    path, root = write_coco(tmp_path, annotations)  # json.dumps writes NaN / Infinity literals
    with pytest.raises(
        ValueError, match="annotation 8: field 'keypoints' contains a non-finite value"
    ):
        load_keypoint_annotations(path, root)
    annotations = [annotation(9, 1, 2, [0, 0, bad, 40], [5, 5, 2, 6, 6, 2])]
    path, root = write_coco(tmp_path, annotations)
    with pytest.raises(ValueError, match="annotation 9: field 'bbox' contains a non-finite value"):
        load_keypoint_annotations(path, root)


def test_bad_visibility_flag_duplicate_and_dangling_ids(tmp_path: Path) -> None:
    path, root = write_coco(tmp_path, [annotation(5, 1, 2, [0, 0, 9, 9], [1, 1, 3, 2, 2, 2])])
    with pytest.raises(ValueError, match="annotation 5: keypoint 0 has visibility 3"):
        load_keypoint_annotations(path, root)
    duplicate = [annotation(5, 1, 2, [0, 0, 9, 9], [1, 1, 2, 2, 2, 2])] * 2
    path, root = write_coco(tmp_path, duplicate)
    with pytest.raises(ValueError, match="annotation 5: duplicate annotation id"):
        load_keypoint_annotations(path, root)
    path, root = write_coco(tmp_path, [annotation(6, 1, 99, [0, 0, 9, 9], [1, 1, 2, 2, 2, 2])])
    with pytest.raises(ValueError, match="annotation 6: unknown category_id 99"):
        load_keypoint_annotations(path, root)
    images = [{"id": 1, "file_name": "img_1.png", "width": 64, "height": 48}]
    path, root = write_coco(
        tmp_path, [annotation(6, 4, 2, [0, 0, 9, 9], [1, 1, 2, 2, 2, 2])], images=images
    )
    with pytest.raises(ValueError, match="annotation 6: unknown image_id 4"):
        load_keypoint_annotations(path, root)


# --------------------------------------------------------------------------------------------
# Names override
# --------------------------------------------------------------------------------------------


def test_names_override_replaces_keypoint_names(tmp_path: Path) -> None:
    path, root = write_coco(tmp_path, basic_annotations())
    override = tmp_path / "names.json"
    override.write_text(json.dumps({
        "cat": ["tip of the nose", "left ear", "base of the tail"],
        "a category absent from this split": ["x"],
    }))  # fmt: skip
    dataset = load_keypoint_annotations(path, root, names_override=override)
    assert dataset[0]["keypoint_names"] == ["tip of the nose", "left ear", "base of the tail"]
    assert dataset[2]["keypoint_names"] == ["seat", "back"]  # not overridden


def test_names_override_length_and_format_are_checked(tmp_path: Path) -> None:
    path, root = write_coco(tmp_path, basic_annotations())
    override = tmp_path / "names.json"
    override.write_text(json.dumps({"chair": ["seat"]}))
    with pytest.raises(
        ValueError, match="names override has 1 keypoint names but the category defines 2"
    ):
        load_keypoint_annotations(path, root, names_override=override)
    override.write_text(json.dumps({"chair": "seat"}))
    with pytest.raises(ValueError, match="names.json: a names override must map"):
        load_keypoint_annotations(path, root, names_override=override)


def test_names_override_supplies_names_for_categories_without_keypoints(tmp_path: Path) -> None:
    categories = [{"id": 2, "name": "chair", "supercategory": "furniture"}]
    path, root = write_coco(
        tmp_path, [annotation(1, 1, 2, [0, 0, 9, 9], [1, 1, 2, 2, 2, 2])], categories
    )
    override = tmp_path / "names.json"
    override.write_text(json.dumps({"chair": ["seat", "back"]}))
    assert load_keypoint_annotations(path, root, names_override=override)[0]["keypoint_names"] == [
        "seat",
        "back",
    ]


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def test_load_image_converts_modes_to_rgb(tmp_path: Path) -> None:
    gray = tmp_path / "gray.png"
    Image.new("L", (4, 3), 128).save(gray)
    rgba = tmp_path / "rgba.png"
    image = Image.new("RGBA", (4, 3), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
    image.save(rgba)
    palette = tmp_path / "palette.png"
    Image.new("RGB", (4, 3), (0, 0, 255)).convert("P").save(palette)
    palette_transparent = tmp_path / "palette_t.png"
    p_image = Image.new("P", (4, 3), 1)
    p_image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p_image.putpixel((0, 0), 0)
    p_image.save(palette_transparent, transparency=0)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (4, 3), (0, 255, 255, 0)).save(cmyk)
    gray16 = tmp_path / "gray16.png"
    Image.fromarray(np.full((3, 4), 65535, dtype=np.uint16)).save(gray16)

    results = {
        p.name: load_image(p) for p in (gray, rgba, palette, palette_transparent, cmyk, gray16)
    }
    for name, result in results.items():
        assert result.mode == "RGB" and result.size == (4, 3), name
    assert results["gray.png"].getpixel((1, 1)) == (128, 128, 128)
    assert results["rgba.png"].getpixel((0, 0)) == (255, 255, 255)  # composited on white
    assert results["rgba.png"].getpixel((1, 1)) == (255, 0, 0)
    assert results["palette.png"].getpixel((1, 1)) == (0, 0, 255)
    assert results["palette_t.png"].getpixel((0, 0)) == (255, 255, 255)
    assert results["palette_t.png"].getpixel((1, 1)) == (0, 255, 0)
    red, green, blue = np.asarray(results["cmyk.jpg"])[1, 1].tolist()
    assert red > 200 and green < 60 and blue < 60
    assert results["gray16.png"].getpixel((0, 0)) == (255, 255, 255)


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.new("RGB", (8, 4), (10, 20, 30)).save(path, exif=exif)
    assert load_image(path).size == (4, 8)


def test_load_image_rejects_oversized_missing_and_corrupt_files(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 30)).save(path)
    with pytest.raises(
        ValueError, match=r"big\.png is 40x30 = 1200 pixels, more than the limit of 1000"
    ):
        load_image(path, max_pixels=1000)
    assert load_image(path, max_pixels=1200).size == (40, 30)
    with pytest.raises(FileNotFoundError, match="absent.png"):
        load_image(tmp_path / "absent.png")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="Cannot read image .*garbage.png"):
        load_image(garbage)
    truncated = tmp_path / "truncated.jpg"
    Image.effect_noise((64, 64), 50).convert("RGB").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(ValueError, match="Cannot read image .*truncated.jpg"):
        load_image(truncated)


def test_load_image_turns_decompression_bomb_into_value_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bomb.png"
    Image.new("RGB", (40, 30)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL raises above twice this
    with pytest.raises(ValueError, match="bomb.png is too large"):
        load_image(path, max_pixels=10**9)


# --------------------------------------------------------------------------------------------
# MP-100 and AP-10K
# --------------------------------------------------------------------------------------------


def test_load_mp100_reads_the_split_layout(tmp_path: Path) -> None:
    root = tmp_path / "mp100"
    (root / "annotations").mkdir(parents=True)
    images = [{"id": 1, "file_name": "cat_body/000.png", "width": 64, "height": 48}]
    write_image(root / "images" / "cat_body" / "000.png")
    for subset, category_id in (("train", 1), ("test", 2)):
        keypoints = [5, 5, 2, 6, 6, 2, 7, 7, 2] if category_id == 1 else [5, 5, 2, 6, 6, 2]
        (root / "annotations" / f"mp100_split3_{subset}.json").write_text(json.dumps({
            "images": images, "categories": [CATEGORIES[category_id - 1]],
            "annotations": [annotation(category_id, 1, category_id, [0, 0, 20, 20], keypoints)],
        }))  # fmt: skip
    dataset, report = load_mp100(root, 3, "test", return_report=True)
    assert dataset["category_name"][:] == ["chair"]
    assert dataset[0]["image_path"] == os.path.abspath(root / "images" / "cat_body" / "000.png")
    assert isinstance(report, LoadReport) and report.annotation_file.endswith(
        "mp100_split3_test.json"
    )
    assert load_mp100(root, 3, "train")["category_name"][:] == ["cat"]
    with pytest.raises(ValueError, match="split must be one of 1..5"):
        load_mp100(root, 6, "train")
    with pytest.raises(ValueError, match="subset must be one of"):
        load_mp100(root, 1, "training")
    with pytest.raises(FileNotFoundError, match="mp100_split1_val.json"):
        load_mp100(root, 1, "val")


AP10K_JSON_NAMES = [name.replace(" ", "_") for name in AP10K_KEYPOINT_NAMES]
AP10K_SPECIES = [  # (id, species, family) as in AP-10K's categories
    (1, "antelope", "Bovidae"), (2, "cow", "Bovidae"),
    (3, "dog", "Canidae"), (4, "fox", "Canidae"),
    (5, "cat", "Felidae"), (6, "lion", "Felidae"),
    (7, "horse", "Equidae"),
]  # fmt: skip


def write_ap10k(directory: Path) -> tuple[Path, Path]:
    categories = [
        {
            "id": i,
            "name": name,
            "supercategory": family,
            "keypoints": AP10K_JSON_NAMES,
            "skeleton": [],
        }
        for i, name, family in AP10K_SPECIES
    ]
    keypoints = [value for k in range(17) for value in (10 + k, 10 + k, 2)]
    annotations = [
        annotation(100 + i, i, i, [5, 5, 40, 40], keypoints) for i, _, _ in AP10K_SPECIES
    ]
    return write_coco(directory, annotations, categories, name="ap10k-train-split1.json")


def test_ap10k_constants() -> None:
    assert len(AP10K_SIGMAS) == len(AP10K_KEYPOINT_NAMES) == 17
    assert AP10K_SIGMAS[:5] == (0.025, 0.025, 0.026, 0.035, 0.035)
    assert (
        AP10K_KEYPOINT_NAMES[4] == "root of tail" and AP10K_KEYPOINT_NAMES[-1] == "right back paw"
    )
    assert CLAMP_PROTOCOLS == {
        "bovidae_to_canidae": ("Bovidae", "Canidae"),
        "canidae_to_felidae": ("Canidae", "Felidae"),
    }


@pytest.mark.parametrize("protocol", sorted(CLAMP_PROTOCOLS))
def test_ap10k_family_selection_for_clamp_protocols(tmp_path: Path, protocol: str) -> None:
    path, root = write_ap10k(tmp_path)
    train_family, test_family = CLAMP_PROTOCOLS[protocol]
    train = load_ap10k(path, root, families=[train_family])
    test = load_ap10k(path, root, families=[test_family])
    assert set(train["supercategory"][:]) == {train_family}
    assert set(test["supercategory"][:]) == {test_family}
    assert len(train) == len(test) == 2
    assert not set(train["category_id"][:]) & set(test["category_id"][:])
    assert train[0]["keypoint_names"] == AP10K_JSON_NAMES


def test_ap10k_species_selection_and_errors(tmp_path: Path) -> None:
    path, root = write_ap10k(tmp_path)
    assert len(load_ap10k(path, root)) == len(AP10K_SPECIES)
    assert load_ap10k(path, root, species=["Dog", "lion"])["category_name"][:] == ["dog", "lion"]
    assert load_ap10k(path, root, families=["canidae"], species=["dog", "cow"])["category_name"][
        :
    ] == ["dog"]
    _, report = load_ap10k(path, root, families=["Felidae"], return_report=True)
    assert report.num_annotations == 2 and report.num_instances == 2
    with pytest.raises(
        ValueError, match=r"unknown AP-10K families \['Canide'\]; available: .*'Canidae'"
    ):
        load_ap10k(path, root, families=["Canide"])
    with pytest.raises(ValueError, match=r"unknown AP-10K species \['wolf'\]"):
        load_ap10k(path, root, species=["wolf"])


def test_ap10k_requires_17_keypoints(tmp_path: Path) -> None:
    categories = [{**CATEGORIES[1], "name": "dog", "supercategory": "Canidae"}]
    path, root = write_coco(
        tmp_path, [annotation(1, 1, 2, [0, 0, 9, 9], [1, 1, 2, 2, 2, 2])], categories
    )
    with pytest.raises(ValueError, match="category 'dog' has 2 keypoints, AP-10K has 17"):
        load_ap10k(path, root, families=["Canidae"])


def test_decoded_image_cache_keeps_recent_images_within_its_budget(tmp_path):
    from processing.coco import DecodedImageCache

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (10, 10), (i, 0, 0)).save(paths[-1])  # 300 bytes decoded
    cache = DecodedImageCache(max_bytes=650)  # two images
    first = cache(paths[0])
    assert cache(paths[0]) is first and first.getpixel((0, 0)) == (0, 0, 0)
    cache(paths[1])
    cache(paths[0])  # 0 is now the most recent: 1 goes first
    cache(paths[2])
    assert cache(paths[0]) is first
    assert list(cache._images) == [str(paths[2]), str(paths[0])]
    assert DecodedImageCache(max_bytes=100)(paths[0]).size == (10, 10)  # larger than the budget: read, not kept
    with pytest.raises(FileNotFoundError, match="missing.png"):
        cache(tmp_path / "missing.png")
