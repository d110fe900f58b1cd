"""Evaluate KptLLM with the paper's protocols; every number is printed next to baselines measured in the same run.

    python eval.py --model runs/tiny/model                                   # embedded MP-100-style, split 1, 1-shot
    python eval.py --model "runs/split{split}/model" --splits 1,2,3,4,5 --shots 1,5   # Table 2 (one model per split)
    python eval.py --model runs/xsc/model --held_out_supercategory human_body        # Table 3 (cross super-category)
    python eval.py --model runs/ap10k/model --dataset ap10k                          # Table 4 (OKS AP, the model's CLAMP protocol)
    python eval.py --model DIR --task semantic                                         # Table 1 (naming accuracy)
    python eval.py --model DIR --identify_then_detect false                            # Table 5 (a model trained without ItD)
    python eval.py --model DIR --task visual+textual                                   # Table 7 (both prompts)
    python eval.py --demo                                                              # tiny random model, inference only

PCK@0.2 is scored as the official CAPE code scores MP-100 (POMNet / CapeFormer / PoseAnything): per category,
`--episodes` draws of `random.sample(instances, shots + queries)` after `random.seed(1)`, the `--queries` queries
of an episode sharing its support; per support-query pair the share of keypoints visible in the query and in
every shot that lie strictly within 0.2 x max(w, h) of the query's box (a pair with none scores 0); the mean
over pairs, with a 95% bootstrap interval over pairs. `--dataset mp100` draws the official 200 episodes x 15
queries per category (60,000 pairs per split); the embedded benchmark 7 x 15 (2,100 pairs per split and shots).
Per-category and pooled-keypoint figures are written as labelled extras.

Table 6 (prompt-feature extractor vs average pooling) compares two models trained with
`train.py --prompt_feature_extractor cross_attention|avg_pool`; each result records the model's extractor.

`--dataset embedded` (the default) and `--dataset mp100` read the MP-100 layout under `--data_dir`
(`annotations/mp100_split{1..5}_{train,val,test}.json` + `images/`); `--dataset ap10k` reads
`annotations/ap10k_{train,test}.json` (the embedded benchmark ships AP-10K-style files too) and scores OKS AP with
the model's confidences (`processing/textual_eval.py`: instance score = mean of the keypoint scores above 0.2,
as mmpose), beside the same predictions with every score 1.0 and the mean-position baseline. Results go
to OUTPUT_DIR/results.json (a `summary` list the model card reads, and `details`), OUTPUT_DIR/results.md
and pictures of sampled episodes (support with its keypoints beside the query with predictions and names).
"""

import json
import math
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw
from transformers import HfArgumentParser

from processing.builders import build_tiny_model

logger = logging.getLogger(__name__)

EMBEDDED_DATA_DIR = "data/embedded"
OFFICIAL_EPISODES = 200  # per test category, 15 queries each: the official MP-100 test
EMBEDDED_EPISODES = 7  # x 15 queries x 20 test categories = 2,100 pairs per split and shots (~7 min per setting on 2 cores)
DATASET_TITLES = {
    "embedded": ("KptLLM embedded MP-100-style", "kptllm-embedded-mp100"),
    "mp100": ("MP-100", "mp100"),
    "ap10k": ("AP-10K", "ap10k"),
}


