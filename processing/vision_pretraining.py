"""Stage 0 for a randomly initialised vision tower: name the keypoints of training images, before KptLLM training.

Why it exists: the paper fine-tunes LLaVA-1.5, whose CLIP tower already tells image parts apart. No
pretrained image encoder is available offline, so the `tiny` and `smol` presets start from a random
tower. Trained end to end from there, the LLM never learnt to use the support features. Measured on the
embedded benchmark (split 1, names of keypoints of the unseen test categories):

* a linear classifier on the random tower's features pooled at a keypoint names it 13% of the time
  (the same classifier on the raw 6-pixel window around the keypoint: 96%);
* KptLLM trained with the default task mix named 3-5% of test keypoints after 600-1,000 steps,
  below the most-frequent-name baseline (6%).

This stage trains the modules in front of the LLM (vision tower, prompt encoder, prompt feature
extractor) with a linear keypoint-name classifier on the prompt feature of every visible keypoint,
on randomly shifted and scaled crops of the *training* instances only, as the stand-in for CLIP's
pretraining. The classifier is discarded afterwards; KptLLM training then starts from these modules.

Measured (split 1, 2 cores): 800 steps of batch 32 take ~3.7 min; the stage's classifier then names
51% of the keypoints of 400 instances of the unseen test categories through the prompt feature
extractor (47% after 400 steps, 36% after 100), and `python
train.py` (stage 0 + 1500 KptLLM steps) names 27.3% of the 5,398 test keypoints against 4.4% for the
most frequent training name (`eval.py --task semantic`; 4.97% vs 6.06% without stage 0).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from torch.utils.data import Dataset as TorchDataset
from transformers import Trainer, TrainingArguments

from modeling_kptllm import KptLlmForKeypointComprehension, KptLlmProcessor
from modeling_kptllm.modeling_kptllm import average_pool_around
from modeling_kptllm.processing_kptllm import normalize_points, square_crop_box

from .coco import load_image

logger = logging.getLogger(__name__)


class KeypointNamingDataset(TorchDataset):
    """One randomly jittered crop per instance with its visible keypoints and their name ids.

    The instance box is scaled by up to ±`jitter` and shifted by up to ±`jitter` of its size before
    the processor's square crop, so that a glyph falls on every sub-patch offset; keypoints that the
    jitter pushes out of the crop are left out.
    """

    def __init__(
        self, instances: Dataset, processor: KptLlmProcessor, name_ids: dict[str, int], jitter: float = 0.15, seed: int = 0
    ):
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        missing = sorted(set().union(*instances["keypoint_names"]) - set(name_ids))
        if missing:
            raise ValueError(f"keypoint names without an id: {missing[:5]}")
        self.instances = instances
        self.processor = processor
        self.name_ids = name_ids
        self.jitter = jitter
        self.seed = seed
        self.draws = [0] * len(instances)  # a fresh jitter every time an instance is drawn again

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.instances[index]
        rng = random.Random(f"vision-pretraining/{self.seed}/{index}/{self.draws[index]}")
        self.draws[index] += 1
        x, y, w, h = row["bbox"]
        scale = rng.uniform(1 - self.jitter, 1 + self.jitter)
        x += rng.uniform(-self.jitter, self.jitter) * w + w * (1 - scale) / 2
        y += rng.uniform(-self.jitter, self.jitter) * h + h * (1 - scale) / 2
        image = load_image(row["image_path"])
        box = square_crop_box([x, y, w * scale, h * scale], image.size, self.processor.crop_padding, f"{row['image_path']}: bbox")
        pixel_values = self.processor._pixel_values([self.processor._crop(image, box)])[0]  # (3, H, W)
        coords = normalize_points(np.asarray(row["keypoints"], dtype=np.float64), box)  # (K, 2)
        keep = (np.asarray(row["visible"]) > 0) & ((coords >= 0) & (coords <= 1)).all(-1)
        names = [self.name_ids[name] for name, kept in zip(row["keypoint_names"], keep) if kept]
        return {
            "pixel_values": pixel_values,
            "keypoint_coords": torch.tensor(coords[keep], dtype=torch.float32),
            "labels": torch.tensor(names, dtype=torch.long),
        }


def collate_keypoint_naming(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pads keypoints to the batch's maximum: coords (B, K, 2), labels (B, K) with -100 padding."""
    most = max(1, max(len(f["labels"]) for f in features))
    coords = torch.zeros(len(features), most, 2)
    labels = torch.full((len(features), most), -100, dtype=torch.long)
    for i, feature in enumerate(features):
        count = len(feature["labels"])
        coords[i, :count] = feature["keypoint_coords"]
        labels[i, :count] = feature["labels"]
    return {"pixel_values": torch.stack([f["pixel_values"] for f in features]), "keypoint_coords": coords, "labels": labels}


