import numpy as np
import pyarrow as pa
import pytest

from walkthrough import actions as A


def random_actions(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros((n, A.ACTION_DIM), dtype=np.float32)
    out[:, :A.NUM_BUTTONS] = rng.random((n, A.NUM_BUTTONS)) < 0.3
    out[:, A.NUM_BUTTONS:] = rng.uniform(-1, 1, (n, A.NUM_AXES))
    return out


def test_schema_names_and_order():
    assert A.BUTTONS[0] == "back" and A.BUTTONS[-1] == "west" and A.NUM_BUTTONS == 17
    assert list(A.BUTTONS) == sorted(A.BUTTONS)  # NitroGen's column order is alphabetical
    assert A.ACTION_DIM == 21
    assert A.ACTION_NAMES[17:] == ("j_left_x", "j_left_y", "j_right_x", "j_right_y")


def test_table_round_trip_keeps_extra_columns():
    acts = random_actions(50)
    table = A.to_table(acts, {"confidence": np.linspace(0, 1, 50)})
    assert table.column("south").type == pa.bool_()
    assert table.column("j_left").to_pylist()[3] == pytest.approx(list(acts[3, 17:19]))
    np.testing.assert_array_equal(A.from_table(table), acts)


def test_missing_column_is_named():
    table = A.to_table(random_actions(4)).drop_columns(["dpad_up", "j_right"])
    with pytest.raises(A.ActionError, match="dpad_up, j_right"):
        A.from_table(table, "x.parquet")


def test_validation_errors_name_the_problem():
    acts = random_actions(3)
    acts[1, A.BUTTON_INDEX["east"]] = 0.5
    with pytest.raises(A.ActionError, match="'east'.*row 1"):
        A.validate(acts)
    acts = random_actions(3)
    acts[2, 19] = 1.5
    with pytest.raises(A.ActionError, match="j_right_x.*out of"):
        A.validate(acts)
    acts = random_actions(3)
    acts[0, 18] = np.nan
    with pytest.raises(A.ActionError, match="NaN.*j_left_y"):
        A.validate(acts)
    with pytest.raises(A.ActionError, match="shape"):
        A.validate(np.zeros((3, 20)))


def test_null_values_rejected():
    table = A.to_table(random_actions(3))
    index = table.column_names.index("south")
    table = table.set_column(index, "south", pa.array([True, None, False]))
    with pytest.raises(A.ActionError, match="'south' has 1 missing"):
        A.from_table(table)


def test_nitrogen_vector_round_trip():
    acts = random_actions(20, seed=1)
    packed = A.to_nitrogen_vector(acts)
    assert packed.shape == (20, 25)
    assert (packed[:, 17:21] == 0).all() and packed[:, 21:].min() >= 0 and packed[:, 21:].max() <= 1
    np.testing.assert_allclose(A.from_nitrogen_vector(packed), acts, atol=1e-6)


def test_ale_full_action_set_round_trips():
    for ale_id in range(18):
        pad = A.ale_to_gamepad(ale_id)
        assert A.gamepad_to_ale(pad) == ale_id
    assert set(np.flatnonzero(A.ale_to_gamepad(15))) == {
        A.BUTTON_INDEX["dpad_up"], A.BUTTON_INDEX["dpad_left"], A.BUTTON_INDEX["south"]}


def test_ale_nearest_available_action():
    breakout = [0, 1, 3, 4]  # NOOP FIRE RIGHT LEFT
    assert A.gamepad_to_ale(A.ale_to_gamepad(12), breakout) == 4  # LEFTFIRE -> LEFT (direction kept)
    assert A.gamepad_to_ale(A.ale_to_gamepad(10), breakout) == 1  # UPFIRE -> FIRE
    assert A.gamepad_to_ale(A.ale_to_gamepad(2), breakout) == 0  # UP -> NOOP
    stick_left = A.idle(1)[0]
    stick_left[17] = -0.9
    assert A.gamepad_to_ale(stick_left, breakout) == 4
    both = A.ale_to_gamepad(3) + A.ale_to_gamepad(4)  # left + right cancel
    assert A.gamepad_to_ale(both, breakout) == 0


def test_is_active():
    acts = A.idle(3)
    acts[1, 0] = 1
    acts[2, 20] = 0.1  # inside the dead zone
    assert A.is_active(acts).tolist() == [False, True, False]
