"""The policy: flow matching, sampling, guidance, checkpoints, pretrained SigLIP 2, data mixtures."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Siglip2VisionConfig, Siglip2VisionModel
from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

from walkthrough import actions as A
from walkthrough import chunks
from walkthrough.chunks import ChunkStore, StoreError
from walkthrough.policy import (NULL_GAME, PRESETS, Policy, PolicyConfig, PolicyDataset, Source, from_flow,
                                initialised_from, is_pseudo_label, patchify, to_flow, train_policy,
                                with_pretrained_vision)
from walkthrough.train import TrainConfig, load_model


def config(**overrides) -> PolicyConfig:
    return PolicyConfig(**{**PRESETS["test"], "games": ["Breakout", "Pong"], "sample_steps": 4, **overrides})


def toy_batch(cfg: PolicyConfig, batch: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    actions = A.idle(batch * cfg.horizon)
    actions[:, A.BUTTON_INDEX["south"]] = torch.rand(len(actions), generator=g).numpy() > 0.5
    actions[:, A.NUM_BUTTONS] = torch.rand(len(actions), generator=g).numpy() * 2 - 1
    side = cfg.image_size
    return {
        "frames": torch.randint(0, 256, (batch, cfg.context_frames, 3, side, side), generator=g, dtype=torch.uint8),
        "actions": torch.from_numpy(actions).view(batch, cfg.horizon, A.ACTION_DIM),
        "action_mask": torch.ones(batch, cfg.horizon, dtype=torch.bool),
        "weight": torch.ones(batch, cfg.horizon),
        "game": torch.randint(1, len(cfg.games) + 1, (batch,), generator=g),
    }


def quick_train(cfg: TrainConfig | None = None, **overrides) -> TrainConfig:
    return TrainConfig(**{"steps": 2, "batch_size": 4, "warmup_steps": 1, "eval_every": 2, "ckpt_every": 2,
                          "log_every": 1, "num_workers": 0, "eval_samples": 8, "ema_decay": 0.9, **overrides})


def test_patchify_matches_the_siglip2_processor():
    image = torch.rand(3, 32, 48)
    ours = patchify(image[None], 8)[0]
    theirs = convert_image_to_patches(image.numpy(), 8)
    np.testing.assert_array_equal(ours.numpy(), theirs)


@pytest.mark.parametrize("image_size", [32, 48])  # the position grid as is (4 x 4 patches) and resized (6 x 6)
def test_vision_tokens_equal_the_siglip2_forward(image_size):
    policy = Policy(config(image_size=image_size))
    side = image_size // 8
    patches = patchify(torch.rand(3, 3, image_size, image_size) * 2 - 1, 8)
    theirs = policy.vision(pixel_values=patches, pixel_attention_mask=torch.ones(patches.shape[:2], dtype=torch.long),
                           spatial_shapes=torch.tensor([[side, side]] * 3)).last_hidden_state
    torch.testing.assert_close(policy.vision_tokens(patches, side), theirs)


def test_flow_space_round_trips_schema_actions():
    actions = torch.from_numpy(np.stack([A.ale_to_gamepad(a) for a in range(18)]))
    actions[:, A.NUM_BUTTONS:] = torch.linspace(-1, 1, 18)[:, None]
    flow = to_flow(actions)
    assert flow.min() >= -1 and flow.max() <= 1
    assert torch.equal(from_flow(flow), actions)


@pytest.mark.parametrize("image_summary", [False, True])
def test_loss_decreases_and_samples_have_the_right_shape(image_summary):
    torch.manual_seed(0)
    cfg = config(image_summary=image_summary)
    policy, batch = Policy(cfg), toy_batch(cfg)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss, metrics = policy.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(metrics["loss"])
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    for steps in (4, 16):
        chunk = policy.eval().sample(batch["frames"], batch["game"], steps=steps)
        assert chunk.shape == (8, cfg.horizon, A.ACTION_DIM)
        A.validate(chunk.flatten(0, 1).numpy())  # buttons 0/1, sticks in [-1, 1]


@pytest.mark.parametrize("noise_samples", [1, 3])
def test_masked_and_unconfident_steps_weigh_nothing(noise_samples):
    cfg = config(noise_samples=noise_samples)
    policy, batch = Policy(cfg), toy_batch(cfg)

    def loss_of(b: dict) -> float:
        torch.manual_seed(1)  # the same noise and t every call
        return policy.loss(b)[0].item()

    masked = {**batch, "action_mask": batch["action_mask"].clone()}
    masked["action_mask"][:, 2:] = False
    changed = {**masked, "actions": masked["actions"].clone()}
    changed["actions"][:, 2:] = 1 - changed["actions"][:, 2:]  # flip every button of the masked steps
    assert loss_of(masked) == pytest.approx(loss_of(changed))
    assert loss_of(masked) != pytest.approx(loss_of(batch))
    # a confidence of 0.5 everywhere halves the loss; it is not renormalised away
    assert loss_of({**batch, "weight": batch["weight"] * 0.5}) == pytest.approx(0.5 * loss_of(batch), rel=1e-5)
    # a batch without any real action trains nothing
    none = {**batch, "action_mask": torch.zeros_like(batch["action_mask"])}
    loss, _ = policy.loss(none)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in policy.parameters())


def test_classifier_free_guidance_mixes_game_and_null_velocities():
    torch.manual_seed(0)
    policy = Policy(config()).eval()
    with torch.no_grad():  # a random game embedding, so conditioning on the game matters
        policy.game_embed.weight.normal_(0, 1.0)
        for block in policy.blocks:
            block.adaln[-1].weight.normal_(0, 0.2)
        policy.final.linear.weight.normal_(0, 0.2)
    frames = toy_batch(policy.config, batch=2)["frames"]
    game, null = torch.tensor([1, 2]), torch.full((2,), NULL_GAME)

    def sample(g: torch.Tensor, scale: float) -> torch.Tensor:
        return policy.sample(frames, g, cfg_scale=scale, generator=torch.Generator().manual_seed(3))

    assert torch.equal(sample(game, 1.0), policy.sample(frames, game, generator=torch.Generator().manual_seed(3)))
    assert torch.allclose(sample(game, 0.0), sample(null, 1.0), atol=1e-5)  # s = 0: unconditional
    assert not torch.equal(sample(game, 3.0), sample(game, 1.0))
    assert config().game_id("Pong") == 2 and config().game_id("Zaxxon") == NULL_GAME


def test_checkpoint_round_trip_gives_identical_actions(recorded, tmp_path):
    cfg = config()
    run = train_policy([Source(recorded)], tmp_path / "run", cfg, quick_train(), eval_windows=8)
    saved = json.loads((run / "config.json").read_text())
    assert saved["model_type"] == "policy" and saved["model"]["games"] == ["Breakout", "Pong"]
    weights = load_file(run / "model.safetensors")
    policy = Policy(PolicyConfig.from_dict(saved["model"]))
    policy.load_state_dict(weights)
    loaded = load_model(run, ema=False)
    frames = toy_batch(cfg, batch=3)["frames"]
    a = policy.eval().sample(frames, generator=torch.Generator().manual_seed(0))
    b = loaded.sample(frames, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    ema = load_model(run)
    assert ema.config == loaded.config  # the EMA weights load too
    # Token statistics are recomputed for each set of weights: the EMA's are its own.
    assert not torch.equal(ema.token_norm.running_mean, loaded.token_norm.running_mean)


def test_a_run_starts_from_an_earlier_runs_weights_when_the_architecture_matches(recorded, tmp_path):
    first = train_policy([Source(recorded)], tmp_path / "first", config(), quick_train(), eval_windows=8)
    # lr 0 (weight decay scales with it): the second run's weights stay the ones it started from,
    # the first run's EMA; its sampling-only and training-only settings may differ
    second = train_policy([Source(recorded)], tmp_path / "second", config(noise_samples=2, sample_steps=2),
                          quick_train(lr=0.0, ema_decay=0.0), eval_windows=8, init_from=first)
    start, after = load_model(first), load_file(second / "model.safetensors")
    for name, weight in start.named_parameters():
        torch.testing.assert_close(after[name], weight, rtol=0, atol=0)
    assert json.loads((second / "config.json").read_text())["data"]["init_from"] == str(first)
    with pytest.raises(ValueError, match="another architecture .*horizon: 16 -> 8"):
        train_policy([Source(recorded)], tmp_path / "third", config(horizon=8), quick_train(), init_from=first)
    with pytest.raises(ValueError, match="not both"):
        train_policy([Source(recorded)], tmp_path / "fourth", config(), quick_train(), init_from=first,
                     vision_pretrained=tmp_path)


def test_a_run_grown_to_more_context_frames_acts_as_the_earlier_one_on_a_still_screen(recorded, tmp_path):
    first = train_policy([Source(recorded)], tmp_path / "first", config(), quick_train(), eval_windows=8)
    # the grown weights themselves (a run would recompute the token statistics on moving frames)
    start, grown = load_model(first), initialised_from(first, config(context_frames=3)).eval()
    assert grown.config.context_frames == 3
    frames = toy_batch(start.config, batch=3)["frames"]  # (B, 1, 3, H, W)
    game = torch.tensor([1, 2, 1])
    before = start.sample(frames, game, generator=torch.Generator().manual_seed(0))
    after = grown.sample(frames.expand(-1, 3, -1, -1, -1), game, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(after, before, rtol=0, atol=1e-3)  # float rounding only
    second = train_policy([Source(recorded)], tmp_path / "second", config(context_frames=3), quick_train(),
                          eval_windows=8, init_from=first)
    grown2 = train_policy([Source(recorded)], tmp_path / "third", config(context_frames=2),
                          quick_train(steps=20, lr=1e-2), eval_windows=8, init_from=first)
    trained = load_model(grown2, ema=False)
    older, now = trained.frame_pos[0], trained.frame_pos[1]
    assert not torch.equal(older, now)  # the frames' differences tell them apart, though they start alike
    with pytest.raises(ValueError, match="another architecture .*context_frames: 3 -> 1"):
        train_policy([Source(recorded)], tmp_path / "fourth", config(), quick_train(), init_from=second)


def test_fused_frames_are_stacked_in_each_patch_at_one_frames_token_count():
    torch.manual_seed(0)
    one, fused = Policy(config()), Policy(config(context_frames=3, fuse_frames=True))
    batch = toy_batch(fused.config, batch=4)
    tokens = fused.encode(batch["frames"])  # (B, N, D): the three frames in one set of tokens
    assert tokens.shape == one.encode(batch["frames"][:, -1:]).shape
    assert fused.vision.embeddings.patch_embedding.in_features == 8 * 8 * 3 * 3
    moved = batch["frames"].clone()
    moved[:, 0] = 255 - moved[:, 0]  # only the oldest frame differs
    assert not torch.allclose(fused.eval().encode(moved), fused.encode(batch["frames"]))
    loss, _ = fused.train().loss(batch)
    assert torch.isfinite(loss)
    assert fused.sample(batch["frames"], batch["game"], steps=2).shape == (4, fused.config.horizon, A.ACTION_DIM)


def test_a_run_grown_to_fused_frames_acts_as_the_earlier_one_whatever_they_show(recorded, tmp_path):
    first = train_policy([Source(recorded)], tmp_path / "first", config(), quick_train(), eval_windows=8)
    start, grown = load_model(first), initialised_from(first, config(context_frames=2, fuse_frames=True)).eval()
    frames = toy_batch(grown.config, batch=3)["frames"]  # (B, 2, 3, H, W): two different frames
    game = torch.tensor([1, 2, 1])
    before = start.sample(frames[:, -1:], game, generator=torch.Generator().manual_seed(0))
    after = grown.sample(frames, game, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(after, before, rtol=0, atol=1e-3)  # float rounding only
    second = train_policy([Source(recorded)], tmp_path / "second", config(context_frames=2, fuse_frames=True),
                          quick_train(), eval_windows=8, init_from=first)
    third = train_policy([Source(recorded)], tmp_path / "third", config(context_frames=3, fuse_frames=True),
                         quick_train(steps=4, lr=1e-2), eval_windows=8, init_from=second)
    embedding = load_model(third, ema=False).vision.embeddings.patch_embedding.weight.view(-1, 8, 8, 3, 3)
    assert embedding[..., 0, :].abs().sum() > 0  # the oldest frame starts at weight 0; training gives it weight
    with pytest.raises(ValueError, match="another architecture .*fuse_frames: True -> False"):
        train_policy([Source(recorded)], tmp_path / "fourth", config(context_frames=3), quick_train(), init_from=second)


def test_a_run_started_from_an_earlier_one_learns_a_new_game_from_the_null_games_embedding(recorded, tmp_path):
    from walkthrough import games

    breakout = tmp_path / "breakout"
    games.record(breakout, ["Breakout"], player="expert", episodes=2, fps=30, seed=0, max_seconds=3, progress=False)
    first = train_policy([Source(breakout)], tmp_path / "first", config(), quick_train(), eval_windows=8)
    assert load_model(first).config.games == ["Breakout"]
    second = train_policy([Source(recorded)], tmp_path / "second", config(), quick_train(lr=0.0, ema_decay=0.0),
                          eval_windows=8, init_from=first)
    start, grown = load_model(first), load_model(second)
    assert grown.config.games == ["Breakout", "Pong"]  # the earlier ids kept, the new game appended
    table, before = grown.game_embed.weight, start.game_embed.weight  # (1 + games, D)
    torch.testing.assert_close(table[:2], before, rtol=0, atol=0)
    torch.testing.assert_close(table[grown.config.game_id("Pong")], before[NULL_GAME], rtol=0, atol=0)


def test_standardized_tokens_are_centred_on_the_data_they_were_measured_on():
    torch.manual_seed(0)
    cfg = config()
    policy = Policy(cfg)
    batches = [toy_batch(cfg, batch=8, seed=s) for s in range(4)]
    from walkthrough.train import recompute_batchnorm
    recompute_batchnorm(policy, batches, torch.device("cpu"))
    with torch.no_grad():
        tokens = torch.cat([policy.eval().encode(b["frames"]) for b in batches])  # (32, N, D)
    assert tokens.mean(0).abs().max() < 1e-4 and 0.5 < tokens.std(0).mean() < 1.5
    assert Policy(config(standardize_tokens=False)).token_norm is None


@pytest.mark.parametrize("full_model", [False, True])
def test_trains_from_a_local_pretrained_siglip2_with_the_hub_offline(recorded, tmp_path, monkeypatch, full_model):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                  patch_size=8, num_patches=16)
    if full_model:  # a whole SigLIP 2 (text tower and pooling head included), as released checkpoints are
        from transformers import Siglip2Config, Siglip2Model
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
        pretrained = Siglip2Model(Siglip2Config(vision_config=vision, text_config=text))
        reference = pretrained.vision_model
    else:
        pretrained = reference = Siglip2VisionModel(Siglip2VisionConfig(**vision))
    pretrained.save_pretrained(tmp_path / "siglip2")
    cfg = config(freeze_vision=True)
    policy = with_pretrained_vision(cfg, tmp_path / "siglip2")
    assert policy.config.vision["hidden_size"] == 48
    for name, value in reference.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(policy.vision.state_dict()[name], value), name
    run = train_policy([Source(recorded)], tmp_path / "run", cfg, quick_train(),
                       vision_pretrained=tmp_path / "siglip2", eval_windows=8)
    trained = load_model(run, ema=False)
    assert trained.config.vision["hidden_size"] == 48
    assert torch.equal(trained.vision.embeddings.patch_embedding.weight,
                       reference.embeddings.patch_embedding.weight)  # frozen
    assert not torch.equal(trained.action_in.weight, Policy(trained.config).action_in.weight)
    # fused frames: the pretrained embedding reads the newest frame, the earlier ones start at weight 0
    # and stay trainable when the rest of the encoder is frozen (else they could never count)
    fused = with_pretrained_vision(config(freeze_vision=True, context_frames=2, fuse_frames=True), tmp_path / "siglip2")
    frames = toy_batch(fused.config, batch=2)["frames"]  # (B, 2, 3, H, W)
    ours = fused.vision_tokens(patchify(frames.flatten(1, 2).float() / 127.5 - 1, 8), 4)
    theirs = policy.vision_tokens(patchify(frames[:, -1].float() / 127.5 - 1, 8), 4)
    torch.testing.assert_close(ours, theirs)
    assert fused.vision.embeddings.patch_embedding.weight.requires_grad
    assert not fused.vision.encoder.layers[0].mlp.fc1.weight.requires_grad


def test_pretrained_vision_needs_a_real_checkpoint(tmp_path):
    with pytest.raises(OSError):
        with_pretrained_vision(config(), tmp_path)


def write_pseudo_labels(recorded, root, confidence: float) -> ChunkStore:
    """Pseudo-labels over the recorded Breakout expert video, written as a labeler writes them."""
    episode = next(e for e in ChunkStore(recorded) if e.game == "Breakout" and e.info["player"] == "expert")
    actions = episode.actions
    info = {"label_type": "pseudo", "labeler": {"min_confidence": 0.5}, "idm": "test",
            "source_video": {"path": str(episode.video)}}
    chunks.write_episode(root, f"{episode.video_id}-pseudo", actions, fps=episode.chunks[0].action_fps,
                         game=episode.game, resolution=episode.resolution, info=info,
                         extra_columns={"confidence": np.full(len(actions), confidence, np.float32)})
    return ChunkStore(root)


def test_mixture_reads_pseudo_labels_through_the_ground_truth_reader(recorded, tmp_path):
    labels = write_pseudo_labels(recorded, tmp_path / "labels", confidence=0.25)
    assert all(is_pseudo_label(e) for e in labels) and not any(is_pseudo_label(e) for e in ChunkStore(recorded))
    cfg = config(context_frames=2)
    truth = list(ChunkStore(recorded))
    mixture = PolicyDataset([(truth, 1.0), (labels.episodes, 3.0)], cfg)
    per_source = np.bincount(mixture.items[:, 0], minlength=2)
    assert per_source[1] / per_source.sum() == pytest.approx(0.75, abs=0.01)
    assert len(mixture) == sum(len(s) for s in mixture.sets)
    pseudo_item = mixture[int(np.flatnonzero(mixture.items[:, 0] == 1)[0])]
    assert pseudo_item["frames"].shape == (2, 3, 32, 32)
    assert pseudo_item["actions"].shape == (cfg.horizon, A.ACTION_DIM)
    assert torch.allclose(pseudo_item["weight"], torch.tensor(0.25))
    assert pseudo_item["game"].item() == cfg.game_id("Breakout")
    unweighted = PolicyDataset([(labels.episodes, 1.0)], cfg, use_confidence=False)
    assert torch.equal(unweighted[0]["weight"], torch.ones(cfg.horizon))
    # the chunk starts at the last context frame: the step between the two context frames is dropped
    source, window = mixture.items[0]
    assert torch.equal(mixture[0]["actions"], mixture.sets[source][int(window)]["actions"][1:])

    run = train_policy([Source(recorded), Source(tmp_path / "labels", 3.0)], tmp_path / "run", config(),
                       quick_train(), eval_windows=8)
    saved = json.loads((run / "config.json").read_text())
    assert [s["pseudo_episodes"] for s in saved["data"]["sources"]] == [0, 1]
    assert not set(saved["data"]["val_episodes"]) & {e.video_id for e in labels}  # validation: ground truth only


def test_sources_parse_weights_and_reject_bad_ones():
    assert Source.parse("data") == Source(Path("data"))
    assert Source.parse("runs/labels:0.5") == Source(Path("runs/labels"), 0.5)
    assert Source.parse("C:/data") == Source(Path("C:/data"))
    for bad in ("data:0", "data:-1", "data:nan"):
        with pytest.raises(ValueError, match="positive"):
            Source.parse(bad)


def test_bad_configs_and_data_are_refused(tmp_path):
    with pytest.raises(ValueError, match="multiple of the patch size"):
        config(image_size=30)
    with pytest.raises(ValueError, match="divisible"):
        config(width=30, heads=4)
    with pytest.raises(ValueError, match=">= 1"):
        config(horizon=0)
    with pytest.raises(StoreError, match="no such file"):
        train_policy([Source(tmp_path / "missing")], tmp_path / "run", config(), quick_train())
    with pytest.raises(ValueError, match="at least 2 windows"):
        train_policy([Source(tmp_path / "missing")], tmp_path / "run", config(), quick_train(batch_size=1))

