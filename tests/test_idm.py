"""The IDM: shapes, inference helpers, that it learns motion, and `train-idm` / `eval-idm` end to end."""

import json
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from walkthrough import actions as A
from walkthrough import idm, train
from walkthrough.cli import app
from walkthrough.metrics import STICK_BINS, STICK_CENTRES

TINY = dict(frames=3, size=(16, 16), channels=(4,), dim=16, depth=1, heads=2)
RIGHT, LEFT = A.BUTTON_INDEX["dpad_right"], A.BUTTON_INDEX["dpad_left"]


def tiny(**changes) -> idm.IDM:
    torch.manual_seed(0)
    return idm.IDM(idm.IDMConfig(**{**TINY, **changes}))


def test_predict_gives_probabilities_actions_and_confidence_per_transition():
    out = tiny().predict(torch.randint(0, 256, (2, 5, 3, 16, 16), dtype=torch.uint8))  # T = 3 and 2 context frames
    assert out["button_prob"].shape == (2, 2, A.NUM_BUTTONS)
    assert out["stick_logits"].shape == out["stick_prob"].shape == (2, 2, A.NUM_AXES, STICK_BINS)
    assert out["actions"].shape == (2, 2, A.ACTION_DIM)
    assert ((out["confidence"] > 0) & (out["confidence"] <= 1)).all()
    with pytest.raises(ValueError, match="windows of 3 frames plus 2 context frames"):
        tiny().predict(torch.zeros(1, 3, 3, 16, 16, dtype=torch.uint8))


def test_motion_input_is_a_reparametrised_space_time_convolution():
    conv3d = torch.nn.Conv3d(3, 4, kernel_size=3, padding=(0, 1, 1))
    x = torch.randn(2, 5, 3, 8, 8)  # (B, T, C, H, W)
    padded = torch.cat([x[:, :1], x, x[:, -1:]], dim=1)  # the window's ends repeated in time
    expected = conv3d(padded.transpose(1, 2)).transpose(1, 2)  # Conv3d wants (B, C, T, H, W)
    w_prev, w_now, w_next = conv3d.weight.unbind(2)  # (out, in, 3, 3) per time offset
    g = idm.MOTION_GAIN  # a x + b g (next - x) + c g (x - prev) == w_prev prev + w_now x + w_next next
    weight = torch.cat([w_prev + w_now + w_next, w_next / g, -w_prev / g], dim=1)
    motion = idm.with_motion(padded.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)  # (B, T, 9, H, W)
    got = F.conv2d(motion.flatten(0, 1), weight, conv3d.bias, padding=1).view_as(expected)
    assert torch.allclose(got, expected, atol=1e-5)


