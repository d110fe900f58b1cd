"""Training examples for HF `Trainer`: one (instance, keypoint, task) sample -> processor features -> batch.

`KeypointTrainingDataset` turns the rows of `episodes.make_training_samples` into processor outputs
(one sequence each); `KptLlmDataCollator` pads them into a batch that `KptLlmForKeypointComprehension`
takes as is. Use `TrainingArguments(remove_unused_columns=False)`: the inputs are not text columns.

Rows of one instance (`group_by_instance`) repeat its query crop and support crop; the collator keeps
each distinct crop once and writes which one every row and prompt shot reads (`query_index`,
`support_index`), so that a batch carries, copies and checks U crops instead of one per row.
"""

from dataclasses import dataclass

import torch
from datasets import Dataset
from torch.utils.data import Dataset as TorchDataset

from modeling_kptllm import KptLlmProcessor

from .coco import DecodedImageCache

SUPPORT_KEYS = ("support_pixel_values", "prompt_coords", "prompt_visible")


class KeypointTrainingDataset(TorchDataset):
    """Processor features for training samples drawn from annotated instances.

    Args:
        instances: rows of `coco.load_keypoint_annotations` (image path, bbox, keypoints, names).
        samples: rows of `episodes.make_training_samples` (task, query_row, support_rows, keypoint_index).
        processor: builds the token sequence, crops and targets.
        identify_then_detect: False trains the Table 5 ablation (the answer is `<keypoint>` alone).
    """

    def __init__(
        self, instances: Dataset, samples: Dataset, processor: KptLlmProcessor, identify_then_detect: bool = True
    ):
        self.instances = instances
        self.samples = samples
        self.processor = processor
        self.identify_then_detect = identify_then_detect
        # Arrow row access and PNG decoding were ~40% of a batch's data time: keep the rows as Python
        # dicts, and the decoded images (within DecodedImageCache's memory budget)
        self._instance_rows = instances.to_list()
        self._sample_rows = samples.to_list()
        self._load_image = DecodedImageCache()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self._sample_rows[index]
        query = self._instance_rows[sample["query_row"]]
        k = sample["keypoint_index"]
        name = query["keypoint_names"][k]
        kwargs = dict(
            query=self._load_image(query["image_path"]),
            query_bbox=query["bbox"],
            task=sample["task"],
            kpt_names=[name],
            return_labels=True,
            identify_then_detect=self.identify_then_detect,
        )
        if sample["task"] == "semantic":  # the answer is a name only: no <keypoint>, no coordinate target
            kwargs["kpts"] = [query["keypoints"][k]]
        else:
            kwargs.update(query_kpts=[query["keypoints"][k]], query_visible=[query["visible"][k]])
        if sample["support_rows"]:
            supports = [self._instance_rows[row] for row in sample["support_rows"]]
            kwargs.update(
                support=[self._load_image(s["image_path"]) for s in supports],
                kpts=[[s["keypoints"][k]] for s in supports],
                support_bbox=[s["bbox"] for s in supports],
                support_visible=[[s["visible"][k]] for s in supports],
            )
        return dict(self.processor(**kwargs))


def distinct_images(images: torch.Tensor) -> tuple[torch.Tensor, torch.LongTensor]:
    """(N, 3, H, W) -> the distinct images in first-seen order (U, 3, H, W) and each image's row among them (N,).

    Images are the same when their bytes are: the processor crops one instance the same way every
    time, so the K rows of an instance hold byte-identical crops. A dict over the bytes is one pass
    (no sort, unlike `torch.unique(dim=0)`), and first-seen order keeps the rows' order of instances.
    """
    row_of_bytes: dict[bytes, int] = {}
    first: list[int] = []  # (U,) the first image of each distinct one
    index: list[int] = []  # (N,)
    flat = images.detach().cpu().contiguous().flatten(1).view(torch.uint8)  # (N, bytes per image)
    for i, image in enumerate(flat):
        row = row_of_bytes.setdefault(image.numpy().tobytes(), len(first))
        if row == len(first):
            first.append(i)
        index.append(row)
    return images[first], torch.tensor(index, dtype=torch.long)


@dataclass
class KptLlmDataCollator:
    """Pads sequences on the right and concatenates images, prompts and keypoint targets.

    Every feature is one processor output for one sequence; sequences without a `<kpt_prompt>`
    (textual task) contribute no support crops. With `dedupe_crops` (default), `pixel_values` holds
    each distinct query crop once and `query_index` (B,) names each row's, and `support_pixel_values`
    each distinct support crop once with `support_index` (P, S) naming shot s of the p-th prompt's
    image: the same inputs as one crop per row (same loss and gradients), minus the copies. Without
    it, one query crop per row, and shot s of the p-th prompt is support image p * S + s.
    """

    pad_token_id: int
    ignore_index: int = -100
    dedupe_crops: bool = True

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        for i, feature in enumerate(features):
            if feature["input_ids"].shape[0] != 1:
                raise ValueError(f"feature {i} holds {feature['input_ids'].shape[0]} sequences; the collator takes one each")
        length = max(f["input_ids"].shape[1] for f in features)

        def pad(key: str, value: int) -> torch.Tensor:
            rows = [f[key][0] for f in features]
            return torch.stack([torch.cat([row, row.new_full((length - len(row),), value)]) for row in rows])

        batch = {
            "input_ids": pad("input_ids", self.pad_token_id),
            "attention_mask": pad("attention_mask", 0),
            "pixel_values": torch.cat([f["pixel_values"] for f in features]),
        }
        if any("labels" in f for f in features):
            if not all("labels" in f for f in features):
                raise ValueError("either every feature has labels or none has")
            batch["labels"] = pad("labels", self.ignore_index)

        prompted = [f for f in features if "prompt_coords" in f]
        if prompted:
            shots = {f["prompt_coords"].shape[1] for f in prompted}
            if len(shots) > 1:
                raise ValueError(f"features mix different numbers of support shots {sorted(shots)}; batch them apart")
            for key in SUPPORT_KEYS:
                batch[key] = torch.cat([f[key] for f in prompted])
            if self.dedupe_crops:  # (P * S, ...) -> (U_s, ...), shot s of prompt p reads image support_index[p, s]
                batch["support_pixel_values"], index = distinct_images(batch["support_pixel_values"])
                batch["support_index"] = index.view(batch["prompt_coords"].shape[:2])
        if self.dedupe_crops:  # (B, ...) -> (U_q, ...), row b reads crop query_index[b]
            batch["pixel_values"], batch["query_index"] = distinct_images(batch["pixel_values"])

        if any("keypoint_labels" in f for f in features):
            batch["keypoint_labels"] = torch.cat([f.get("keypoint_labels", torch.zeros(1, 2)) for f in features])
            batch["keypoint_visible"] = torch.cat(
                [f.get("keypoint_visible", torch.zeros(1, dtype=torch.long)) for f in features]
            )
        return batch
