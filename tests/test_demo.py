"""The demo end to end, on tiny budgets: the same stages and the same CLI a user runs."""

import json

from typer.testing import CliRunner

from walkthrough.cli import app
from walkthrough.demo import DemoConfig, recovered_share, render_html


def test_demo_quick_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    config = DemoConfig.quick()
    # every game was played by every policy and scored for the random and expert players
    assert set(report["play"]) == set(config.all_games)
    for game, row in report["play"].items():
        for policy in ("labeled-only", "labeled+pseudo", "oracle", "random", "expert"):
            assert row[policy] is not None and "mean" in row[policy], (game, policy)
    assert not report["play"]["Freeway"]["in_labeled_set"]  # a game seen only in walkthroughs
    # the numbers come from this run's files
    scores = json.loads((out / "play" / "oracle" / "Pong" / "scores.json").read_text())
    assert report["play"]["Pong"]["oracle"]["mean"] == scores["mean"]
    assert report["hours"]["walkthroughs"] > report["hours"]["labeled"] > 0
    assert report["labels"]["before"]["hours"] >= report["labels"]["after"]["hours"]
    # every stage is a rerunnable command, listed in the report
    commands = [c["command"] for c in report["commands"]]
    for sub in ("record", "train-idm", "eval-idm", "label", "train-policy", "play"):
        assert any(c.startswith(f"walkthrough {sub} ") for c in commands), sub
    # each model trained for the demo's budget (the flag reached the training loop)
    for run, minutes in (("idm", config.idm_minutes), ("policy-oracle", config.policy_minutes)):
        assert json.loads((out / "runs" / run / "config.json").read_text())["train"]["budget_minutes"] == minutes
    markdown = (out / "report.md").read_text()
    assert "walkthrough train-idm" in markdown and "Headline" in markdown
    html = (out / "report.html").read_text()
    assert "<table>" in html and "plots/scores.png" in html
    for plot in ("learning_curves.png", "scores.png"):
        assert (out / "plots" / plot).stat().st_size > 1000


def test_recovered_share():
    assert recovered_share(labeled=2.0, pseudo=5.0, oracle=8.0) == 0.5
    assert recovered_share(labeled=2.0, pseudo=1.0, oracle=6.0) == -0.25
    assert recovered_share(labeled=3.0, pseudo=5.0, oracle=3.0) is None  # no gain to recover
    # a gain under 10% of the expert's lead over random is noise: no share of it is reported
    assert recovered_share(labeled=-20.2, pseudo=-19.0, oracle=-19.0, span=22.2) is None
    assert recovered_share(labeled=0.0, pseudo=0.0, oracle=7.6, span=8.6) == 0.0


def test_html_rendering_escapes_and_keeps_tables():
    page = render_html("# T\n\n| a | b |\n|---|---|\n| <x> | `y` |\n\n![p](plots/p.png)\n- **z**\n")
    assert "<h1>T</h1>" in page and "<th>a</th>" in page and "<td>&lt;x&gt;</td>" in page
    assert "<code>y</code>" in page and '<img alt="p" src="plots/p.png">' in page and "<b>z</b>" in page


def test_demo_bad_output_path_fails_cleanly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(blocker / "demo")])
    assert result.exit_code != 0
