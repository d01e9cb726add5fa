"""The experiment scripts behind docs' figures still run (a few steps on the recorded fixture)."""

import importlib.util
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).parents[1] / "experiments"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("encoder", ["cnn", "policy"])
def test_policy_probe_trains_and_reports_held_out_accuracy(recorded, capsys, encoder):
    probe = load("policy_probe")
    probe.main(["--data", str(recorded), "--encoder", encoder, "--preset", "test", "--steps", "2",
                "--eval-every", "2", "--train-episodes", "2"])
    out = capsys.readouterr().out
    assert "held-out majority class" in out and "step 2: loss" in out and "held-out accuracy" in out
