"""Embedded benchmark: a procedurally generated keypoint dataset the repo creates itself.

Why it exists: KptLLM must be trainable and evaluable with no downloads (DESIGN.md §5). This module
draws a small, deterministic dataset in exactly the MP-100 / AP-10K COCO layout so that the same
readers, episode samplers and metrics run on it as on the real datasets.

Layout of ``<out>``::

    annotations/mp100_split{1..5}_{train,val,test}.json   # 100 categories, 70/10/20 per split
    annotations/ap10k_{train,val,test}.json               # 17 AP-10K keypoints, synthetic species
    images/<category name>/<image id:06d>.png             # one instance per image
    glyphs.json                                           # keypoint name -> glyph (documentation)
    manifest.json                                         # generator version, parameters, summary

What makes the task learnable but not trivial:

* Every keypoint *name* has one global glyph (shape x colour, 10 x 8 = 80 glyphs for an 80-name
  pool), drawn at that keypoint in every category that uses the name. Appearance -> name
  (semantic task), name -> appearance (textual task) and support glyph <-> query glyph (visual
  task) are therefore learnable and transfer to unseen categories.
* Each category has its own random, left/right-symmetric canonical layout and skeleton; every
  instance applies a random rotation (full circle for MP-100-style categories; +-10 degrees and
  a left/right flip for AP-10K species), an anisotropic
  scale, per-limb articulation and a random position on a mildly cluttered background, and ~10 %
  of the keypoints are occluded (glyph not drawn, ``v=0``). Copying the support keypoints'
  bbox-normalised coordinates (the "support copy" baseline) therefore scores far below a glyph
  matcher; its PCK@0.2 is measured at generation time and reported in the summary
  (0.24-0.26 per split on the default benchmark).
* Keypoint names come from themed pools ("quadruped", "bird", "vehicle", ...) and categories are
  assigned to test folds stratified by theme, so for every split 100 % of the keypoint names of
  the test categories also occur in its training categories (the requirement is >= 80 %; the
  generator asserts it and records ``name_overlap`` per split in the summary).
* The glyph radius r is 6 % of the body extent, i.e. >= 5 % of the bbox's longer side, so glyphs
  stay visible when the bbox crop is resized to 64 x 64 px; keypoints of an instance are at least
  2r + 1 px apart (pose rejection sampling), so glyphs do not cover each other.

AP-10K subset: 20 synthetic species in 5 families (``supercategory`` = Bovidae, Canidae, Felidae,
Equidae, Ursidae), quadruped template with family-specific proportions, the 17 AP-10K keypoints
in AP-10K order and the AP-10K skeleton. Instances of every species are split 70/10/20 % into
``ap10k_{train,val,test}.json`` (like AP-10K, species are shared across the three files); CLAMP's
cross-species protocols select by family, e.g. train on the Bovidae instances of
``ap10k_train.json`` and test on the Canidae instances of ``ap10k_test.json``.

Hard variant (``--difficulty hard``, :mod:`processing.embedded_hard`): the same files, categories,
splits, poses and annotations, drawn so that appearance alone is ambiguous: left/right pairs share a
glyph, a quarter of each category's keypoints (skeleton joints) carry none, every glyph's colour,
size and rotation is jittered, and look-alike glyphs sit in the background. Its knobs and their
measured effect on the baselines are in that module and ``docs/embedded_hard.md``.

Everything is a pure function of the seed: every instance has its own random generator derived
from ``(seed, category, instance)``, so the worker pool's scheduling cannot change any byte.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from .coco import AP10K_KEYPOINT_NAMES

if TYPE_CHECKING:  # embedded_hard builds on this module, so it is imported where it is used
    from .embedded_hard import HardCategoryPlan, HardKnobs

GENERATOR_VERSION = "1.0"

# ----------------------------------------------------------------------------------------------
# Keypoint names, themes and glyphs
# ----------------------------------------------------------------------------------------------

AP10K_KEYPOINTS: tuple[str, ...] = AP10K_KEYPOINT_NAMES  # the real dataset's names and order
# AP-10K's own skeleton (1-based, as in its annotation files).
AP10K_SKELETON: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 3), (2, 3), (3, 4), (4, 5), (4, 6), (6, 7), (7, 8), (4, 9), (9, 10),
    (10, 11), (5, 12), (12, 13), (13, 14), (5, 15), (15, 16), (16, 17),
)
AP10K_FAMILIES: tuple[str, ...] = ("Bovidae", "Canidae", "Felidae", "Equidae", "Ursidae")

# Themed name pools play the role of MP-100's super-categories. Names shared between themes
# ("left eye", "nose", "left shoulder", ...) share their glyph, which is what makes the
# semantics transfer across categories.
THEMES: dict[str, tuple[str, ...]] = {
    "quadruped": AP10K_KEYPOINTS + ("tail tip", "left ear", "right ear", "chin"),
    "human_body": (
        "head top", "nose", "left eye", "right eye", "left ear", "right ear",
        "left shoulder", "right shoulder", "left elbow", "right elbow", "left wrist", "right wrist",
        "left hip", "right hip", "left knee", "right knee", "left ankle", "right ankle",
    ),
    "animal_face": (
        "forehead", "left eyebrow", "right eyebrow", "left eye", "right eye", "left ear",
        "right ear", "nose", "left cheek", "right cheek", "upper lip", "lower lip",
        "left mouth corner", "right mouth corner", "chin",
    ),
    "bird": (
        "head top", "beak tip", "left eye", "right eye", "neck", "breast",
        "left wing joint", "right wing joint", "left wing tip", "right wing tip", "tail tip",
        "left foot", "right foot",
    ),
    "insect": (
        "head top", "left eye", "right eye", "left antenna tip", "right antenna tip", "thorax",
        "abdomen tip", "left front leg tip", "right front leg tip", "left middle leg tip",
        "right middle leg tip", "left hind leg tip", "right hind leg tip", "left wing tip",
        "right wing tip",
    ),
    "vehicle": (
        "left headlight", "right headlight", "front bumper center", "left mirror", "right mirror",
        "front left wheel", "front right wheel", "rear left wheel", "rear right wheel",
        "left taillight", "right taillight", "rear bumper center",
    ),
    "furniture": (
        "backrest top", "top left corner", "top right corner", "left armrest", "right armrest",
        "seat center", "bottom left corner", "bottom right corner", "front left leg",
        "front right leg", "back left leg", "back right leg",
    ),
    "clothes": (
        "collar center", "neck", "left shoulder", "right shoulder", "left elbow", "right elbow",
        "left wrist", "right wrist", "left hip", "right hip",
        "left hem", "right hem",
    ),
}


def _ordered_union(groups: list[tuple[str, ...]]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for group in groups:
        for name in group:
            seen.setdefault(name, None)
    return tuple(seen)


NAME_POOL: tuple[str, ...] = _ordered_union(list(THEMES.values()))

GLYPH_SHAPES: tuple[str, ...] = (
    "disc", "ring", "square", "hollow square", "diamond",
    "triangle up", "triangle down", "plus", "cross", "bowtie",
)
GLYPH_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (235, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (255, 235, 0),
    "green": (20, 200, 40),
    "cyan": (0, 225, 235),
    "blue": (35, 75, 255),
    "magenta": (235, 0, 235),
    "white": (255, 255, 255),
}


@dataclass(frozen=True)
class Glyph:
    """The mark drawn at every keypoint with a given name, in every category."""

    shape: str
    colour: str

    @property
    def rgb(self) -> tuple[int, int, int]:
        return GLYPH_COLOURS[self.colour]


def _build_glyph_table() -> dict[str, Glyph]:
    """Name i -> (shape i mod 10, colour (i + i div 10) mod 8).

    Injective for i < 80 because names with the same shape differ by 10k (k = 1..7) in index and
    therefore by 11k = 3k (mod 8) != 0 in colour. Consecutive names (left/right pairs) differ in
    shape and colour, so the two sides of a body are never confusable. The table depends only on
    ``NAME_POOL``, never on the seed, so models trained on one seed read glyphs of another.
    """
    shapes, colours = len(GLYPH_SHAPES), list(GLYPH_COLOURS)
    if len(NAME_POOL) > shapes * len(colours):
        raise AssertionError("name pool larger than the glyph alphabet")
    return {
        name: Glyph(GLYPH_SHAPES[i % shapes], colours[(i + i // shapes) % len(colours)])
        for i, name in enumerate(NAME_POOL)
    }


GLYPHS: dict[str, Glyph] = _build_glyph_table()

# ----------------------------------------------------------------------------------------------
# Geometry constants (fractions of the extent, i.e. the longer side of the box around all drawn
# body points of an instance: keypoints plus an AP-10K tail tip)
# ----------------------------------------------------------------------------------------------

GLYPH_RADIUS_FRAC = 0.06  # glyph radius r
GLYPH_REACH = 1.15  # farthest glyph pixel from its centre, in units of r (square/cross corners)
BBOX_MARGIN_FRAC = 0.01  # margin beyond the farthest glyph pixel and its 1 px outline
# => bbox side = 1.158 * extent + 2 px, so r >= 5 % of the bbox side whenever the extent is
#    >= 48 px, i.e. for image_size >= 88 (at the 64 px minimum r is >= 4.9 % of the bbox side).
EXTENT_RANGE = (0.55, 0.80)  # body extent / image side; the bbox (<= 0.93 x side + 2 px) fits
OCCLUSION_PROB = 0.10
MIN_VISIBLE = 3

MP100_NUM_CATEGORIES = 100
MP100_NUM_SPLITS = 5
MP100_SPLIT_SIZES = {"train": 70, "val": 10, "test": 20}
AP10K_SPECIES_PER_FAMILY = 4
AP10K_SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1}  # the rest is test
SUBSETS = ("train", "val", "test")


def mirror_name(name: str) -> str:
    """'left front paw' <-> 'right front paw'; names without a side map to themselves."""
    words = name.split()
    swap = {"left": "right", "right": "left"}
    return " ".join(swap.get(w, w) for w in words)


@dataclass
class CategorySpec:
    """Everything needed to draw instances of one category (MP-100-style or AP-10K species)."""

    id: int
    name: str
    supercategory: str
    keypoints: tuple[str, ...]
    layout: np.ndarray  # (K + E, 2) canonical positions; rows >= K are non-keypoint body points
    parents: tuple[int, ...]  # articulation tree over all rows, -1 for the root
    limbs: tuple[tuple[int, int], ...]  # 0-based row pairs drawn as thick lines
    skeleton: tuple[tuple[int, int], ...]  # 1-based keypoint pairs written to the JSON
    polygons: tuple[tuple[int, ...], ...]  # rows whose convex hull is filled (torso, head)
    body_rgb: tuple[int, int, int]
    max_rotation_deg: float
    anisotropy: float  # max ratio between the two axis scales
    joint_deg: tuple[float, ...]  # per row: max random turn of the row about its parent
    can_flip: bool  # mirror + swap left/right names (physically consistent flip)

    def coco_category(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "supercategory": self.supercategory,
            "keypoints": list(self.keypoints),
            "skeleton": [list(edge) for edge in self.skeleton],
        }


@dataclass
class Instance:
    """One placed instance: pixel keypoints, visibility, bbox and the glyph size used."""

    points: np.ndarray  # (K + E, 2) pixel positions of all rows (extra rows: body only)
    visible: np.ndarray  # (K,) bool
    bbox: tuple[float, float, float, float]  # x, y, w, h
    glyph_radius: float


# ----------------------------------------------------------------------------------------------
# Category construction
# ----------------------------------------------------------------------------------------------


def _muted_rgb(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float],
               hue: tuple[float, float] = (0.0, 1.0)) -> tuple[int, int, int]:
    """A low-saturation colour: body and clutter colours must never look like a glyph colour."""
    h = float(rng.uniform(*hue)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, float(rng.uniform(*sat)), float(rng.uniform(*val)))
    return int(r * 255), int(g * 255), int(b * 255)


def _mst_tree(points: np.ndarray) -> tuple[list[tuple[int, int]], list[int]]:
    """Minimum spanning tree (Prim) of the canonical layout: a natural-looking random skeleton.

    Rooted at the point nearest the centroid; returns (parent, child) edges and the parent array.
    """
    n = len(points)
    dist = np.linalg.norm(points[:, None] - points[None], axis=-1)
    root = int(np.argmin(np.linalg.norm(points - points.mean(0), axis=1)))
    parent = [-1] * n
    in_tree = np.zeros(n, bool)
    in_tree[root] = True
    best = dist[root].copy()
    best_from = np.full(n, root)
    edges: list[tuple[int, int]] = []
    for _ in range(n - 1):
        cand = np.where(~in_tree, best, np.inf)
        j = int(np.argmin(cand))
        i = int(best_from[j])
        edges.append((i, j))
        parent[j] = i
        in_tree[j] = True
        closer = dist[j] < best
        best = np.where(closer, dist[j], best)
        best_from = np.where(closer, j, best_from)
    return edges, parent


def _pick_names(pool: tuple[str, ...], rng: np.random.Generator) -> tuple[str, ...]:
    """Pick 8..17 names as symmetric units (a left/right pair counts two), in pool order."""
    target = int(rng.integers(8, min(17, len(pool)) + 1))
    units: list[tuple[str, ...]] = []
    for name in pool:
        mirrored = mirror_name(name)
        if mirrored == name or mirrored not in pool:
            units.append((name,))
        elif "left" in name.split():
            units.append((name, mirrored))  # the 'right' name is covered by its 'left' unit
    chosen: list[str] = []
    while len(chosen) < 8:  # only pairs left may stop one short of an 8-keypoint target
        chosen = []
        for idx in rng.permutation(len(units)):
            unit = units[int(idx)]
            if len(chosen) + len(unit) <= target:
                chosen.extend(unit)
    order = {name: i for i, name in enumerate(pool)}
    return tuple(sorted(chosen, key=order.__getitem__))


def _symmetric_layout(names: tuple[str, ...], rng: np.random.Generator,
                      min_sep: float = 0.2) -> np.ndarray | None:
    """Place names in the unit square: centre names on x=0.5, 'left X'/'right X' mirrored.

    'left' goes to image-right (a subject facing the viewer). Returns None when random sequential
    placement gets stuck, so the caller retries with a fresh draw.
    """
    pos: dict[str, np.ndarray] = {}
    placed: list[np.ndarray] = []

    def free(p: np.ndarray) -> bool:
        return all(np.linalg.norm(p - q) >= min_sep for q in placed)

    for idx in rng.permutation(len(names)):
        name = names[int(idx)]
        if name in pos:
            continue
        mirrored = mirror_name(name)
        paired = mirrored != name and mirrored in names
        for _ in range(300):
            if not paired:
                p = np.array([0.5, rng.uniform(0.0, 1.0)])
                if free(p):
                    pos[name] = p
                    placed.append(p)
                    break
            else:
                x = rng.uniform(0.5 + min_sep / 2, 1.0)
                y = rng.uniform(0.0, 1.0)
                left_name = name if "left" in name.split() else mirrored
                p_left, p_right = np.array([x, y]), np.array([1.0 - x, y])
                if free(p_left) and free(p_right):
                    pos[left_name], pos[mirror_name(left_name)] = p_left, p_right
                    placed.extend([p_left, p_right])
                    break
        else:
            return None
    return np.stack([pos[n] for n in names])


def _make_mp100_category(cat_id: int, name: str, theme: str, seed: int) -> CategorySpec:
    rng = np.random.default_rng([seed, 1, cat_id])
    while True:
        names = _pick_names(THEMES[theme], rng)
        layout = _symmetric_layout(names, rng)
        if layout is not None:
            break
    # Stretch the canonical layout a little so categories differ in aspect ratio too.
    layout = (layout - 0.5) * np.array([1.0, rng.uniform(0.8, 1.25)])
    edges, parent = _mst_tree(layout)
    return CategorySpec(
        id=cat_id,
        name=name,
        supercategory=theme,
        keypoints=names,
        layout=layout,
        parents=tuple(parent),
        limbs=tuple(edges),
        skeleton=tuple(sorted((min(i, j) + 1, max(i, j) + 1) for i, j in edges)),
        polygons=(),
        body_rgb=_muted_rgb(rng, sat=(0.15, 0.45), val=(0.18, 0.38)),
        max_rotation_deg=180.0,
        anisotropy=1.3,
        joint_deg=(12.0,) * len(names),
        can_flip=False,
    )


# Per-family ranges of the quadruped template parameters (body length = 1 unit scale):
# body length, leg length, neck length, neck angle (deg above horizontal), head size,
# tail length, tail angle (deg below horizontal), hue range of the muted body colour.
_FAMILY_PARAMS: dict[str, dict[str, tuple[float, float]]] = {
    "Bovidae": dict(body=(1.20, 1.35), leg=(1.05, 1.20), neck=(0.60, 0.70), neck_deg=(15, 35),
                    head=(0.50, 0.60), tail=(0.35, 0.50), tail_deg=(75, 88), hue=(0.05, 0.12)),
    "Canidae": dict(body=(1.10, 1.25), leg=(1.00, 1.10), neck=(0.60, 0.70), neck_deg=(40, 60),
                    head=(0.55, 0.65), tail=(0.40, 0.55), tail_deg=(50, 70), hue=(0.55, 0.70)),
    "Felidae": dict(body=(1.15, 1.30), leg=(0.95, 1.05), neck=(0.60, 0.68), neck_deg=(25, 45),
                    head=(0.45, 0.55), tail=(0.45, 0.60), tail_deg=(45, 65), hue=(0.08, 0.14)),
    "Equidae": dict(body=(1.20, 1.35), leg=(1.15, 1.30), neck=(0.68, 0.80), neck_deg=(50, 65),
                    head=(0.55, 0.65), tail=(0.40, 0.55), tail_deg=(70, 85), hue=(0.0, 0.05)),
    "Ursidae": dict(body=(1.15, 1.30), leg=(0.95, 1.05), neck=(0.60, 0.68), neck_deg=(5, 25),
                    head=(0.50, 0.60), tail=(0.12, 0.20), tail_deg=(30, 60), hue=(0.02, 0.10)),
}


def _quadruped_layout(rng: np.random.Generator, p: dict[str, tuple[float, float]]) -> np.ndarray:
    """17 AP-10K keypoints + tail tip, animal facing +x, y down, right side nearer the viewer.

    A stylised three-quarter view: the far (left) side is shifted up and forward, and the
    offsets are chosen so that every pair of keypoints stays at least ~14 % of the extent apart,
    because glyphs are 12 % of the extent wide and must not overlap.
    """
    u = {k: float(rng.uniform(*v)) for k, v in p.items() if k != "hue"}
    body, leg = u["body"], u["leg"]
    depth = np.array([0.45, -0.35])
    r_hip, r_sh = np.array([0.0, 0.0]), np.array([body, 0.0])
    l_hip, l_sh = r_hip + depth, r_sh + depth
    neck = r_sh + np.array([0.40, -0.95])
    a = math.radians(u["neck_deg"])
    r_eye = neck + u["neck"] * np.array([math.cos(a), -math.sin(a)])
    l_eye = r_eye + np.array([0.25, -0.45])
    nose = r_eye + np.array([u["head"], 0.25])
    tail_root = np.array([-0.30, -0.50])
    t = math.radians(u["tail_deg"])
    tail_tip = tail_root + u["tail"] * np.array([-math.cos(t), math.sin(t)])

    def limb(top: np.ndarray, swing: float) -> tuple[np.ndarray, np.ndarray]:
        return top + np.array([swing, 0.5 * leg]), top + np.array([2 * swing, leg])

    r_elb, r_fpaw = limb(r_sh, -0.05)
    l_elb, l_fpaw = limb(l_sh, 0.05)
    r_knee, r_bpaw = limb(r_hip, -0.05)
    l_knee, l_bpaw = limb(l_hip, 0.03)
    pts = [l_eye, r_eye, nose, neck, tail_root, l_sh, l_elb, l_fpaw, r_sh, r_elb, r_fpaw,
           l_hip, l_knee, l_bpaw, r_hip, r_knee, r_bpaw, tail_tip]
    return np.stack(pts)


def _make_ap10k_species(cat_id: int, family: str, index: int, seed: int) -> CategorySpec:
    rng = np.random.default_rng([seed, 3, cat_id])
    params = _FAMILY_PARAMS[family]
    layout = _quadruped_layout(rng, params)
    k = len(AP10K_KEYPOINTS)
    ix = {name: i for i, name in enumerate(AP10K_KEYPOINTS)}
    tail_tip = k
    parent_of = {
        "neck": None, "nose": "neck", "left eye": "nose", "right eye": "nose",
        "root of tail": "neck", "left shoulder": "neck", "right shoulder": "neck",
        "left elbow": "left shoulder", "left front paw": "left elbow",
        "right elbow": "right shoulder", "right front paw": "right elbow",
        "left hip": "root of tail", "right hip": "root of tail",
        "left knee": "left hip", "left back paw": "left knee",
        "right knee": "right hip", "right back paw": "right knee",
    }
    parents = [-1 if parent_of[n] is None else ix[parent_of[n]] for n in AP10K_KEYPOINTS]
    parents.append(ix["root of tail"])
    limbs = [(i - 1, j - 1) for i, j in AP10K_SKELETON] + [(ix["root of tail"], tail_tip)]
    # Legs, head and tail move; the torso (neck, shoulders, hips, root of tail) and the eyes
    # relative to the nose stay rigid, so articulation never squeezes glyphs together.
    moving = {"left elbow": 8, "left front paw": 15, "right elbow": 8, "right front paw": 15,
              "left knee": 8, "left back paw": 15, "right knee": 8, "right back paw": 15, "nose": 10}
    joint_deg = [float(moving.get(n, 0.0)) for n in AP10K_KEYPOINTS] + [25.0]  # + tail tip
    torso = tuple(ix[n] for n in ("neck", "left shoulder", "right shoulder", "right hip",
                                  "left hip", "root of tail"))
    head = tuple(ix[n] for n in ("left eye", "right eye", "nose", "neck"))
    return CategorySpec(
        id=cat_id,
        name=f"{family.lower()}_{index + 1:02d}",
        supercategory=family,
        keypoints=AP10K_KEYPOINTS,
        layout=layout - layout.mean(0),
        parents=tuple(parents),
        limbs=tuple(limbs),
        skeleton=AP10K_SKELETON,
        polygons=(torso, head),
        body_rgb=_muted_rgb(rng, sat=(0.25, 0.5), val=(0.2, 0.4), hue=params["hue"]),
        max_rotation_deg=10.0,
        anisotropy=1.1,
        joint_deg=tuple(joint_deg),
        can_flip=True,
    )


def build_mp100_categories(seed: int) -> list[CategorySpec]:
    """100 categories, spread over the themes as evenly as possible (13 or 12 per theme)."""
    themes = list(THEMES)
    per_theme = [MP100_NUM_CATEGORIES // len(themes)] * len(themes)
    for i in range(MP100_NUM_CATEGORIES % len(themes)):
        per_theme[i] += 1
    specs: list[CategorySpec] = []
    for theme, count in zip(themes, per_theme):
        for j in range(count):
            specs.append(_make_mp100_category(len(specs) + 1, f"{theme}_{j + 1:02d}", theme, seed))
    return specs


def build_ap10k_species(seed: int) -> list[CategorySpec]:
    specs: list[CategorySpec] = []
    for family in AP10K_FAMILIES:
        for j in range(AP10K_SPECIES_PER_FAMILY):
            specs.append(_make_ap10k_species(len(specs) + 1, family, j, seed))
    return specs


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


def make_mp100_splits(specs: list[CategorySpec], seed: int) -> dict[int, dict[str, list[int]]]:
    """Five 70/10/20 partitions of the category ids; the five test sets partition all categories.

    Categories are dealt round-robin into five folds within each theme (after a seeded shuffle),
    so each test fold holds 2-3 categories of every theme and its names are covered by training.
    """
    rng = np.random.default_rng([seed, 2])
    folds: list[list[int]] = [[] for _ in range(MP100_NUM_SPLITS)]
    by_theme: dict[str, list[int]] = {}
    for spec in specs:
        by_theme.setdefault(spec.supercategory, []).append(spec.id)
    offset = 0
    for theme in THEMES:
        ids = [by_theme[theme][int(i)] for i in rng.permutation(len(by_theme[theme]))]
        for i, cid in enumerate(ids):
            folds[(offset + i) % MP100_NUM_SPLITS].append(cid)
        offset += len(ids)
    splits: dict[int, dict[str, list[int]]] = {}
    for s in range(MP100_NUM_SPLITS):
        test = sorted(folds[s])
        rest = [cid for f in range(MP100_NUM_SPLITS) if f != s for cid in folds[f]]
        rest.sort()
        val = sorted(int(rest[int(i)]) for i in rng.permutation(len(rest))[: MP100_SPLIT_SIZES["val"]])
        train = sorted(set(rest) - set(val))
        splits[s + 1] = {"train": train, "val": val, "test": test}
    return splits


def name_overlap(specs: list[CategorySpec], split: dict[str, list[int]]) -> float:
    """Share of the distinct keypoint names of the test categories seen in training categories."""
    by_id = {s.id: s for s in specs}
    train_names = {n for cid in split["train"] for n in by_id[cid].keypoints}
    test_names = {n for cid in split["test"] for n in by_id[cid].keypoints}
    return len(test_names & train_names) / len(test_names)


# ----------------------------------------------------------------------------------------------
# Instances
# ----------------------------------------------------------------------------------------------


def _rot(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def _articulate(spec: CategorySpec, rng: np.random.Generator) -> np.ndarray:
    """Rotate every limb about its parent by a small random angle (translations propagate)."""
    src = spec.layout
    out = src.copy()
    done = [False] * len(src)

    def place(i: int) -> None:
        if done[i]:
            return
        par = spec.parents[i]
        if par >= 0:
            place(par)
            angle = rng.uniform(-spec.joint_deg[i], spec.joint_deg[i])
            out[i] = out[par] + _rot(angle) @ (src[i] - src[par])
        done[i] = True

    for i in range(len(src)):
        place(i)
    return out + rng.normal(0.0, 0.01, size=out.shape)


def _min_pairwise(points: np.ndarray) -> float:
    d = np.linalg.norm(points[:, None] - points[None], axis=-1)
    d[np.diag_indices(len(points))] = np.inf
    return float(d.min())


def sample_instance(spec: CategorySpec, rng: np.random.Generator, image_size: int) -> Instance:
    """Random pose, scale and position; rejection keeps glyphs of different keypoints apart."""
    k = len(spec.keypoints)
    for _ in range(200):
        pts = _articulate(spec, rng)
        names = spec.keypoints
        if spec.can_flip and rng.random() < 0.5:
            # Mirror the drawing and swap the left/right labels: an animal that faces the
            # other way shows its other flank, so names stay physically correct.
            pts = pts * np.array([-1.0, 1.0])
            names = tuple(mirror_name(n) for n in spec.keypoints)
        log_ratio = rng.uniform(-math.log(spec.anisotropy), math.log(spec.anisotropy))
        scale = np.array([math.exp(log_ratio / 2), math.exp(-log_ratio / 2)])
        rot = _rot(rng.uniform(-spec.max_rotation_deg, spec.max_rotation_deg))
        pts = (pts * scale) @ rot.T
        # The extent covers the whole drawn body (an AP-10K tail too), so the glyph radius is a
        # fixed fraction of the bbox side whatever the category.
        extent_px = rng.uniform(*EXTENT_RANGE) * image_size
        factor = extent_px / float((pts.max(0) - pts.min(0)).max())
        pts = pts * factor
        radius = GLYPH_RADIUS_FRAC * extent_px
        if _min_pairwise(pts[:k]) >= 2.0 * radius + 1.0:
            break
    else:
        raise RuntimeError(f"could not place the glyphs of {spec.name} without overlap")
    pad = GLYPH_REACH * radius + 1.0 + BBOX_MARGIN_FRAC * extent_px
    lo, hi = pts.min(0) - pad, pts.max(0) + pad
    shift = np.array([rng.uniform(1.0 - lo[a], image_size - 1.0 - hi[a]) for a in range(2)])
    pts = pts + shift
    lo, hi = lo + shift, hi + shift
    while True:
        visible = rng.random(k) >= OCCLUSION_PROB
        if visible.sum() >= MIN_VISIBLE:
            break
    x0, y0 = round(float(lo[0]), 2), round(float(lo[1]), 2)
    bbox = (x0, y0, round(float(hi[0]) - x0, 2), round(float(hi[1]) - y0, 2))
    # Row k of the drawing carries the glyph of names[k]; the annotation must list the keypoint
    # with that name, so reorder rows into the category's keypoint order.
    row_of = {name: row for row, name in enumerate(names)}
    order = [row_of[name] for name in spec.keypoints]
    kp_rows = np.concatenate([pts[order], pts[k:]])
    return Instance(points=kp_rows, visible=visible, bbox=bbox, glyph_radius=float(radius))


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _glyph_polygons(shape: str, cx: float, cy: float, r: float, grow: float) -> list[tuple[str, Any]]:
    """Primitives for a glyph; ``grow`` > 0 gives the enlarged black outline drawn underneath."""
    R = r + grow
    w = max(2.0, 0.42 * r) + 2 * grow  # stroke width for ring / hollow square / plus / cross
    if shape == "disc":
        return [("ellipse", [cx - R, cy - R, cx + R, cy + R])]
    if shape == "ring":
        return [("ring", ([cx - R, cy - R, cx + R, cy + R], w))]
    if shape == "square":
        s = 0.8 * r + grow
        return [("polygon", [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)])]
    if shape == "hollow square":
        s = 0.8 * r + grow
        return [("frame", ([cx - s, cy - s, cx + s, cy + s], w))]
    if shape == "diamond":
        s = 1.1 * r + grow
        return [("polygon", [(cx, cy - s), (cx + s, cy), (cx, cy + s), (cx - s, cy)])]
    if shape in ("triangle up", "triangle down"):
        s = r + 1.8 * grow  # centroid on the keypoint, vertices at 1.1 r; outline ~1 px on the base
        sign = -1.0 if shape == "triangle up" else 1.0
        return [("polygon", [(cx, cy + sign * 1.1 * s), (cx + 0.95 * s, cy - sign * 0.55 * s),
                             (cx - 0.95 * s, cy - sign * 0.55 * s)])]
    if shape == "plus":
        h = w / 2
        return [("polygon", [(cx - R, cy - h), (cx + R, cy - h), (cx + R, cy + h), (cx - R, cy + h)]),
                ("polygon", [(cx - h, cy - R), (cx + h, cy - R), (cx + h, cy + R), (cx - h, cy + R)])]
    if shape == "cross":
        h, d = w / 2 / math.sqrt(2), R / math.sqrt(2) * 1.1
        return [("polygon", [(cx - d - h, cy - d + h), (cx - d + h, cy - d - h),
                             (cx + d + h, cy + d - h), (cx + d - h, cy + d + h)]),
                ("polygon", [(cx + d - h, cy - d - h), (cx + d + h, cy - d + h),
                             (cx - d + h, cy + d + h), (cx - d - h, cy + d - h)])]
    if shape == "bowtie":
        s = 0.8 * r + grow
        return [("polygon", [(cx - s, cy - s), (cx + 0.15 * r, cy), (cx - s, cy + s)]),
                ("polygon", [(cx + s, cy - s), (cx - 0.15 * r, cy), (cx + s, cy + s)])]
    raise ValueError(f"unknown glyph shape {shape!r}")


def draw_glyph(draw: ImageDraw.ImageDraw, glyph: Glyph, cx: float, cy: float, r: float) -> None:
    """Black outline then the coloured glyph, so any glyph reads on any background."""
    for grow, colour in ((1.0, (0, 0, 0)), (0.0, glyph.rgb)):
        for kind, geom in _glyph_polygons(glyph.shape, cx, cy, r, grow):
            if kind == "ellipse":
                draw.ellipse(geom, fill=colour)
            elif kind == "polygon":
                draw.polygon(geom, fill=colour)
            elif kind == "ring":
                box, width = geom
                draw.ellipse(box, outline=colour, width=int(round(width)))
            elif kind == "frame":
                box, width = geom
                draw.rectangle(box, outline=colour, width=int(round(width)))


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Light muted base colour, low-frequency shading, faint pixel noise and 4-8 clutter shapes.

    Clutter uses thin lines, arcs, large ellipses and rectangles in muted colours only, so it
    never imitates a glyph (small, saturated, black-outlined) and stays behind the darker,
    thicker body.
    """
    base = np.array(_muted_rgb(rng, sat=(0.0, 0.3), val=(0.5, 0.8)), dtype=np.float32)
    coarse = rng.uniform(-18, 18, size=(5, 5)).astype(np.float32)
    shade = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR))
    noise = rng.uniform(-4, 4, size=(size, size)).astype(np.float32)
    arr = base[None, None, :] + (shade + noise)[..., None]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 9))):
        colour = _muted_rgb(rng, sat=(0.0, 0.25), val=(0.3, 0.9))
        kind = int(rng.integers(4))
        x0, y0 = rng.uniform(-0.2, 1.0, size=2) * size
        ext = rng.uniform(0.25, 0.7, size=2) * size
        box = [float(x0), float(y0), float(x0 + ext[0]), float(y0 + ext[1])]
        width = int(rng.integers(1, 3))  # thinner than any limb
        if kind == 0:
            x1, y1 = rng.uniform(0, 1, size=2) * size
            draw.line([float(x0), float(y0), float(x1), float(y1)], fill=colour, width=width)
        elif kind == 1:
            start = float(rng.uniform(0, 360))
            draw.arc(box, start, start + float(rng.uniform(60, 270)), fill=colour, width=width)
        elif kind == 2:
            draw.ellipse(box, outline=colour, width=width)
        else:
            draw.rectangle(box, outline=colour, width=width)
    return img


