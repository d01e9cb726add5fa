"""The demo: the project's whole claim, end to end, on real Atari games, with a report.

    1. record    expert and persistent-random play of several ALE games, with true actions
    2. split     a small labeled set (the "overlay" data) and many "walkthroughs" whose actions
                 are hidden from every model (kept aside only to grade pseudo-labels and to
                 train the oracle); one game appears only in walkthroughs
    3. IDM       train on the labeled set, calibrate on its held-out episodes, evaluate on the
                 walkthroughs (never seen) against the repeat-previous / always-idle floors
    4. label     pseudo-label the walkthrough videos, filter, grade against the hidden truth
    5. policies  labeled-only, labeled + pseudo-labels, oracle (labeled + true walkthrough
                 actions), the same budget each; play each closed loop in each game
    6. report    DEMO/report.md and DEMO/report.html: every number comes from this run

Every stage runs through the `walkthrough` command line (in this process), so each one is a
command a user can rerun alone on the demo's outputs; the report lists them.
"""

from __future__ import annotations

import html
import json
import math
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import pyarrow.parquet as pq
from rich.console import Console

from walkthrough import actions as A
from walkthrough.chunks import ChunkStore, write_json_atomic

console = Console(stderr=True)
POLICIES = ("labeled-only", "labeled+pseudo", "oracle")
UNTIL_BUDGET = 1_000_000  # --steps for the demo's models: their time budget ends them, as on any machine


@dataclass
class DemoConfig:
    """What the demo records and how long each stage may train. Saved as DEMO/demo_config.json."""
    labeled_games: list[str] = field(default_factory=lambda: ["Breakout", "Pong"])
    walkthrough_only_games: list[str] = field(default_factory=lambda: ["Freeway"])
    # games recorded with the random player only, in the labeled set: they show the IDM d-pad
    # directions the labeled experts never press (NitroGen's labels span many games too)
    coverage_games: list[str] = field(default_factory=lambda: ["Boxing"])
    labeled_expert_episodes: int = 1  # per labeled game
    labeled_random_episodes: int = 1  # per labeled and coverage game
    walkthrough_expert_episodes: int = 5  # per game
    walkthrough_random_episodes: int = 2  # per game
    episode_seconds: float = 60.0  # cap on each recorded episode
    fps: float = 30.0
    idm_minutes: float = 6.0
    idm_frames: int = 2
    policy_minutes: float = 3.0
    policy_preset: str = "cpu"
    play_episodes: int = 5
    play_seconds: float = 45.0  # the demo must finish in 30 min on 2 cores: play is ~30% of it
    seed: int = 0

    @classmethod
    def quick(cls) -> "DemoConfig":
        """The same stages in a couple of minutes: the end-to-end test, not a result."""
        return cls(coverage_games=[], walkthrough_expert_episodes=1, walkthrough_random_episodes=1,
                   episode_seconds=6.0, idm_minutes=0.25, policy_minutes=0.15, policy_preset="test",
                   play_episodes=1, play_seconds=4.0)

    @property
    def all_games(self) -> list[str]:
        return self.labeled_games + self.walkthrough_only_games


class Stage:
    """Runs `walkthrough ...` commands in this process and remembers them for the report."""

    def __init__(self, out: Path):
        self.out = out
        self.commands: list[dict] = []

    def run(self, title: str, *args: object) -> None:
        from walkthrough.cli import app

        argv = [str(a) for a in args]
        command = "walkthrough " + shlex.join(argv)
        console.rule(f"[bold]{title}")
        console.print(f"[dim]$ {command}", highlight=False)
        began = time.time()
        code = app(argv, standalone_mode=False, prog_name="walkthrough")
        if code not in (None, 0):
            raise RuntimeError(f"demo stage '{title}' failed: {command}")
        self.commands.append({"title": title, "command": command, "seconds": time.time() - began})


