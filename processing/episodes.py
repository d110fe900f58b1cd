"""Few-shot episodes for evaluation and (instance, keypoint) samples for training.

The test episodes every tool scores are :func:`sample_cape_episodes`: the official CAPE draw (POMNet /
CapeFormer / PoseAnything), reproduced exactly from the annotation file's order, so they need no cache.
The generator-per-category episodes below (:func:`sample_episodes`, cached by :func:`fixed_test_episodes`)
are the earlier protocol's.

Both work on the instance datasets of :mod:`processing.coco` (one row per instance, with
``annotation_id``, ``category_id`` and ``visible`` columns).

Determinism: every random choice is made in a canonical order (categories by id, instances by
annotation id) with a :class:`random.Random` seeded from the user's seed, using only
``Random.random()``, whose sequence Python guarantees across versions. So the same dataset and
seed give the same result, and a permutation of the dataset's rows gives the same episodes and
samples in terms of annotation ids (row indices then follow the rows). Evaluation episodes are
additionally saved by annotation id (:func:`fixed_test_episodes`) so that two runs, or two
models, are scored on exactly the same support/query pairs.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from datasets import Dataset, Features, List, Value
from tqdm.auto import tqdm

from .coco import read_json

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("visual", "textual", "semantic", "visual+textual")
"""Training tasks (DESIGN.md §2). Tasks containing "visual" need support instances."""

VISUAL_TASKS = frozenset(task for task in TASKS if "visual" in task)

DEFAULT_TASK_MIX: Mapping[str, float] = MappingProxyType(
    {"visual": 0.6, "textual": 0.2, "semantic": 0.2}
)

EPISODE_FILE_FORMAT = "kptllm-episodes"
EPISODE_FILE_VERSION = 1

TRAINING_SAMPLE_FEATURES = Features(
    {
        "task": Value("string"),
        "query_row": Value("int64"),
        "support_rows": List(Value("int64")),
        "keypoint_index": Value("int64"),
    }
)

_PROGRESS_THRESHOLD = 5000


@dataclass(frozen=True)
class Episode:
    """One few-shot evaluation episode: K support instances and one query of the same category.

    Rows index the dataset the episode was sampled from or resolved against; the annotation ids
    identify the same instances independently of row order and are what episode files store.
    """

    category_id: int
    support_rows: tuple[int, ...]
    query_row: int
    support_annotation_ids: tuple[int, ...]
    query_annotation_id: int

    @property
    def num_shots(self) -> int:
        return len(self.support_rows)


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


class _CategoryIndex:
    """Rows of a dataset grouped by category, each group sorted by annotation id."""

    def __init__(self, dataset: Dataset) -> None:
        missing = {"annotation_id", "category_id"} - set(dataset.column_names)
        if missing:
            raise ValueError(f"The dataset lacks the column(s) {sorted(missing)}")
        self.annotation_ids: list[int] = dataset["annotation_id"][:]
        self.category_ids: list[int] = dataset["category_id"][:]
        self.row_of_annotation: dict[int, int] = {}
        for row, annotation_id in enumerate(self.annotation_ids):
            if annotation_id in self.row_of_annotation:
                raise ValueError(
                    f"Annotation id {annotation_id} appears in rows "
                    f"{self.row_of_annotation[annotation_id]} and {row}; ids must be unique"
                )
            self.row_of_annotation[annotation_id] = row
        self.rows_by_category: dict[int, list[int]] = {}
        for row in sorted(range(len(self.annotation_ids)), key=self.annotation_ids.__getitem__):
            self.rows_by_category.setdefault(self.category_ids[row], []).append(row)
        names = dataset["category_name"][:] if "category_name" in dataset.column_names else None
        self.category_names: dict[int, str] = {}
        for rows in self.rows_by_category.values():
            category_id = self.category_ids[rows[0]]
            self.category_names[category_id] = names[rows[0]] if names else str(category_id)

    def describe(self, category_id: int) -> str:
        return f"category {category_id} ('{self.category_names[category_id]}')"


def _randbelow(rng: random.Random, n: int) -> int:
    """A uniform integer in ``[0, n)`` from ``rng.random()`` only (reproducible across Pythons)."""
    return min(int(rng.random() * n), n - 1)


def _sample_positions(
    rng: random.Random, n: int, k: int, excluded: Sequence[int] = ()
) -> list[int]:
    """``k`` distinct positions in ``[0, n)`` avoiding ``excluded`` (distinct), sorted.

    Floyd's algorithm over the ``n - len(excluded)`` allowed positions, then mapped past the
    excluded ones, so it costs O(k) and never builds the list of candidates.
    """
    available = n - len(excluded)
    if not 0 <= k <= available:
        raise ValueError(f"Cannot draw {k} distinct positions from {available}")
    chosen: set[int] = set()
    for upper in range(available - k, available):
        t = _randbelow(rng, upper + 1)
        chosen.add(upper if t in chosen else t)
    result = []
    for position in sorted(chosen):
        for skip in sorted(excluded):
            if position >= skip:
                position += 1
        result.append(position)
    return sorted(result)


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------------------------
# Evaluation episodes
# --------------------------------------------------------------------------------------------


def sample_episodes(
    dataset: Dataset,
    num_shots: int,
    num_queries_per_category: int | None = None,
    seed: int = 0,
) -> list[Episode]:
    """Sample K-shot episodes: for each query, ``num_shots`` other instances of its category.

    Args:
        dataset: an instance dataset from :mod:`processing.coco`.
        num_shots: K, the number of support instances per episode (1 and 5 in the paper).
        num_queries_per_category: how many distinct query instances per category; ``None`` uses
            every instance of the category once as the query (the exhaustive protocol), a
            number larger than the category uses all of them.
        seed: the sampling seed.

    Each category draws from its own generator (seeded by ``seed`` and the category id), so adding
    or removing a category does not change the other categories' episodes. Categories with fewer
    than ``num_shots + 1`` instances cannot form an episode (support and query must be distinct)
    and are excluded with a warning. Episodes are ordered by category id, then query annotation id.
    """
    _check_positive_int(num_shots, "num_shots")
    if num_queries_per_category is not None:
        _check_positive_int(num_queries_per_category, "num_queries_per_category")
    index = _CategoryIndex(dataset)
    episodes: list[Episode] = []
    for category_id in sorted(index.rows_by_category):
        rows = index.rows_by_category[category_id]
        if len(rows) < num_shots + 1:
            logger.warning(
                "%s has %d instance(s); a %d-shot episode needs %d (supports + a distinct query), "
                "so the category is excluded from the episodes",
                index.describe(category_id), len(rows), num_shots, num_shots + 1,
            )  # fmt: skip
            continue
        rng = random.Random(f"kptllm-episodes/{seed}/{category_id}")
        if num_queries_per_category is None or num_queries_per_category >= len(rows):
            query_positions = list(range(len(rows)))
        else:
            query_positions = _sample_positions(rng, len(rows), num_queries_per_category)
        for query_position in query_positions:
            support_rows = tuple(
                rows[p] for p in _sample_positions(rng, len(rows), num_shots, [query_position])
            )
            query_row = rows[query_position]
            episodes.append(
                Episode(
                    category_id=category_id,
                    support_rows=support_rows,
                    query_row=query_row,
                    support_annotation_ids=tuple(index.annotation_ids[r] for r in support_rows),
                    query_annotation_id=index.annotation_ids[query_row],
                )
            )
    logger.info(
        "Sampled %d %d-shot episodes over %d categories (seed %d)",
        len(episodes), num_shots, len({e.category_id for e in episodes}), seed,
    )  # fmt: skip
    return episodes


@dataclass(frozen=True)
class CapeEpisode:
    """One episode of the official CAPE test protocol: support shots and the queries that share them.

    `pairs()` gives its support-query pairs, the unit the official PCK averages over.
    """

    category_id: int
    support_rows: tuple[int, ...]
    query_rows: tuple[int, ...]
    support_annotation_ids: tuple[int, ...]
    query_annotation_ids: tuple[int, ...]

    @property
    def num_shots(self) -> int:
        return len(self.support_rows)

    def pairs(self) -> list[Episode]:
        return [
            Episode(self.category_id, self.support_rows, row, self.support_annotation_ids, annotation_id)
            for row, annotation_id in zip(self.query_rows, self.query_annotation_ids, strict=True)
        ]


OFFICIAL_EPISODE_SEED = 1
"""`random.seed(1)` before the test episodes are drawn (the official code also calls `np.random.seed(0)`,
which draws nothing at test time)."""


def coco_file_order(annotation_file: str | os.PathLike[str]) -> tuple[list[int], list[int]]:
    """(category ids, image ids) in the order the COCO file lists them: what pycocotools' `getCatIds()` and
    `getImgIds()` return, and so the order in which the official code visits categories and instances."""
    data = read_json(os.fspath(annotation_file))
    return [category["id"] for category in data["categories"]], [image["id"] for image in data["images"]]


def sample_cape_episodes(
    dataset: Dataset,
    num_shots: int,
    num_queries: int,
    num_episodes: int,
    category_order: Sequence[int] | None = None,
    image_order: Sequence[int] | None = None,
) -> list[CapeEpisode]:
    """The official CAPE test episodes (POMNet / CapeFormer / PoseAnything `make_paired_samples`).

    With Python's generator seeded as the official code seeds it, for each category (in `category_order`,
    the annotation file's) and each of `num_episodes` draws, `random.sample(instances, num_shots +
    num_queries)`: the first `num_shots` are the support, the rest the queries that share it. A category's
    instances are listed as the official reader lists them: by image in `image_order` (the file's), then in
    annotation order within an image, which is the order of this dataset's rows (`processing.coco` reads
    annotations in file order). `random.sample` depends only on that list's length and the generator, so
    the draw equals the official one whenever the reader kept the same instances (its `LoadReport` says
    what it skipped). Without the file's orders, categories and images go by id.

    A category with fewer than `num_shots + num_queries` instances (the official code fails on it) is
    left out with a warning.
    """
    for value, name in ((num_shots, "num_shots"), (num_queries, "num_queries"), (num_episodes, "num_episodes")):
        _check_positive_int(value, name)
    if "image_id" not in dataset.column_names:
        raise ValueError("The dataset lacks the column 'image_id'")
    index = _CategoryIndex(dataset)
    image_ids: list[int] = dataset["image_id"][:]
    image_position = {image_id: position for position, image_id in enumerate(image_order or sorted(set(image_ids)))}
    unlisted = set(image_ids) - set(image_position)
    if unlisted:
        raise ValueError(f"image ids {sorted(unlisted)[:5]} of the dataset are not in image_order")
    present = set(index.rows_by_category)
    categories = [c for c in category_order if c in present] if category_order is not None else sorted(present)
    rng = random.Random(OFFICIAL_EPISODE_SEED)
    episodes: list[CapeEpisode] = []
    for category_id in categories:
        rows = sorted(index.rows_by_category[category_id], key=lambda row: (image_position[image_ids[row]], row))
        if len(rows) < num_shots + num_queries:
            logger.warning(
                "%s has %d instance(s); an episode draws %d (%d shots + %d queries), so the category is left out",
                index.describe(category_id), len(rows), num_shots + num_queries, num_shots, num_queries,
            )  # fmt: skip
            continue
        for _ in range(num_episodes):
            drawn = rng.sample(rows, num_shots + num_queries)
            support, queries = tuple(drawn[:num_shots]), tuple(drawn[num_shots:])
            episodes.append(
                CapeEpisode(
                    category_id=category_id,
                    support_rows=support,
                    query_rows=queries,
                    support_annotation_ids=tuple(index.annotation_ids[r] for r in support),
                    query_annotation_ids=tuple(index.annotation_ids[r] for r in queries),
                )
            )
    if not episodes:
        raise ValueError(
            f"no episode of {num_shots} shots + {num_queries} queries can be drawn from {len(dataset)} instances: "
            "every category is too small (were image files missing?)"
        )
    logger.info(
        "Drew %d official episodes (%d shots, %d queries each) over %d categories",
        len(episodes), num_shots, num_queries, len({e.category_id for e in episodes}),
    )  # fmt: skip
    return episodes


def save_episodes(
    episodes: Sequence[Episode],
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write episodes as JSON by annotation id (not row index), so any run can reuse them.

    ``metadata`` (JSON-serialisable, e.g. the sampling parameters) is stored alongside; the file
    is written to a temporary name and renamed so that an interrupted run leaves no partial file.
    """
    path = os.fspath(path)
    payload = {
        "format": EPISODE_FILE_FORMAT,
        "version": EPISODE_FILE_VERSION,
        "metadata": dict(metadata or {}),
        "episodes": [
            {
                "category_id": episode.category_id,
                "support": list(episode.support_annotation_ids),
                "query": episode.query_annotation_id,
            }
            for episode in episodes
        ],
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1)
    os.replace(temporary, path)


def _read_episode_file(path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != EPISODE_FILE_FORMAT:
        raise ValueError(
            f"{path}: not a KptLLM episode file (expected format '{EPISODE_FILE_FORMAT}')"
        )
    if data.get("version") != EPISODE_FILE_VERSION:
        raise ValueError(
            f"{path}: episode file version {data.get('version')!r} is not supported "
            f"(expected {EPISODE_FILE_VERSION})"
        )
    episodes = data.get("episodes")
    if not isinstance(episodes, list):
        raise ValueError(f"{path}: field 'episodes' must be a list")
    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: field 'metadata' must be a JSON object")
    return metadata, episodes


def load_episodes(path: str | os.PathLike[str], dataset: Dataset) -> list[Episode]:
    """Read an episode file and resolve its annotation ids to rows of ``dataset``.

    Raises ``ValueError`` if the file refers to an annotation id that is not in the dataset or
    puts an instance in the wrong category: the file was made for other data, and evaluating on
    a silently different episode set would make results incomparable.
    """
    path = os.fspath(path)
    _, raw_episodes = _read_episode_file(path)
    index = _CategoryIndex(dataset)
    episodes = []
    for number, raw in enumerate(raw_episodes):
        where = f"{path}: episode {number}"
        try:
            category_id = raw["category_id"]
            support_ids = tuple(raw["support"])
            query_id = raw["query"]
        except (KeyError, TypeError):
            raise ValueError(
                f"{where}: expected {{'category_id', 'support', 'query'}}, got {raw!r}"
            ) from None
        if not support_ids or query_id in support_ids or len(set(support_ids)) != len(support_ids):
            raise ValueError(
                f"{where}: supports must be distinct from each other and from the query"
            )
        rows = []
        for annotation_id in (*support_ids, query_id):
            row = index.row_of_annotation.get(annotation_id)
            if row is None:
                raise ValueError(
                    f"{where}: annotation id {annotation_id!r} is not in the dataset "
                    "(was this file made for another dataset or split?)"
                )
            if index.category_ids[row] != category_id:
                raise ValueError(
                    f"{where}: annotation id {annotation_id} has category "
                    f"{index.category_ids[row]} in the dataset, the file says {category_id}"
                )
            rows.append(row)
        episodes.append(
            Episode(
                category_id=category_id,
                support_rows=tuple(rows[:-1]),
                query_row=rows[-1],
                support_annotation_ids=support_ids,
                query_annotation_id=query_id,
            )
        )
    return episodes


def instances_fingerprint(dataset: Dataset) -> str:
    """A hash of what episodes are drawn from: the (annotation id, category id) pairs of ``dataset``.

    Sampling depends on nothing else, so two datasets with the same fingerprint give the same episodes
    (row order does not matter). An instance dropped because its image was missing changes it.
    """
    index = _CategoryIndex(dataset)
    pairs = sorted(zip(index.annotation_ids, index.category_ids))
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def fixed_test_episodes(
    dataset: Dataset,
    path: str | os.PathLike[str],
    num_shots: int,
    seed: int = 0,
    num_queries_per_category: int | None = None,
    *,
    complete: bool = True,
) -> list[Episode]:
    """The evaluation episodes stored at ``path``, sampling and saving them on first use.

    This is how the PCK protocol's "fixed seed, same support/query pairs" is enforced: the first
    run writes the file, later runs (and other models) read it back. A file made with different
    sampling parameters, or drawn from other instances (its ``instances`` fingerprint,
    :func:`instances_fingerprint`), raises instead of being silently reused or overwritten.

    Only complete, usable episode sets are saved: no episode at all raises (nothing is written), and
    with ``complete=False`` (the reader skipped instances whose image file was missing, which may be
    a transient problem) the episodes are sampled for this run only, so a later run on the full data
    does not inherit them.
    """
    path = os.fspath(path)
    fingerprint = instances_fingerprint(dataset)
    parameters = {
        "num_shots": num_shots,
        "seed": seed,
        "num_queries_per_category": num_queries_per_category,
    }
    if os.path.exists(path):
        metadata, _ = _read_episode_file(path)
        stored = {key: metadata.get(key) for key in parameters}
        if stored != parameters:
            raise ValueError(
                f"{path} holds episodes sampled with {stored}, but {parameters} were requested; "
                "use another path or delete the file to resample"
            )
        if metadata.get("instances", fingerprint) != fingerprint:  # files without one are checked by id below
            raise ValueError(
                f"{path} holds episodes drawn from other instances (fingerprint {metadata['instances'][:12]}, this "
                f"dataset's is {fingerprint[:12]}): the annotation file changed, or images were missing when the "
                "file was made; use another path or delete the file to resample"
            )
        episodes = load_episodes(path, dataset)
        logger.info("Reusing %d fixed test episodes from %s", len(episodes), path)
        return episodes
    episodes = sample_episodes(dataset, num_shots, num_queries_per_category, seed)
    if not episodes:
        raise ValueError(
            f"no {num_shots}-shot episode can be drawn from {len(dataset)} instances (a category needs "
            f"{num_shots + 1}); were image files missing? Nothing was saved to {path}"
        )
    if not complete:
        logger.warning(
            "Instances were skipped for missing image files: these %d episodes are used for this run only, "
            "not saved to %s (the fixed episodes are drawn from the complete data)", len(episodes), path,
        )  # fmt: skip
        return episodes
    save_episodes(episodes, path, metadata={**parameters, "instances": fingerprint})
    logger.info("Saved %d fixed test episodes to %s", len(episodes), path)
    return episodes


# --------------------------------------------------------------------------------------------
# Training samples
# --------------------------------------------------------------------------------------------


def validate_task_mix(task_mix: Mapping[str, float]) -> dict[str, float]:
    """Check a task mix and return it normalised to sum to 1.

    Weights must be finite and non-negative with a positive sum; unknown task names are rejected
    (a typo such as "textural" would otherwise silently drop a task).
    """
    unknown = sorted(set(task_mix) - set(TASKS))
    if unknown:
        raise ValueError(f"Unknown task(s) {unknown} in task_mix; known tasks: {list(TASKS)}")
    for task, weight in task_mix.items():
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
        ):
            raise ValueError(f"task_mix['{task}'] must be a finite number, got {weight!r}")
        if weight < 0:
            raise ValueError(f"task_mix['{task}'] must be non-negative, got {weight}")
    total = sum(task_mix.values())
    if total <= 0:
        raise ValueError(f"task_mix weights must sum to a positive number, got {dict(task_mix)}")
    return {task: task_mix[task] / total for task in TASKS if task_mix.get(task, 0) > 0}


def make_training_samples(
    dataset: Dataset,
    task_mix: Mapping[str, float] = DEFAULT_TASK_MIX,
    num_shots: int = 1,
    seed: int = 0,
    samples_per_epoch: int | None = None,
    group_by_instance: bool = False,
) -> Dataset:
    """One epoch of training samples, each ONE (query instance, keypoint) pair with a task.

    Only keypoints visible in the query are sampled. For the visual tasks, ``num_shots`` support
    instances of the same category (distinct from the query) are drawn, at least one of which has
    the keypoint visible; the others are uniform over the category, as at test time.

    Args:
        dataset: an instance dataset from :mod:`processing.coco`.
        task_mix: relative weights of :data:`TASKS` (see :func:`validate_task_mix`).
        num_shots: supports per visual sample.
        seed: sampling seed; pass a different one per epoch for fresh supports and tasks.
        samples_per_epoch: ``None`` uses every visible (instance, keypoint) pair once; a number
            draws that many pairs without replacement (cycling through reshuffles if larger).

    A pair that cannot be a visual sample (its category has fewer than ``num_shots + 1``
    instances, or no other instance shows the keypoint) draws its task from the non-visual part of
    the mix; if that part is empty the pair is dropped. Both are logged, along with the realised
    task counts, so a skew of the mix is visible.

        group_by_instance: keep the visible keypoints of one query instance consecutive, with ONE
            support draw for all of them (uniform over the category, as in a test episode; a
            keypoint no support shows gets a non-visual task). Batches then repeat few query and
            support crops, which the model encodes once each; train without reshuffling the rows
            (``TrainingArguments(train_sampling_strategy="sequential")``).

    Returns:
        A dataset with columns ``task``, ``query_row``, ``support_rows`` (empty for textual and
        semantic) and ``keypoint_index``, in random order (instances in random order, if grouped).
    """
    mix = validate_task_mix(task_mix)
    _check_positive_int(num_shots, "num_shots")
    if samples_per_epoch is not None:
        _check_positive_int(samples_per_epoch, "samples_per_epoch")
    if "visible" not in dataset.column_names:
        raise ValueError("The dataset lacks the column 'visible'")
    index = _CategoryIndex(dataset)
    visible: list[list[int]] = dataset["visible"][:]

    # Canonical enumeration of (query row, keypoint) pairs, plus, per category and keypoint, the
    # positions (in the category's annotation-id order) of the instances showing that keypoint.
    pairs: list[tuple[int, int]] = []
    position_in_category: dict[int, int] = {}
    visible_positions: dict[int, dict[int, list[int]]] = {}
    for category_id in sorted(index.rows_by_category):
        rows = index.rows_by_category[category_id]
        if len(rows) < 2 and VISUAL_TASKS & set(mix):
            logger.warning(
                "%s has a single instance: it cannot be its own support, so it gets no visual "
                "samples", index.describe(category_id),
            )  # fmt: skip
        per_keypoint = visible_positions.setdefault(category_id, {})
        for position, row in enumerate(rows):
            position_in_category[row] = position
            for k, flag in enumerate(visible[row]):
                if flag:
                    pairs.append((row, k))
                    per_keypoint.setdefault(k, []).append(position)

    rng = random.Random(f"kptllm-training/{seed}")
    if group_by_instance:
        return _instance_grouped_samples(index, visible, position_in_category, mix, num_shots, rng, samples_per_epoch, seed)
    if samples_per_epoch is None:
        selected = _shuffled(rng, pairs)
    else:
        selected = []
        while pairs and len(selected) < samples_per_epoch:
            selected.extend(_shuffled(rng, pairs)[: samples_per_epoch - len(selected)])

    non_visual = {task: weight for task, weight in mix.items() if task not in VISUAL_TASKS}
    columns: dict[str, list[Any]] = {name: [] for name in TRAINING_SAMPLE_FEATURES}
    dropped = restricted = 0
    for row, k in tqdm(
        selected, desc="Sampling training pairs", disable=len(selected) < _PROGRESS_THRESHOLD
    ):
        category_id = index.category_ids[row]
        rows = index.rows_by_category[category_id]
        shown_at = visible_positions[category_id][k]
        can_be_visual = len(rows) >= num_shots + 1 and len(shown_at) >= 2
        if not can_be_visual and VISUAL_TASKS & set(mix):
            restricted += 1
            if not non_visual:
                dropped += 1
                continue
        task = _draw_task(rng, mix if can_be_visual else non_visual)
        support_rows: list[int] = []
        if task in VISUAL_TASKS:
            query_position = position_in_category[row]
            # One support that shows the keypoint (skipping the query), the rest uniform.
            j = _randbelow(rng, len(shown_at) - 1)
            if j >= bisect.bisect_left(shown_at, query_position):
                j += 1
            guaranteed = shown_at[j]
            others = _sample_positions(
                rng, len(rows), num_shots - 1, sorted((query_position, guaranteed))
            )
            support_rows = [rows[p] for p in sorted([guaranteed, *others])]
        columns["task"].append(task)
        columns["query_row"].append(row)
        columns["support_rows"].append(support_rows)
        columns["keypoint_index"].append(k)

    if restricted:
        logger.warning(
            "%d of %d (instance, keypoint) pairs could not be visual samples (too few instances "
            "in the category, or no other instance shows the keypoint)%s",
            restricted, len(selected),
            f"; {dropped} were dropped because the mix has no non-visual task" if dropped else "",
        )  # fmt: skip
    counts = {task: columns["task"].count(task) for task in mix}
    logger.info("Made %d training samples (seed %d): %s", len(columns["task"]), seed, counts)
    return Dataset.from_dict(columns, features=TRAINING_SAMPLE_FEATURES)


def _instance_grouped_samples(
    index: _CategoryIndex,
    visible: list[list[int]],
    position_in_category: dict[int, int],
    mix: dict[str, float],
    num_shots: int,
    rng: random.Random,
    samples_per_epoch: int | None,
    seed: int,
) -> Dataset:
    """`make_training_samples(group_by_instance=True)`: instances in random order, each with its
    visible keypoints (in random order) and one support draw shared by its visual samples."""
    non_visual = {task: weight for task, weight in mix.items() if task not in VISUAL_TASKS}
    instances = [row for row in range(len(visible)) if any(visible[row])]
    total = sum(sum(1 for flag in visible[row] if flag) for row in instances)
    wanted = total if samples_per_epoch is None else samples_per_epoch
    columns: dict[str, list[Any]] = {name: [] for name in TRAINING_SAMPLE_FEATURES}
    dropped = 0
    while instances and len(columns["task"]) < wanted:
        made_before = len(columns["task"])
        for row in _shuffled(rng, instances):
            rows = index.rows_by_category[index.category_ids[row]]
            supports: list[int] = []
            if VISUAL_TASKS & set(mix) and len(rows) >= num_shots + 1:
                positions = _sample_positions(rng, len(rows), num_shots, [position_in_category[row]])
                supports = [rows[p] for p in positions]
            for k in _shuffled(rng, [k for k, flag in enumerate(visible[row]) if flag]):
                shown = any(visible[support][k] for support in supports)
                if not shown and not non_visual:
                    dropped += 1
                    continue
                task = _draw_task(rng, mix if shown else non_visual)
                columns["task"].append(task)
                columns["query_row"].append(row)
                columns["support_rows"].append(supports if task in VISUAL_TASKS else [])
                columns["keypoint_index"].append(k)
            if len(columns["task"]) >= wanted:
                break
        if samples_per_epoch is None or len(columns["task"]) == made_before:
            break  # one epoch, or a pass that could make no sample at all
    columns = {name: values[:wanted] for name, values in columns.items()}
    if dropped:
        logger.warning("%d keypoints were shown by no support of their instance's draw and the mix has no non-visual task: dropped", dropped)
    counts = {task: columns["task"].count(task) for task in mix}
    logger.info("Made %d instance-grouped training samples (seed %d): %s", len(columns["task"]), seed, counts)
    return Dataset.from_dict(columns, features=TRAINING_SAMPLE_FEATURES)


def _shuffled(rng: random.Random, items: Sequence[Any]) -> list[Any]:
    """Fisher–Yates shuffle driven by ``rng.random()`` only (see the module docstring)."""
    result = list(items)
    for i in range(len(result) - 1, 0, -1):
        j = _randbelow(rng, i + 1)
        result[i], result[j] = result[j], result[i]
    return result


def _draw_task(rng: random.Random, weights: Mapping[str, float]) -> str:
    threshold = rng.random() * sum(weights.values())
    cumulative = 0.0
    for task, weight in weights.items():
        cumulative += weight
        if threshold < cumulative:
            return task
    return list(weights)[-1]  # only reached through floating-point round-off
