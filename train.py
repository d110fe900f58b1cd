"""Train KptLLM with HF `Trainer`: argument dataclasses -> model and processor -> Trainer.

`python train.py` (no arguments) is the embedded default: it generates the embedded benchmark if
absent, trains the tiny model on split 1's training categories on CPU, evaluates PCK@0.2 (1-shot)
on the held-out test categories next to the support-copy and mean-position baselines, and writes a
ready-to-load model folder plus a picture of predictions. Presets only set defaults: any
`--flag value` given on the command line wins.
"""

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from processing.builders import build_tiny_model
from processing.coco import load_mp100
from processing.collator import KeypointTrainingDataset, KptLlmDataCollator
from processing.embedded import ensure_embedded_benchmark
from processing.episodes import fixed_test_episodes, make_training_samples
from processing.evaluation import evaluate_visual_prompt, markdown_table
from processing.visualize import save_episode_sheet

logger = logging.getLogger("train")

# Trainer defaults per preset; the command line is appended, so explicit flags override these.
PRESETS: dict[str, list[str]] = {
    "tiny": [
        "--output_dir", "runs/tiny", "--max_steps", "1500", "--per_device_train_batch_size", "16",
        "--learning_rate", "1e-3", "--weight_decay", "0", "--lr_scheduler_type", "cosine", "--warmup_steps", "50",
        "--logging_steps", "25", "--save_steps", "250", "--save_total_limit", "2", "--report_to", "none",
        "--use_cpu", "true", "--dataloader_num_workers", "0", "--remove_unused_columns", "false", "--seed", "0",
    ],
}


@dataclass
class ModelArguments:
    preset: str = field(default="tiny", metadata={"help": "tiny (embedded default, CPU minutes)"})
    prompt_feature_extractor: str = field(default="cross_attention", metadata={"help": "cross_attention | avg_pool"})
    image_size: int = field(default=64, metadata={"help": "tiny preset: crop size of the vision tower"})
    patch_size: int = field(default=8, metadata={"help": "tiny preset: ViT patch size"})
    vision_hidden_size: int = field(default=96, metadata={"help": "tiny preset: vision width"})
    vision_layers: int = field(default=3, metadata={"help": "tiny preset: vision depth"})
    text_hidden_size: int = field(default=128, metadata={"help": "tiny preset: LLM width"})
    text_layers: int = field(default=4, metadata={"help": "tiny preset: LLM depth"})


@dataclass
class DataArguments:
    data_dir: str = field(default="data/embedded", metadata={"help": "embedded benchmark folder (made if absent)"})
    split: int = field(default=1, metadata={"help": "MP-100-style split (1-5)"})
    task_mix: str = field(default="visual=0.6,textual=0.2,semantic=0.2", metadata={"help": "task=weight,..."})
    num_shots: int = field(default=1, metadata={"help": "support shots of visual training samples"})
    identify_then_detect: bool = field(default=True, metadata={"help": "False: Table 5 ablation"})
    crop_padding: float = field(default=1.25, metadata={"help": "crop side = padding x max(bbox w, h)"})
    eval_queries_per_category: int = field(default=5, metadata={"help": "test episodes per category"})
    resume: bool = field(default=False, metadata={"help": "resume from the last checkpoint in output_dir"})


def parse_task_mix(text: str) -> dict[str, float]:
    try:
        return {task.strip(): float(weight) for task, weight in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise SystemExit(f"--task_mix must look like 'visual=0.6,textual=0.2,semantic=0.2', got {text!r}") from None


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    preset = next((argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--preset"), "tiny")
    if preset not in PRESETS:
        raise SystemExit(f"--preset {preset!r}: expected one of {sorted(PRESETS)}")
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    return parser.parse_args_into_dataclasses(args=PRESETS[preset] + argv)


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)

    ensure_embedded_benchmark(data_args.data_dir)
    train_instances = load_mp100(data_args.data_dir, data_args.split, "train")
    test_instances = load_mp100(data_args.data_dir, data_args.split, "test")
    names = set(train_instances["keypoint_names"][0]).union(*train_instances["keypoint_names"], *test_instances["keypoint_names"])

    model, processor = build_tiny_model(
        sorted(names),
        seed=training_args.seed,
        image_size=model_args.image_size,
        patch_size=model_args.patch_size,
        vision_hidden_size=model_args.vision_hidden_size,
        vision_layers=model_args.vision_layers,
        text_hidden_size=model_args.text_hidden_size,
        text_layers=model_args.text_layers,
        prompt_feature_extractor=model_args.prompt_feature_extractor,
    )
    processor.crop_padding = data_args.crop_padding
    samples = make_training_samples(
        train_instances, parse_task_mix(data_args.task_mix), num_shots=data_args.num_shots, seed=training_args.seed
    )
    train_dataset = KeypointTrainingDataset(train_instances, samples, processor, data_args.identify_then_detect)
    logger.info("%d training samples from %d instances; %.2fM parameters", len(train_dataset), len(train_instances),
                sum(p.numel() for p in model.parameters()) / 1e6)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=KptLlmDataCollator(pad_token_id=processor.tokenizer.pad_token_id),
    )
    trainer.train(resume_from_checkpoint=True if data_args.resume else None)

    model_dir = output_dir / "model"
    trainer.save_model(model_dir)
    processor.save_pretrained(model_dir)

    episodes = fixed_test_episodes(
        test_instances, output_dir / f"test_episodes_split{data_args.split}_1shot.json", num_shots=1,
        seed=0, num_queries_per_category=data_args.eval_queries_per_category,
    )
    results = evaluate_visual_prompt(
        model, processor, test_instances, episodes, train_instances, identify_then_detect=data_args.identify_then_detect
    )
    table = markdown_table(results, title=f"PCK@0.2, split {data_args.split} test, 1-shot")
    print(table)
    report = {
        "split": data_args.split,
        "episodes": len(episodes),
        "results": {method: {k: v for k, v in scores.items() if k != "pck_per_category"} for method, scores in results.items()},
        "model_args": asdict(model_args),
        "data_args": asdict(data_args),
        "train_runtime_s": trainer.state.log_history[-1].get("train_runtime"),
    }
    (output_dir / "results.json").write_text(json.dumps(report, indent=2))
    (output_dir / "results.md").write_text(table + "\n")
    save_episode_sheet(model, processor, test_instances, episodes[:: max(1, len(episodes) // 6)][:6], output_dir / "predictions.png")
    print(f"model folder: {model_dir}  (AutoModel.from_pretrained(..., trust_remote_code=True))")
    return report


if __name__ == "__main__":
    main()