def run_demo(out: Path, config: DemoConfig) -> dict:
    """Run every stage into ``out`` and write the report; returns the report's numbers."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "demo_config.json", asdict(config))
    began = time.time()
    stage = Stage(out)
    data, runs, evals, play = out / "data", out / "runs", out / "eval", out / "play"
    labeled, walk, baselines, labels = data / "labeled", data / "walkthroughs", data / "baselines", out / "labels"
    common = ["--fps", config.fps, "--max-seconds", config.episode_seconds]

    # 1-2. record: the labeled set and the walkthroughs are separate recordings (other seeds)
    seed = config.seed
    for game in config.labeled_games:
        stage.run(f"record labeled {game} (expert)", "record", "--game", game, "--player", "expert",
                  "--episodes", config.labeled_expert_episodes, "--seed", seed, *common, "--out", labeled)
    for game in config.labeled_games + config.coverage_games:
        stage.run(f"record labeled {game} (random)", "record", "--game", game, "--player", "random",
                  "--episodes", config.labeled_random_episodes, "--seed", seed + 100, *common, "--out", labeled)
    for game in config.all_games:
        stage.run(f"record walkthroughs {game} (expert)", "record", "--game", game, "--player", "expert",
                  "--episodes", config.walkthrough_expert_episodes, "--seed", seed + 1000, *common, "--out", walk)
        stage.run(f"record walkthroughs {game} (random)", "record", "--game", game, "--player", "random",
                  "--episodes", config.walkthrough_random_episodes, "--seed", seed + 1100, *common, "--out", walk)
    stage.run("dataset summary (labeled)", "info", labeled)

    # 3. IDM: train on the labeled set; calibrate on its held-out episodes; test on walkthroughs
    idm_run = runs / "idm"
    stage.run("train the IDM on the labeled set", "train-idm", "--data", labeled, "--out", idm_run,
              "--frames", config.idm_frames, "--fps", config.fps, "--budget-minutes", config.idm_minutes,
              "--steps", UNTIL_BUDGET,
              "--val-fraction", 0.2, "--eval-every", 100_000, "--seed", seed)
    stage.run("evaluate + calibrate the IDM (held-out labeled episodes)", "eval-idm", "--ckpt", idm_run,
              "--data", labeled, "--split", "held-out", "--out", evals / "idm-heldout")
    stage.run("evaluate the IDM on the walkthroughs (hidden truth)", "eval-idm", "--ckpt", idm_run,
              "--data", walk, "--split", "all", "--no-calibrate", "--out", evals / "idm-walkthroughs")

    # 4. pseudo-label the walkthrough videos (video files only: the labeler never sees actions)
    stage.run("pseudo-label the walkthrough videos", "label", "--ckpt", idm_run, walk / "videos", "--out", labels,
              *fallback_threshold(evals / "idm-heldout" / "report.json"))

    # 5. three policies, the same budget each, then closed-loop play in every game
    kept_any = any((labels / "actions").glob("*/*/metadata.json"))
    if not kept_any:
        console.print("[yellow]the filters kept no pseudo-label: labeled+pseudo trains on the labeled set alone")
    mixtures = {
        "labeled-only": [labeled],
        "labeled+pseudo": [labeled, labels] if kept_any else [labeled],
        "oracle": [labeled, walk],
    }
    for name, sources in mixtures.items():
        stage.run(f"train policy: {name}", "train-policy", *[a for s in sources for a in ("--data", s)],
                  "--out", runs / f"policy-{name}", "--preset", config.policy_preset, "--fps", config.fps,
                  "--budget-minutes", config.policy_minutes, "--steps", UNTIL_BUDGET, "--eval-every", 100_000,
                  "--seed", seed)
    for name in mixtures:
        for game in config.all_games:
            stage.run(f"play {game} with policy {name}", "play", "--ckpt", runs / f"policy-{name}",
                      "--game", game, "--episodes", config.play_episodes, "--max-seconds", config.play_seconds,
                      "--batch", config.play_episodes, "--seed", seed + 5000, "--out", play / name / game)
    for player in ("random", "expert"):
        for game in config.all_games:
            stage.run(f"score the {player} player on {game}", "record", "--game", game, "--player", player,
                      "--episodes", config.play_episodes, "--seed", seed + 5000, "--fps", config.fps,
                      "--max-seconds", config.play_seconds, "--out", baselines / player)

    # 6. report
    results = collect(out, config, stage.commands, time.time() - began)
    write_report(out, results)
    summary_line(results)
    return results


def fallback_threshold(report_file: Path, min_coverage: float = 0.1) -> list:
    """``--min-confidence`` for the labeler when no threshold reached the target precision.

    Then the calibrated threshold is missing and the labeler refuses to guess; the demo takes the
    most precise point of the held-out precision-coverage curve that keeps ``min_coverage`` of the
    steps, and the report says so.
    """
    selective = read_json(report_file)["selective"]
    if selective.get("threshold") is not None:
        return []
    curve = selective["curve"]
    usable = [i for i, c in enumerate(curve["coverage"]) if c >= min_coverage] or [0]
    best = max(usable, key=lambda i: curve["precision"][i])
    return ["--min-confidence", round(float(curve["threshold"][best]), 6)]


# --- gathering the numbers --------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def baseline_scores(store: Path) -> dict[str, dict]:
    scores: dict[str, list[float]] = {}
    for episode in ChunkStore(store):
        scores.setdefault(episode.game, []).append(float(episode.info["score"]))
    return {g: {"mean": float(np.mean(s)), "std": float(np.std(s)), "episodes": len(s)} for g, s in scores.items()}


MIN_ORACLE_GAIN = 0.1  # of the expert's lead over the random player: smaller gains are noise here


def recovered_share(labeled: float, pseudo: float, oracle: float, span: float | None = None) -> float | None:
    """The share of the oracle's gain over labeled-only that pseudo-labels recover.

    None when there is no gain to recover: the oracle did not beat labeled-only by at least
    ``MIN_ORACLE_GAIN`` of ``span`` (expert minus random, when known). With a few short episodes a
    smaller gain is within the scores' noise, and a share of it would mean nothing.
    """
    gain = oracle - labeled
    if gain <= 0 or (span is not None and gain < MIN_ORACLE_GAIN * max(span, 0.0)):
        return None
    return (pseudo - labeled) / gain


def hours(store: Path) -> float:
    return sum(e.duration for e in ChunkStore(store)) / 3600


def collect(out: Path, config: DemoConfig, commands: list[dict], seconds: float) -> dict:
    from walkthrough.label import grade

    data = out / "data"
    idm_heldout = read_json(out / "eval" / "idm-heldout" / "report.json")
    idm_walk = read_json(out / "eval" / "idm-walkthroughs" / "report.json")
    labels_summary = read_json(out / "labels" / "summary.json")
    graded = grade(out / "labels", data / "walkthroughs")
    scores = {name: {game: read_json(out / "play" / name / game / "scores.json") for game in config.all_games}
              for name in POLICIES}
    random_scores = baseline_scores(data / "baselines" / "random")
    expert_scores = baseline_scores(data / "baselines" / "expert")
    per_game = {}
    for game in config.all_games:
        means = {name: scores[name][game]["mean"] for name in POLICIES}
        random_, expert = random_scores.get(game), expert_scores.get(game)
        span = expert["mean"] - random_["mean"] if random_ and expert else None
        per_game[game] = {
            **{name: {"mean": means[name], "std": scores[name][game]["std"]} for name in POLICIES},
            "random": random_, "expert": expert,
            "recovered": recovered_share(means["labeled-only"], means["labeled+pseudo"], means["oracle"], span),
            "in_labeled_set": game in config.labeled_games,
        }
    shares = [g["recovered"] for g in per_game.values() if g["recovered"] is not None]
    return {
        "config": asdict(config),
        "seconds": seconds,
        "hours": {"labeled": hours(data / "labeled"), "walkthroughs": hours(data / "walkthroughs"),
                  "pseudo_labels_kept": labels_summary["hours_kept"]},
        "idm": {"heldout": idm_report_numbers(idm_heldout), "walkthroughs": idm_report_numbers(idm_walk),
                "threshold": idm_heldout["selective"]},
        "labels": {"summary": {k: labels_summary[k] for k in ("hours_in", "hours_kept", "dropped_hours",
                                                              "mean_confidence", "mean_confidence_kept",
                                                              "confidence_threshold")},
                   "before": pseudo_numbers(graded["before"]), "after": pseudo_numbers(graded["after"])},
        "play": per_game,
        "headline": {"recovered_share_mean": float(np.mean(shares)) if shares else None,
                     "games_with_oracle_gain": len(shares)},
        "commands": commands,
    }


def idm_report_numbers(report: dict) -> dict:
    keep = ("event_f1", "exact_onset_f1", "button_f1", "step_accuracy", "idle_accuracy", "stick_bin_accuracy", "ece")
    overall = {p: {k: report["overall"][p].get(k) for k in keep} for p in report["overall"]}
    per_game = {g: {p: s[p]["event_f1"] for p in ("idm", "repeat_previous", "always_idle")}
                for g, s in report["per_game"].items()}
    return {"steps": report["steps"], "overall": overall, "per_game_event_f1": per_game}


def pseudo_numbers(graded: dict) -> dict:
    """Event scores, and press precision / recall pooled over every button (micro average)."""
    if not graded.get("steps"):
        return {"hours": graded.get("hours", 0.0), "steps": 0}
    buttons = graded["buttons"].values()
    true_positives = sum(round(s["recall"] * s["support"]) for s in buttons if s["support"] > 0)
    predicted = sum(s["predicted"] for s in buttons)
    support = sum(s["support"] for s in buttons)
    return {"hours": graded["hours"], "steps": graded["steps"], "event_f1": graded["event_f1"],
            "event_precision": graded["event_precision"], "event_recall": graded["event_recall"],
            "button_precision": true_positives / predicted if predicted else None,
            "button_recall": true_positives / support if support else None,
            "step_accuracy": graded["step_accuracy"]}


# --- the report --------------------------------------------------------------------------------------
def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def plot_learning_curves(out: Path, file: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, runs, title in ((axes[0], ["idm"], "IDM"), (axes[1], [f"policy-{p}" for p in POLICIES], "policies")):
        for run in runs:
            path = out / "runs" / run / "metrics.jsonl"
            if not path.exists():
                continue
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            train = [r for r in rows if r.get("split") == "train" and "loss" in r]
            ax.plot([r["step"] for r in train], [r["loss"] for r in train], label=run)
        ax.set_title(f"{title}: training loss")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def plot_scores(results: dict, file: Path) -> None:
    games = list(results["play"])
    bars = [*POLICIES, "random", "expert"]
    fig, axes = plt.subplots(1, len(games), figsize=(4 * len(games), 3.5), squeeze=False)
    for ax, game in zip(axes[0], games):
        row = results["play"][game]
        means = [row[b]["mean"] if row[b] else 0.0 for b in bars]
        stds = [row[b]["std"] if row[b] else 0.0 for b in bars]
        ax.bar(range(len(bars)), means, yerr=stds, color=["tab:blue", "tab:green", "tab:purple", "tab:gray", "tab:orange"])
        ax.set_xticks(range(len(bars)), bars, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{game}{'' if row['in_labeled_set'] else ' (walkthroughs only)'}")
        ax.set_ylabel("score")
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def plot_label_examples(out: Path, file: Path, count: int = 6) -> None:
    """A few walkthrough frames with the true action and the IDM's pseudo-label."""
    from walkthrough import video

    truth = {e.video.resolve(): e for e in ChunkStore(out / "data" / "walkthroughs") if e.video is not None}
    picks = []
    for done_file in sorted((out / "labels" / "done").glob("*.json")):
        done = read_json(done_file)
        steps = out / "labels" / "steps" / f"{done['key']}.parquet"
        if done.get("status") != "labeled" or not steps.exists() or Path(done["path"]) not in truth:
            continue
        table = pq.read_table(steps)
        times = table.column("time").to_numpy()
        pred = A.from_table(table)
        episode = truth[Path(done["path"])]
        fps = done["steps"] / done["seconds_in"]
        true, valid = episode.actions_at(times, 1.0 / fps)
        active = np.flatnonzero(valid & A.is_active(true))
        if len(active):
            picks.append((episode, times, pred, true, table.column("confidence").to_numpy(), active[len(active) // 2]))
        if len(picks) >= count:
            break
    if not picks:
        return
    fig, axes = plt.subplots(1, len(picks), figsize=(2.6 * len(picks), 3.8), squeeze=False)
    for ax, (episode, times, pred, true, confidence, i) in zip(axes[0], picks):
        frame = video.read_frames(episode.video, float(times[i]), 1, 30.0)[0]
        ax.imshow(frame)
        ax.axis("off")
        ax.set_title(f"{episode.game} t={times[i]:.1f}s\ntrue: {pressed(true[i])}\nIDM: {pressed(pred[i])} "
                     f"({confidence[i]:.2f})", fontsize=7)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def pressed(action: np.ndarray) -> str:
    return ",".join(b.replace("dpad_", "") for j, b in enumerate(A.BUTTONS) if action[j] > 0.5) or "idle"


def write_report(out: Path, results: dict) -> None:
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    plot_learning_curves(out, plots / "learning_curves.png")
    plot_scores(results, plots / "scores.png")
    plot_label_examples(out, plots / "label_examples.png")
    write_json_atomic(out / "report.json", results)
    markdown = render_markdown(results)
    (out / "report.md").write_text(markdown)
    (out / "report.html").write_text(render_html(markdown))


def headline_text(r: dict) -> str:
    share, games = r["headline"]["recovered_share_mean"], r["headline"]["games_with_oracle_gain"]
    if share is None:
        return ("**Headline: the share of the oracle's gain that pseudo-labels recover is undefined in this run: "
                f"in no game did the oracle beat labeled-only by {100 * MIN_ORACLE_GAIN:.0f}% of the expert's lead "
                "over the random player** (per game below).")
    return (f"**Headline: pseudo-labels recover {100 * share:.0f}% of the oracle's gain over labeled-only** "
            f"(mean over the {games} game(s) where the oracle beat labeled-only by at least "
            f"{100 * MIN_ORACLE_GAIN:.0f}% of the expert's lead over the random player; smaller gains are "
            "within the noise of a few short episodes; per game below).")


def render_markdown(r: dict) -> str:
    head = r["headline"]["recovered_share_mean"]
    lines = [
        "# walkthrough demo report",
        "",
        f"Ran in {r['seconds'] / 60:.1f} min. Labeled data: {r['hours']['labeled'] * 60:.1f} min of play; "
        f"walkthroughs (actions hidden): {r['hours']['walkthroughs'] * 60:.1f} min; pseudo-labels kept: "
        f"{r['hours']['pseudo_labels_kept'] * 60:.1f} min.",
        "",
        headline_text(r),
        "",
        "## Inverse dynamics model",
        "",
        "Event F1 counts a predicted press onset within ±1 step of a true one; exact-onset F1 needs the same "
        "step (there, repeating the previous true action scores 0).",
        "",
        "| evaluated on | predictor | event F1 (±1) | exact-onset F1 | button F1 | step accuracy | idle accuracy | ECE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for split, title in (("heldout", "held-out labeled episodes"), ("walkthroughs", "walkthroughs (never seen)")):
        for predictor, s in r["idm"][split]["overall"].items():
            lines.append(f"| {title} | {predictor} | {fmt(s['event_f1'])} | {fmt(s['exact_onset_f1'])} | {fmt(s['button_f1'])} | "
                         f"{fmt(s['step_accuracy'])} | {fmt(s['idle_accuracy'])} | {fmt(s.get('ece'))} |")
    lines += ["", "Event F1 per game on the walkthroughs (IDM / repeat-previous / always-idle):", ""]
    for game, s in r["idm"]["walkthroughs"]["per_game_event_f1"].items():
        lines.append(f"- {game}: {fmt(s['idm'])} / {fmt(s['repeat_previous'])} / {fmt(s['always_idle'])}")
    sel = r["idm"]["threshold"]
    lines += ["", f"Confidence threshold (target precision, on held-out labeled episodes): {fmt(sel.get('threshold'), 4)}, "
              f"coverage {fmt(sel.get('coverage'))}, precision {fmt(sel.get('precision'))}.",
              "", "![precision vs coverage](eval/idm-heldout/precision_coverage.png)",
              "![calibration](eval/idm-heldout/calibration.png)", "",
              "## Pseudo-labels vs the hidden truth", "",
              "| | hours | event precision | event recall | event F1 | button precision | button recall | step accuracy |",
              "|---|---|---|---|---|---|---|---|"]
    for part in ("before", "after"):
        p = r["labels"][part]
        lines.append(f"| {part} filtering | {fmt(p.get('hours'), 4)} | {fmt(p.get('event_precision'))} | "
                     f"{fmt(p.get('event_recall'))} | {fmt(p.get('event_f1'))} | {fmt(p.get('button_precision'))} | "
                     f"{fmt(p.get('button_recall'))} | {fmt(p.get('step_accuracy'))} |")
    used = r["labels"]["summary"]["confidence_threshold"]
    source = "calibrated" if sel.get("threshold") is not None else (
        "no threshold reached the target precision: the most precise point of the held-out curve with >= 10% coverage")
    lines += ["", f"The labeler's confidence threshold: {fmt(used, 4)} ({source})."]
    dropped = ", ".join(f"{k}: {v * 60:.2f} min" for k, v in r["labels"]["summary"]["dropped_hours"].items())
    lines += ["", f"Dropped by reason: {dropped or 'nothing'}.", "", "![frames with true and pseudo actions](plots/label_examples.png)", "",
              "## Policies in closed loop", "",
              f"Score mean ± std over {r['config']['play_episodes']} episodes of at most {r['config']['play_seconds']:g} s.", "",
              "| game | labeled-only | labeled + pseudo | oracle | random | expert | recovered |",
              "|---|---|---|---|---|---|---|"]
    for game, g in r["play"].items():
        note = "" if g["in_labeled_set"] else " (walkthroughs only)"
        recovered = "n/a (oracle gain too small)" if g["recovered"] is None else f"{100 * g['recovered']:.0f}%"
        lines.append(f"| {game}{note} | {score_cell(g['labeled-only'])} | {score_cell(g['labeled+pseudo'])} | "
                     f"{score_cell(g['oracle'])} | {score_cell(g['random'])} | {score_cell(g['expert'])} | {recovered} |")
    lines += ["", "![scores](plots/scores.png)", "", "![learning curves](plots/learning_curves.png)", "",
              "## Rerun any stage", "", "Each stage was this command (run from the directory the demo ran in):", ""]
    for c in r["commands"]:
        lines.append(f"- {c['title']} ({c['seconds']:.0f} s): `{c['command']}`")
    return "\n".join(lines) + "\n"


def score_cell(score: dict | None) -> str:
    return "n/a" if not score else f"{score['mean']:.1f} ± {score['std']:.1f}"


def render_html(markdown: str) -> str:
    """A small, dependency-free rendering of the report's markdown (headings, tables, images, lists)."""
    body, in_table = [], False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            body.append(("<table>" if not in_table else "") + "<tr>" +
                        "".join(f"<{tag}>{inline(c)}</{tag}>" for c in cells) + "</tr>")
            in_table = True
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            body.append(f'<img alt="{html.escape(alt)}" src="{html.escape(src.rstrip(")"))}">')
        elif line.startswith("- "):
            body.append(f"<li>{inline(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}"
             "img{max-width:100%;margin:0.5em 0}code{background:#f4f4f4;padding:1px 4px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>walkthrough demo</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def inline(text: str) -> str:
    """Escape, then render **bold** and `code`."""
    text = html.escape(text)
    parts = text.split("`")
    text = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def summary_line(r: dict) -> None:
    from rich.table import Table

    table = Table(title="walkthrough demo: closed-loop scores (mean ± std)")
    for column in ("game", *POLICIES, "random", "expert", "recovered"):
        table.add_column(column)
    for game, g in r["play"].items():
        table.add_row(game, *(score_cell(g[p]) for p in POLICIES), score_cell(g["random"]), score_cell(g["expert"]),
                      "n/a" if g["recovered"] is None else f"{100 * g['recovered']:.0f}%")
    console.print(table)
    idm = r["idm"]["walkthroughs"]["overall"]
    console.print(f"IDM event F1 on walkthroughs: {fmt(idm['idm']['event_f1'])} (repeat-previous "
                  f"{fmt(idm['repeat_previous']['event_f1'])}, always-idle {fmt(idm['always_idle']['event_f1'])}); "
                  f"pseudo-labels kept {r['hours']['pseudo_labels_kept'] * 60:.1f} of "
                  f"{r['hours']['walkthroughs'] * 60:.1f} min; headline recovered share: "
                  f"{fmt(r['headline']['recovered_share_mean'])}", highlight=False)
