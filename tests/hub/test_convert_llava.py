"""hub/convert_llava.py on a tiny random LLaVA that the tests build and save themselves (no downloads)."""

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast

from hub.convert_llava import KEY_MAPPING, NEW_MODULES, ConversionError, convert_llava, main, map_key
from modeling_kptllm import KptLlmForKeypointComprehension, KptLlmProcessor
from processing.builders import template_corpus
from tests.helpers import KEYPOINT_NAMES, random_image, run_without_repo

IMAGE_SIZE, PATCH_SIZE = 32, 8
# not CLIP's defaults, so that the test sees them carried over rather than re-created
IMAGE_MEAN, IMAGE_STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def build_llava_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-like byte-level BPE tokenizer with LLaVA's added tokens `<image>` and `<pad>` at the end."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(template_corpus(KEYPOINT_NAMES), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    wrapped.add_special_tokens({"extra_special_tokens": ["<image>"]})  # llava-hf: <image> 32000, then <pad> 32001
    wrapped.add_special_tokens({"pad_token": "<pad>"})
    return wrapped


def save_tiny_llava(folder: Path, padded_vocab: bool, seed: int = 0) -> LlavaForConditionalGeneration:
    """A random LLaVA (CLIP 32/8 + Llama) saved with save_pretrained, its tokenizer and its image processor.

    `padded_vocab` gives the embedding matrix spare rows, like llava-1.5-7b-hf's 32064 rows for 32002 tokens.
    """
    tokenizer = build_llava_tokenizer()
    vocab_size = math.ceil(len(tokenizer) / 64) * 64 if padded_vocab else len(tokenizer)
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
            "num_attention_heads": 4, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE,
        },
        text_config={
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": vocab_size, "max_position_embeddings": 512,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        },
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=IMAGE_MEAN, image_std=IMAGE_STD
    ).save_pretrained(folder)
    return model


def load_converted(folder: Path) -> tuple[KptLlmForKeypointComprehension, KptLlmProcessor]:
    return KptLlmForKeypointComprehension.from_pretrained(folder).eval(), KptLlmProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """(source folder, source model) of an unpadded tiny LLaVA: adding two tokens makes the vocabulary grow."""
    folder = tmp_path_factory.mktemp("llava") / "tiny-llava"
    return folder, save_tiny_llava(folder, padded_vocab=False)


@pytest.fixture(scope="module")
def converted(llava, tmp_path_factory):
    """(output folder, summary, model, processor) of the conversion of `llava` in float32."""
    out = tmp_path_factory.mktemp("converted") / "kptllm"
    summary = convert_llava(llava[0], out, dtype="float32")
    return out, summary, *load_converted(out)


def test_key_mapping_covers_the_three_llava_layouts():
    assert map_key("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") == "vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert map_key("model.vision_tower.embeddings.class_embedding") == "vision_tower.embeddings.class_embedding"
    assert map_key("model.language_model.layers.1.self_attn.q_proj.weight") == "language_model.model.layers.1.self_attn.q_proj.weight"
    assert map_key("lm_head.weight") == map_key("language_model.lm_head.weight") == "language_model.lm_head.weight"
    assert map_key("model.multi_modal_projector.linear_2.bias") == "multi_modal_projector.linear_2.bias"
    assert map_key("keypoint_head.mlp.0.weight") is None
    assert not any(target.startswith(NEW_MODULES) for _, target in KEY_MAPPING)