class KeypointNamingModel(nn.Module):
    """KptLLM's vision tower, prompt encoder and prompt feature extractor (shared, not copied) + a name classifier."""

    def __init__(self, model: KptLlmForKeypointComprehension, num_names: int):
        super().__init__()
        self.vision_tower = model.vision_tower
        self.prompt_encoder = model.prompt_encoder  # None under the avg_pool extractor
        self.prompt_feature_extractor = model.prompt_feature_extractor
        self.feature_layer = model.config.vision_feature_layer
        self.drop_cls = model.config.vision_feature_select_strategy == "default"
        self.grid_size = model.config.patch_grid_size
        self.pool_radius = model.config.prompt_pool_radius
        self.classifier = nn.Linear(model.config.vision_config.hidden_size, num_names)

    def forward(self, pixel_values: torch.Tensor, keypoint_coords: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.vision_tower(pixel_values, output_hidden_states=True).hidden_states[self.feature_layer]
        if self.drop_cls:
            features = features[:, 1:]  # (B, h*w, D)
        mask = labels != -100  # (B, K)
        if not mask.any():  # every keypoint jittered out or invisible: nothing to learn from this batch
            return {"loss": features.sum() * 0.0, "logits": features.new_zeros(0, self.classifier.out_features)}
        rows = mask.nonzero(as_tuple=True)[0]
        coords = keypoint_coords[mask]  # (N, 2)
        if self.prompt_feature_extractor is None:
            prompt_features = average_pool_around(features[rows], coords, self.grid_size, self.pool_radius)
        else:
            prompt_features = self.prompt_feature_extractor(self.prompt_encoder(coords), coords, features[rows])  # (N, D)
        logits = self.classifier(prompt_features)
        return {"loss": F.cross_entropy(logits, labels[mask]), "logits": logits}


def pretrain_vision_modules(
    model: KptLlmForKeypointComprehension,
    processor: KptLlmProcessor,
    instances: Dataset,
    keypoint_names: list[str],
    output_dir: str | Path,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    jitter: float = 0.15,
    seed: int = 0,
    use_cpu: bool = False,
) -> list[dict[str, float]]:
    """Trains the model's vision tower, prompt encoder and extractor in place; returns the Trainer's log."""
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    name_ids = {name: i for i, name in enumerate(sorted(keypoint_names))}
    dataset = KeypointNamingDataset(instances, processor, name_ids, jitter=jitter, seed=seed)
    naming_model = KeypointNamingModel(model, len(name_ids))
    args = TrainingArguments(
        output_dir=str(Path(output_dir) / "vision_pretraining"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=0.0,
        lr_scheduler_type="cosine",
        warmup_steps=min(50, steps // 10),
        logging_steps=max(1, steps // 8),
        save_strategy="no",
        report_to="none",
        use_cpu=use_cpu,
        dataloader_num_workers=0,
        dataloader_pin_memory=not use_cpu,
        remove_unused_columns=False,
        seed=seed,
    )
    trainer = Trainer(model=naming_model, args=args, train_dataset=dataset, data_collator=collate_keypoint_naming)
    logger.info("Stage 0: %d steps of keypoint naming on %d training instances (%d names)", steps, len(dataset), len(name_ids))
    trainer.train()
    return trainer.state.log_history
