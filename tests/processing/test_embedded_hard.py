"""The hard embedded variant: same layout and annotations as the default, and each knob does what it says."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from processing import embedded as emb
from processing import embedded_hard as hard
from processing.contact_sheet import main as contact_sheet_main
from processing.contact_sheet import make_contact_sheet

SMALL = ["--instances-per-category", "2", "--instances-per-species", "10", "--image-size", "64", "--workers", "2"]
STEMS = [f"mp100_split{s}_{sub}" for s in range(1, 6) for sub in ("train", "val", "test")] + [
    f"ap10k_{sub}" for sub in ("train", "val", "test")
]
SPECS = emb.build_mp100_categories(0)
SPEC_BY_NAME = {spec.name: spec for spec in SPECS + emb.build_ap10k_species(0)}


@pytest.fixture(scope="module")
def hard_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded_hard") / "data"
    summary = emb.main(["--difficulty", "hard", "--out", str(out), *SMALL])
    return out, summary


def _load(out: Path, stem: str) -> dict:
    return json.loads((out / "annotations" / f"{stem}.json").read_text())


def _instance_and_render(spec, index: int, plan=None, size: int = 96):
    """(instance, pixels) of instance `index` of `spec` as the generator draws it (default, or with `plan`)."""
    stream = 11 if spec.can_flip else 10
    rng = np.random.default_rng([0, stream, spec.id, index])
    inst = emb.sample_instance(spec, rng, size)
    image = emb.render_instance(spec, inst, rng, size) if plan is None else hard.render_hard_instance(
        spec, inst, rng, size, plan)
    return inst, np.asarray(image)


def test_layout_and_annotations_are_the_defaults(hard_bench):
    out, summary = hard_bench
    assert set(summary["files"]) == set(STEMS) and summary["difficulty"] == "hard"
    assert len(list((out / "images").glob("*/*.png"))) == summary["images"] == 100 * 2 + 20 * 10
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["hard"] == hard.HardKnobs().as_dict()
    for stem in ("mp100_split1_test", "mp100_split3_val", "ap10k_train"):
        coco = _load(out, stem)
        for category in coco["categories"]:  # the default's categories, plus the unglyphed list
            spec = SPEC_BY_NAME[category["name"]]
            assert {k: v for k, v in category.items() if k != "unglyphed_keypoints"} == spec.coco_category()
    # Poses, boxes and visibility are the default's: instance i of a category uses the default's generator.
    coco = _load(out, "mp100_split2_test")
    seen: dict[int, int] = {}
    for ann in coco["annotations"]:
        index = seen.get(ann["category_id"], 0)
        seen[ann["category_id"]] = index + 1
        spec = SPECS[ann["category_id"] - 1]
        inst, _ = _instance_and_render(spec, index, size=64)
        assert ann == emb._coco_annotation(spec, inst, ann["image_id"])


def test_ensure_keeps_the_hard_folder(hard_bench):
    out, _ = hard_bench
    kept = emb.ensure_embedded_benchmark(out, instances_per_category=2, instances_per_species=10, image_size=64)
    assert not kept["generated"]  # train.py / eval.py --data_dir on a hard folder use it as it is


def test_mirror_pairs_share_a_glyph(hard_bench):
    out, _ = hard_bench
    table = json.loads((out / "glyphs.json").read_text())
    paired = 0
    for name, glyph in table.items():
        other = emb.mirror_name(name)
        if other != name and other in table:
            assert glyph == table[other], name
            paired += 1
        else:  # names without a side keep their unique default glyph
            assert glyph["shape"] == emb.GLYPHS[name].shape and glyph["colour"] == emb.GLYPHS[name].colour
    assert paired >= 40


def test_unglyphed_keypoints_are_recorded_joints_without_glyph(hard_bench):
    out, summary = hard_bench
    total = 0
    for stem in STEMS:
        for category in _load(out, stem)["categories"]:
            unglyphed, names = category["unglyphed_keypoints"], category["keypoints"]
            assert set(unglyphed) <= set(names)
            assert len(unglyphed) == max(1, round(0.25 * len(names)))
            spec = SPEC_BY_NAME[category["name"]]
            degree = np.bincount(np.array(spec.limbs).ravel(), minlength=len(spec.layout))
            if (degree[: len(names)] >= 2).sum() >= len(unglyphed):  # joints first, where there are enough
                assert all(degree[names.index(n)] >= 2 for n in unglyphed), category["name"]
            total += len(unglyphed) if stem.startswith("mp100_split1") or stem == "ap10k_train" else 0
    assert summary["unglyphed_keypoints"] == total
    # In the pixels: a visible unglyphed keypoint shows the body's colour (a bare joint), a glyphed one its glyph.
    coco = _load(out, "mp100_split1_train")
    names = {c["id"]: (c["keypoints"], set(c["unglyphed_keypoints"])) for c in coco["categories"]}
    files = {img["id"]: img["file_name"] for img in coco["images"]}
    table = hard.glyph_table(hard.HardKnobs())
    checked = {True: 0, False: 0}
    for ann in coco["annotations"][:60]:
        pixels = np.asarray(Image.open(out / "images" / files[ann["image_id"]]).convert("RGB"))
        body = SPECS[ann["category_id"] - 1].body_rgb
        keypoints, unglyphed = names[ann["category_id"]]
        for name, (x, y, v) in zip(keypoints, np.array(ann["keypoints"]).reshape(-1, 3)):
            if v > 0 and table[name].shape not in ("ring", "hollow square", "bowtie"):  # hollow centres
                bare = name in unglyphed
                cx, cy = int(round(x)), int(round(y))
                if bare:  # limbs 2 px wide at 64 px: the joint's pixel may sit one off the keypoint's rounding
                    assert (pixels[cy - 1: cy + 2, cx - 1: cx + 2] == body).all(-1).any(), (name, ann["id"])
                else:
                    assert tuple(pixels[cy, cx]) != body, (name, ann["id"])
                checked[bare] += 1
    assert min(checked.values()) > 20


def test_glyph_jitter_varies_colour_size_and_rotation():
    knobs = replace(hard.KNOBS_OFF, colour_jitter=0.06, size_jitter=0.3, rotation_jitter_deg=45.0)
    rng = np.random.default_rng(0)
    glyph = emb.GLYPHS["nose"]
    looks = [hard._jittered_look(glyph, 5.0, knobs, rng) for _ in range(50)]
    assert len({look.rgb for look in looks}) > 40 and all(look.rgb != glyph.rgb for look in looks[:5])
    assert all(3.5 - 1e-9 <= look.radius <= 5.0 for look in looks) and np.std([look.radius for look in looks]) > 0.2
    assert all(abs(look.angle_deg) <= 45 for look in looks) and np.std([look.angle_deg for look in looks]) > 10
    # The same keypoint is drawn in another colour in another instance (pixel-identical without jitter).
    centre_colours = []
    for spec in SPECS:
        plan = hard.plan_category(spec, knobs, 0)
        drawn = [_instance_and_render(spec, index, plan) for index in range(2)]
        for k, name in enumerate(spec.keypoints):
            if emb.GLYPHS[name].shape == "disc" and all(inst.visible[k] for inst, _ in drawn):
                centre_colours.append({tuple(pixels[int(round(inst.points[k][1])), int(round(inst.points[k][0]))])
                                       for inst, pixels in drawn})
        if len(centre_colours) >= 5:
            break
    assert all(len(colours) == 2 for colours in centre_colours)


def test_distractors_are_drawn_away_from_the_keypoints():
    knobs = replace(hard.KNOBS_OFF, distractors=3)
    for spec in SPECS[:30:6]:
        plan = hard.plan_category(spec, knobs, 0)
        inst, pixels = _instance_and_render(spec, 0, plan)
        _, default = _instance_and_render(spec, 0)
        changed = np.argwhere((pixels != default).any(-1))  # (y, x) where the distractors are
        assert len(changed) > 3 * 10, spec.name
        keypoints = inst.points[: len(spec.keypoints)]
        distance = np.linalg.norm(changed[:, None, ::-1] - keypoints[None], axis=-1).min(1)
        reach = (hard.DISTRACTOR_CLEARANCE - emb.GLYPH_REACH) * inst.glyph_radius - 2.0
        assert distance.min() >= reach, spec.name
        colours = {tuple(c) for c in pixels[changed[:, 0], changed[:, 1]]}
        assert colours & {emb.GLYPHS[n].rgb for n in spec.keypoints}, spec.name  # look-alikes of its own glyphs


def test_knobs_off_draws_the_default_pixels():
    for spec in SPECS[::17] + emb.build_ap10k_species(0)[::7]:
        plan = hard.plan_category(spec, hard.KNOBS_OFF, 0)
        assert plan.unglyphed == () and plan.glyphs == tuple(emb.GLYPHS[n] for n in spec.keypoints)
        for index in range(2):
            assert np.array_equal(_instance_and_render(spec, index, plan)[1], _instance_and_render(spec, index)[1])


def test_contact_sheet_beside(hard_bench, tmp_path):
    out, _ = hard_bench
    single = make_contact_sheet(out, tmp_path / "one.png", n=4, columns=4)
    path = contact_sheet_main(["--data", str(out), "--beside", str(out), "--n", "4", "--columns", "4",
                               "--out", str(tmp_path / "both.png")])
    with Image.open(single) as one, Image.open(path) as both:
        assert both.width == one.width and both.height > 2 * one.height
    assert sorted(p.name for p in tmp_path.iterdir()) == ["both.png", "one.png"]  # the lower sheet's file is gone