def test_vision_features_and_projector_match_llava(llava, converted):
    _, source = llava
    _, _, model, processor = converted
    image = random_image(IMAGE_SIZE, IMAGE_SIZE, 7)
    pixel_values = processor(query=image, kpt_names=["nose"], task="textual")["pixel_values"]
    llava_pixels = CLIPImageProcessorPil.from_pretrained(llava[0])(image, return_tensors="pt")["pixel_values"]
    assert torch.equal(pixel_values, llava_pixels)  # same crop size, mean and std as LLaVA's processor

    with torch.no_grad():
        hidden = source.model.vision_tower(llava_pixels, output_hidden_states=True).hidden_states
        expected_features = hidden[source.config.vision_feature_layer][:, 1:]  # layer -2, CLS dropped
        expected_tokens = torch.stack(source.model.get_image_features(pixel_values=llava_pixels).pooler_output)
        features = model.get_vision_features(pixel_values)
        tokens = model.get_image_features(pixel_values)
    assert features.shape == (1, (IMAGE_SIZE // PATCH_SIZE) ** 2, 32)
    torch.testing.assert_close(features, expected_features, rtol=0, atol=1e-6)
    torch.testing.assert_close(tokens, expected_tokens, rtol=0, atol=1e-6)


def test_language_model_logits_match_llava_on_the_original_vocabulary(llava, converted):
    _, source = llava
    _, _, model, processor = converted
    source_vocab = source.config.text_config.vocab_size
    text = processor.tokenizer(["USER: Where is the nose? ASSISTANT: It is the nose."], return_tensors="pt")
    # an image + text prompt of the textual task: KptLLM's query path is LLaVA's
    multimodal = processor(query=random_image(IMAGE_SIZE, IMAGE_SIZE, 8), kpt_names=["left eye"], task="textual")
    with torch.no_grad():
        for inputs in (dict(text), {key: multimodal[key] for key in ("input_ids", "attention_mask", "pixel_values")}):
            expected = source(**inputs).logits
            logits = model(**inputs).logits
            assert logits.shape[-1] == model.config.text_config.vocab_size > source_vocab
            torch.testing.assert_close(logits[..., :source_vocab], expected, rtol=0, atol=1e-5)


def test_special_tokens_are_added_and_embeddings_grow_around_the_mean(llava, converted):
    folder, source = llava
    out, summary, model, processor = converted
    source_tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    vocab = processor.tokenizer.get_vocab()
    ids = [vocab[token] for token in ("<image>", "<kpt_prompt>", "<keypoint>")]
    assert len(set(ids)) == 3
    assert ids == [model.config.image_token_id, model.config.kpt_prompt_token_id, model.config.keypoint_token_id]
    assert ids[0] == source.config.image_token_id
    assert {t: vocab[t] for t in source_tokenizer.get_vocab()} == source_tokenizer.get_vocab()  # old ids unchanged
    assert set(processor.tokenizer.all_special_tokens) >= {"<image>", "<kpt_prompt>", "<keypoint>"}
    assert processor.tokenizer.decode([ids[1], ids[2]], skip_special_tokens=True) == ""

    old_rows = source.config.text_config.vocab_size
    new_rows = math.ceil(len(processor.tokenizer) / 64) * 64
    assert len(processor.tokenizer) == len(source_tokenizer) + 2 > old_rows
    assert (summary.vocab_size_before, summary.vocab_size_after) == (old_rows, new_rows)
    assert model.config.text_config.vocab_size == new_rows
    for name, source_weight in (
        ("embed", source.get_input_embeddings().weight), ("lm_head", source.get_output_embeddings().weight)
    ):
        weight = (model.get_input_embeddings() if name == "embed" else model.get_output_embeddings()).weight
        assert weight.shape == (new_rows, 64), name
        assert torch.equal(weight[:old_rows], source_weight.detach()), name
        # mean_resizing: new rows drawn around the old rows' mean with 1e-9 x their covariance
        mean = source_weight.detach().mean(0)
        torch.testing.assert_close(weight[old_rows:], mean.expand(new_rows - old_rows, -1), rtol=0, atol=1e-4)
        assert weight[old_rows:].sub(mean).abs().max() < 0.1 * source_weight.detach().std()
    assert list(processor.image_processor.image_mean) == IMAGE_MEAN and list(processor.image_processor.image_std) == IMAGE_STD
    assert processor.image_seq_length == (IMAGE_SIZE // PATCH_SIZE) ** 2


def test_new_modules_keep_their_init_and_the_rest_is_llavas(llava, converted):
    _, source = llava
    out, summary, model, _ = converted
    assert set(summary.new_modules) == set(NEW_MODULES) and all(summary.new_modules.values())
    assert summary.copied_tensors == len(source.state_dict())
    # the cross-attention starts as identities (KptLLM's own init), so _init_weights ran on the new modules
    cross = model.prompt_feature_extractor.layers[0].cross_attn.q_proj.weight
    assert torch.equal(cross, torch.eye(*cross.shape))
    source_state = source.state_dict()
    saved = load_file(out / "model.safetensors")
    assert set(saved) == set(model.state_dict())  # KptLLM's names on disk, not LLaVA's
    for key, tensor in source_state.items():
        if "embed_tokens" not in key and "lm_head" not in key:
            assert torch.equal(saved[map_key(key)], tensor), key


def test_padded_vocabulary_keeps_its_rows(tmp_path):
    """llava-1.5-7b-hf's case: the matrix has spare rows, the new tokens take two of them and nothing is resized."""
    source = save_tiny_llava(tmp_path / "llava", padded_vocab=True, seed=1)
    summary = convert_llava(tmp_path / "llava", tmp_path / "out", dtype="float32")
    model, processor = load_converted(tmp_path / "out")
    rows = source.config.text_config.vocab_size
    assert summary.vocab_size_before == summary.vocab_size_after == rows == model.config.text_config.vocab_size
    assert len(processor.tokenizer) < rows
    assert torch.equal(model.get_input_embeddings().weight, source.get_input_embeddings().weight.detach())
    assert torch.equal(model.get_output_embeddings().weight, source.get_output_embeddings().weight.detach())
    assert model.config.kpt_prompt_token_id == source.config.image_token_id + 2  # after <image>, <pad>


def rewrite_checkpoint(source: Path, target: Path, rename, drop: str | None = None, extra: dict | None = None, shards: int = 1):
    """Copy a LLaVA folder with its tensors renamed (another layout), dropped, added, or split into shards."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        if not path.name.endswith(".safetensors"):
            (target / path.name).write_bytes(path.read_bytes())
    tensors = {rename(key): value for key, value in load_file(source / "model.safetensors").items() if key != drop}
    tensors.update(extra or {})
    if shards == 1:
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
        return
    keys = sorted(tensors)
    weight_map = {}
    for index in range(shards):
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[index::shards]
        save_file({key: tensors[key] for key in part}, target / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def hub_layout(key: str) -> str:  # transformers 4 / llava-hf on the Hub: CLIP keeps its vision_model prefix
    return key.replace("vision_tower.", "vision_tower.vision_model.", 1)


def state_dict_layout(key: str) -> str:  # transformers 5 in memory: model.* and a top-level lm_head
    if key.startswith("language_model.lm_head."):
        return key.removeprefix("language_model.")
    if key.startswith("language_model.model."):
        return "model.language_model." + key.removeprefix("language_model.model.")
    return "model." + key


@pytest.mark.parametrize("layout", ["hub_sharded", "state_dict"])
def test_other_checkpoint_layouts_convert_to_the_same_model(llava, converted, tmp_path, layout):
    rename, shards = (hub_layout, 3) if layout == "hub_sharded" else (state_dict_layout, 1)
    # transformers-4 CLIP checkpoints also stored the (now non-persistent) position_ids buffer
    buffer = {"vision_tower.vision_model.embeddings.position_ids": torch.arange(17)[None]} if layout == "hub_sharded" else {}
    rewrite_checkpoint(llava[0], tmp_path / "llava", rename, extra=buffer, shards=shards)
    assert not (tmp_path / "llava" / "model.safetensors").exists() or shards == 1
    summary = convert_llava(tmp_path / "llava", tmp_path / "out", dtype="float32")
    assert summary.skipped_buffers == list(buffer)
    reference = load_file(converted[0] / "model.safetensors")
    result = load_file(tmp_path / "out" / "model.safetensors")
    assert set(result) == set(reference)
    for key, tensor in reference.items():  # same seed: the new modules and rows are equal too
        assert torch.equal(result[key], tensor), key


def transformers4_config(source: LlavaConfig) -> dict:
    """config.json as llava-hf/llava-1.5-7b-hf writes it (transformers 4.36 fields), at the tiny sizes."""
    text, vision = source.text_config, source.vision_config
    return {
        "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": source.image_token_id,
        "model_type": "llava", "pad_token_id": text.pad_token_id, "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 512,
            "model_type": "llama", "rms_norm_eps": 1e-05, "torch_dtype": "float16", "vocab_size": text.vocab_size,
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        },
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
        "vision_config": {
            "hidden_size": vision.hidden_size, "image_size": vision.image_size, "intermediate_size": vision.intermediate_size,
            "model_type": "clip_vision_model", "num_attention_heads": vision.num_attention_heads,
            "num_hidden_layers": vision.num_hidden_layers, "patch_size": vision.patch_size, "projection_dim": 768, "vocab_size": 32000,
        },
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": text.vocab_size,
    }


def test_transformers4_float16_folder_converts_in_its_own_dtype(llava, tmp_path):
    """llava-1.5-7b-hf's shape of folder: transformers-4 config fields, Hub key names, float16 tensors."""
    folder, source = llava
    rewrite_checkpoint(folder, tmp_path / "llava", hub_layout)
    path = tmp_path / "llava" / "model.safetensors"
    save_file({key: value.half() for key, value in load_file(path).items()}, path, metadata={"format": "pt"})
    (tmp_path / "llava" / "config.json").write_text(json.dumps(transformers4_config(source.config)))
    summary = convert_llava(tmp_path / "llava", tmp_path / "out")  # dtype auto
    assert summary.dtype == "float16"
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.float16}
    for key, tensor in source.state_dict().items():
        if "embed_tokens" not in key and "lm_head" not in key:
            assert torch.equal(saved[map_key(key)], tensor.half()), key
    assert json.loads((tmp_path / "out" / "config.json").read_text())["text_config"]["rms_norm_eps"] == 1e-05


def test_dtype_option_casts_every_weight(llava, tmp_path):
    summary = convert_llava(llava[0], tmp_path / "out", dtype="bfloat16")
    assert summary.dtype == "bfloat16"
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.bfloat16}
    reference = llava[1].state_dict()["model.language_model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(saved["language_model.model.layers.0.mlp.up_proj.weight"], reference.to(torch.bfloat16))


LOADER = textwrap.dedent(
    """
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoProcessor

    folder, query_path, support_path, out_path = sys.argv[1:]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    query = Image.open(query_path)
    inputs = processor(query=query, support=Image.open(support_path), kpts=[[10, 12], [30, 40]], task="visual")
    det = model.detect_keypoints(**inputs, max_new_tokens=6)
    (result,), = processor.post_process_keypoint_detection(det)
    assert set(result) == {"keypoints", "scores", "labels", "names", "bbox"} and result["keypoints"].shape == (2, 2), result
    save_file({"sequences": det.sequences, "pred_keypoints": det.pred_keypoints}, out_path)
    """
)


@pytest.mark.slow  # a fresh interpreter importing torch + transformers: 30 s on 2 busy cores
def test_converted_folder_loads_with_remote_code_offline_and_detects(converted, tmp_path):
    out, _, model, processor = converted
    files = {path.name for path in out.iterdir()}
    assert {"configuration_kptllm.py", "modeling_kptllm.py", "processing_kptllm.py", "model.safetensors", "processor_config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_kptllm.KptLlmForKeypointComprehension"

    query, support = random_image(80, 60, 1), random_image(50, 70, 2)
    query.save(tmp_path / "query.png")
    support.save(tmp_path / "support.png")
    result = run_without_repo(LOADER, [str(out), str(tmp_path / "query.png"), str(tmp_path / "support.png"), str(tmp_path / "det.safetensors")], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]

    loaded = load_file(tmp_path / "det.safetensors")
    inputs = processor(query=query, support=support, kpts=[[10, 12], [30, 40]], task="visual")
    det = model.detect_keypoints(**inputs, max_new_tokens=6)
    assert torch.equal(loaded["sequences"], det.sequences)
    torch.testing.assert_close(loaded["pred_keypoints"], det.pred_keypoints, rtol=0, atol=1e-6, equal_nan=True)


def test_converted_folder_starts_lora_training(converted):
    """train.py --model_name_or_path: the folder loads, gets LoRA, and a training step has gradients."""
    import train

    out = converted[0]
    args = train.ModelArguments(model_name_or_path=str(out), use_lora=True, lora_r=4, lora_alpha=8)
    peft_model, processor = train.build_model(args, [], seed=0)
    inputs = processor(
        query=random_image(40, 40, 3), support=random_image(40, 40, 4), kpts=[[5, 6], [20, 30]], task="visual",
        kpt_names=["nose", "left eye"], query_kpts=[[10, 10], [30, 20]], return_labels=True,
    )
    loss = peft_model(**inputs).loss
    loss.backward()
    grads = {name for name, p in peft_model.named_parameters() if p.requires_grad and p.grad is not None}
    assert any("lora_A" in name and "language_model" in name for name in grads)
    assert any("keypoint_head" in name for name in grads) and any("prompt_feature_extractor" in name for name in grads)


# -- errors -----------------------------------------------------------------------------------------


def test_refuses_a_folder_that_is_not_llava(converted, tmp_path):
    with pytest.raises(ConversionError, match="config.json not found"):
        convert_llava(tmp_path, tmp_path / "out")
    # a KptLLM folder is not a LLaVA one
    with pytest.raises(ConversionError, match="model_type is 'kptllm', expected 'llava'"):
        convert_llava(converted[0], tmp_path / "out")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConversionError, match="config.json is not valid JSON"):
        convert_llava(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_pickle_weights_without_unpickling(llava, tmp_path, monkeypatch):
    folder = tmp_path / "llava-bin"
    folder.mkdir()
    (folder / "config.json").write_bytes((llava[0] / "config.json").read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(ConversionError, match=r"only pickle weights \(pytorch_model.bin\).*never unpickles"):
        convert_llava(folder, tmp_path / "out")


def test_refuses_a_non_empty_output_dir_and_leaves_it_alone(llava, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="already exists and is not an empty folder"):
        convert_llava(llava[0], out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    with pytest.raises(SystemExit, match="convert_llava: .*already exists"):
        main(["--llava_dir", str(llava[0]), "--output_dir", str(out)])


def test_lists_unmapped_and_missing_tensors(llava, tmp_path):
    dropped = "language_model.model.layers.1.mlp.down_proj.weight"
    rewrite_checkpoint(llava[0], tmp_path / "llava", rename=lambda key: key, drop=dropped, extra={"adapter.scale": torch.ones(3)})
    with pytest.raises(ConversionError) as error:
        convert_llava(tmp_path / "llava", tmp_path / "out")
    message = str(error.value)
    assert "1 source tensors have no place in KptLLM: adapter.scale" in message
    assert f"1 KptLLM tensors outside the new modules are not in the checkpoint: {dropped}" in message
    assert not (tmp_path / "out").exists()


def test_refuses_llava_settings_kptllm_cannot_use(llava, tmp_path):
    rewrite_checkpoint(llava[0], tmp_path / "llava", rename=lambda key: key)
    config_path = tmp_path / "llava" / "config.json"
    config = json.loads(config_path.read_text())
    config["vision_feature_select_strategy"] = "full"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="vision_feature_select_strategy='full'"):
        convert_llava(tmp_path / "llava", tmp_path / "out")


def test_cli_converts_with_the_pooling_ablation(llava, tmp_path, caplog):
    caplog.set_level("INFO", logger="convert_llava")
    out = tmp_path / "out"
    argv = ["--llava_dir", str(llava[0]), "--output_dir", str(out), "--dtype", "float32", "--prompt_feature_extractor", "avg_pool"]
    summary = main(argv)
    assert summary.output_dir == out and (out / "model.safetensors").is_file()
    assert set(summary.new_modules) == {"prompt_projector", "keypoint_head"}  # no prompt encoder/extractor to init
    assert "embedding rows: 322 -> 384" in caplog.text and "special tokens: <image>=320, <kpt_prompt>=322" in caplog.text
    model, processor = load_converted(out)
    assert model.config.prompt_feature_extractor == "avg_pool" and model.prompt_feature_extractor is None
    inputs = processor(query=random_image(40, 40, 1), support=random_image(40, 40, 2), kpts=[[5, 6]], task="visual")
    assert model.detect_keypoints(**inputs, max_new_tokens=3).sequences.shape[0] == 1
