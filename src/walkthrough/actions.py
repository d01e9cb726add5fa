"""The action schema: NitroGen's gamepad, and the Atari joystick mapped onto it.

A gamepad action is 17 boolean buttons and two analog sticks. Models see it as one flat float
vector of ``ACTION_DIM = 21`` values, in this order (documented once, used everywhere):

    index  0..16  buttons, in ``BUTTONS`` order, 0.0 or 1.0
    index 17, 18  j_left  x, y   in [-1, 1]
    index 19, 20  j_right x, y   in [-1, 1]

Stick convention (NitroGen's): (-1, -1) is the top-left, so y grows downwards.

On disk (``actions_raw.parquet``) each button is a boolean column named as in ``BUTTONS`` and each
stick is a two-float list column (``j_left``, ``j_right``), one row per action step.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

BUTTONS: tuple[str, ...] = (
    "back", "dpad_down", "dpad_left", "dpad_right", "dpad_up", "east", "guide",
    "left_shoulder", "left_thumb", "left_trigger", "north", "right_shoulder", "right_thumb",
    "right_trigger", "south", "start", "west",
)
STICKS: tuple[str, ...] = ("j_left", "j_right")
NUM_BUTTONS = len(BUTTONS)  # 17
STICK_AXES: tuple[str, ...] = ("j_left_x", "j_left_y", "j_right_x", "j_right_y")
NUM_AXES = len(STICK_AXES)  # 4
ACTION_DIM = NUM_BUTTONS + NUM_AXES  # 21
ACTION_NAMES: tuple[str, ...] = BUTTONS + STICK_AXES
BUTTON_INDEX = {name: i for i, name in enumerate(BUTTONS)}

# NitroGen's released model packs 21 button slots (4 unused) then the sticks rescaled to [0, 1].
NITROGEN_BUTTON_SLOTS = 21
NITROGEN_VECTOR_DIM = NITROGEN_BUTTON_SLOTS + NUM_AXES


class ActionError(ValueError):
    """An action table or vector that breaks the schema."""


def idle(n: int = 1) -> np.ndarray:
    """``n`` actions with nothing pressed and both sticks centred. (n, 21) float32."""
    return np.zeros((n, ACTION_DIM), dtype=np.float32)


def validate(actions: np.ndarray, where: str = "actions") -> np.ndarray:
    """Check a (N, 21) action array: finite, buttons in {0, 1}, sticks in [-1, 1]."""
    actions = np.asarray(actions, dtype=np.float32)
    if actions.ndim != 2 or actions.shape[1] != ACTION_DIM:
        raise ActionError(f"{where}: expected shape (N, {ACTION_DIM}), got {actions.shape}")
    bad = ~np.isfinite(actions)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ActionError(f"{where}: NaN or infinite value in '{ACTION_NAMES[col]}' at row {row}")
    buttons = actions[:, :NUM_BUTTONS]
    if not np.isin(buttons, (0.0, 1.0)).all():
        row, col = np.argwhere(~np.isin(buttons, (0.0, 1.0)))[0]
        raise ActionError(
            f"{where}: button '{BUTTONS[col]}' must be 0 or 1, got {buttons[row, col]} at row {row}"
        )
    sticks = actions[:, NUM_BUTTONS:]
    if (np.abs(sticks) > 1.0 + 1e-6).any():
        row, col = np.argwhere(np.abs(sticks) > 1.0 + 1e-6)[0]
        raise ActionError(
            f"{where}: stick axis '{STICK_AXES[col]}' out of [-1, 1]: {sticks[row, col]} at row {row}"
        )
    return actions


def from_table(table: pa.Table, where: str = "actions table") -> np.ndarray:
    """A NitroGen-format action table -> (N, 21) float32. Extra columns are ignored."""
    missing = [c for c in BUTTONS + STICKS if c not in table.column_names]
    if missing:
        raise ActionError(f"{where}: missing column(s) {', '.join(missing)}")
    n = table.num_rows
    out = np.zeros((n, ACTION_DIM), dtype=np.float32)
    for i, name in enumerate(BUTTONS):
        column = table.column(name)
        if column.null_count:
            raise ActionError(f"{where}: column '{name}' has {column.null_count} missing value(s)")
        out[:, i] = column.to_numpy(zero_copy_only=False).astype(np.float32)
    for s, name in enumerate(STICKS):
        column = table.column(name)
        if column.null_count:
            raise ActionError(f"{where}: column '{name}' has {column.null_count} missing value(s)")
        try:
            xy = np.asarray(column.to_pylist(), dtype=np.float32).reshape(n, 2)
        except (ValueError, TypeError) as e:
            raise ActionError(f"{where}: column '{name}' must hold [x, y] pairs ({e})") from None
        out[:, NUM_BUTTONS + 2 * s: NUM_BUTTONS + 2 * s + 2] = xy
    return validate(out, where)


def to_table(actions: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> pa.Table:
    """(N, 21) actions -> a NitroGen-format table; ``extra`` adds columns (e.g. confidence)."""
    actions = validate(actions)
    columns: dict[str, pa.Array] = {
        name: pa.array(actions[:, i] > 0.5, type=pa.bool_()) for i, name in enumerate(BUTTONS)
    }
    for s, name in enumerate(STICKS):
        xy = actions[:, NUM_BUTTONS + 2 * s: NUM_BUTTONS + 2 * s + 2]
        columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(xy.reshape(-1), pa.float32()), 2)
    for name, values in (extra or {}).items():
        columns[name] = pa.array(np.asarray(values))
    return pa.table(columns)


def to_nitrogen_vector(actions: np.ndarray) -> np.ndarray:
    """(N, 21) -> NitroGen's packed (N, 25): 21 button slots (last 4 zero), sticks in [0, 1]."""
    actions = validate(actions)
    out = np.zeros((len(actions), NITROGEN_VECTOR_DIM), dtype=np.float32)
    out[:, :NUM_BUTTONS] = actions[:, :NUM_BUTTONS]
    out[:, NITROGEN_BUTTON_SLOTS:] = (actions[:, NUM_BUTTONS:] + 1.0) / 2.0
    return out


