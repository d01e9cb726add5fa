"""Metrics for predicted vs true gamepad actions, generic over (N, 21) action arrays.

The IDM, the pseudo-labels and the policy are all graded with these. Rows are action steps in
time order; ``segment`` (N,) ids say which contiguous stretch (an episode) a row belongs to, so
that "the previous step" never reaches into another episode.

Per-frame accuracy alone misleads: buttons are mostly idle and presses are held, so copying the
previous action is right on almost every frame while it never catches a press when it starts.
Hence, beside per-button precision/recall/F1:

- **event F1**: a press *onset* (pressed now, not pressed at the previous step) counts as found
  when the prediction has an onset of the same button within ``tolerance`` steps; each onset
  matches at most once.
- **stick bin accuracy and R^2**, on the 11 bins the IDM predicts (centres -1, -0.8, ..., 1).
- **idle accuracy**: is the step idle (nothing pressed, sticks centred) or not.
- **calibration and selective prediction**, given a per-step confidence: a step is *correct*
  when every button matches and every stick lands in the right bin; ECE compares confidence to
  that correctness, and the precision-vs-coverage curve says how many steps survive a
  confidence threshold and how often the survivors are right.

Ratios with nothing to count (0 / 0) are NaN: a button nobody pressed has no recall, and a
predictor that never presses it has no precision.
"""

from __future__ import annotations

import math

import numpy as np

from walkthrough import actions as A

STICK_BINS = 11
STICK_CENTRES = np.linspace(-1.0, 1.0, STICK_BINS)  # -1, -0.8, ..., 1


