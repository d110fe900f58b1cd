"""The embedded benchmark: layout, determinism, split discipline, COCO validity, glyph rules."""

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from processing import embedded as emb
from processing.contact_sheet import make_contact_sheet

SMALL = dict(instances_per_category=3, instances_per_species=10, image_size=96)
SUBSETS = ("train", "val", "test")
MP_FILES = [f"mp100_split{s}_{sub}" for s in range(1, 6) for sub in SUBSETS]
AP_FILES = [f"ap10k_{sub}" for sub in SUBSETS]
FILLED_CENTRE = {"disc", "square", "diamond", "triangle up", "triangle down", "plus", "cross"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded") / "data"
    start = time.perf_counter()
    summary = emb.generate_embedded_benchmark(out, seed=0, workers=2, **SMALL)
    summary["wall"] = time.perf_counter() - start
    return out, summary


def _load(out: Path, stem: str) -> dict:
    return json.loads((out / "annotations" / f"{stem}.json").read_text())


def test_files_and_summary(bench):
    out, summary = bench
    for stem in MP_FILES + AP_FILES:
        assert (out / "annotations" / f"{stem}.json").is_file()
    assert set(summary["files"]) == set(MP_FILES + AP_FILES)
    assert summary["mp100_categories"] >= 100
    assert summary["images"] == 100 * 3 + summary["ap10k_species"] * 10
    assert len(list((out / "images").glob("*/*.png"))) == summary["images"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["seed"] == 0 and manifest["generator_version"] == emb.GENERATOR_VERSION


def test_reduced_generation_is_fast(bench):
    # 500 images here; the default (3,800 images) scales linearly and must stay under 60 s.
    assert bench[1]["wall"] < 15.0


def test_determinism(bench, tmp_path):
    out, _ = bench
    again = tmp_path / "again"
    emb.generate_embedded_benchmark(again, seed=0, workers=1, **SMALL)  # 1 vs 2 workers too
    for stem in MP_FILES + AP_FILES:
        rel = Path("annotations") / f"{stem}.json"
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), stem
    coco = _load(out, "mp100_split1_test")
    for img in coco["images"][:3] + _load(out, "ap10k_val")["images"][:3]:
        rel = Path("images") / img["file_name"]
        assert (out / rel).read_bytes() == (again / rel).read_bytes()


def test_other_seed_differs_via_cli(bench, tmp_path):
    out, _ = bench
    other = tmp_path / "other"
    emb.main(["--out", str(other), "--seed", "1", "--instances-per-category", "3",
              "--instances-per-species", "10", "--image-size", "96"])
    assert (out / "annotations/mp100_split1_train.json").read_bytes() != \
        (other / "annotations/mp100_split1_train.json").read_bytes()
    first = _load(out, "ap10k_train")["images"][0]["file_name"]
    a = np.asarray(Image.open(out / "images" / first))
    b = np.asarray(Image.open(other / "images" / first))
    assert not np.array_equal(a, b)


def test_split_discipline(bench):
    out, _ = bench
    all_ids: set[int] = set()
    test_sets = []
    for s in range(1, 6):
        ids = {sub: {c["id"] for c in _load(out, f"mp100_split{s}_{sub}")["categories"]} for sub in SUBSETS}
        assert [len(ids[sub]) for sub in SUBSETS] == [70, 10, 20]
        assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
        split_ids = ids["train"] | ids["val"] | ids["test"]
        assert all_ids in (set(), split_ids)  # the same 100 categories in every split
        all_ids = split_ids
        test_sets.append(ids["test"])
        for sub in SUBSETS:  # every image of a category lives in that category's subset file
            coco = _load(out, f"mp100_split{s}_{sub}")
            counts = {cid: 0 for cid in ids[sub]}
            for ann in coco["annotations"]:
                counts[ann["category_id"]] += 1
            assert set(counts.values()) == {SMALL["instances_per_category"]}
    assert len(all_ids) == 100
    assert set().union(*test_sets) == all_ids  # every category is tested in some split
    assert len({frozenset(t) for t in test_sets}) == 5  # five different partitions


def test_name_overlap_at_least_80_percent(bench):
    out, summary = bench
    for s in range(1, 6):
        names = {sub: {n for c in _load(out, f"mp100_split{s}_{sub}")["categories"] for n in c["keypoints"]}
                 for sub in ("train", "test")}
        overlap = len(names["test"] & names["train"]) / len(names["test"])
        assert overlap >= 0.8, (s, overlap)
        assert summary["name_overlap"][f"split{s}"] == pytest.approx(overlap, abs=1e-4)


@pytest.mark.parametrize("stem", MP_FILES[:3] + ["mp100_split4_test"] + AP_FILES)
def test_coco_validity(bench, stem):
    out, _ = bench
    path = out / "annotations" / f"{stem}.json"
    coco = COCO(str(path))
    cats = {c["id"]: c for c in coco.loadCats(coco.getCatIds())}
    for cat in cats.values():
        k = len(cat["keypoints"])
        assert 8 <= k <= 17
        assert all(n in emb.NAME_POOL and n == n.lower() for n in cat["keypoints"])
        assert all(1 <= i <= k and 1 <= j <= k and i != j for i, j in cat["skeleton"])
    for ann in coco.loadAnns(coco.getAnnIds()):
        img = coco.loadImgs(ann["image_id"])[0]
        assert (out / "images" / img["file_name"]).is_file()
        assert img["file_name"].split("/")[0] == cats[ann["category_id"]]["name"]
        kps = np.array(ann["keypoints"], dtype=float).reshape(-1, 3)
        assert len(kps) == len(cats[ann["category_id"]]["keypoints"])
        assert set(kps[:, 2]) <= {0.0, 2.0}
        assert (kps[kps[:, 2] == 0, :2] == 0).all()
        assert ann["num_keypoints"] == int((kps[:, 2] > 0).sum()) >= emb.MIN_VISIBLE
        assert ann["iscrowd"] == 0
        x, y, w, h = ann["bbox"]
        assert ann["area"] == pytest.approx(w * h, abs=0.01)
        assert x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
        vis = kps[kps[:, 2] > 0, :2]
        assert ((vis >= [x, y]) & (vis <= [x + w, y + h])).all()


def test_occlusion_rate(bench):
    out, _ = bench
    v = np.concatenate([np.array(a["keypoints"]).reshape(-1, 3)[:, 2]
                        for a in _load(out, "mp100_split1_train")["annotations"]])
    assert 0.05 < (v == 0).mean() < 0.15


def test_glyph_table_is_one_to_one():
    assert set(emb.GLYPHS) == set(emb.NAME_POOL)
    assert len(set(emb.GLYPHS.values())) == len(emb.GLYPHS)  # one glyph per name, none shared
    assert all(g.shape in emb.GLYPH_SHAPES and g.colour in emb.GLYPH_COLOURS for g in emb.GLYPHS.values())
    for name in emb.NAME_POOL:  # the two sides of a body differ in both shape and colour
        other = emb.mirror_name(name)
        if other != name and other in emb.GLYPHS:
            assert emb.GLYPHS[name].shape != emb.GLYPHS[other].shape
            assert emb.GLYPHS[name].colour != emb.GLYPHS[other].colour


@pytest.mark.parametrize("stem", ["mp100_split2_val", "ap10k_test"])
def test_glyph_is_drawn_at_its_keypoint(bench, stem):
    """The pixel under every visible keypoint has the colour of that keypoint name's glyph."""
    out, _ = bench
    coco = _load(out, stem)
    cats = {c["id"]: c for c in coco["categories"]}
    files = {img["id"]: img["file_name"] for img in coco["images"]}
    checked = 0
    for ann in coco["annotations"][:40]:
        pixels = np.asarray(Image.open(out / "images" / files[ann["image_id"]]).convert("RGB"))
        kps = np.array(ann["keypoints"], dtype=float).reshape(-1, 3)
        for name, (x, y, v) in zip(cats[ann["category_id"]]["keypoints"], kps):
            glyph = emb.GLYPHS[name]
            if v > 0 and glyph.shape in FILLED_CENTRE:
                assert tuple(pixels[int(round(y)), int(round(x))]) == glyph.rgb, (name, ann["id"])
                checked += 1
    assert checked > 50


def test_glyph_size_and_separation():
    """Glyph radius >= 5 % of the bbox side (legible in a 64 px crop); glyphs never overlap."""
    specs = emb.build_mp100_categories(0) + emb.build_ap10k_species(0)
    for spec in specs:
        for i in range(3):
            inst = emb.sample_instance(spec, np.random.default_rng([7, spec.id, i]), 128)
            assert inst.glyph_radius >= 0.05 * max(inst.bbox[2], inst.bbox[3]), spec.name
            kp = inst.points[: len(spec.keypoints)]
            d = np.linalg.norm(kp[:, None] - kp[None], axis=-1) + np.eye(len(kp)) * 1e9
            assert d.min() >= 2 * inst.glyph_radius + 1.0 - 1e-9, spec.name


def test_support_copy_baseline_is_weak(bench):
    out, summary = bench
    pck = emb.support_copy_pck(_load(out, "mp100_split1_test")["annotations"])
    assert pck < 0.5  # copying bbox-normalised support coordinates must not solve the task
    assert all(v < 0.5 for v in summary["support_copy_pck@0.2"].values())


def test_ap10k_subset(bench):
    out, _ = bench
    subsets = {sub: _load(out, f"ap10k_{sub}") for sub in SUBSETS}
    cats = subsets["train"]["categories"]
    assert all(tuple(c["keypoints"]) == emb.AP10K_KEYPOINTS for c in cats)
    assert emb.AP10K_KEYPOINTS[:5] == ("left eye", "right eye", "nose", "neck", "root of tail")
    families = {c["supercategory"] for c in cats}
    assert {"Bovidae", "Canidae", "Felidae"} <= families and len(families) >= 5
    fam_of = {c["id"]: c["supercategory"] for c in cats}
    for sub in SUBSETS:  # the CLAMP protocols need every family in train and test
        assert subsets[sub]["categories"] == cats
        present = {fam_of[a["category_id"]] for a in subsets[sub]["annotations"]}
        assert present == families
    image_ids = [{a["image_id"] for a in subsets[sub]["annotations"]} for sub in SUBSETS]
    assert not (image_ids[0] & image_ids[1] or image_ids[0] & image_ids[2] or image_ids[1] & image_ids[2])
    assert sum(len(s) for s in image_ids) == len(cats) * SMALL["instances_per_species"]


def test_ap10k_flips_keep_left_and_right_physical(bench):
    """Animals face both ways; the near (lower) flank is the right one facing right, else the left."""
    out, _ = bench
    ix = {n: i for i, n in enumerate(emb.AP10K_KEYPOINTS)}
    facings = set()
    for ann in _load(out, "ap10k_train")["annotations"]:
        k = np.array(ann["keypoints"], dtype=float).reshape(-1, 3)
        needed = [ix[n] for n in ("nose", "neck", "left hip", "right hip")]
        if (k[needed, 2] == 0).any():
            continue
        facing_right = k[ix["nose"], 0] > k[ix["neck"], 0]
        facings.add(bool(facing_right))
        left_lower = k[ix["left hip"], 1] > k[ix["right hip"], 1]
        assert left_lower != facing_right, ann["id"]
    assert facings == {True, False}


def test_ensure_reuses_or_regenerates(bench, tmp_path):
    out = tmp_path / "ensure"
    first = emb.ensure_embedded_benchmark(out, instances_per_category=2, instances_per_species=10,
                                          image_size=64)
    assert first["generated"]
    again = emb.ensure_embedded_benchmark(out, instances_per_category=2, instances_per_species=10,
                                          image_size=64)
    assert not again["generated"] and again["files"] == first["files"]
    stale = out / "images" / "bird_01" / "999999.png"
    stale.write_bytes(b"")
    changed = emb.ensure_embedded_benchmark(out, instances_per_category=2, instances_per_species=10,
                                            image_size=64, seed=3)
    assert changed["generated"] and not stale.exists()


def test_contact_sheet(bench, tmp_path):
    out, _ = bench
    path = make_contact_sheet(out, tmp_path / "sheet.png", split="1", subset="test", n=8, columns=4)
    with Image.open(path) as sheet:
        assert sheet.width == 4 * 96 * 3 and sheet.height > 2 * 96 * 3
    path = make_contact_sheet(out, tmp_path / "ap.png", split="ap10k", subset="val", n=3)
    assert path.is_file()


def _digests(out: Path) -> dict[str, str]:
    """sha256 over every JSON file's bytes and every image's decoded pixels (PNG bytes depend on zlib)."""
    files, pixels = hashlib.sha256(), hashlib.sha256()
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = str(path.relative_to(out)).encode()
        if path.suffix == ".png":
            pixels.update(rel)
            pixels.update(np.asarray(Image.open(path).convert("RGB")).tobytes())
        else:
            files.update(rel)
            files.update(path.read_bytes())
    return {"json": files.hexdigest(), "pixels": pixels.hexdigest()}


def test_default_variant_is_unchanged(bench):
    """The default benchmark's numbers are another issue's reference: its files must not change by a byte.

    Digests of this module's small generation, recorded before the hard variant (issue #17) was added.
    """
    assert _digests(bench[0]) == {
        "json": "04b09011d5879a1f641fce261a34dde0f7d362f15f062bd00aa4c417ab742784",
        "pixels": "491e76fb9689685b66969cd71882c3371ccf249e195105dca3634d5d9e0f262f",
    }
