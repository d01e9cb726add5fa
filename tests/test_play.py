"""Acting: the frame path, re-planning, closed-loop play, offline grading, and the CLI end to end."""

import json
import math

import av
import numpy as np
import pytest
import torch
from torch.utils.data import default_collate
from typer.testing import CliRunner

from walkthrough import actions as A
from walkthrough.chunks import ChunkStore, StoreError
from walkthrough.cli import app
from walkthrough.games import AtariGame, ExpertPlayer
from walkthrough.play import Agent, _grade, evaluate_offline, flow_errors, play, preprocess
from walkthrough.idm import IDMConfig, train_idm
from walkthrough.policy import PRESETS, Policy, PolicyConfig, PolicyDataset, is_pseudo_label
from walkthrough.train import TrainConfig
from walkthrough.video import VideoWriter, iter_frames


def tiny_policy(**overrides) -> Policy:
    torch.manual_seed(0)
    return Policy(PolicyConfig(**{**PRESETS["test"], "games": ["Breakout"], "sample_steps": 2, **overrides}))


def test_preprocess_matches_how_training_frames_were_decoded(tmp_path):
    game = AtariGame("Breakout")
    screens = [game.reset()] + [game.step_ale(1 if i % 5 == 0 else 3)[0] for i in range(15)]
    with VideoWriter(tmp_path / "v.mp4", 30) as video:
        for screen in screens:
            video.write(screen)
    decoded = [frame for _, frame in iter_frames(tmp_path / "v.mp4", size=(64, 64))]
    ours = np.mean([np.abs(preprocess(s, 64).astype(int) - d).mean() for s, d in zip(screens, decoded)])
    plain = np.mean([np.abs(av.VideoFrame.from_ndarray(s, format="rgb24")
                            .reformat(64, 64, format="rgb24", interpolation="AREA").to_ndarray().astype(int) - d).mean()
                     for s, d in zip(screens, decoded)])
    assert ours < 0.5  # what is left is H.264's own loss
    assert ours < plain / 2  # resizing the RGB screen directly would be further off


def test_agent_replans_every_n_steps_from_its_context():
    policy = tiny_policy(context_frames=2)
    agent = Agent(policy, "Breakout", replan_every=3)
    frame = AtariGame("Breakout").reset()
    actions = np.stack([agent.act(frame) for _ in range(7)])
    assert len(agent.latencies) == 3  # steps 0, 3 and 6
    assert actions.shape == (7, A.ACTION_DIM)
    A.validate(actions)
    assert len(agent.contexts[0]) == 2
    with pytest.raises(ValueError, match="replan_every"):
        Agent(policy, "Breakout", replan_every=policy.config.horizon + 1)


def test_play_writes_scores_and_video(tmp_path):
    result = play(tiny_policy(), "Breakout", episodes=2, out=tmp_path, max_seconds=1.0, videos=1, progress=False)
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved == result
    assert len(saved["episodes"]) == 2 and saved["episodes"][0]["steps"] == 30
    assert saved["mean"] == pytest.approx(np.mean([e["score"] for e in saved["episodes"]]))
    assert (tmp_path / "Breakout_ep0.mp4").stat().st_size > 0 and not (tmp_path / "Breakout_ep1.mp4").exists()