@dataclass
class EvalArguments:
    model: str | None = field(
        default=None, metadata={"help": "a KptLLM folder (train.py writes OUTPUT_DIR/model); '{split}' in it is replaced per split"}
    )
    dataset: str = field(default="embedded", metadata={"help": "embedded | mp100 | ap10k"})
    data_dir: str = field(default=EMBEDDED_DATA_DIR, metadata={"help": "benchmark folder (the embedded one is generated if absent)"})
    task: str = field(default="visual", metadata={"help": "visual | visual+textual | semantic (mp100/embedded); ap10k: textual | semantic"})
    splits: str = field(default="1", metadata={"help": "comma-separated MP-100 splits; several need a '{split}' model path"})
    shots: str = field(default="1", metadata={"help": "comma-separated support shots, e.g. 1,5"})
    held_out_supercategory: str | None = field(
        default=None, metadata={"help": "Table 3: test on this super-category's categories (all splits' files), baselines from the rest"}
    )
    protocol: str | None = field(
        default=None,
        metadata={"help": "ap10k: a CLAMP protocol name, comma list, or 'all' (default: the protocol train.py trained the "
                          "model under, read from its results.json beside the model folder; 'all' for other models)"},
    )
    identify_then_detect: bool = field(default=True, metadata={"help": "False: the Table 5 ablation prompt (model trained that way)"})
    episodes: int | None = field(
        default=None,
        metadata={"help": "official episodes per test category (default: mp100 200, embedded 7, i.e. 2,100 pairs "
                          "per split with 15 queries)"},
    )
    queries: int = field(default=15, metadata={"help": "queries per episode, sharing its support (official: 15)"})
    matching_peer: str | None = field(
        default=None,
        metadata={"help": "a matching-peer folder scored beside KptLLM (train.py writes OUTPUT_DIR/matching_peer; used "
                          "by default when it sits beside the model folder; 'none' skips it)"},
    )
    cosine_probe: bool = field(default=True, metadata={"help": "also score the cosine match of the model's own z_p and z_q"})
    limit: int | None = field(
        default=None, metadata={"help": "score only the first N episodes (each with its queries) / instances (quick runs)"}
    )
    crop_padding: float = field(default=1.25, metadata={"help": "crop side = padding x max(bbox w, h), as in training"})
    num_pictures: int = field(default=6, metadata={"help": "episodes drawn per setting (0: none)"})
    demo: bool = field(default=False, metadata={"help": "run the tiny random-model inference demo"})
    output_dir: str = field(default="outputs/eval", metadata={"help": "where results and pictures go"})
    seed: int = field(default=0, metadata={"help": "seed of the demo's random model"})


def synthetic_pair() -> tuple[Image.Image, Image.Image, list[list[float]], list[str]]:
    """A support and a query image with three coloured landmarks, the query rotated by 90 degrees."""
    names = ["red dot", "green dot", "blue dot"]
    points = [[20.0, 20.0], [60.0, 30.0], [40.0, 60.0]]
    colours = [(230, 40, 40), (40, 200, 40), (40, 80, 230)]
    support = Image.new("RGB", (80, 80), (30, 30, 30))
    draw = ImageDraw.Draw(support)
    for (x, y), colour in zip(points, colours):
        draw.ellipse((x - 5, y - 5, x + 5, y + 5), fill=colour)
    return support.rotate(90), support, points, names


def draw_predictions(image: Image.Image, result: dict, scale: int = 4) -> Image.Image:
    """`result`: one box's dict of `post_process_keypoint_detection` (NaN keypoints are not drawn)."""
    canvas = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for (x, y), name in zip(result["keypoints"].tolist(), result["names"]):
        if math.isnan(x):
            continue
        x, y = x * scale, y * scale
        draw.line((x - 6, y, x + 6, y), fill="white", width=2)
        draw.line((x, y - 6, x, y + 6), fill="white", width=2)
        draw.text((x + 8, y - 6), name or "?", fill="white")
    return canvas