def test_decode_and_confidence_definitions():
    button_prob = torch.full((1, A.NUM_BUTTONS), 0.01)
    button_prob[0, RIGHT] = 0.8
    stick_prob = torch.zeros(1, A.NUM_AXES, STICK_BINS)
    stick_prob[..., STICK_BINS // 2] = 1.0
    stick_prob[0, 0] = torch.zeros(STICK_BINS).index_fill(0, torch.tensor([9, 10]), 0.5)
    stick_prob[0, 0, 9] = 0.6
    stick_prob[0, 0, 10] = 0.4
    action = idm.decode(button_prob, stick_prob)[0]
    assert action[RIGHT] == 1 and action[:A.NUM_BUTTONS].sum() == 1
    assert action[A.NUM_BUTTONS] == pytest.approx(STICK_CENTRES[9]) and (action[A.NUM_BUTTONS + 1:] == 0).all()
    expected = 0.8 * 0.99 ** (A.NUM_BUTTONS - 1) * 0.6
    assert idm.confidence(button_prob, stick_prob).item() == pytest.approx(expected, rel=1e-5)


def test_a_frames_features_do_not_depend_on_its_window():
    model = tiny().eval()
    clip = torch.randint(0, 256, (1, 8, 3, 16, 16), dtype=torch.uint8)
    whole = model.encode_frames(clip)  # (1, 8, D): the clip's ends repeated, as a video's
    padded = idm.repeat_edges(clip)  # (1, 10, ...): padded[:, j + 1] is frame j
    for s in range(6):  # the window of frames s..s+2 with its context frames: frame 3 in every position
        window = model.encode_frames(padded[:, s:s + 5], context=True)  # (1, 3, D)
        torch.testing.assert_close(window, whole[:, s:s + 3], atol=1e-5, rtol=1e-5)
    assert model.encode_frames(clip[:, 2:5]).shape == (1, 3, 16)


def test_label_with_frames_encoded_once_equals_every_window_on_its_own():
    model = tiny().eval()
    frames = torch.randint(0, 256, (9, 3, 16, 16), dtype=torch.uint8)
    padded = idm.repeat_edges(frames[None])[0]  # a video's ends: no motion beyond them
    for stride, block in [(1, 256), (1, 2), (2, 3)]:
        out = model.label(frames, stride=stride, block=block)
        assert out["actions"].shape == (8, A.ACTION_DIM) and out["confidence"].shape == (8,)
        starts = sorted(set(range(0, 7, stride)) | {6})  # windows of T = 3, and one ending on the last frame
        naive = model.predict(torch.stack([padded[s:s + 5] for s in starts]))  # each window re-encoded
        button_sum, count = torch.zeros(8, A.NUM_BUTTONS), torch.zeros(8, 1)
        for j, s in enumerate(starts):
            button_sum[s:s + 2] += naive["button_prob"][j]
            count[s:s + 2] += 1
        torch.testing.assert_close(out["button_prob"], button_sum / count, atol=1e-5, rtol=1e-5)
    assert model.label(frames[:2])["actions"].shape == (1, A.ACTION_DIM)  # shorter than a window


def test_an_older_checkpoint_fails_with_one_clear_line(tmp_path):
    model = tiny()
    train.save_checkpoint(tmp_path, model, None, torch.optim.AdamW(model.parameters()), train.TrainConfig(),
                          step=0, train_seconds=0.0, model_type="idm")
    assert train.load_model(tmp_path).config.input_format == idm.INPUT_FORMAT
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["model"]["input_format"]  # as every checkpoint before the format was recorded
    (tmp_path / "config.json").write_text(json.dumps(saved))
    expected = f"checkpoint {tmp_path} was written by an older walkthrough (IDM input format 1); retrain it"
    with pytest.raises(ValueError) as error:
        train.load_model(tmp_path)
    assert str(error.value) == expected
    result = runner.invoke(app, ["eval-idm", "--ckpt", str(tmp_path), "--data", str(tmp_path), "--out",
                                 str(tmp_path / "eval")])
    assert result.exit_code == 2 and "IDM input format 1" in result.output


def moving_square(actions: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Frames of a square that moves 2 px right / left on dpad_right / dpad_left. (T, 3, 16, 16)."""
    x, frames = int(torch.randint(4, 10, (1,), generator=g)), []
    for t in range(len(actions) + 1):
        frame = torch.zeros(3, 16, 16, dtype=torch.uint8)
        frame[:, 6:10, x:x + 3] = 255
        frames.append(frame)
        if t < len(actions):
            x += 2 * int(actions[t, RIGHT]) - 2 * int(actions[t, LEFT])
    return torch.stack(frames)


def test_idm_learns_actions_it_can_see():
    model = tiny(frames=2, channels=(8,), dim=32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def batch(n: int) -> dict:
        actions = torch.zeros(n, 1, A.ACTION_DIM)
        actions[:, 0, RIGHT] = (torch.rand(n, generator=g) < 0.4).float()
        actions[:, 0, LEFT] = (1 - actions[:, 0, RIGHT]) * (torch.rand(n, generator=g) < 0.5).float()
        frames = idm.repeat_edges(torch.stack([moving_square(a, g) for a in actions]))  # (n, 4, 3, 16, 16)
        return {"frames": frames, "actions": actions,
                "action_mask": torch.ones(n, 1, dtype=torch.bool), "weight": torch.ones(n, 1)}

    for _ in range(120):
        loss, _ = model.loss(batch(32))
        loss.backward()
        opt.step()
        opt.zero_grad()
    test = batch(64)
    predicted = model.predict(test["frames"])["actions"]
    assert (predicted == test["actions"]).all(-1).float().mean() > 0.95


def test_config_round_trips_through_json():
    config = idm.preset("cpu", frames=8)
    assert idm.IDMConfig.from_dict(json.loads(json.dumps(asdict(config)))) == config
    assert idm.preset("gpu").size == (128, 128)
    with pytest.raises(ValueError, match="at least 2 frames"):
        idm.IDMConfig(frames=1)


# --- the commands ---------------------------------------------------------------------------------
runner = CliRunner()
TRAIN = ["--size", "32", "--frames", "3", "--steps", "4", "--batch-size", "8", "--eval-every", "2",
         "--log-every", "2", "--num-workers", "0", "--val-fraction", "0.25"]


@pytest.fixture(scope="module")
def trained(recorded, tmp_path_factory):
    run = tmp_path_factory.mktemp("idm") / "run"
    result = runner.invoke(app, ["train-idm", "--data", str(recorded), "--out", str(run), *TRAIN])
    assert result.exit_code == 0, result.output
    return run


def test_train_idm_writes_a_run_validated_on_held_out_episodes(trained, recorded):
    saved = json.loads((trained / "config.json").read_text())
    assert saved["model_type"] == "idm" and saved["step"] == 4 and saved["model"]["frames"] == 3
    assert (saved["train"]["batch_size"], saved["train"]["eval_every"], saved["train"]["num_workers"]) == (8, 2, 0)
    assert saved["data"]["sources"] == [str(recorded.resolve())] and saved["data"]["val_episodes"] == 1
    split = json.loads((trained / "split.json").read_text())
    assert len(split["train"]) == 3 and len(split["val"]) == 1 and not set(split["train"]) & set(split["val"])
    val = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()
           if '"val"' in line]
    assert [v["step"] for v in val] == [2, 4] and all("event_f1" in v for v in val)
    # resuming a finished run has nothing left to do; a new run may not overwrite it
    assert runner.invoke(app, ["train-idm", "--out", str(trained), "--resume", *TRAIN]).exit_code == 0
    assert json.loads((trained / "config.json").read_text())["step"] == 4
    result = runner.invoke(app, ["train-idm", "--data", str(recorded), "--out", str(trained), *TRAIN])
    assert result.exit_code == 2 and "--resume" in result.output


def test_eval_idm_reports_baselines_plots_and_calibrates(trained, recorded, tmp_path):
    result = runner.invoke(app, ["eval-idm", "--ckpt", str(trained), "--data", str(recorded),
                                 "--out", str(tmp_path), "--target-precision", "0.5"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["split"] == "held-out" and len(report["episodes"]) == 1
    assert set(report["overall"]) == {"idm", "repeat_previous", "always_idle"}
    game = next(iter(report["per_game"].values()))
    assert set(game) >= {"idm", "repeat_previous", "always_idle"} and "event_f1" in game["idm"]
    assert all((tmp_path / f).stat().st_size > 0 for f in ("button_f1.png", "calibration.png",
                                                           "precision_coverage.png"))
    calibration = idm.load_calibration(trained)
    assert calibration["target_precision"] == 0.5 and calibration["step"] == 4
    assert calibration["confidence_threshold"] == report["selective"]["threshold"]


def test_unseen_data_evaluates_with_split_all(trained, recorded, tmp_path):
    args = ["eval-idm", "--ckpt", str(trained), "--data", str(recorded), "--out", str(tmp_path),
            "--split", "all", "--max-seconds", "2", "--no-calibrate"]
    assert runner.invoke(app, args).exit_code == 0
    assert len(json.loads((tmp_path / "report.json").read_text())["episodes"]) == 4


@pytest.mark.parametrize("args, message", [
    (["train-idm", "--out", "RUN"], "no training data"),
    (["train-idm", "--data", "EMPTY", "--out", "RUN"], "no chunks found"),
    (["train-idm", "--data", "MISSING", "--out", "RUN"], "no such file"),
    (["eval-idm", "--ckpt", "EMPTY", "--data", "EMPTY", "--out", "EVAL"], "no checkpoint"),
])
def test_bad_input_exits_with_one_line(args, message, tmp_path):
    (tmp_path / "EMPTY").mkdir()
    args = [str(tmp_path / a) if a.isupper() else a for a in args]
    result = runner.invoke(app, args)
    text = " ".join(result.output.split())  # rich wraps long lines at the test console's width
    assert result.exit_code == 2 and text.startswith("error:") and text.count("error:") == 1
    assert message in text
