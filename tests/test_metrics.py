"""Action metrics against hand-computed values."""

import json
import math

import numpy as np
import pytest

from walkthrough import actions as A
from walkthrough import metrics as M

SOUTH, X = A.BUTTON_INDEX["south"], A.NUM_BUTTONS  # X: j_left_x


def presses(column: int, pattern: list[int]) -> np.ndarray:
    """(N, 21) actions with one button following ``pattern``."""
    out = A.idle(len(pattern))
    out[:, column] = pattern
    return out


def test_button_precision_recall_f1():
    pred, true = presses(SOUTH, [1, 1, 0, 0, 1]), presses(SOUTH, [1, 0, 0, 1, 1])
    south = M.button_scores(pred, true)["south"]
    assert south["precision"] == pytest.approx(2 / 3) and south["recall"] == pytest.approx(2 / 3)
    assert south["f1"] == pytest.approx(2 / 3) and south["support"] == 3
    untouched = M.button_scores(pred, true)["west"]  # never pressed, never predicted: undefined
    assert math.isnan(untouched["precision"]) and math.isnan(untouched["f1"])


def test_event_f1_matches_onsets_within_tolerance():
    true = presses(SOUTH, [0, 1, 1, 0, 0, 1, 1, 0])  # onsets at 1 and 5
    pred = presses(SOUTH, [0, 0, 1, 1, 0, 0, 0, 1])  # onsets at 2 and 7
    assert M.event_scores(pred, true, tolerance=0)["south"]["f1"] == 0.0
    one = M.event_scores(pred, true, tolerance=1)["south"]  # 1 <-> 2 matches, 5 vs 7 does not
    assert (one["precision"], one["recall"], one["f1"]) == (0.5, 0.5, 0.5)
    assert M.event_scores(pred, true, tolerance=2)["south"]["f1"] == 1.0
    assert M.event_scores(pred, true, tolerance=1)["all"]["f1"] == 0.5  # pooled over buttons


def test_each_onset_matches_once():
    true = presses(SOUTH, [0, 0, 1, 0, 1])  # onsets at 2 and 4
    pred = presses(SOUTH, [0, 0, 0, 1, 0])  # one onset at 3, within 1 of both
    south = M.event_scores(pred, true, tolerance=1)["south"]
    assert (south["precision"], south["recall"], south["f1"]) == (1.0, 0.5, pytest.approx(2 / 3))


def test_segments_bound_onsets_and_matches():
    pressed = presses(SOUTH, [0, 0, 1, 1, 0])
    segment = np.array([0, 0, 0, 1, 1])
    # Step 3 starts a new segment: pressed there is not an onset (no previous step is known).
    assert M.onsets(pressed[:, :A.NUM_BUTTONS], segment)[:, SOUTH].tolist() == [0, 0, 1, 0, 0]
    true, pred = presses(SOUTH, [0, 0, 1, 0, 0]), presses(SOUTH, [0, 0, 0, 0, 1])
    assert M.event_scores(pred, true, tolerance=2)["south"]["f1"] == 1.0
    assert M.event_scores(pred, true, segment, tolerance=2)["south"]["f1"] == 0.0  # no match across


def test_repeat_previous_is_right_per_frame_but_late_on_every_press():
    pattern = [0] * 100
    pattern[20:40] = [1] * 20
    pattern[60:80] = [1] * 20
    true = presses(SOUTH, pattern)
    copy = M.repeat_previous(true)
    scores = M.summarize(copy, true)
    assert scores["button_accuracy"] > 0.99 and scores["step_accuracy"] == 0.96  # wrong on 4 changes
    assert scores["exact_onset_f1"] == 0.0  # every onset comes one step late...
    assert scores["event_f1"] == 1.0  # ...which a +-1 step tolerance forgives
    idle = M.summarize(M.always_idle(true), true)
    assert idle["step_accuracy"] == 0.6 and idle["event_f1"] == 0.0 and idle["idle_recall"] == 1.0


def test_repeat_previous_restarts_at_each_segment():
    true = presses(SOUTH, [1, 1, 1, 1])
    copy = M.repeat_previous(true, np.array([0, 0, 1, 1]))
    assert copy[:, SOUTH].tolist() == [0, 1, 0, 1]


def test_stick_bins_and_r2():
    true, pred = A.idle(4), A.idle(4)
    true[:, X] = [-1.0, 0.0, 1.0, 0.5]
    pred[:, X] = [-1.0, 0.0, 0.8, 0.6]
    assert M.stick_bin(true[:, X]).tolist() == [0, 5, 10, 8]  # 7.5 rounds to even
    x = M.stick_scores(pred, true)["j_left_x"]
    assert x["bin_accuracy"] == 0.75
    assert x["r2"] == pytest.approx(1 - 0.05 / 2.1875, abs=1e-6)
    assert math.isnan(M.stick_scores(pred, true)["j_right_y"]["r2"])  # constant truth: undefined


def test_idle_and_step_correctness():
    true = presses(SOUTH, [0, 1, 0, 0])
    pred = presses(SOUTH, [0, 1, 1, 0])
    pred[3, X] = 0.05  # inside the centre bin: still idle and still right
    assert M.step_correct(pred, true).tolist() == [True, True, False, True]
    idle = M.idle_scores(pred, true)
    assert idle["accuracy"] == 0.75 and idle["idle_recall"] == pytest.approx(2 / 3) and idle["idle_share"] == 0.75


def test_expected_calibration_error():
    cal = M.calibration(np.array([0.9, 0.9, 0.6, 0.6]), np.array([1, 0, 1, 1], bool), bins=10)
    assert cal["ece"] == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert cal["count"] == [2, 2] and cal["accuracy"] == [1.0, 0.5]


def test_precision_coverage_and_threshold():
    confidence = np.array([0.9, 0.8, 0.8, 0.3])
    correct = np.array([1, 1, 0, 0], bool)
    curve = M.precision_coverage(confidence, correct)  # ties count together
    assert curve["threshold"].tolist() == [0.9, 0.8, 0.3]
    assert curve["coverage"].tolist() == [0.25, 0.75, 1.0]
    assert curve["precision"].tolist() == pytest.approx([1.0, 2 / 3, 0.5])
    best = M.threshold_for_precision(confidence, correct, 0.6)
    assert (best["threshold"], best["coverage"]) == (0.8, 0.75)
    assert M.threshold_for_precision(confidence, correct, 1.0)["threshold"] == 0.9
    assert M.threshold_for_precision(confidence, np.zeros(4, bool), 0.5)["threshold"] is None


def test_summary_is_complete():
    rng = np.random.default_rng(0)
    true = (rng.random((50, A.ACTION_DIM)) < 0.2).astype(np.float32)
    true[:, A.NUM_BUTTONS:] = rng.uniform(-1, 1, (50, A.NUM_AXES))
    scores = M.summarize(true, true, confidence=np.ones(50))
    assert scores["event_f1"] == scores["step_accuracy"] == scores["button_f1"] == 1.0
    assert scores["ece"] == 0.0 and all(s["r2"] == 1.0 for s in scores["sticks"].values())
    json.dumps(scores)  # JSON-ready (NaN aside, which the report turns into null)