def stick_bin(values: np.ndarray, bins: int = STICK_BINS) -> np.ndarray:
    """Stick values in [-1, 1] -> index of the nearest of ``bins`` evenly spaced centres."""
    return np.clip(np.rint((np.asarray(values) + 1.0) / 2.0 * (bins - 1)), 0, bins - 1).astype(np.int64)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def _scores(tp: int, fp: int, fn: int) -> dict[str, float]:
    return {"precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn), "support": tp + fn, "predicted": tp + fp}


def _check(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, true = np.asarray(pred, np.float32), np.asarray(true, np.float32)
    if pred.shape != true.shape or pred.ndim != 2 or pred.shape[1] != A.ACTION_DIM:
        raise ValueError(f"expected two (N, {A.ACTION_DIM}) arrays, got {pred.shape} and {true.shape}")
    return pred, true


def _segments(segment: np.ndarray | None, n: int) -> np.ndarray:
    return np.zeros(n, np.int64) if segment is None else np.asarray(segment)


# --- buttons ------------------------------------------------------------------------------------

def button_scores(pred: np.ndarray, true: np.ndarray) -> dict[str, dict[str, float]]:
    """Per-button precision / recall / F1 over all steps, plus support (true presses)."""
    pred, true = _check(pred, true)
    p, t = pred[:, :A.NUM_BUTTONS] > 0.5, true[:, :A.NUM_BUTTONS] > 0.5
    tp, fp, fn = (p & t).sum(0), (p & ~t).sum(0), (~p & t).sum(0)
    return {name: _scores(int(tp[i]), int(fp[i]), int(fn[i])) for i, name in enumerate(A.BUTTONS)}


def onsets(buttons: np.ndarray, segment: np.ndarray | None = None) -> np.ndarray:
    """(N, K) pressed -> (N, K) onsets: pressed now and not at the previous step of the segment.

    A segment's first step has no previous step, so it is never an onset.
    """
    pressed = np.asarray(buttons) > 0.5
    segment = _segments(segment, len(pressed))
    out = np.zeros_like(pressed)
    same = segment[1:] == segment[:-1]  # (N-1,) step i+1 continues step i
    out[1:] = pressed[1:] & ~pressed[:-1] & same[:, None]
    return out


def match_events(pred_steps: np.ndarray, true_steps: np.ndarray, tolerance: int) -> int:
    """How many true events a predicted event lies within ``tolerance`` steps of (one-to-one).

    Both inputs sorted ascending. Greedy in time order is optimal here: every true event takes
    the earliest unused prediction that can still reach it.
    """
    matched, j = 0, 0
    for t in true_steps:
        while j < len(pred_steps) and pred_steps[j] < t - tolerance:
            j += 1
        if j < len(pred_steps) and pred_steps[j] <= t + tolerance:
            matched += 1
            j += 1
    return matched


def event_scores(pred: np.ndarray, true: np.ndarray, segment: np.ndarray | None = None,
                 tolerance: int = 1) -> dict[str, dict[str, float]]:
    """Precision / recall / F1 of press onsets per button, and ``"all"`` pooled over buttons."""
    pred, true = _check(pred, true)
    segment = _segments(segment, len(true))
    # Steps of different segments are pushed apart so that no match can cross a boundary.
    starts = np.concatenate([[0], np.cumsum(segment[1:] != segment[:-1])])
    position = np.arange(len(true)) + starts * (tolerance + 1)
    p_on = onsets(pred[:, :A.NUM_BUTTONS], segment)
    t_on = onsets(true[:, :A.NUM_BUTTONS], segment)
    out, totals = {}, np.zeros(3, np.int64)
    for i, name in enumerate(A.BUTTONS):
        p_steps, t_steps = position[p_on[:, i]], position[t_on[:, i]]
        tp = match_events(p_steps, t_steps, tolerance)
        counts = np.array([tp, len(p_steps) - tp, len(t_steps) - tp])
        totals += counts
        out[name] = _scores(*(int(c) for c in counts))
    out["all"] = _scores(*(int(c) for c in totals))
    return out


# --- sticks and idle ----------------------------------------------------------------------------

def stick_scores(pred: np.ndarray, true: np.ndarray) -> dict[str, dict[str, float]]:
    """Per stick axis: accuracy of the 11-bin index, and R^2 of the values (NaN if constant)."""
    pred, true = _check(pred, true)
    out = {}
    for i, name in enumerate(A.STICK_AXES):
        p, t = pred[:, A.NUM_BUTTONS + i], true[:, A.NUM_BUTTONS + i]
        total = float(((t - t.mean()) ** 2).sum())
        r2 = 1.0 - float(((p - t) ** 2).sum()) / total if total > 1e-12 else math.nan
        out[name] = {"bin_accuracy": float((stick_bin(p) == stick_bin(t)).mean()), "r2": r2}
    return out


def idle_scores(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Idle = nothing pressed and sticks in their centre bin. Accuracy of that yes/no, and the
    share of truly idle steps predicted idle (what a filter of idle stretches relies on)."""
    pred, true = _check(pred, true)
    p_idle, t_idle = ~step_active(pred), ~step_active(true)
    return {"accuracy": float((p_idle == t_idle).mean()),
            "idle_recall": _ratio(float((p_idle & t_idle).sum()), float(t_idle.sum())),
            "idle_share": float(t_idle.mean())}


def step_active(actions: np.ndarray) -> np.ndarray:
    """(N, 21) -> (N,) bool: a button pressed or a stick out of its centre bin."""
    centre = STICK_BINS // 2
    return (actions[:, :A.NUM_BUTTONS] > 0.5).any(1) | (stick_bin(actions[:, A.NUM_BUTTONS:]) != centre).any(1)


def step_correct(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(N,) bool: every button right and every stick in the right bin."""
    pred, true = _check(pred, true)
    buttons = ((pred[:, :A.NUM_BUTTONS] > 0.5) == (true[:, :A.NUM_BUTTONS] > 0.5)).all(1)
    sticks = (stick_bin(pred[:, A.NUM_BUTTONS:]) == stick_bin(true[:, A.NUM_BUTTONS:])).all(1)
    return buttons & sticks


# --- confidence -----------------------------------------------------------------------------------

def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> dict:
    """Expected calibration error over ``bins`` equal-width confidence bins, with the curve.

    ECE = sum over bins of (share of steps in the bin) * |accuracy - mean confidence|.
    """
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, bool)
    which = np.clip((confidence * bins).astype(np.int64), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    mean_conf = np.bincount(which, confidence, bins) / np.maximum(count, 1)
    accuracy = np.bincount(which, correct.astype(np.float64), bins) / np.maximum(count, 1)
    ece = float((count * np.abs(accuracy - mean_conf)).sum() / max(len(confidence), 1))
    used = count > 0
    return {"ece": ece, "confidence": mean_conf[used].tolist(), "accuracy": accuracy[used].tolist(),
            "count": count[used].tolist()}


def precision_coverage(confidence: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """Keeping only steps with confidence >= threshold, for every distinct threshold (descending):
    the share of steps kept (coverage) and the share of kept steps that are correct (precision)."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, bool)
    order = np.argsort(-confidence, kind="stable")
    conf = confidence[order]
    kept = np.arange(1, len(conf) + 1)
    right = np.cumsum(correct[order])
    last = np.flatnonzero(np.append(conf[1:] != conf[:-1], True))  # last step of each tie group
    return {"threshold": conf[last], "coverage": kept[last] / len(conf), "precision": right[last] / kept[last]}


def threshold_for_precision(confidence: np.ndarray, correct: np.ndarray, target: float) -> dict:
    """The lowest confidence threshold whose kept steps reach ``target`` precision (so the most
    coverage at that precision). ``threshold`` is None when no threshold reaches it."""
    curve = precision_coverage(confidence, correct)
    ok = np.flatnonzero(curve["precision"] >= target)
    if len(ok) == 0:
        return {"target_precision": target, "threshold": None, "coverage": 0.0, "precision": math.nan}
    best = ok[-1]  # thresholds descend, so the last one reaching the target keeps the most
    return {"target_precision": target, "threshold": float(curve["threshold"][best]),
            "coverage": float(curve["coverage"][best]), "precision": float(curve["precision"][best])}


# --- baselines ------------------------------------------------------------------------------------

def repeat_previous(true: np.ndarray, segment: np.ndarray | None = None) -> np.ndarray:
    """The "nothing changes" baseline: each step gets the true action of the step before (idle at
    a segment's first step). It sees the true past, which a labeler never has: a generous floor."""
    true = np.asarray(true, np.float32)
    segment = _segments(segment, len(true))
    out = A.idle(len(true))
    same = segment[1:] == segment[:-1]
    out[1:][same] = true[:-1][same]
    return out


def always_idle(true: np.ndarray) -> np.ndarray:
    """The "nobody touches the pad" baseline."""
    return A.idle(len(true))


# --- everything at once ---------------------------------------------------------------------------

def summarize(pred: np.ndarray, true: np.ndarray, segment: np.ndarray | None = None,
              confidence: np.ndarray | None = None, tolerance: int = 1) -> dict:
    """Every metric above for one predictor, as a JSON-ready dict.

    Headline numbers: ``event_f1`` (onsets pooled over buttons), ``button_f1`` (macro mean over
    buttons that were pressed at least once), ``button_accuracy`` (per button per frame),
    ``step_accuracy`` (whole action right), ``idle_accuracy``, ``stick_bin_accuracy``, and with a
    confidence ``ece``.
    """
    pred, true = _check(pred, true)
    buttons = button_scores(pred, true)
    events = event_scores(pred, true, segment, tolerance)
    exact = event_scores(pred, true, segment, tolerance=0)["all"]
    sticks = stick_scores(pred, true)
    idle = idle_scores(pred, true)
    pressed = [s["f1"] for s in buttons.values() if s["support"] > 0]
    correct = step_correct(pred, true)
    out = {
        "steps": len(true),
        "event_f1": events["all"]["f1"],
        "event_precision": events["all"]["precision"],
        "event_recall": events["all"]["recall"],
        "exact_onset_f1": exact["f1"],
        "button_f1": float(np.mean(pressed)) if pressed else math.nan,
        "button_accuracy": float(((pred[:, :A.NUM_BUTTONS] > 0.5) == (true[:, :A.NUM_BUTTONS] > 0.5)).mean()),
        "step_accuracy": float(correct.mean()),
        "idle_accuracy": idle["accuracy"],
        "idle_recall": idle["idle_recall"],
        "stick_bin_accuracy": float(np.mean([s["bin_accuracy"] for s in sticks.values()])),
        "buttons": buttons,
        "events": events,
        "sticks": sticks,
    }
    if confidence is not None:
        cal = calibration(confidence, correct)
        out["ece"] = cal["ece"]
        out["calibration"] = cal
        out["mean_confidence"] = float(np.mean(confidence))
    return out