def _convex_hull(points: np.ndarray) -> list[tuple[float, float]]:
    pts = sorted(map(tuple, points.tolist()))

    def half(seq: list[tuple[float, float]]) -> list[tuple[float, float]]:
        out: list[tuple[float, float]] = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out

    lower, upper = half(pts), half(pts[::-1])
    return lower[:-1] + upper[:-1]


def draw_body(draw: ImageDraw.ImageDraw, spec: CategorySpec, inst: Instance) -> None:
    """The category's body: filled polygons, limbs and round joints, in its body colour."""
    limb_w = max(2, int(round(0.6 * inst.glyph_radius)))
    for poly in spec.polygons:
        hull = _convex_hull(inst.points[list(poly)])
        draw.polygon(hull, fill=spec.body_rgb)
    for i, j in spec.limbs:
        (x0, y0), (x1, y1) = inst.points[i], inst.points[j]
        draw.line([float(x0), float(y0), float(x1), float(y1)], fill=spec.body_rgb, width=limb_w)
    for x, y in inst.points:
        h = limb_w / 2
        draw.ellipse([x - h, y - h, x + h, y + h], fill=spec.body_rgb)


def render_instance(spec: CategorySpec, inst: Instance, rng: np.random.Generator,
                    image_size: int) -> Image.Image:
    img = _background(rng, image_size)
    draw = ImageDraw.Draw(img)
    r = inst.glyph_radius
    draw_body(draw, spec, inst)
    for k, name in enumerate(spec.keypoints):
        if inst.visible[k]:
            x, y = inst.points[k]
            draw_glyph(draw, GLYPHS[name], float(x), float(y), r)
    return img


