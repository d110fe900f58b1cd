"""benchmarks/paper_memory.py: the memory and FLOP arithmetic on hand-checkable numbers."""

import pytest

from benchmarks.paper_memory import (
    GIB,
    PEAK_BF16_TFLOPS,
    PaperShape,
    ParameterCounts,
    TrainingSetup,
    capacity_table,
    largest_batch,
    llm_layer_saved_bytes_per_token,
    memory_per_gpu,
    model_flops_per_row,
    step_seconds,
)

SHAPE = PaperShape(hidden=8, intermediate=16, layers=2, heads=2, vocab=100, vision_hidden=4, vision_intermediate=8,
                   vision_layers=3, vision_tokens=5, lora_r=2)  # fmt: skip
COUNTS = ParameterCounts(in_training=1000, trainable=400, llm_matmul=600, llm_trained_matmul=50, vision=30, projector=7)
SETUP = TrainingSetup(gpus=4, batch_per_gpu=3, text_tokens=6, images_per_row=2.0, weight_bytes=2, overhead_gib=1.0)


def test_each_term_of_the_per_gpu_memory():
    memory = memory_per_gpu(SHAPE, COUNTS, SETUP)
    tokens = 3 * (4 + 6)  # rows x (image tokens without CLS + text)
    assert memory.weights == 2 * 1000  # ZeRO-2 keeps every weight on every GPU
    assert memory.gradients == 400 / 4 * (2 + 4) + 2 * 8 * 8 * 2  # bf16 + fp32 partition, two hidden² buckets
    assert memory.optimizer == 400 / 4 * 12  # fp32 master, exp_avg, exp_avg_sq of this rank's quarter
    assert memory.llm_checkpoints == 2 * tokens * 8 * 2
    saved = (4 * 8 + 3 * 8 + 2 * 8 + 8 + 4 * 16 + 6 * 8 + 16 + 7 * 2) * 2 + (6 * 8 + 16)
    assert llm_layer_saved_bytes_per_token(SHAPE, 2) == saved
    assert memory.llm_layer_recompute == 2 * tokens * saved
    assert memory.logits == tokens * 100 * 14
    image_tokens = 3 * 2 * 5
    assert memory.vision_activations == 3 * image_tokens * 4 * 2 + 2 * image_tokens * (4 * 4 + 3 * 4 + 4 + 2 * 8) * 2
    assert memory.overhead == GIB
    assert memory.total == pytest.approx(
        memory.weights + memory.gradients + memory.optimizer + memory.activations + memory.overhead
    )


def test_more_gpus_shrink_only_the_partitioned_terms():
    one, eight = (memory_per_gpu(SHAPE, COUNTS, TrainingSetup(**{**SETUP.__dict__, "gpus": n})) for n in (1, 8))
    assert one.optimizer == 8 * eight.optimizer and one.weights == eight.weights
    assert one.activations == eight.activations


def test_largest_batch_is_the_last_that_fits():
    memory_at = lambda batch: memory_per_gpu(SHAPE, COUNTS, TrainingSetup(**{**SETUP.__dict__, "batch_per_gpu": batch})).total
    capacity_gb = (memory_at(5) + memory_at(6)) / 2 / 1e9
    assert largest_batch(SHAPE, COUNTS, SETUP, capacity_gb) == 5
    assert largest_batch(SHAPE, COUNTS, SETUP, memory_at(1) / 1e9 * 0.99) == 0
    assert capacity_table(SHAPE, COUNTS, SETUP).count("\n") == 4  # header, rule, 80/40/24 GB


def test_flops_and_step_time():
    tokens = 10
    llm = (4 * 600 + 2 * 50) * tokens  # forward + input gradients for all, weight gradients for LoRA only
    attention = 12 * 2 * 8 * tokens * tokens
    vision = 6 * 30 * 10 + 12 * 3 * 4 * 5 * 10  # 2 crops x 5 tokens, trained fully
    assert model_flops_per_row(SHAPE, COUNTS, SETUP) == llm + attention + vision + 6 * 7 * 4
    setup = TrainingSetup(**{**SETUP.__dict__, "mfu": 0.5, "gpu": "H100"})
    expected = 3 * model_flops_per_row(SHAPE, COUNTS, setup) / (0.5 * PEAK_BF16_TFLOPS["H100"] * 1e12)
    assert step_seconds(SHAPE, COUNTS, setup) == pytest.approx(expected)
