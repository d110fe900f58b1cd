"""What the hard embedded variant's knobs do to the baselines: support-copy, mean-position and the cosine matcher.

    python -m benchmarks.embedded_hard                                   # default and hard, stage 0 of 800 steps
    python -m benchmarks.embedded_hard --variants mirror,unglyphed,jitter,distractors,default,hard --stage0_steps 400

Per variant (the default benchmark, the full hard one, or one knob of `processing.embedded_hard.HardKnobs` alone,
each generated under `data/` if absent), on split 1's test categories, 1-shot, with the official episodes
`eval.py` draws on the embedded benchmark (7 per category x 15 queries = 2,100 pairs; the variants share their
annotations, so they are scored on the very same pairs and keypoints):

* support-copy and mean-position (`processing.evaluation.evaluate_baselines`);
* the plain cosine matcher (`processing.matching_peer.match_episodes(..., "cosine probe")`: the query patch whose
  z_q is most similar to z_p) on the modules of a tiny KptLLM after stage 0 on that variant's training categories
  (`pretrain_vision_modules`, as `python train.py` runs it: same model, seed 0, first-layer match on), plus its
  pooled hit rate on the unglyphed and on the glyphed keypoints, and how often a keypoint of a mirror pair was put
  on its partner instead.

Results go to `benchmarks/results/embedded_hard.{json,md}`; a variant already there with the same stage-0 steps
is read back, not rerun (`--rerun` forces it).
"""

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from processing.builders import build_tiny_model
from processing.coco import load_mp100
from processing.embedded import ensure_embedded_benchmark, mirror_name
from processing.embedded_hard import KNOBS_OFF, HardKnobs
from processing.episodes import coco_file_order, sample_cape_episodes
from processing.evaluation import evaluate_baselines, official_normalizer, score_pck
from processing.matching_peer import match_episodes
from processing.vision_pretraining import pretrain_vision_modules

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SPLIT, SHOTS, EPISODES, QUERIES, CROP_PADDING, THRESHOLD = 1, 1, 7, 15, 1.25, 0.2

# name -> (knobs or None for the default variant, what it changes); one knob alone = the others as in KNOBS_OFF
VARIANTS: dict[str, tuple[HardKnobs | None, str]] = {
    "default": (None, "the default benchmark (one unique glyph per name)"),
    "hard": (HardKnobs(), "all knobs (`--difficulty hard`)"),
    "mirror": (replace(KNOBS_OFF, mirror_shared_glyphs=True), "mirror pairs share one glyph"),
    "unglyphed": (replace(KNOBS_OFF, unglyphed_share=HardKnobs.unglyphed_share), "25% of keypoints unglyphed (joints)"),
    "jitter": (
        replace(KNOBS_OFF, colour_jitter=HardKnobs.colour_jitter, size_jitter=HardKnobs.size_jitter,
                rotation_jitter_deg=HardKnobs.rotation_jitter_deg),
        "per-glyph colour, size and rotation jitter",
    ),
    "distractors": (replace(KNOBS_OFF, distractors=HardKnobs.distractors), "3 look-alike glyphs in the background"),
}


def data_dir(variant: str) -> Path:
    return ROOT / "data" / ("embedded" if variant == "default" else f"embedded_{variant}" if variant == "hard"
                            else f"embedded_hard_{variant}")


def keypoint_vocabulary(*datasets) -> list[str]:
    """As train.py builds the tiny model's tokenizer vocabulary."""
    return sorted({name for dataset in datasets for names in dataset["keypoint_names"] for name in names})


def keypoint_breakdown(instances, pairs, predictions: list[np.ndarray], unglyphed: dict[int, set[str]]) -> dict:
    """Pooled hit rates (valid keypoints within the PCK threshold) of one method by kind of keypoint, and the share
    of mirror-pair keypoints put within the threshold of their partner and not of themselves."""
    hits = {"glyphed": [0, 0], "unglyphed": [0, 0], "mirror pair": [0, 0], "on the mirror partner": [0, 0]}
    for pair, predicted in zip(pairs, predictions, strict=True):
        query = instances[pair.query_row]
        valid = np.asarray(query["visible"], bool)
        for row in pair.support_rows:
            valid &= np.asarray(instances[row]["visible"], bool)
        truth = np.asarray(query["keypoints"], float)
        limit = THRESHOLD * official_normalizer(query)
        names = query["keypoint_names"]
        index = {name: k for k, name in enumerate(names)}
        for k in np.flatnonzero(valid):
            hit = bool(np.linalg.norm(predicted[k] - truth[k]) < limit)
            kind = "unglyphed" if names[k] in unglyphed.get(query["category_id"], set()) else "glyphed"
            hits[kind][0] += hit
            hits[kind][1] += 1
            partner = index.get(mirror_name(names[k]))
            if partner is not None and partner != k and query["visible"][partner]:
                hits["mirror pair"][0] += hit
                hits["mirror pair"][1] += 1
                on_partner = bool(np.linalg.norm(predicted[k] - truth[partner]) < limit) and not hit
                hits["on the mirror partner"][0] += on_partner
                hits["on the mirror partner"][1] += 1
    return {kind: {"rate": h / n if n else None, "keypoints": n} for kind, (h, n) in hits.items()}