def _coco_annotation(spec: CategorySpec, inst: Instance, image_id: int) -> dict[str, Any]:
    kps: list[float] = []
    for k in range(len(spec.keypoints)):
        if inst.visible[k]:
            x, y = inst.points[k]
            kps.extend([round(float(x), 2), round(float(y), 2), 2])
        else:
            kps.extend([0, 0, 0])
    x, y, w, h = inst.bbox
    return {
        "id": image_id,
        "image_id": image_id,
        "category_id": spec.id,
        "bbox": [x, y, w, h],
        "keypoints": kps,
        "num_keypoints": int(inst.visible.sum()),
        "iscrowd": 0,
        "area": round(w * h, 2),
    }


# One job = one image: (seed, stream, spec, instance index, image id, image size, path, hard plan
# or None for the default variant). Module-level so that multiprocessing can pickle it.
_Job = tuple[int, int, CategorySpec, int, int, int, str, "HardCategoryPlan | None"]


def _run_job(job: _Job) -> tuple[dict[str, Any], dict[str, Any]]:
    seed, stream, spec, index, image_id, image_size, path, hard_plan = job
    rng = np.random.default_rng([seed, stream, spec.id, index])
    inst = sample_instance(spec, rng, image_size)
    if hard_plan is None:
        img = render_instance(spec, inst, rng, image_size)
    else:
        from .embedded_hard import render_hard_instance

        img = render_hard_instance(spec, inst, rng, image_size, hard_plan)
    img.save(path, format="PNG", compress_level=6)
    file_name = f"{spec.name}/{image_id:06d}.png"
    image = {"id": image_id, "file_name": file_name, "width": image_size, "height": image_size}
    return image, _coco_annotation(spec, inst, image_id)


