"""IDM evaluation (`walkthrough eval-idm`): metrics beside their floors, calibration, plots.

    run + chunk store -> label every held-out episode (overlapping windows, as the labeler does)
      -> metrics for the IDM and for two baselines on the same steps:
           repeat_previous  each step copies the true action before it (it sees the true past)
           always_idle      nothing pressed, sticks centred
      -> overall and per game; precision vs coverage of the IDM's confidence, and the lowest
         threshold that reaches the target precision
      -> EVAL/report.json, EVAL/*.png, and RUN/calibration.json for the labeler

The threshold is chosen on the data evaluated here, so evaluate on held-out episodes of the
games you will label (the default, ``--split held-out``, skips every episode the run trained on).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

from walkthrough import actions as A
from walkthrough import metrics as M
from walkthrough.chunks import ChunkStore, StoreError, write_json_atomic
from walkthrough.idm import CALIBRATION_FILE, SPLIT_FILE, Labelled, label_episode, native_bf16
from walkthrough.train import load_model, read_run_config

HEADLINE = ("event_f1", "exact_onset_f1", "button_f1", "button_accuracy", "step_accuracy",
            "idle_accuracy", "stick_bin_accuracy", "ece")
PREDICTORS = ("idm", "repeat_previous", "always_idle")


def compare(rows: Labelled) -> dict[str, dict]:
    """Every metric for the IDM and both baselines on the same steps."""
    return {
        "idm": M.summarize(rows.pred, rows.true, rows.segment, rows.confidence),
        "repeat_previous": M.summarize(M.repeat_previous(rows.true, rows.segment), rows.true, rows.segment),
        "always_idle": M.summarize(M.always_idle(rows.true), rows.true, rows.segment),
    }


def headline(summary: dict) -> dict[str, float]:
    return {k: summary[k] for k in HEADLINE if k in summary}


def build_report(rows: Labelled, target_precision: float) -> dict:
    """The report: overall (full detail), per game (headline numbers), selective prediction."""
    overall = compare(rows)
    per_game = {}
    for game in sorted(set(rows.game)):
        scores = compare(rows.where(rows.game == game))
        per_game[game] = {"steps": int((rows.game == game).sum()),
                          **{name: headline(s) for name, s in scores.items()}}
    correct = M.step_correct(rows.pred, rows.true)
    curve = M.precision_coverage(rows.confidence, correct)
    keep = np.unique(np.linspace(0, len(curve["threshold"]) - 1, 200).astype(int))  # enough to plot
    return {
        "steps": len(rows.true),
        "overall": overall,
        "per_game": per_game,
        "selective": {**M.threshold_for_precision(rows.confidence, correct, target_precision),
                      "curve": {k: v[keep].tolist() for k, v in curve.items()}},
    }


# --- plots --------------------------------------------------------------------------------------------
COLOURS = {"idm": "tab:blue", "repeat_previous": "tab:orange", "always_idle": "tab:gray"}


def plot_button_f1(report: dict, file: Path) -> None:
    """Per-button F1 of the IDM and the baselines, for buttons pressed in the data."""
    buttons = [b for b in A.BUTTONS if report["overall"]["idm"]["buttons"][b]["support"] > 0]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(buttons) + 1), 3.5))
    width = 0.8 / len(PREDICTORS)
    for i, name in enumerate(PREDICTORS):
        f1 = [np.nan_to_num(report["overall"][name]["buttons"][b]["f1"]) for b in buttons]
        event = [np.nan_to_num(report["overall"][name]["events"][b]["f1"]) for b in buttons]
        x = np.arange(len(buttons)) + (i - 1) * width
        ax.bar(x, f1, width, color=COLOURS[name], label=f"{name} (frame F1)")
        ax.scatter(x, event, color="black", marker="_", s=120, zorder=3, label="event F1" if i == 0 else None)
    ax.set_xticks(np.arange(len(buttons)), buttons)
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.set_title("per-button F1 (bars: per frame; ticks: press onsets within +-1 step)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def plot_calibration(report: dict, file: Path) -> None:
    """Reliability diagram: accuracy of the whole step vs stated confidence, per bin."""
    cal = report["overall"]["idm"]["calibration"]
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
    ax.plot(cal["confidence"], cal["accuracy"], marker="o", color=COLOURS["idm"])
    ax.set_xlabel("confidence")
    ax.set_ylabel("share of steps fully right")
    ax.set_title(f"calibration (ECE {cal['ece']:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def plot_precision_coverage(report: dict, file: Path) -> None:
    """Precision of the steps kept vs the share kept; the baselines keep everything (one point)."""
    sel = report["selective"]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(sel["curve"]["coverage"], sel["curve"]["precision"], color=COLOURS["idm"], label="idm")
    for name in PREDICTORS[1:]:
        ax.scatter([1.0], [report["overall"][name]["step_accuracy"]], color=COLOURS[name], label=name, zorder=3)
    ax.axhline(sel["target_precision"], color="gray", linestyle="--", linewidth=1)
    if sel["threshold"] is not None:
        ax.scatter([sel["coverage"]], [sel["precision"]], color="red", zorder=4,
                   label=f"threshold {sel['threshold']:.3f}: {sel['coverage']:.0%} kept")
    ax.set_xlabel("coverage (share of steps kept)")
    ax.set_ylabel("precision (kept steps fully right)")
    ax.set(xlim=(0, 1.02), ylim=(0, 1.02))
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


# --- the command ----------------------------------------------------------------------------------------
def json_ready(value):
    """NaN -> None (JSON has no NaN), numpy scalars -> Python, recursively."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def evaluate_run(run_dir: Path, sources: list[Path], out: Path, split: str = "held-out",
                 target_precision: float = 0.95, ema: bool = True, max_seconds: float | None = None,
                 calibrate: bool = True, bf16: bool | None = None) -> dict:
    """Evaluate the IDM of ``run_dir`` on ``sources``; write ``out/report.json`` and plots, and
    (``calibrate``) the confidence threshold for ``target_precision`` to ``run_dir/calibration.json``.

    ``split="held-out"``: every episode of ``sources`` the run did not train on (its held-out
    split when ``sources`` is its training data); ``"all"``: every episode. ``max_seconds`` caps
    each episode. ``bf16`` (None: where it is native, as the labeler decides) should match the
    labeler's, so that the calibrated threshold means the same there.
    """
    if split not in ("held-out", "all"):
        raise ValueError(f"split must be 'held-out' or 'all', got {split!r}")
    saved = read_run_config(run_dir)
    if saved["model_type"] != "idm":
        raise ValueError(f"{run_dir}: holds a {saved['model_type']} model, not an IDM")
    model = load_model(run_dir, ema=ema)
    episodes = [e for e in ChunkStore(sources).episodes if e.video is not None]
    if split == "held-out":
        if not (Path(run_dir) / SPLIT_FILE).exists():
            raise StoreError(f"{run_dir}: no {SPLIT_FILE} says which episodes it trained on; use --split all")
        trained_on = set(json.loads((Path(run_dir) / SPLIT_FILE).read_text())["train"])
        episodes = [e for e in episodes if e.video_id not in trained_on]
        if not episodes:
            raise StoreError(f"{', '.join(map(str, sources))}: the run trained on every episode here")
    if not episodes:
        raise StoreError(f"{', '.join(map(str, sources))}: no episode has its video file")
    if bf16 is None:
        bf16 = native_bf16(next(model.parameters()).device)
    rows = Labelled.concat([label_episode(model, e, max_seconds=max_seconds, bf16=bf16) for e in episodes])
    report = {"run": str(Path(run_dir).resolve()), "step": saved["step"], "weights": "ema" if ema else "raw",
              "bf16": bf16,
              "data": [str(Path(s).resolve()) for s in sources], "split": split,
              "episodes": [e.video_id for e in episodes], "model": saved["model"],
              **build_report(rows, target_precision)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "report.json", json_ready(report))
    plot_button_f1(report, out / "button_f1.png")
    plot_calibration(report, out / "calibration.png")
    plot_precision_coverage(report, out / "precision_coverage.png")
    if calibrate:
        sel = report["selective"]
        write_json_atomic(Path(run_dir) / CALIBRATION_FILE, json_ready({
            "confidence_threshold": sel["threshold"], "target_precision": target_precision,
            "coverage": sel["coverage"], "precision": sel["precision"], "step": saved["step"],
            "weights": report["weights"], "episodes": len(episodes), "steps": report["steps"],
            "report": str(out.resolve() / "report.json"),
        }))
    return report