def run_demo(args: EvalArguments) -> dict:
    query, support, points, names = synthetic_pair()
    model, processor = build_tiny_model(names, seed=args.seed)
    model.eval()
    inputs = processor(query=query, support=support, kpts=points, task="visual")
    outputs = model.detect_keypoints(**inputs)
    (result,), = processor.post_process_keypoint_detection(outputs)  # one image, one box
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    draw_predictions(query, result).save(out_dir / "demo_predictions.png")
    for prompt, name, (x, y), score in zip(points, result["names"], result["keypoints"].tolist(), result["scores"].tolist()):
        print(f"support point {prompt} -> name={name!r} at ({x:.1f}, {y:.1f}), score {score:.3f}")
    print(f"untrained model: names and positions are random; picture in {out_dir / 'demo_predictions.png'}")
    return result


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise SystemExit(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise SystemExit(f"{flag} is empty")
    return values


def check_arguments(args: EvalArguments) -> None:
    """Refuse inconsistent flags before any model or data is loaded."""
    if args.dataset not in DATASET_TITLES:
        raise SystemExit(f"--dataset {args.dataset!r}: expected one of {sorted(DATASET_TITLES)}")
    tasks = ("textual", "semantic") if args.dataset == "ap10k" else ("visual", "visual+textual", "semantic")
    if args.dataset == "ap10k" and args.task == "visual":
        args.task = "textual"  # AP-10K's protocol is textual-prompt detection
    if args.task not in tasks:
        raise SystemExit(f"--task {args.task!r} is not evaluated on {args.dataset}: choose one of {tasks}")
    splits = _int_list(args.splits, "--splits")
    if any(split not in (1, 2, 3, 4, 5) for split in splits):
        raise SystemExit(f"--splits must be within 1..5, got {args.splits!r}")
    if any(shots < 1 for shots in _int_list(args.shots, "--shots")):
        raise SystemExit(f"--shots must be positive, got {args.shots!r}")
    if len(splits) > 1 and "{split}" not in args.model:
        raise SystemExit(
            "several --splits need one model per split (a split's test categories are another split's training "
            "categories): pass --model with '{split}' in it, e.g. runs/split{split}/model"
        )
    if args.held_out_supercategory and len(splits) > 1:
        raise SystemExit("--held_out_supercategory uses all categories of one split's files: pass a single --splits")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"--limit must be at least 1, got {args.limit}")
    if args.episodes is None:
        args.episodes = OFFICIAL_EPISODES if args.dataset == "mp100" else EMBEDDED_EPISODES
    for flag, value in (("--episodes", args.episodes), ("--queries", args.queries)):
        if value < 1:
            raise SystemExit(f"{flag} must be at least 1, got {value}")


def load_model(model_dir: str | Path):
    from modeling_kptllm import KptLlmForKeypointComprehension, KptLlmProcessor

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{model_dir} is not a KptLLM folder (no config.json)")
    try:
        model = KptLlmForKeypointComprehension.from_pretrained(model_dir).eval()
        processor = KptLlmProcessor.from_pretrained(model_dir, trust_remote_code=False)  # our own class: no remote code
    except (OSError, ValueError) as error:  # a damaged folder: the message names the file, no traceback needed
        raise SystemExit(f"error: cannot load {model_dir}: {error}") from None
    return model, processor


def load_matching_peer(flag: str | None, model_dir: str, split: int):
    """The matching peer to score beside KptLLM: `--matching_peer`, else the one train.py left beside the model."""
    from processing.matching_peer import MatchingPeer

    if flag is not None and flag.lower() == "none":
        return None
    folder = Path(flag.replace("{split}", str(split))) if flag else Path(model_dir).parent / "matching_peer"
    if not (folder / "model.safetensors").is_file():
        if flag:
            raise SystemExit(f"--matching_peer {folder}: no model.safetensors there (train.py writes OUTPUT_DIR/matching_peer)")
        return None
    return MatchingPeer.from_pretrained(folder)


def _without_per_category(scores: dict) -> dict:
    return {key: value for key, value in scores.items() if key not in ("pck_per_category", "pck_per_pair")}


def _percent_interval(interval: list[float]) -> str:
    return f"[{100 * interval[0]:.2f}, {100 * interval[1]:.2f}]"


def _summary_entry(args: EvalArguments, task: str, config: str, split: str, metric: tuple[str, str, float],
                   baselines: dict[str, float], setting: str) -> dict:
    name, kind = DATASET_TITLES[args.dataset]
    metric_name, metric_type, value = metric
    return {
        "task": task,
        "task_type": "keypoint-detection",
        "dataset": {"name": name, "type": kind, "split": split, "config": config},
        "metric": {"name": metric_name, "type": metric_type, "value": value},
        "baselines": baselines,
        "setting": setting,
    }