# ----------------------------------------------------------------------------------------------
# Baselines measured at generation time (documentation of the difficulty)
# ----------------------------------------------------------------------------------------------


def support_copy_pck(annotations: list[dict[str, Any]], threshold: float = 0.2) -> float:
    """PCK of 'copy the support keypoints' bbox-normalised coordinates' (1-shot).

    Pairs consecutive instances of each category (support i, query i+1), counts keypoints
    visible in both, averages per category then over categories (the POMNet protocol).
    """
    by_cat: dict[int, list[dict[str, Any]]] = {}
    for ann in annotations:
        by_cat.setdefault(ann["category_id"], []).append(ann)
    per_cat = []
    for anns in by_cat.values():
        hits = total = 0
        for sup, qry in zip(anns[:-1], anns[1:]):
            ks, kq = np.array(sup["keypoints"]).reshape(-1, 3), np.array(qry["keypoints"]).reshape(-1, 3)
            both = (ks[:, 2] > 0) & (kq[:, 2] > 0)
            bs, bq = np.array(sup["bbox"]), np.array(qry["bbox"])
            pred = bq[:2] + (ks[:, :2] - bs[:2]) / bs[2:] * bq[2:]
            dist = np.linalg.norm(pred - kq[:, :2], axis=1) / max(bq[2], bq[3])
            hits += int((dist[both] <= threshold).sum())
            total += int(both.sum())
        if total:
            per_cat.append(hits / total)
    return float(np.mean(per_cat))


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _params(seed: int, instances_per_category: int, instances_per_species: int,
            image_size: int, hard: HardKnobs | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"seed": seed, "instances_per_category": instances_per_category,
                              "instances_per_species": instances_per_species, "image_size": image_size}
    if hard is not None:  # only then: the default variant's manifest stays byte for byte what it was
        params["hard"] = hard.as_dict()
    return params


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":")) + "\n", encoding="utf-8")


