"""benchmarks/paper_sizes.py: the paper configuration's parameter counts, checked against closed-form counts."""

import pytest

from benchmarks.paper_sizes import GROUPS, base_model_size, build_on_meta, markdown_table, paper_lora_arguments, parameter_sizes

# Llama/Vicuna-7B: hidden 4096, MLP 11008, 32 layers; LLaVA-1.5 pads the vocabulary to 32064 rows
HIDDEN, MLP, LAYERS, VOCAB = 4096, 11008, 32, 32064
LLAMA_LAYER = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * MLP + 2 * HIDDEN  # q/k/v/o, gate/up/down, two RMSNorms
# CLIP ViT-L/14 at 336 px: 24 layers of width 1024 (MLP 4096), 24 x 24 patches + CLS
CLIP_WIDTH, CLIP_MLP, CLIP_LAYERS, CLIP_TOKENS = 1024, 4096, 24, 24 * 24 + 1
CLIP_LAYER = 4 * (CLIP_WIDTH**2 + CLIP_WIDTH) + 2 * CLIP_WIDTH * CLIP_MLP + CLIP_MLP + CLIP_WIDTH + 2 * 2 * CLIP_WIDTH
CLIP = CLIP_LAYERS * CLIP_LAYER + CLIP_WIDTH + 3 * 14 * 14 * CLIP_WIDTH + CLIP_TOKENS * CLIP_WIDTH + 2 * 2 * CLIP_WIDTH


@pytest.fixture(scope="module")
def paper():
    peft_model = build_on_meta()
    return peft_model, parameter_sizes(peft_model)


def test_backbones_are_llama_7b_and_clip_vit_l_336(paper):
    _, sizes = paper
    llm = sizes["llm_decoder"].total + sizes["embed_tokens"].frozen + sizes["lm_head"].frozen
    assert llm == LAYERS * LLAMA_LAYER + HIDDEN + 2 * VOCAB * HIDDEN == 6_738_939_904  # Llama-7B's 6.74 B at vocab 32064
    assert sizes["vision_tower"].trainable == sizes["vision_tower"].frozen == CLIP == 303_507_456


def test_lora_and_fully_trained_modules(paper):
    _, sizes = paper
    lora = paper_lora_arguments()
    assert (lora["r"], lora["alpha"]) == (128, 256)
    per_layer = lora["r"] * (4 * (HIDDEN + HIDDEN) + 2 * (HIDDEN + MLP) + (MLP + HIDDEN))
    assert sizes["lora"].trainable == sizes["lora"].total == LAYERS * per_layer == 319_815_680
    assert sizes["llm_decoder"].trainable == 0
    for table in ("embed_tokens", "lm_head"):  # <image>, <kpt_prompt>, <keypoint>
        assert sizes[table].trainable == 3 * HIDDEN
    projector = CLIP_WIDTH * HIDDEN + HIDDEN + HIDDEN * HIDDEN + HIDDEN  # LLaVA-1.5's linear-GELU-linear
    assert sizes["multi_modal_projector"].trainable == sizes["prompt_projector"].trainable == projector == 20_979_712
    assert sizes["prompt_encoder"].trainable == 2 * (CLIP_WIDTH**2 + CLIP_WIDTH) + 2 * CLIP_WIDTH
    extractor_layer = 8 * (CLIP_WIDTH**2 + CLIP_WIDTH) + 2 * CLIP_WIDTH * CLIP_MLP + CLIP_MLP + CLIP_WIDTH + 3 * 2 * CLIP_WIDTH
    assert sizes["prompt_feature_extractor"].trainable == 2 * extractor_layer + 2 * CLIP_WIDTH
    assert sizes["keypoint_head"].trainable == 2 * (HIDDEN * HIDDEN + HIDDEN) + 2 * HIDDEN + 2
    for group in ("vision_tower", "multi_modal_projector", "prompt_encoder", "prompt_feature_extractor", "prompt_projector", "keypoint_head"):
        assert sizes[group].frozen == sizes[group].trainable, group  # peft's untouched original beside the trained copy


def test_totals_and_table(paper):
    peft_model, sizes = paper
    trainable = sum(size.trainable for size in sizes.values())
    assert trainable == sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == 734_574_594
    assert sum(size.total for size in sizes.values()) == sum(p.numel() for p in peft_model.parameters())
    assert base_model_size(peft_model) == 7_153_674_242  # the merged model: 7.15 B, the sum of the modules
    table = markdown_table(sizes, base_model_size(peft_model))
    assert table.count("\n") == len(GROUPS) + 3 and "734,574,594" in table
