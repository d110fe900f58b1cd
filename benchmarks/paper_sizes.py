"""Exact parameter counts of the paper's configuration (LLaVA-1.5-7B + KptLLM, LoRA r=128 on every LLM Linear).

    python -m benchmarks.paper_sizes            # markdown table, ~10 s on 2 cores, no weights allocated

The model is built on the meta device (shapes only), wrapped by `processing.builders.apply_lora` with the
`paper` preset's LoRA flags (read from `train.PRESETS["paper"]`, so the two cannot drift), and every
parameter is assigned to one group. peft's `modules_to_save` keeps a frozen original of each fully
trained module next to its trained copy; those originals are counted as frozen, because they take
memory on every GPU just like the frozen LLM.
"""

import re
from dataclasses import dataclass

import torch

from modeling_kptllm import KptLlmConfig, KptLlmForKeypointComprehension
from processing.builders import FULLY_TRAINED_MODULES, apply_lora

# row order of the table; every parameter of the peft model falls into exactly one group
GROUPS = (
    "vision_tower",
    "multi_modal_projector",
    "prompt_encoder",
    "prompt_feature_extractor",
    "prompt_projector",
    "llm_decoder",
    "lora",
    "embed_tokens",
    "lm_head",
    "keypoint_head",
)
GROUP_TITLES = {
    "vision_tower": "vision tower (CLIP ViT-L/14-336)",
    "multi_modal_projector": "projector (z_q)",
    "prompt_encoder": "prompt encoder",
    "prompt_feature_extractor": "prompt feature extractor",
    "prompt_projector": "prompt projector (z_p)",
    "llm_decoder": "LLM decoder layers + final norm",
    "lora": "LoRA A/B on the 7 Linears of every LLM layer",
    "embed_tokens": "input embeddings (+ 3 trained rows)",
    "lm_head": "LM head (+ 3 trained rows)",
    "keypoint_head": "keypoint head",
}


def preset_flag(preset: list[str], flag: str) -> str:
    """The value that follows `flag` in a preset's argument list."""
    return preset[preset.index(flag) + 1]


def paper_lora_arguments() -> dict[str, float]:
    """r, alpha and dropout of train.py's `paper` preset."""
    from train import PRESETS  # train.py is a script at the repository root, importable from there

    paper = PRESETS["paper"]
    return {
        "r": int(preset_flag(paper, "--lora_r")),
        "alpha": int(preset_flag(paper, "--lora_alpha")),
        "dropout": float(preset_flag(paper, "--lora_dropout")),
    }


def build_on_meta(config: KptLlmConfig | None = None, lora: dict[str, float] | None = None):
    """The paper's peft-wrapped KptLLM with every tensor on the meta device (no memory, no init cost)."""
    config = config or KptLlmConfig()  # the defaults are LLaVA-1.5-7B's shapes
    lora = lora or paper_lora_arguments()
    with torch.device("meta"):
        model = KptLlmForKeypointComprehension(config)
        return apply_lora(model, int(lora["r"]), int(lora["alpha"]), float(lora["dropout"]))


def parameter_group(name: str) -> str:
    """The table row of a peft parameter name (e.g. `base_model.model.vision_tower.modules_to_save.default.…`)."""
    if ".lora_A." in name or ".lora_B." in name:
        return "lora"
    path = name.removeprefix("base_model.model.")
    top = path.split(".")[0]
    if top != "language_model":
        return top
    if re.match(r"language_model\.model\.embed_tokens\.", path):
        return "embed_tokens"
    if path.startswith("language_model.lm_head."):
        return "lm_head"
    return "llm_decoder"


@dataclass
class GroupSize:
    group: str
    total: int = 0
    trainable: int = 0

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


def parameter_sizes(peft_model) -> dict[str, GroupSize]:
    """group -> total / trainable / frozen parameters of the peft model (GROUPS order)."""
    sizes = {group: GroupSize(group) for group in GROUPS}
    for name, parameter in peft_model.named_parameters():
        group = parameter_group(name)
        if group not in sizes:
            raise ValueError(f"parameter {name} belongs to no group of the table ({group})")
        sizes[group].total += parameter.numel()
        if parameter.requires_grad:
            sizes[group].trainable += parameter.numel()
    return sizes


def base_model_size(peft_model) -> int:
    """Parameters of the plain KptLLM (what `output_dir/model` holds after LoRA is merged)."""
    total = 0
    for name, parameter in peft_model.named_parameters():
        if ".lora_" in name or ".modules_to_save." in name or "trainable_tokens_delta" in name:
            continue  # adapters and trained copies: merged into the base weights on export
        total += parameter.numel()
    return total


def markdown_table(sizes: dict[str, GroupSize], base_total: int) -> str:
    def millions(count: int) -> str:  # exact counts: the test pins them to the parameter
        return f"{count:,}"

    lines = [
        "| module | total | trainable | frozen |",
        "|---|---:|---:|---:|",
    ]
    for group in GROUPS:
        size = sizes[group]
        note = " (trained copy + peft's frozen original)" if group in FULLY_TRAINED_MODULES else ""
        lines.append(f"| {GROUP_TITLES[group]}{note} | {millions(size.total)} | {millions(size.trainable)} | {millions(size.frozen)} |")
    total = sum(size.total for size in sizes.values())
    trainable = sum(size.trainable for size in sizes.values())
    lines.append(f"| **all (peft model in training)** | **{millions(total)}** | **{millions(trainable)}** | **{millions(total - trainable)}** |")
    lines.append(f"| merged KptLLM (`output_dir/model`) | {millions(base_total)} | | |")
    return "\n".join(lines)


def main() -> dict[str, GroupSize]:
    peft_model = build_on_meta()
    sizes = parameter_sizes(peft_model)
    print(markdown_table(sizes, base_model_size(peft_model)))
    return sizes


if __name__ == "__main__":
    main()