def measure(variant: str, stage0_steps: int, work_dir: Path) -> dict:
    knobs, description = VARIANTS[variant]
    folder = data_dir(variant)
    start = time.perf_counter()
    ensure_embedded_benchmark(folder, hard=knobs, workers=1)
    generation_s = time.perf_counter() - start
    train = load_mp100(folder, SPLIT, "train")
    test, report = load_mp100(folder, SPLIT, "test", return_report=True)
    categories = json.loads(Path(report.annotation_file).read_text())["categories"]
    unglyphed = {c["id"]: set(c.get("unglyphed_keypoints", [])) for c in categories}
    episodes = sample_cape_episodes(test, SHOTS, QUERIES, EPISODES, *coco_file_order(report.annotation_file))
    pairs = [pair for episode in episodes for pair in episode.pairs()]
    results = evaluate_baselines(test, pairs, train, CROP_PADDING, THRESHOLD)

    model, processor = build_tiny_model(
        keypoint_vocabulary(train, test), seed=0, image_size=64, patch_size=8, vision_hidden_size=96, vision_layers=3,
        prompt_feature_extractor="cross_attention", text_hidden_size=128, text_layers=4,
    )  # train.py's tiny preset
    processor.crop_padding = CROP_PADDING
    start = time.perf_counter()
    pretrain_vision_modules(model, processor, train, keypoint_vocabulary(train), work_dir / variant, steps=stage0_steps,
                            seed=0, use_cpu=True, match_first_llm_layer=True)
    stage0_s = time.perf_counter() - start
    predictions = match_episodes(model, processor, test, pairs, "cosine probe")
    results["cosine matcher"] = score_pck(test, pairs, predictions, THRESHOLD)
    return {
        "description": description,
        "knobs": None if knobs is None else knobs.as_dict(),
        "stage0_steps": stage0_steps,
        "pairs": len(pairs),
        "pck": {method: scores["pck"] for method, scores in results.items()},
        "pck_ci95": {method: scores["pck_ci95"] for method, scores in results.items()},
        "valid_keypoints": results["cosine matcher"]["num_keypoints"],
        "cosine_matcher_by_keypoint": keypoint_breakdown(test, pairs, predictions, unglyphed),
        "seconds": {"generation": round(generation_s, 1), "stage0": round(stage0_s, 1)},
    }


def markdown(results: dict) -> str:
    lines = [
        f"Split {SPLIT} test, {SHOTS}-shot, official episodes ({EPISODES} per category x {QUERIES} queries), PCK@0.2 "
        "(mean over pairs) with 95% bootstrap interval; cosine matcher after stage 0 on the variant's training "
        "categories. Extras: the cosine matcher's pooled hit rate on glyphed / unglyphed keypoints, and the share of "
        "mirror-pair keypoints it put on the partner.",
        "",
        "| variant | stage-0 steps | support-copy | mean-position | cosine matcher | cosine: glyphed | cosine: unglyphed "
        "| cosine: on mirror partner |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(variant: dict, method: str) -> str:
        low, high = variant["pck_ci95"][method]
        return f"{100 * variant['pck'][method]:.2f} [{100 * low:.1f}, {100 * high:.1f}]"

    def rate(variant: dict, kind: str) -> str:
        value = variant["cosine_matcher_by_keypoint"][kind]
        return "-" if value["rate"] is None else f"{100 * value['rate']:.1f} (n={value['keypoints']})"

    for name, variant in results["variants"].items():
        lines.append(
            f"| {name}: {variant['description']} | {variant['stage0_steps']} | {cell(variant, 'support-copy')} "
            f"| {cell(variant, 'mean-position')} | {cell(variant, 'cosine matcher')} | {rate(variant, 'glyphed')} "
            f"| {rate(variant, 'unglyphed')} | {rate(variant, 'on the mirror partner')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="default,hard", help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--stage0_steps", type=int, default=800, help="train.py's default: 800")
    parser.add_argument("--rerun", action="store_true", help="measure variants already in the results again")
    parser.add_argument("--work_dir", default=str(ROOT / "runs" / "embedded_hard"), help="stage-0 trainer output")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    path = RESULTS / "embedded_hard.json"
    results = json.loads(path.read_text()) if path.exists() else {"variants": {}}
    for variant in args.variants.split(","):
        key = variant if args.stage0_steps == 800 else f"{variant} ({args.stage0_steps} steps)"
        if key in results["variants"] and not args.rerun:
            continue
        results["variants"][key] = measure(variant, args.stage0_steps, Path(args.work_dir))
        results["machine"] = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                              "python": platform.python_version(), "torch": torch.__version__}
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        (RESULTS / "embedded_hard.md").write_text(markdown(results) + "\n")
        print(markdown(results), flush=True)


if __name__ == "__main__":
    main()