def from_nitrogen_vector(packed: np.ndarray) -> np.ndarray:
    """NitroGen's packed (N, 25) -> (N, 21); buttons thresholded at 0.5 as NitroGen decodes."""
    packed = np.asarray(packed, dtype=np.float32)
    if packed.ndim != 2 or packed.shape[1] != NITROGEN_VECTOR_DIM:
        raise ActionError(f"expected shape (N, {NITROGEN_VECTOR_DIM}), got {packed.shape}")
    out = np.zeros((len(packed), ACTION_DIM), dtype=np.float32)
    out[:, :NUM_BUTTONS] = packed[:, :NUM_BUTTONS] > 0.5
    out[:, NUM_BUTTONS:] = np.clip(packed[:, NITROGEN_BUTTON_SLOTS:] * 2.0 - 1.0, -1.0, 1.0)
    return out


def is_active(actions: np.ndarray, stick_deadzone: float = 0.2) -> np.ndarray:
    """(N, 21) -> (N,) bool: any button pressed or any stick outside the dead zone."""
    actions = np.asarray(actions)
    return (actions[:, :NUM_BUTTONS] > 0.5).any(1) | (
        np.abs(actions[:, NUM_BUTTONS:]) > stick_deadzone
    ).any(1)


# --- Atari --------------------------------------------------------------------------------------
# ALE's full action set, in ALE's numbering. Each is a d-pad direction plus optionally fire,
# which we put on `south` (the A button on an Xbox pad).
ALE_ACTIONS: tuple[str, ...] = (
    "NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN", "UPRIGHT", "UPLEFT", "DOWNRIGHT", "DOWNLEFT",
    "UPFIRE", "RIGHTFIRE", "LEFTFIRE", "DOWNFIRE", "UPRIGHTFIRE", "UPLEFTFIRE", "DOWNRIGHTFIRE",
    "DOWNLEFTFIRE",
)
_DIRECTION_BUTTON = {"UP": "dpad_up", "DOWN": "dpad_down", "LEFT": "dpad_left", "RIGHT": "dpad_right"}
ATARI_BUTTONS: tuple[str, ...] = ("dpad_up", "dpad_down", "dpad_left", "dpad_right", "south")


def _ale_parts(name: str) -> frozenset[str]:
    """'UPLEFTFIRE' -> {'dpad_up', 'dpad_left', 'south'}."""
    parts, rest = set(), name
    if rest.endswith("FIRE"):
        parts.add("south")
        rest = rest[: -len("FIRE")]
    for word in ("UP", "DOWN", "LEFT", "RIGHT"):
        if word in rest:
            parts.add(_DIRECTION_BUTTON[word])
    return frozenset(parts)


def ale_to_gamepad(ale_action: int) -> np.ndarray:
    """An ALE action id (full action set numbering, 0..17) -> one (21,) gamepad action."""
    if not 0 <= int(ale_action) < len(ALE_ACTIONS):
        raise ActionError(f"ALE action must be in 0..{len(ALE_ACTIONS) - 1}, got {ale_action}")
    out = np.zeros(ACTION_DIM, dtype=np.float32)
    for button in _ale_parts(ALE_ACTIONS[int(ale_action)]):
        out[BUTTON_INDEX[button]] = 1.0
    return out


def gamepad_to_ale(action: np.ndarray, available: list[int] | tuple[int, ...] | None = None,
                   stick_threshold: float = 0.5) -> int:
    """One (21,) gamepad action -> the ALE action id (full numbering) it means.

    The d-pad or the left stick (past ``stick_threshold``) gives the direction; ``south`` fires.
    Opposite directions cancel. Where the game's ``available`` (minimal) set lacks that exact
    combination, the closest available one is taken: the one sharing most parts and adding fewest
    (fire is dropped before a direction), NOOP when nothing matches.
    """
    action = np.asarray(action, dtype=np.float32)
    pressed = {b for b in ATARI_BUTTONS if action[BUTTON_INDEX[b]] > 0.5}
    x, y = action[NUM_BUTTONS], action[NUM_BUTTONS + 1]
    if x <= -stick_threshold:
        pressed.add("dpad_left")
    if x >= stick_threshold:
        pressed.add("dpad_right")
    if y <= -stick_threshold:
        pressed.add("dpad_up")
    if y >= stick_threshold:
        pressed.add("dpad_down")
    for a, b in (("dpad_up", "dpad_down"), ("dpad_left", "dpad_right")):
        if a in pressed and b in pressed:
            pressed -= {a, b}
    candidates = range(len(ALE_ACTIONS)) if available is None else available

    def closeness(ale_id: int) -> tuple[int, int, int]:
        parts = _ale_parts(ALE_ACTIONS[ale_id])
        shared_directions = len((parts & pressed) - {"south"})
        return (len(parts & pressed) + shared_directions, -len(parts - pressed), -ale_id)

    return max(candidates, key=closeness)