def generate_embedded_benchmark(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    instances_per_category: int = 30,
    image_size: int = 128,
    instances_per_species: int = 40,
    workers: int | None = None,
    hard: HardKnobs | None = None,
) -> dict[str, Any]:
    """Generate the benchmark under ``out_dir`` and return a summary with the file paths.

    ``hard`` draws the hard variant with these knobs (:mod:`processing.embedded_hard`; same
    annotations, harder pixels). ``workers`` only changes speed (default: up to 2 processes), never the output. A previous
    benchmark in ``out_dir`` (recognised by its manifest) is removed first so that no stale image
    survives a change of parameters; other files in ``out_dir`` are never touched.
    """
    if instances_per_category < 2 or instances_per_species < 10:
        raise ValueError("need >= 2 instances per category (1-shot episodes) and >= 10 per species")
    if image_size < 64:
        raise ValueError("image_size must be >= 64 px: smaller glyphs are illegible")
    start = time.perf_counter()
    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        for sub in ("images", "annotations"):
            shutil.rmtree(out / sub, ignore_errors=True)
        manifest_path.unlink()
    (out / "annotations").mkdir(parents=True, exist_ok=True)

    mp_specs = build_mp100_categories(seed)
    ap_specs = build_ap10k_species(seed)
    splits = make_mp100_splits(mp_specs, seed)
    overlaps = {s: name_overlap(mp_specs, split) for s, split in splits.items()}
    if min(overlaps.values()) < 0.8:
        raise AssertionError(f"test keypoint names not covered by training: {overlaps}")
    plans: dict[tuple[int, int], HardCategoryPlan] = {}
    if hard is not None:
        from .embedded_hard import plan_category

        plans = {(stream, spec.id): plan_category(spec, hard, seed)
                 for stream, specs in ((10, mp_specs), (11, ap_specs)) for spec in specs}

    def coco_category(stream: int, spec: CategorySpec) -> dict[str, Any]:
        category = spec.coco_category()
        if hard is not None:  # where a scorer can tell keypoints found by glyph from those found by geometry
            category["unglyphed_keypoints"] = [spec.keypoints[k] for k in plans[(stream, spec.id)].unglyphed]
        return category

    jobs: list[_Job] = []
    image_id = 0
    for stream, specs, count in ((10, mp_specs, instances_per_category),
                                 (11, ap_specs, instances_per_species)):
        for spec in specs:
            (out / "images" / spec.name).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                image_id += 1
                path = str(out / "images" / spec.name / f"{image_id:06d}.png")
                jobs.append((seed, stream, spec, index, image_id, image_size, path,
                             plans.get((stream, spec.id))))

    n_workers = min(2, os.cpu_count() or 1) if workers is None else workers
    if n_workers > 1:
        with multiprocessing.Pool(n_workers) as pool:
            results = pool.map(_run_job, jobs, chunksize=32)
    else:
        results = [_run_job(job) for job in jobs]

    by_cat: dict[tuple[int, int], list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for job, res in zip(jobs, results):
        by_cat.setdefault((job[1], job[2].id), []).append(res)

    files: dict[str, str] = {}
    mp_by_id = {s.id: s for s in mp_specs}
    baselines: dict[str, float] = {}
    for s, split in splits.items():
        for subset in SUBSETS:
            pairs = [p for cid in split[subset] for p in by_cat[(10, cid)]]
            coco = {
                "info": {"description": f"KptLLM embedded benchmark, MP-100 layout, split {s} {subset}",
                         "version": GENERATOR_VERSION, "seed": seed},
                "images": [p[0] for p in pairs],
                "annotations": [p[1] for p in pairs],
                "categories": [coco_category(10, mp_by_id[cid]) for cid in split[subset]],
            }
            key = f"mp100_split{s}_{subset}"
            files[key] = str(out / "annotations" / f"{key}.json")
            _write_json(Path(files[key]), coco)
            if subset == "test":
                baselines[f"split{s}"] = round(support_copy_pck(coco["annotations"]), 4)

    ap_subsets: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {s: [] for s in SUBSETS}
    n_train = int(round(AP10K_SPLIT_FRACTIONS["train"] * instances_per_species))
    n_val = int(round(AP10K_SPLIT_FRACTIONS["val"] * instances_per_species))
    for spec in ap_specs:
        res = by_cat[(11, spec.id)]
        perm = np.random.default_rng([seed, 4, spec.id]).permutation(len(res))
        ordered = [res[int(i)] for i in perm]
        ap_subsets["train"].extend(ordered[:n_train])
        ap_subsets["val"].extend(ordered[n_train:n_train + n_val])
        ap_subsets["test"].extend(ordered[n_train + n_val:])
    for subset in SUBSETS:
        pairs = sorted(ap_subsets[subset], key=lambda p: p[0]["id"])
        coco = {
            "info": {"description": f"KptLLM embedded benchmark, AP-10K layout, {subset}",
                     "version": GENERATOR_VERSION, "seed": seed},
            "images": [p[0] for p in pairs],
            "annotations": [p[1] for p in pairs],
            "categories": [coco_category(11, spec) for spec in ap_specs],
        }
        key = f"ap10k_{subset}"
        files[key] = str(out / "annotations" / f"{key}.json")
        _write_json(Path(files[key]), coco)

    if hard is None:
        glyphs = GLYPHS
    else:
        from .embedded_hard import glyph_table as hard_glyph_table

        glyphs = hard_glyph_table(hard)
    glyph_table = {n: {"shape": g.shape, "colour": g.colour, "rgb": list(g.rgb)} for n, g in glyphs.items()}
    _write_json(out / "glyphs.json", glyph_table)

    summary: dict[str, Any] = {
        "mp100_categories": len(mp_specs),
        "ap10k_species": len(ap_specs),
        "ap10k_families": list(AP10K_FAMILIES),
        "instances": len(jobs),
        "images": len(jobs),
        "keypoint_names": len(NAME_POOL),
        "name_overlap": {f"split{s}": round(v, 4) for s, v in overlaps.items()},
        "support_copy_pck@0.2": baselines,
    }
    if hard is not None:
        summary["difficulty"] = "hard"
        summary["unglyphed_keypoints"] = sum(len(plan.unglyphed) for plan in plans.values())
    manifest = {"generator_version": GENERATOR_VERSION,
                "params": _params(seed, instances_per_category, instances_per_species, image_size, hard),
                "summary": summary, "files": {k: str(Path(v).relative_to(out)) for k, v in files.items()}}
    _write_json(manifest_path, manifest)
    return {**summary, "out_dir": str(out), "files": files, "generated": True,
            "seconds": round(time.perf_counter() - start, 2)}


def ensure_embedded_benchmark(out_dir: str | os.PathLike[str], **kw: Any) -> dict[str, Any]:
    """Generate the benchmark unless ``out_dir`` already holds one with the same parameters.

    The manifest is written last, so an interrupted generation is detected and redone.
    Accepts the keyword arguments of :func:`generate_embedded_benchmark`. Without ``hard``, a folder
    keeps the variant it holds (``train.py --data_dir data/embedded_hard`` uses the hard variant
    generated there); ``hard=None`` asks for the default variant explicitly.
    """
    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.exists() else {}
    if "hard" not in kw and "hard" in manifest.get("params", {}):
        from .embedded_hard import HardKnobs

        kw = {**kw, "hard": HardKnobs(**manifest["params"]["hard"])}
    defaults = {"seed": 0, "instances_per_category": 30, "instances_per_species": 40, "image_size": 128,
                "hard": None}
    wanted = _params(**{k: kw.get(k, v) for k, v in defaults.items()})
    if manifest:
        files = {k: str(out / v) for k, v in manifest.get("files", {}).items()}
        if (manifest.get("generator_version") == GENERATOR_VERSION and manifest.get("params") == wanted
                and files and all(Path(p).exists() for p in files.values())):
            return {**manifest["summary"], "out_dir": str(out), "files": files, "generated": False}
    return generate_embedded_benchmark(out, **kw)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/embedded", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--instances-per-category", type=int, default=30)
    parser.add_argument("--instances-per-species", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: up to 2)")
    parser.add_argument("--difficulty", choices=["default", "hard"], default="default",
                        help="hard: mirror pairs share a glyph, unglyphed joints, jittered glyphs, "
                             "background look-alikes (processing/embedded_hard.py)")
    args = parser.parse_args(argv)
    hard = None
    if args.difficulty == "hard":
        from .embedded_hard import HardKnobs

        hard = HardKnobs()
    summary = generate_embedded_benchmark(
        args.out, seed=args.seed, instances_per_category=args.instances_per_category,
        image_size=args.image_size, instances_per_species=args.instances_per_species,
        workers=args.workers, hard=hard)
    print(f"embedded benchmark ({args.difficulty} variant) written to {summary['out_dir']}")
    print(f"  MP-100 layout: {summary['mp100_categories']} categories, 5 splits (70/10/20)")
    print(f"  AP-10K layout: {summary['ap10k_species']} species in families {', '.join(summary['ap10k_families'])}")
    print(f"  instances: {summary['instances']}, images: {summary['images']}, "
          f"keypoint names: {summary['keypoint_names']}")
    print(f"  test-name overlap with training: {summary['name_overlap']}")
    print(f"  support-copy baseline PCK@0.2 on test: {summary['support_copy_pck@0.2']}")
    print(f"  elapsed: {summary['seconds']:.1f} s")
    return summary


if __name__ == "__main__":
    main()
