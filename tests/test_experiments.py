"""The experiment scripts behind docs' figures still run (a few steps on the recorded fixture)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).parents[1] / "experiments"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("encoder, frames", [("cnn", "1"), ("policy", "1"), ("cnn", "2"), ("policy", "2 --fuse-frames")])
def test_policy_probe_trains_and_reports_held_out_accuracy(recorded, capsys, encoder, frames):
    probe = load("policy_probe")
    probe.main(["--data", str(recorded), "--encoder", encoder, "--preset", "test", "--steps", "2",
                "--eval-every", "2", "--train-episodes", "2", "--context-frames", *frames.split()])
    out = capsys.readouterr().out
    assert "held-out majority class" in out and "step 2: loss" in out and "held-out accuracy" in out


def test_gpu_lease_script_trains_plays_and_runs_dagger_rounds(recorded, tmp_path):
    """experiments/gpu_breakout.sh on the test preset and the CPU: one variant, two short episodes, two DAgger rounds."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "WORK": str(work), "PY": sys.executable, "SKIP_WHEELS": "1",
           "DATA": str(recorded), "PRESET": "test", "BATCH": "4", "WORKERS": "0", "VARIANTS": "plain",
           "TRAIN_MINUTES": "0.01", "EVAL_EVERY": "100", "EPISODES": "2", "PLAY_SECONDS": "2", "SKIP_BENCH": "1",
           "DEADLINE": "900", "DAGGER_MINUTES": "0.01", "DAGGER_ROUNDS": "2", "ROLLOUTS": "2"}
    done = subprocess.run(["bash", str(EXPERIMENTS / "gpu_breakout.sh")], cwd=EXPERIMENTS.parent, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    play = json.loads((out / "play.json").read_text())
    assert [e["seed"] for e in play["plain"]["episodes"]] == [0, 1]
    assert [e["seed"] for e in play["plain-d2"]["episodes"]] == [0, 1]  # the last round, evaluated as the start
    assert [e["seed"] for e in play["plain rollouts"]["episodes"]] == [100, 101]
    assert [e["seed"] for e in play["plain-d1 rollouts"]["episodes"]] == [102, 103]
    assert len(list((work / "dagger_plain-d1" / "actions").iterdir())) == 2
    second = json.loads((out / "plain-d2" / "config.json").read_text())["data"]
    assert second["init_from"].endswith("plain-d1")
    assert [Path(s["path"]).name for s in second["sources"]][-2:] == ["dagger_plain", "dagger_plain-d1"]  # aggregated
    assert {p.name for p in (out / "plain").iterdir()} == {"config.json", "ema.safetensors", "metrics.jsonl"}
    assert "plain: Breakout" in (out / "log.txt").read_text()


def test_baseline_agreement_grades_the_expert_above_the_random_player(capsys):
    result = load("baseline_agreement").main(["--game", "Pong", "--episodes", "1", "--max-seconds", "4"])
    assert result["expert"]["expert_agreement"] > result["random"]["expert_agreement"]
    assert '"game": "Pong"' in capsys.readouterr().out
