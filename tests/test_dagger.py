"""DAgger rounds: rollouts relabelled by the expert, training on from the last round, resuming a killed run."""

import json

from typer.testing import CliRunner

from walkthrough.chunks import ChunkStore
from walkthrough.cli import app
from walkthrough.dagger import DaggerConfig, dagger
from walkthrough.policy import PRESETS, PolicyConfig, Source, is_pseudo_label, train_policy
from walkthrough.train import TrainConfig, read_run_config, run_finished

import pytest


def quick_train(**overrides) -> TrainConfig:
    return TrainConfig(**{"steps": 2, "batch_size": 4, "warmup_steps": 1, "eval_every": 2, "ckpt_every": 2,
                          "log_every": 1, "num_workers": 0, "eval_samples": 8, "ema_decay": 0.9, **overrides})


@pytest.fixture(scope="module")
def start(recorded, tmp_path_factory):
    config = PolicyConfig(**{**PRESETS["test"], "games": ["Breakout"], "sample_steps": 2})
    return train_policy([Source(recorded)], tmp_path_factory.mktemp("start") / "run", config, quick_train(),
                        eval_windows=8)


def test_each_round_trains_on_from_the_last_on_all_relabelled_rounds_and_a_rerun_redoes_nothing(recorded, start, tmp_path):
    out = tmp_path / "dagger"
    cfg = DaggerConfig(game="Breakout", rounds=2, rollouts=2, eval_episodes=2, max_seconds=1.0)
    summary = dagger(start, [Source(recorded)], out, cfg, quick_train(), progress=False)
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert json.loads((out / "dagger.json").read_text()) == summary
    for r in (1, 2):
        rollouts = json.loads((out / f"round{r}" / "rollouts" / "scores.json").read_text())
        assert [e["seed"] for e in rollouts["episodes"]] == [1000 + 2 * (r - 1), 1001 + 2 * (r - 1)]
        episodes = list(ChunkStore(out / f"round{r}" / "data"))
        assert len(episodes) == 2 and all(is_pseudo_label(e) for e in episodes)
        evaluated = json.loads((out / f"round{r}" / "play" / "scores.json").read_text())
        assert [e["seed"] for e in evaluated["episodes"]] == [0, 1]  # every round on the same seeds
        assert summary["rounds"][r]["eval"]["mean"] == evaluated["mean"]
        shares = summary["rounds"][r]["rollouts"]["expert_action_shares"]
        assert sum(shares.values()) == pytest.approx(1.0)
    second = read_run_config(out / "round2" / "run")["data"]
    assert second["init_from"] == str(out / "round1" / "run")
    assert [s["path"] for s in second["sources"]] == [str(recorded), str(out / "round1" / "data"),
                                                      str(out / "round2" / "data")]
    assert run_finished(out / "round2" / "run")

    # A rerun finds every round done; a lost evaluation is played again, nothing else is redone.
    weights = (out / "round2" / "run" / "model.safetensors").stat().st_mtime_ns
    (out / "round2" / "play" / "scores.json").unlink()
    again = dagger(start, [Source(recorded)], out, cfg, quick_train(), progress=False)
    assert again == summary
    assert (out / "round2" / "run" / "model.safetensors").stat().st_mtime_ns == weights


def test_a_run_killed_in_training_resumes_it(recorded, start, tmp_path):
    out = tmp_path / "dagger"
    cfg = DaggerConfig(game="Breakout", rounds=1, rollouts=1, eval_episodes=0, max_seconds=1.0)
    # Stopped after its first checkpoint, as a killed run leaves it: the next call trains on from there.
    dagger(start, [Source(recorded)], out, cfg, quick_train(steps=4, max_minutes=0.0), progress=False)
    run = out / "round1" / "run"
    assert read_run_config(run)["step"] == 1 and not run_finished(run)
    summary = dagger(start, [Source(recorded)], out, cfg, quick_train(steps=4), progress=False)
    assert read_run_config(run)["step"] == 4 and run_finished(run)
    assert summary["rounds"][1]["eval"] is None


def test_cli_runs_a_streaming_round_growing_to_fused_frames_and_refuses_a_game_without_an_expert(recorded, start, tmp_path):
    runner = CliRunner()
    out = tmp_path / "dagger"
    result = runner.invoke(app, ["dagger", "--ckpt", str(start), "--game", "Breakout", "--data", str(recorded),
                                 "--rounds", "1", "--rollouts", "2", "--eval-episodes", "1", "--max-seconds", "1",
                                 "--steps", "2", "--lr", "3e-4", "--context-frames", "2", "--fuse-frames", "--stream",
                                 "--play-batch", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "round 1:" in result.output and (out / "dagger.json").exists()
    assert json.loads((out / "round1" / "rollouts" / "scores.json").read_text())["batch"] == 2
    trained = read_run_config(out / "round1" / "run")
    assert trained["train"]["lr"] == 3e-4 and trained["data"]["preload"] is False
    assert trained["model"]["context_frames"] == 2 and trained["model"]["fuse_frames"]  # grown from the one-frame start
    result = runner.invoke(app, ["dagger", "--ckpt", str(start), "--game", "Pitfall", "--data", str(recorded),
                                 "--out", str(tmp_path / "other")])
    assert result.exit_code == 2 and "scripted expert" in result.output