def evaluate_mp100_setting(
    args: EvalArguments, split: int, shots: int, model, processor, out_dir: Path, matching_peer=None
) -> dict:
    """Official PCK@0.2 of one (split, shots) setting, with per-category extras and pictures."""
    from processing.coco import load_cross_supercategory, load_mp100
    from processing.episodes import coco_file_order, sample_cape_episodes
    from processing.evaluation import evaluate_visual_prompt
    from processing.visualize import save_episode_sheet

    if args.held_out_supercategory:  # three files merged: categories and images go by id
        train, test = load_cross_supercategory(args.data_dir, args.held_out_supercategory, split)
        category_order = image_order = None
    else:
        train = load_mp100(args.data_dir, split, "train")
        test, report = load_mp100(args.data_dir, split, "test", return_report=True)
        if report.num_skipped:
            logger.warning("the reader skipped %d test instances (%s): the episodes are not the official draw",
                           report.num_skipped, report.summary())
        category_order, image_order = coco_file_order(report.annotation_file)
    try:
        episodes = sample_cape_episodes(test, shots, args.queries, args.episodes, category_order, image_order)[: args.limit]
    except ValueError as error:  # every category too small: say so, no traceback
        raise SystemExit(f"error: {error}") from None
    results, pairs, predictions = evaluate_visual_prompt(
        model, processor, test, episodes, train, identify_then_detect=args.identify_then_detect, task=args.task,
        matching_peer=matching_peer, cosine_probe=args.cosine_probe,
    )
    if args.num_pictures > 0:
        shown = slice(None, None, max(1, len(pairs) // args.num_pictures))
        save_episode_sheet(test, pairs[shown][: args.num_pictures], predictions[shown][: args.num_pictures],
                           out_dir / f"predictions_split{split}_{shots}shot.png")
    names = dict(zip(test["category_id"], test["category_name"]))
    per_category = {
        names.get(int(category), str(category)): score for category, score in results["KptLLM"]["pck_per_category"].items()
    }
    return {
        "episodes": len(episodes),
        "queries_per_episode": args.queries,
        "pairs": len(pairs),
        "results": {method: _without_per_category(scores) for method, scores in results.items()},
        "per_pair": {method: scores["pck_per_pair"] for method, scores in results.items()},
        "pck_per_category": per_category,
    }


def run_mp100(args: EvalArguments) -> dict:
    """Tables 2, 3, 5, 7: official PCK@0.2 per split and shots, averaged over splits, baselines beside."""
    from processing.evaluation import bootstrap_interval_of_mean_over_splits, markdown_table

    out_dir = Path(args.output_dir)
    splits, shot_list = _int_list(args.splits, "--splits"), _int_list(args.shots, "--shots")
    details: dict = {"settings": {}}
    per_pair: dict[str, dict[str, list[float]]] = {}
    summary: list[dict] = []
    lines: list[str] = []
    config_of_model = None
    for split in splits:
        model_dir = args.model.replace("{split}", str(split))
        model, processor = load_model(model_dir)
        processor.crop_padding = args.crop_padding
        matching_peer = load_matching_peer(args.matching_peer, model_dir, split)
        config_of_model = {"prompt_feature_extractor": model.config.prompt_feature_extractor}
        for shots in shot_list:
            setting = evaluate_mp100_setting(args, split, shots, model, processor, out_dir, matching_peer)
            key = f"split{split}_{shots}shot"
            per_pair[key] = setting.pop("per_pair")  # the pairs' accuracies bootstrap the mean over splits, unsaved
            details["settings"][key] = setting
            title = f"PCK@0.2, split {split} test, {shots}-shot" + (
                f", held-out super-category {args.held_out_supercategory}" if args.held_out_supercategory else "")
            lines += [f"### {title}", "", f"{setting['episodes']} episodes x {args.queries} queries = "
                      f"{setting['pairs']} support-query pairs", "", markdown_table(setting["results"], title=title), ""]
            lines += ["| category | KptLLM PCK@0.2 (extra: mean over the category's pairs) |", "|---|---|"] + [
                f"| {name} | {100 * score:.2f} |" for name, score in sorted(setting["pck_per_category"].items())
            ] + [""]
    for shots in shot_list:  # the paper's headline: the mean over the evaluated splits
        keys = [f"split{split}_{shots}shot" for split in splits]
        per_split = [details["settings"][key]["results"] for key in keys]
        methods = per_split[0].keys()
        mean = {method: 100 * sum(r[method]["pck"] for r in per_split) / len(per_split) for method in methods}
        interval = {
            method: bootstrap_interval_of_mean_over_splits([per_pair[key][method] for key in keys]) for method in methods
        }
        details.setdefault("mean_over_splits", {})[f"{shots}shot"] = mean
        details.setdefault("mean_over_splits_ci95", {})[f"{shots}shot"] = interval
        split_label = ",".join(map(str, splits))
        lines += [f"### PCK@0.2 mean over splits {split_label}, {shots}-shot", "",
                  "| method | PCK@0.2 | 95% CI (bootstrap over pairs, per split) |", "|---|---|---|"]
        lines += [f"| {method} | {value:.2f} | {_percent_interval(interval[method])} |" for method, value in mean.items()]
        lines += [""]
        keypoints = sum(r["KptLLM"]["num_keypoints"] for r in per_split)
        pairs = sum(r["KptLLM"]["num_pairs"] for r in per_split)
        task_title = "Visual+textual-prompt keypoint detection" if args.task == "visual+textual" else "Visual-prompt keypoint detection"
        held_out = f"held-out super-category {args.held_out_supercategory}; " if args.held_out_supercategory else ""
        summary.append(_summary_entry(
            args, task_title, f"{shots}-shot",
            f"split{split_label}-test" if len(splits) == 1 else f"mean of splits {split_label}",
            ("PCK@0.2", "pck", round(mean["KptLLM"], 2)),
            {method: round(value, 2) for method, value in mean.items() if method != "KptLLM"},
            f"{held_out}official CAPE protocol: {pairs} support-query pairs ({args.queries} queries per episode), "
            f"{keypoints} valid keypoints, 95% CI {_percent_interval(interval['KptLLM'])}; identify-then-detect {'on' if args.identify_then_detect else 'off'}; "
            f"extractor {config_of_model['prompt_feature_extractor']}",
        ))
    return {"summary": summary, "details": details, "markdown": "\n".join(lines)}


def run_ap10k(args: EvalArguments) -> dict:
    """Table 4 (textual-prompt OKS AP under CLAMP's protocols) or Table 1-style naming accuracy on AP-10K."""
    from processing.coco import CLAMP_PROTOCOLS
    from processing.textual_eval import (
        CONSTANT_SCORE_ROW, evaluate_semantic, evaluate_textual_prompt, load_clamp_protocol, naming_markdown_table,
        oks_markdown_table,
    )

    trained_under = training_protocol(args.model)
    requested = args.protocol or trained_under or "all"
    protocols = list(CLAMP_PROTOCOLS) if requested == "all" else [p.strip() for p in requested.split(",")]
    unknown = [p for p in protocols if p not in CLAMP_PROTOCOLS]
    if unknown:
        raise SystemExit(f"--protocol {unknown}: expected 'all' or some of {sorted(CLAMP_PROTOCOLS)}")
    if trained_under is not None:
        trained_family = CLAMP_PROTOCOLS[trained_under][0]
        seen = [p for p in protocols if CLAMP_PROTOCOLS[p][1] == trained_family]
        if seen:  # its test family is the model's training family: not a cross-species result
            raise SystemExit(f"--protocol {seen}: the model was trained on {trained_family} ({trained_under}), which "
                             f"these protocols test on; pass --protocol {trained_under}")
    model, processor = load_model(args.model)
    processor.crop_padding = args.crop_padding
    details, summary, lines = {}, [], []
    for protocol in protocols:
        train, test = load_clamp_protocol(args.data_dir, protocol)
        if args.task == "semantic":
            results = evaluate_semantic(model, processor, test, train, limit=args.limit)
            lines += [f"### naming accuracy, {protocol}", "", naming_markdown_table(results), ""]
            metric = ("Naming accuracy", "accuracy", round(100 * results["KptLLM"]["accuracy"], 2))
            baselines = {m: round(100 * r["accuracy"], 2) for m, r in results.items() if m != "KptLLM"}
            counts = f"{results['KptLLM']['num_keypoints']} keypoints"
            task_title = "Keypoint semantic understanding"
        else:
            results = evaluate_textual_prompt(
                model, processor, test, train, limit=args.limit, identify_then_detect=args.identify_then_detect
            )
            lines += [f"### OKS AP, {protocol}", "", oks_markdown_table(results), ""]
            metric = ("OKS AP", "oks_ap", round(100 * results["KptLLM"]["AP"], 2))
            baselines = {m: round(100 * r["AP"], 2) for m, r in results.items() if m not in ("KptLLM", CONSTANT_SCORE_ROW)}
            counts = (f"{results['KptLLM']['num_instances']} instances; ranked by the model's instance scores (AP with "
                      f"every score 1.0: {100 * results[CONSTANT_SCORE_ROW]['AP']:.2f})")
            task_title = "Textual-prompt keypoint detection"
        details[protocol] = results
        summary.append(_summary_entry(args, task_title, protocol, "test", metric, baselines, f"CLAMP protocol {protocol}; {counts}"))
    return {"summary": summary, "details": details, "markdown": "\n".join(lines)}


def training_protocol(model_dir: str) -> str | None:
    """The CLAMP protocol train.py trained `model_dir` under (its results.json beside the model folder), or None."""
    record = Path(model_dir).parent / "results.json"
    try:
        data_args = json.loads(record.read_text()).get("data_args", {})
    except (OSError, ValueError, AttributeError):
        return None
    from processing.coco import CLAMP_PROTOCOLS

    protocol = data_args.get("protocol") if data_args.get("dataset") == "ap10k" else None
    return protocol if protocol in CLAMP_PROTOCOLS else None


def run_mp100_semantic(args: EvalArguments) -> dict:
    """Table 1: naming accuracy on the test categories of each split, with the naming baselines."""
    from processing.coco import load_mp100
    from processing.textual_eval import evaluate_semantic, naming_markdown_table

    details, summary, lines = {}, [], []
    for split in _int_list(args.splits, "--splits"):
        model, processor = load_model(args.model.replace("{split}", str(split)))
        processor.crop_padding = args.crop_padding
        train, test = load_mp100(args.data_dir, split, "train"), load_mp100(args.data_dir, split, "test")
        results = evaluate_semantic(model, processor, test, train, limit=args.limit)
        details[f"split{split}"] = results
        lines += [f"### naming accuracy, split {split} test", "", naming_markdown_table(results), ""]
        summary.append(_summary_entry(
            args, "Keypoint semantic understanding", "semantic", f"split{split}-test",
            ("Naming accuracy", "accuracy", round(100 * results["KptLLM"]["accuracy"], 2)),
            {m: round(100 * r["accuracy"], 2) for m, r in results.items() if m != "KptLLM"},
            f"{results['KptLLM']['num_keypoints']} keypoints",
        ))
    return {"summary": summary, "details": details, "markdown": "\n".join(lines)}


def run_evaluation(args: EvalArguments) -> dict:
    """Evaluate, print the Markdown tables and write results.json / results.md; returns the written JSON."""
    check_arguments(args)
    if Path(args.data_dir) == Path(EMBEDDED_DATA_DIR):  # generated if absent (MP-100- and AP-10K-style files)
        from processing.embedded import ensure_embedded_benchmark

        ensure_embedded_benchmark(args.data_dir)
    if args.dataset == "ap10k":
        outcome = run_ap10k(args)
    elif args.task == "semantic":
        outcome = run_mp100_semantic(args)
    else:
        outcome = run_mp100(args)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "model": args.model,
        "benchmark": args.dataset,
        "arguments": asdict(args),
        "summary": outcome["summary"],
        "details": outcome["details"],
    }
    (out_dir / "results.json").write_text(json.dumps(report, indent=2, default=float))
    (out_dir / "results.md").write_text(outcome["markdown"] + "\n")
    print(outcome["markdown"])
    print(f"results: {out_dir / 'results.json'}, {out_dir / 'results.md'}")
    return report


def main() -> None:
    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses()
    if args.demo:
        run_demo(args)
    elif args.model:
        run_evaluation(args)
    else:
        raise SystemExit("pass --model DIR (a KptLLM folder) or --demo")


if __name__ == "__main__":
    main()