def test_batched_play_samples_the_games_together(tmp_path, monkeypatch):
    """Three episodes two at a time: the first two share each policy call, the third takes the slot
    the first frees; results come back in seed order, as played alone."""
    sizes = []
    sample = Policy.sample

    def counted(self, frames, *args):
        sizes.append(len(frames))
        return sample(self, frames, *args)

    monkeypatch.setattr(Policy, "sample", counted)
    alone = play(tiny_policy(), "Pong", episodes=3, out=tmp_path / "alone", max_seconds=1.0, videos=0,
                 progress=False, seed=5, replan_every=8)
    assert sizes == [1] * 12  # 30 steps, a chunk every 8
    sizes.clear()
    together = play(tiny_policy(), "Pong", episodes=3, out=tmp_path / "together", max_seconds=1.0, videos=2,
                    progress=False, seed=5, batch=2, replan_every=8)
    assert sizes == [2] * 4 + [1] * 4
    assert [e["seed"] for e in together["episodes"]] == [5, 6, 7] and together["batch"] == 2
    assert [e["steps"] for e in together["episodes"]] == [e["steps"] for e in alone["episodes"]] == [30] * 3
    assert sorted(p.name for p in (tmp_path / "together").glob("*.mp4")) == ["Pong_ep0.mp4", "Pong_ep1.mp4"]
    with pytest.raises(ValueError, match="batch"):
        play(tiny_policy(), "Pong", episodes=1, out=tmp_path / "none", progress=False, batch=0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the stand-in agents sample no chunks: no latency to average
def test_expert_agreement_grades_each_step_against_the_scripted_expert(tmp_path, monkeypatch):
    """An idle player never serves in Breakout, where the expert's first move is to serve: 0 agreement.
    A player that does what the noise-free expert does agrees on every step; games without an expert
    get no agreement."""
    monkeypatch.setattr(Agent, "act_all", lambda self, frames: {slot: A.idle(1)[0] for slot in frames})
    idle = play(tiny_policy(), "Breakout", episodes=1, out=tmp_path / "idle", max_seconds=2.0, videos=0, progress=False)
    assert idle["episodes"][0]["expert_agreement"] == 0.0 and idle["expert_agreement"] == 0.0
    assert idle["expert_agreement_by_action"] == {"FIRE": 0.0}
    none = play(tiny_policy(), "Pitfall", episodes=1, out=tmp_path / "pitfall", max_seconds=0.5, videos=0,
                progress=False)
    assert none["expert_agreement"] is None and none["episodes"][0]["expert_agreement"] is None
    assert none["expert_agreement_by_action"] == {}

    from walkthrough import play as play_module

    envs = []

    class Watched(AtariGame):  # lets the mimic below read the game's RAM, as the judge does
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            envs.append(self)

    twin = {}

    def mimic(self, frames):
        expert = twin.setdefault("expert", ExpertPlayer(envs[-1], aim_px=0.0, lapses_per_s=0.0, serve_delay_s=0.0))
        return {0: A.ale_to_gamepad(expert.act(envs[-1]))}

    monkeypatch.setattr(play_module, "AtariGame", Watched)
    monkeypatch.setattr(Agent, "act_all", mimic)
    same = play(tiny_policy(), "Breakout", episodes=1, out=tmp_path / "same", max_seconds=2.0, videos=0, progress=False)
    assert same["expert_agreement"] == 1.0
    assert len(same["expert_agreement_by_action"]) > 1 and set(same["expert_agreement_by_action"].values()) == {1.0}



@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the stand-in agent samples no chunks: no latency to average
def test_relabel_writes_the_visited_screens_with_the_experts_actions(tmp_path, monkeypatch):
    """DAgger data: an idle agent never serves, the expert would serve on every screen it leaves
    behind; the store keeps what the agent did beside the expert's label, and trains no IDM."""
    monkeypatch.setattr(Agent, "act_all", lambda self, frames: {slot: A.idle(1)[0] for slot in frames})
    store = tmp_path / "relabel"
    play(tiny_policy(), "Breakout", episodes=2, out=tmp_path / "play", max_seconds=1.0, videos=0, progress=False,
         relabel=store, batch=2)
    episodes = list(ChunkStore(store))
    assert [e.video_id for e in episodes] == ["Breakout-relabel-s0000", "Breakout-relabel-s0001"]
    for e in episodes:
        assert is_pseudo_label(e) and e.info["player"] == "policy" and e.video is not None
        assert len(e.actions) == 30 and (e.actions[:, A.BUTTON_INDEX["south"]] == 1).all()  # serve, always
        assert (e.column("ale_action") == A.ALE_ACTIONS.index("NOOP")).all()  # what the agent did
        assert sum(1 for _ in iter_frames(e.video)) == 30
    with pytest.raises(StoreError, match="actions played"):
        train_idm([store], tmp_path / "idm", IDMConfig(), TrainConfig(steps=1))
    with pytest.raises(ValueError, match="scripted expert"):
        play(tiny_policy(), "Pitfall", episodes=1, out=tmp_path / "p", max_seconds=0.5, progress=False, relabel=store)


def test_offline_grades_first_action_and_chunk(recorded):
    policy = tiny_policy()
    dataset = PolicyDataset([(list(ChunkStore(recorded)), 1.0)], policy.config)
    result = evaluate_offline(policy, dataset, max_windows=20, batch_size=8)
    assert result["windows"] == 20
    assert result["first"]["steps"] == 20 and result["chunk"]["steps"] == 20 * policy.config.horizon
    for part in ("first", "chunk"):
        assert 0 <= result[part]["button_f1"] <= 1 and 0 <= result[part]["stick_mae"] <= 2
    truth = np.stack([A.ale_to_gamepad(a) for a in (1, 3, 4, 0)])
    assert _grade(truth, truth)["button_f1"] == 1.0 and _grade(truth, truth)["stick_mae"] == 0.0


def test_image_gain_says_whether_the_policy_reads_the_screen(recorded):
    policy = tiny_policy()
    with torch.no_grad():
        for p in policy.parameters():  # past adaLN-Zero's start, where nothing depends on anything
            p.normal_(0, 0.3)
    dataset = PolicyDataset([(list(ChunkStore(recorded)), 1.0)], policy.config)
    reads = evaluate_offline(policy, dataset, max_windows=16, batch_size=8)["image_gain"]
    with torch.no_grad():
        for block in policy.blocks:
            if block.cross:  # the image's only way into the action head
                block.attn.out.weight.zero_()
                block.attn.out.bias.zero_()
    blind = evaluate_offline(policy, dataset, max_windows=16, batch_size=8)["image_gain"]
    assert abs(reads) > 1e-3 and blind == pytest.approx(0.0, abs=1e-6)


def test_motion_gain_says_whether_the_policy_reads_the_earlier_frames(recorded):
    policy = tiny_policy(context_frames=2)
    with torch.no_grad():
        for p in policy.parameters():
            p.normal_(0, 0.3)
    policy.eval()
    dataset = PolicyDataset([(list(ChunkStore(recorded)), 1.0)], policy.config)
    batch = default_collate([dataset[i] for i in range(0, 160, 20)])
    now = batch["frames"][:, -1:]  # (B, 1, 3, H, W)
    batch["frames"] = torch.cat([now.roll(1, dims=0), now], dim=1)  # the screen before: another window's
    own, _, still = flow_errors(policy, batch, torch.Generator().manual_seed(0))
    assert still != own  # the earlier frame counts
    batch["frames"] = now.repeat(1, 2, 1, 1, 1)  # nothing moved: nothing to read
    own, _, still = flow_errors(policy, batch, torch.Generator().manual_seed(0))
    assert still == own
    assert math.isfinite(evaluate_offline(policy, dataset, max_windows=8, batch_size=8)["motion_gain"])
    one_frame = tiny_policy()
    dataset = PolicyDataset([(list(ChunkStore(recorded)), 1.0)], one_frame.config)
    assert "motion_gain" not in evaluate_offline(one_frame, dataset, max_windows=8, batch_size=8)


def test_cli_trains_plays_and_grades(recorded, tmp_path):
    runner = CliRunner()
    run, out = tmp_path / "run", tmp_path / "play"
    result = runner.invoke(app, ["train-policy", "--data", str(recorded), "--out", str(run), "--preset", "test",
                                 "--steps", "2", "--batch-size", "4", "--warmup-steps", "1", "--eval-every", "2",
                                 "--num-workers", "0", "--sample-steps", "2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["play", "--ckpt", str(run), "--game", "breakout", "--episodes", "1",
                                 "--max-seconds", "1", "--out", str(out), "--relabel", str(tmp_path / "dagger")])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "scores.json").read_text())["episodes"][0]["steps"] == 30
    assert [len(e.actions) for e in ChunkStore(tmp_path / "dagger")] == [30]
    assert (out / "Breakout_ep0.mp4").exists()
    result = runner.invoke(app, ["eval-policy", "--ckpt", str(run), "--data", str(recorded), "--max-windows", "8",
                                 "--out", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    assert set(json.loads((tmp_path / "eval.json").read_text())) >= {"first", "chunk", "episodes"}

    for args, message in [
        (["play", "--ckpt", str(run), "--out", str(out), "--replan-every", "99"], "replan_every"),
        (["play", "--ckpt", str(tmp_path / "nothing"), "--out", str(out)], "no checkpoint"),
        (["play", "--ckpt", str(run), "--out", str(out), "--game", "NoSuchGame"], "unknown game"),
        (["train-policy", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r2")], "no such file"),
        (["train-policy", "--data", f"{recorded}:0", "--out", str(tmp_path / "r2")], "positive"),
        (["train-policy", "--data", str(recorded), "--out", str(tmp_path / "r2"), "--preset", "huge"], "preset"),
        (["train-policy", "--data", str(recorded), "--out", str(run), "--preset", "test"], "already holds a run"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in " ".join(result.output.split()), (args, result.output)
