"""The CAPE matching peer: a copy of KptLLM's front modules, local soft-argmax, training, saving, episode scoring."""

import numpy as np
import pytest
import torch

from modeling_kptllm.modeling_kptllm import patch_centers
from processing.coco import load_mp100
from processing.episodes import sample_cape_episodes
from processing.evaluation import evaluate_visual_prompt
from processing.matching_peer import BackgroundPeerTraining, MatchingPeer, match_episodes, train_matching_peer
from processing.vision_pretraining import KeypointPairDataset, collate_keypoint_pairs
from train import keypoint_vocabulary


@pytest.fixture(scope="module")
def splits(small_benchmark):
    return load_mp100(small_benchmark, 1, "train"), load_mp100(small_benchmark, 1, "test")


def test_the_peer_holds_a_copy_of_the_front_modules_and_no_llm(tiny):
    model, _ = tiny
    peer = MatchingPeer.from_stage0(model)
    assert peer.front.language_model is None and peer.front.keypoint_head is None
    assert model.language_model is not None and model.keypoint_head is not None  # the KptLLM model is untouched
    for name in ("vision_tower", "multi_modal_projector", "prompt_encoder", "prompt_feature_extractor", "prompt_projector"):
        ours, theirs = getattr(peer.front, name), getattr(model, name)
        assert ours is not theirs
        for (key, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), f"{name}.{key}"
    with torch.no_grad():
        next(peer.front.vision_tower.parameters()).add_(1.0)
    assert not torch.equal(next(peer.front.vision_tower.parameters()), next(model.vision_tower.parameters()))


def test_localize_reads_the_peak_and_ignores_look_alikes_far_away(tiny):
    peer = MatchingPeer.from_stage0(tiny[0]).eval()
    grid = peer.grid_size
    dim = tiny[0].config.text_config.hidden_size
    query = torch.randn(1, grid * grid, dim)
    far = grid * grid - 1  # bottom-right corner
    query[0, far] = query[0, 0] * 0.999 + 1e-3  # a look-alike of the target patch, far from it
    out = peer.localize(query, query[:, 0].clone())
    centers = patch_centers(grid, query.device)
    # the global soft-argmax would land half-way between patch 0 and its look-alike; the local one stays at 0
    assert torch.allclose(out["proposal"], centers[0:1], atol=0.5 / grid)
    assert torch.equal(out["point"], out["proposal"].clamp(0, 1))  # the refinement's offset starts at zero


def test_training_moves_the_peer_only_and_lowers_its_loss(tiny, splits):
    model, processor = tiny
    train, _ = splits
    before = {key: value.clone() for key, value in model.state_dict().items()}
    peer = MatchingPeer.from_stage0(model)
    names = keypoint_vocabulary(train)
    batch = collate_keypoint_pairs([KeypointPairDataset(train, processor, {n: i for i, n in enumerate(names)})[i] for i in range(8)])
    with torch.no_grad():
        first = peer(**batch)["loss"].item()
    train_matching_peer(peer, processor, train, names, "/tmp/kptllm-test-peer", steps=30, batch_size=8, learning_rate=3e-3)
    with torch.no_grad():
        after = peer(**batch)["loss"].item()
    assert np.isfinite(after) and after < first
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())


def test_saved_peer_predicts_the_same_and_scores_beside_kptllm(tiny, splits, tmp_path):
    model, processor = tiny
    train, test = splits
    peer = MatchingPeer.from_stage0(model).eval()
    cape_episodes = sample_cape_episodes(test, num_shots=1, num_queries=1, num_episodes=1)[:3]
    episodes = [pair for episode in cape_episodes for pair in episode.pairs()]
    predictions = match_episodes(peer, processor, test, episodes)
    peer.save_pretrained(tmp_path / "peer")
    again = match_episodes(MatchingPeer.from_pretrained(tmp_path / "peer"), processor, test, episodes)
    for a, b, episode in zip(predictions, again, episodes):
        np.testing.assert_allclose(a, b, atol=1e-5)
        visible = np.asarray(test[episode.support_rows[0]]["visible"], bool)
        assert np.isfinite(a[visible]).all() and np.isnan(a[~visible]).all()  # only prompted keypoints are placed
    probe = match_episodes(model, processor, test, episodes)  # the cosine floor on KptLLM's own modules
    assert [p.shape for p in probe] == [p.shape for p in predictions]
    results, pairs, _ = evaluate_visual_prompt(model, processor, test, cape_episodes, train, matching_peer=peer, cosine_probe=True)
    assert pairs == episodes
    assert list(results) == ["KptLLM", "matching peer", "cosine probe (KptLLM's z_p, z_q)", "support-copy", "mean-position"]
    assert len({scores["num_keypoints"] for scores in results.values()}) == 1  # the same episodes for every method


def test_background_training_returns_the_trained_peer_or_names_the_failure(tiny, splits, tmp_path):
    train_instances, _ = splits
    model, processor = tiny
    names = keypoint_vocabulary(train_instances)
    threads = torch.get_num_threads()
    peer = MatchingPeer.from_stage0(model)
    (tmp_path / "ok" / "matching_peer_start" / "instances").mkdir(parents=True)  # as a killed run leaves it
    job = BackgroundPeerTraining(peer, processor, train_instances, names, tmp_path / "ok", steps=2, seed=0, use_cpu=True)
    assert torch.get_num_threads() == 1  # the child has the other core
    trained = job.join()
    assert torch.get_num_threads() == threads and not (tmp_path / "ok" / "matching_peer_start").exists()
    assert not torch.equal(trained.logit_scale, peer.logit_scale)  # the child trained it, and this is its result

    failing = BackgroundPeerTraining(peer, processor, train_instances, names, tmp_path / "bad", steps=0, seed=0, use_cpu=True)
    with pytest.raises(RuntimeError, match="matching_peer_start"):
        failing.join()
    assert torch.get_num_threads() == threads


def test_a_folder_without_weights_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        MatchingPeer.from_pretrained(tmp_path)


def test_a_lora_wrapped_model_gives_a_peer_of_its_trained_front_copies(tiny, tmp_path):
    import copy

    from processing.builders import apply_lora

    wrapped = apply_lora(copy.deepcopy(tiny[0]), r=4, alpha=8)
    peer = MatchingPeer.from_stage0(wrapped.get_base_model())
    assert not [key for key in peer.state_dict() if "modules_to_save" in key or "original_module" in key]
    peer.save_pretrained(tmp_path / "peer")
    MatchingPeer.from_pretrained(tmp_path / "peer")  # loads strictly
