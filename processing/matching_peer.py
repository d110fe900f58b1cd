"""A CAPE matching peer for the embedded default: the method family KptLLM is compared with in Table 2.

POMNet and CapeFormer localize a keypoint by correlating the support keypoint's feature with the
query feature map (a similarity heatmap), reading a position off the heatmap (soft-argmax), and, in
CapeFormer, refining that proposal with a transformer layer that attends to the query features
around it. `MatchingPeer` is that recipe built on a *copy* of KptLLM's own modules in front of the
LLM (vision tower, projector, prompt encoder, prompt feature extractor, prompt projector) taken
right after stage 0, so that a comparison with KptLLM isolates what the LLM adds:

    z_q = projector(V(query crop))                        (h*w, D)   KptLLM's query tokens
    z_p = prompt_projector(extractor(PE(x), V(support)))  (D,)       KptLLM's prompt token
    heatmap = softmax(s * cos(z_p, z_q))                  (h*w,)     correlation (POMNet)
    proposal = sum(heatmap * patch centres) near its peak (2,)       local soft-argmax
    y = proposal + offset(DecoderLayer(z_p + PE(proposal), z_q + PE(centres)))   (CapeFormer)

It trains on the same pairs of jittered training-category crops as stage 0
(`vision_pretraining.KeypointPairDataset`) with L1 on the proposal and on the refined point plus the
heatmap's cross-entropy against the patches around the target. `cosine_argmax` is its untrained
floor: the query patch whose z_q is most similar to z_p, read off any KptLLM's modules (the "cosine
probe" of what KptLLM's own inputs hold).
"""

from __future__ import annotations

import copy
import logging
import math
import multiprocessing
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, load_from_disk
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import Trainer

from modeling_kptllm import KptLlmConfig, KptLlmForKeypointComprehension, KptLlmProcessor
from modeling_kptllm.modeling_kptllm import patch_centers, sine_cosine_embedding
from modeling_kptllm.processing_kptllm import denormalize_points, square_crop_box

from .episodes import Episode
from .evaluation import episode_inputs
from .vision_pretraining import (
    KeypointPairDataset,
    collate_keypoint_pairs,
    patch_targets,
    prompt_to_patch_cosine,
    short_stage_arguments,
)

logger = logging.getLogger(__name__)


def query_and_prompt_tokens(
    front: KptLlmForKeypointComprehension,
    query_pixels: torch.Tensor,
    support_pixels: torch.Tensor,
    prompt_coords: torch.Tensor,
    prompt_visible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_q (N_q, h*w, D), z_p (P, D)) of KptLLM's inputs, from crops and prompts in its input layout."""
    features = front.get_vision_features(torch.cat([query_pixels, support_pixels]))
    query_tokens = front.multi_modal_projector(features[: len(query_pixels)])
    prompt_tokens = front.get_prompt_features(features[len(query_pixels) :], prompt_coords, prompt_visible)
    return query_tokens, prompt_tokens


class MatchingPeer(nn.Module):
    """Correlation heatmap -> soft-argmax proposal -> transformer refinement, on KptLLM's front modules.

    `front` is a KptLLM model used only for `get_image_features` / `get_vision_features` /
    `get_prompt_features`; pass a copy (`from_stage0`) so that training the peer leaves KptLLM alone.
    """

    def __init__(self, front: KptLlmForKeypointComprehension, refine_heads: int = 4):
        super().__init__()
        front.language_model = None  # the LLM and keypoint head take no part in matching
        front.keypoint_head = None
        self.front = front
        dim = front.config.text_config.hidden_size
        self.grid_size = front.config.patch_grid_size
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        self.refiner = nn.TransformerDecoderLayer(dim, refine_heads, dim_feedforward=2 * dim, batch_first=True, norm_first=True)
        self.offset = nn.Linear(dim, 2)
        nn.init.zeros_(self.offset.weight)  # starts as the plain soft-argmax
        nn.init.zeros_(self.offset.bias)

    @classmethod
    def from_stage0(cls, model: KptLlmForKeypointComprehension) -> "MatchingPeer":
        """A peer whose front modules are a copy of `model`'s (call it right after stage 0)."""
        front = copy.copy(model)  # shallow: swap the heavy parts out before copying the rest
        front._modules = {}
        for name, module in model._modules.items():
            if name in ("language_model", "keypoint_head"):
                continue
            trained = getattr(module, "modules_to_save", None)  # under LoRA, peft's wrapper: take its trained copy
            front._modules[name] = trained["default"] if trained is not None else module
        return cls(copy.deepcopy(front))

    def save_pretrained(self, directory: str | Path) -> None:
        """config.json (the front's KptLLM config) and model.safetensors."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.front.config.save_pretrained(directory)
        save_file({key: value.contiguous() for key, value in self.state_dict().items()}, directory / "model.safetensors")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "MatchingPeer":
        directory = Path(directory)
        weights = directory / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} not found: not a matching-peer folder (train.py writes OUTPUT_DIR/matching_peer)")
        peer = cls(KptLlmForKeypointComprehension(KptLlmConfig.from_pretrained(directory)))
        missing, unexpected = peer.load_state_dict(load_file(weights), strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights} does not fit the matching peer: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return peer.eval()

    def localize(self, query_tokens: torch.Tensor, prompt_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """query_tokens (P, h*w, D), prompt_tokens (P, D) -> logits (P, h*w), proposal and point (P, 2)."""
        centers = patch_centers(self.grid_size, query_tokens.device)  # (h*w, 2)
        similarity = prompt_to_patch_cosine(prompt_tokens, query_tokens)  # (P, h*w)
        logits = self.logit_scale.exp().clamp(max=100) * similarity  # (P, h*w)
        # soft-argmax within one patch of the peak: a global one averages in look-alikes elsewhere
        # (measured on the stage-0 start: 81.4 PCK after 300 steps, below the plain argmax's 87.2)
        peak = centers[logits.argmax(-1)]  # (P, 2)
        near_peak = ((centers[None] - peak[:, None]).abs() * self.grid_size <= 1.01).all(-1)  # (P, h*w)
        proposal = logits.masked_fill(~near_peak, float("-inf")).softmax(-1) @ centers  # (P, 2)
        dim = query_tokens.shape[-1]
        query = (prompt_tokens + sine_cosine_embedding(proposal, dim, self.grid_size / 2)).unsqueeze(1)  # (P, 1, D)
        memory = query_tokens + sine_cosine_embedding(centers, dim, self.grid_size / 2)  # (P, h*w, D)
        refined = self.refiner(query, memory).squeeze(1)  # (P, D)
        point = proposal + torch.tanh(self.offset(refined)) / self.grid_size  # at most one patch from the proposal
        return {"logits": logits, "proposal": proposal, "point": point.clamp(0, 1)}

    def forward(
        self,
        pixel_values: torch.Tensor,
        keypoint_coords: torch.Tensor,
        labels: torch.Tensor,
        query_pixel_values: torch.Tensor,
        query_keypoint_coords: torch.Tensor,
        query_labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Training on stage 0's crop pairs: the support's kept keypoints, localized on the query crop."""
        matched = (labels != -100) & (query_labels != -100)  # (B, K): shown in both crops
        rows = matched.nonzero(as_tuple=True)[0]  # (M,)
        if len(rows) == 0:
            return {"loss": sum(p.sum() for p in self.parameters()) * 0.0}
        features = self.front.get_vision_features(torch.cat([pixel_values, query_pixel_values]))
        batch = pixel_values.shape[0]
        query_tokens = self.front.multi_modal_projector(features[batch:])[rows]  # (M, h*w, D)
        support_features = features[:batch][rows]  # (M, h*w, D_v): one shot per prompt
        prompt_tokens = self.front.get_prompt_features(support_features, keypoint_coords[matched][:, None])  # (M, D)
        out = self.localize(query_tokens, prompt_tokens)
        target = query_keypoint_coords[matched]  # (M, 2)
        heatmap_loss = F.cross_entropy(out["logits"], patch_targets(target, self.grid_size))
        loss = F.l1_loss(out["proposal"], target) + F.l1_loss(out["point"], target) + heatmap_loss
        return {"loss": loss}


def train_matching_peer(
    peer: MatchingPeer,
    processor: KptLlmProcessor,
    instances: Dataset,
    keypoint_names: list[str],
    output_dir: str | Path,
    steps: int,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    seed: int = 0,
    use_cpu: bool = False,
    train_front: bool = True,
) -> list[dict[str, float]]:
    """Trains the peer's heatmap temperature and refiner, and its front copy unless `train_front` is False
    (the `tiny` preset keeps KptLLM's front frozen after stage 0, so the peer's is too), with HF
    `Trainer`; returns its log."""
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    peer.front.requires_grad_(train_front)
    name_ids = {name: i for i, name in enumerate(sorted(keypoint_names))}
    dataset = KeypointPairDataset(instances, processor, name_ids, seed=seed + 1)  # other jitters than stage 0's
    args = short_stage_arguments(Path(output_dir) / "matching_peer", steps, batch_size, learning_rate, seed, use_cpu)
    trainer = Trainer(model=peer, args=args, train_dataset=dataset, data_collator=collate_keypoint_pairs)
    logger.info("Matching peer: %d steps on pairs of %d training instances", steps, len(dataset))
    trainer.train()
    return trainer.state.log_history


def _train_saved_peer(start_dir: str, crop_padding: float, keypoint_names: list[str], output_dir: str, kwargs: dict) -> None:
    """A child process's work: train the peer saved in `start_dir` with one thread, save it to OUTPUT_DIR/matching_peer."""
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    start = Path(start_dir)
    peer = MatchingPeer.from_pretrained(start)
    processor = KptLlmProcessor.from_pretrained(start)
    processor.crop_padding = crop_padding
    train_matching_peer(peer, processor, load_from_disk(str(start / "instances")), keypoint_names, output_dir, **kwargs)
    peer.save_pretrained(Path(output_dir) / "matching_peer")


class BackgroundPeerTraining:
    """`train_matching_peer` in a child process with one thread while the caller trains KptLLM with one.

    Why: the tiny model's operations are too small for a second thread. Two one-thread training processes
    ran at ~92% of the speed of one two-thread process (docs/embedded_default.md), so the peer trained
    beside the KptLLM stage costs little wall time, where run before it, it cost ~1 minute. The peer's
    starting point (`from_stage0`), processor and training instances go to OUTPUT_DIR/matching_peer_start
    for the child; `join()` waits for it, restores this process's threads and returns the trained peer.
    """

    def __init__(self, peer: MatchingPeer, processor: KptLlmProcessor, instances: Dataset, keypoint_names: list[str],
                 output_dir: str | Path, **train_kwargs):
        self.output_dir = Path(output_dir)
        self.start_dir = self.output_dir / "matching_peer_start"
        shutil.rmtree(self.start_dir, ignore_errors=True)  # left by a run killed before its peer was saved
        peer.save_pretrained(self.start_dir)
        processor.save_pretrained(self.start_dir)
        instances.save_to_disk(str(self.start_dir / "instances"))
        args = (str(self.start_dir), processor.crop_padding, list(keypoint_names), str(self.output_dir), train_kwargs)
        # spawn, not fork: a forked child would inherit this process's torch thread pools; daemon: it
        # ends with this process if KptLLM training fails
        self.process = multiprocessing.get_context("spawn").Process(target=_train_saved_peer, args=args, daemon=True)
        self.process.start()
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def join(self) -> MatchingPeer:
        self.process.join()
        torch.set_num_threads(self.threads)
        if self.process.exitcode != 0:
            raise RuntimeError(
                f"training the matching peer in its own process failed (exit code {self.process.exitcode}); "
                f"its log is above, its starting point in {self.start_dir}"
            )
        shutil.rmtree(self.start_dir)
        return MatchingPeer.from_pretrained(self.output_dir / "matching_peer")


@torch.no_grad()
def match_episodes(
    model: KptLlmForKeypointComprehension | MatchingPeer,
    processor: KptLlmProcessor,
    instances: Dataset,
    episodes: Sequence[Episode],
    description: str = "matching",
) -> list[np.ndarray]:
    """(K, 2) pixel predictions per episode: a `MatchingPeer`'s refined point, or, for a KptLLM model,
    the centre of the query patch whose z_q is most similar (cosine) to z_p (the untrained floor)."""
    peer = model if isinstance(model, MatchingPeer) else None
    front = model.front if peer is not None else model
    front.eval()
    if peer is not None:
        peer.eval()
    predictions = []
    for episode in tqdm(episodes, desc=description, leave=False):
        inputs, prompted, query = episode_inputs(processor, instances, episode)
        inputs = inputs.to(front.device)
        query_tokens, prompt_tokens = query_and_prompt_tokens(
            front, inputs["pixel_values"], inputs["support_pixel_values"], inputs["prompt_coords"], inputs["prompt_visible"]
        )
        query_tokens = query_tokens.expand(len(prompt_tokens), -1, -1)  # (K, h*w, D)
        if peer is not None:
            normalized = peer.localize(query_tokens, prompt_tokens)["point"]
        else:
            similarity = prompt_to_patch_cosine(prompt_tokens, query_tokens)  # (K, h*w)
            normalized = patch_centers(front.config.patch_grid_size, similarity.device)[similarity.argmax(-1)]
        box = square_crop_box(query["bbox"], (query["width"], query["height"]), processor.crop_padding, "bbox")
        points = np.full((len(query["visible"]), 2), np.nan)
        points[prompted] = denormalize_points(normalized.float().cpu().numpy(), box)
        predictions.append(points)
    return predictions

