"""The labeler on real recorded Atari videos and on broken, odd and spliced files, with a real
(tiny, randomly initialised) IDM saved by the real checkpoint code."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from walkthrough import idm, label, train, video
from walkthrough.chunks import ChunkStore
from walkthrough.dataset import WindowDataset, WindowSpec

FPS = 15.0  # the IDM's rate: half the recordings' 30 fps, so the labeler must resample
OPEN = dict(min_confidence=0.0, idle_seconds=1e9, min_active_share=0.0)  # only the frame filters act


@pytest.fixture(scope="module")
def idm_run(tmp_path_factory) -> Path:
    """A tiny random IDM (T=4, 32x32 at 15 fps), saved as `train-idm` saves its runs."""
    torch.manual_seed(0)
    config = idm.IDMConfig(frames=4, size=(32, 32), fps=FPS, channels=(8,), dim=16, depth=1, heads=2)
    model = idm.IDM(config)
    with torch.no_grad():  # decisive heads, as a trained IDM's: no output sits on a 0.5 knife-edge
        model.head[-1].bias.uniform_(-4.0, 4.0)
    run = tmp_path_factory.mktemp("idm")
    train.save_checkpoint(run, model, None, torch.optim.AdamW(model.parameters()), train.TrainConfig(),
                          step=0, train_seconds=0.0, model_type="idm")
    return run


@pytest.fixture(scope="module")
def walkthroughs(recorded) -> Path:
    return recorded / "videos"


def run_label(inputs, run, out, **config) -> dict:
    return label.label(list(inputs), run, out, label.LabelConfig(**{**OPEN, **config}), progress=False)


def chunk_files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted((root / "actions").rglob("*")) if f.is_file()}


def test_labels_are_a_chunk_store_like_ground_truth(idm_run, walkthroughs, tmp_path):
    summary = run_label([walkthroughs], idm_run, tmp_path)
    store = ChunkStore(tmp_path)
    assert summary["videos_labeled"] == 4 and summary["videos_failed"] == 0 and len(store) >= 4
    for episode in store:
        source = episode.info["source_video"]
        assert episode.video == Path(source["path"]) and episode.video.parent == walkthroughs.resolve()
        assert source["sha256"] == label.file_sha256(episode.video)
        assert episode.info["action_fps"] == FPS and episode.info["idm"]["run"] == str(idm_run.resolve())
        assert episode.info["idm"]["step"] == 0 and len(episode.info["idm"]["weights_sha256"]) == 64
        assert episode.info["labeler"]["min_confidence"] == 0.0
        np.testing.assert_allclose(np.diff(episode.times), 1 / FPS, atol=1e-9)
        assert episode.start_time == pytest.approx(source["time_range"][0])
        assert episode.end_time == pytest.approx(source["time_range"][1])
        confidence = episode.column("confidence")
        assert confidence.shape == (len(episode.actions),) and ((confidence > 0) & (confidence <= 1)).all()
    dropped = sum(summary["dropped_hours"].values())
    assert summary["hours_in"] == pytest.approx(summary["hours_kept"] + dropped)
    assert summary["hours_in"] == pytest.approx(4 * (6 * FPS - 1) / FPS / 3600)  # 6 s videos, N - 1 steps
    # Training reads pseudo-labels with the ground-truth reader, confidence as the weight.
    dataset = WindowDataset.from_store(store, WindowSpec(num_frames=4, num_actions=3, fps=FPS, size=(32, 32)))
    item = dataset[len(dataset) // 2]
    assert item["frames"].shape == (4, 3, 32, 32) and item["action_mask"].all()
    assert ((item["weight"] > 0) & (item["weight"] <= 1)).all()


def test_bf16_is_on_where_native_and_labels_as_fp32_does(idm_run, walkthroughs, tmp_path):
    assert label.LabelConfig().bf16 == label.idm.native_bf16("cpu")
    assert label.LabelConfig(bf16=False).bf16 is False
    clip = sorted(walkthroughs.glob("*.mp4"))[0]
    steps = {}
    for bf16 in (False, True):
        run_label([clip], idm_run, tmp_path / str(bf16), crop_letterbox=False, bf16=bf16)
        steps[bf16] = pq.read_table(next((tmp_path / str(bf16) / "steps").glob("*.parquet")))
    same = (label.A.from_table(steps[True]) == label.A.from_table(steps[False])).all(-1).mean()
    drift = np.abs(steps[True].column("confidence").to_numpy() - steps[False].column("confidence").to_numpy())
    assert same >= 0.95 and drift.mean() < 0.01


@pytest.mark.parametrize("stride, batch_size", [(1, 256), (2, 5)])
def test_overlapping_windows_average_as_the_idm_does(idm_run, walkthroughs, tmp_path, monkeypatch, stride, batch_size):
    """Streamed in blocks, the averaged labels equal IDM.label over the whole clip in memory."""
    monkeypatch.setattr(label.StepAverager, "BLOCK", 8)  # release many times within one video
    clip = sorted(walkthroughs.glob("*.mp4"))[0]
    run_label([clip], idm_run, tmp_path, stride=stride, batch_size=batch_size, crop_letterbox=False, bf16=False)
    steps = pq.read_table(next((tmp_path / "steps").glob("*.parquet")))
    model = train.load_model(idm_run)
    frames = np.stack([f for _, f in video.iter_frames(clip, FPS, (32, 32))])  # (N, H, W, 3)
    expected = model.label(torch.from_numpy(frames).permute(0, 3, 1, 2), stride=stride)
    np.testing.assert_array_equal(label.A.from_table(steps), expected["actions"].numpy())
    np.testing.assert_allclose(steps.column("confidence").to_numpy(), expected["confidence"].numpy(), rtol=1e-4)
    motion = (np.abs(np.diff(frames.astype(np.int16), axis=0)) > label.MOTION_LEVEL).any(-1).mean((1, 2))
    np.testing.assert_allclose(steps.column("motion").to_numpy(), motion, rtol=1e-6)
    level = frames.reshape(len(frames), -1).mean(1)
    np.testing.assert_allclose(steps.column("brightness").to_numpy(), np.maximum(level[:-1], level[1:]), rtol=1e-6)


def test_broken_inputs_are_listed_and_the_rest_is_labeled(idm_run, walkthroughs, tmp_path):
    good = sorted(walkthroughs.glob("*.mp4"))[0]
    bad = tmp_path / "bad"
    (bad / "empty_dir").mkdir(parents=True)
    (bad / "zero.mp4").touch()
    (bad / "notes.mp4").write_text("not a video, whatever the name says\n")
    (bad / "readme.txt").write_text("hello\n")
    frames = [f for _, f in video.iter_frames(good)]
    with video.VideoWriter(bad / "cut.mkv", 30) as writer:  # streamable: decodes until the cut
        for frame in frames:
            writer.write(frame)
    data = (bad / "cut.mkv").read_bytes()
    (bad / "cut.mkv").write_bytes(data[:len(data) // 2])
    with av.open(str(bad / "sound.m4a"), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        sound = av.AudioFrame.from_ndarray((np.sin(np.arange(16000) / 10) * 8000).astype(np.int16)[None],
                                           format="s16", layout="mono")
        sound.sample_rate, sound.pts = 16000, 0
        container.mux(stream.encode(sound))
        container.mux(stream.encode(None))
    inputs = [good, bad / "empty_dir", bad / "zero.mp4", bad / "notes.mp4", bad / "readme.txt",
              bad / "cut.mkv", bad / "sound.m4a", tmp_path / "missing.mp4"]
    out = tmp_path / "labels"
    summary = run_label(inputs, idm_run, out)
    assert summary["videos_labeled"] == 1 and summary["videos_failed"] == 5 and summary["input_problems"] == 2
    failures = {Path(f["path"]).name: f["error"] for f in map(json.loads, (out / "failures.jsonl").open())}
    assert "empty file (0 bytes)" in failures["zero.mp4"]
    assert "cannot open as video" in failures["notes.mp4"] and "cannot open" in failures["readme.txt"]
    assert "truncated" in failures["cut.mkv"] or "corrupt" in failures["cut.mkv"]
    assert "no video stream" in failures["sound.m4a"]
    assert "no video files" in failures["empty_dir"] and "no such file" in failures["missing.mp4"]
    for name, error in failures.items():
        assert name in error  # every message names its file
    assert [e.video for e in ChunkStore(out)] == [good.resolve()]
    nothing = run_label([bad / "empty_dir"], idm_run, tmp_path / "nothing")
    assert nothing["input_problems"] == 1 and nothing["videos_labeled"] == 0


def splice(source: Path, path: Path) -> list[tuple[float, float, str]]:
    """Pong gameplay with a 1.5 s black stretch and a 1.5 s frozen one spliced in.
    Returns the (start, end, reason) of each splice in seconds."""
    frames = [f for _, f in video.iter_frames(source)]  # 6 s at 30 fps
    black, frozen = [np.zeros_like(frames[0])] * 45, [frames[119]] * 45
    with video.VideoWriter(path, 30) as writer:
        for frame in frames[:60] + black + frames[60:120] + frozen + frames[120:]:
            writer.write(frame)
    return [(2.0, 3.5, "dark"), (5.5, 7.0, "static")]


def test_black_and_frozen_stretches_are_dropped_for_their_reason(idm_run, walkthroughs, tmp_path):
    spliced = splice(walkthroughs / "Pong-expert-s0000.mp4", tmp_path / "spliced.mp4")
    summary = run_label([tmp_path / "spliced.mp4"], idm_run, tmp_path / "labels")
    steps = pq.read_table(next((tmp_path / "labels" / "steps").glob("*.parquet"))).to_pydict()
    times, reasons = np.array(steps["time"]), np.array(steps["reason"])
    for start, end, reason in spliced:
        inside = (times >= start + 0.1) & (times < end - 0.2)  # a transition into a splice moves
        assert (reasons[inside] == reason).all(), (reason, reasons[inside])
    assert summary["dropped_hours"]["dark"] * 3600 == pytest.approx(1.5, abs=0.2)
    assert summary["dropped_hours"]["static"] * 3600 == pytest.approx(1.5, abs=0.2)
    kept = [(e.start_time, e.end_time) for e in ChunkStore(tmp_path / "labels")]
    step = 1 / FPS  # the transition out of a splice (its last frame -> gameplay) is kept
    assert len(kept) == 3 and all(b <= start or a >= end - step - 1e-6 for a, b in kept for start, end, _ in spliced)


def test_filters_on_steps():
    """The stretch rules, NitroGen's chunk rule and the short rule, on hand-made steps at 10 fps."""
    south = label.A.BUTTON_INDEX["south"]
    actions = label.A.idle(200)
    actions[:, south] = 1.0
    actions[40:80] = 0.0  # 4 s without input
    actions[143:183:3] = 0.0  # input in 2 of 3 steps
    actions[183:200] = 0.0
    actions[183:200:3, south] = 1.0  # input in 1 of 3 steps
    confidence = np.full(200, 0.9, np.float32)
    confidence[100:103] = 0.1  # a 0.3 s dip
    brightness = np.full(200, 100.0, np.float32)
    brightness[10:12] = 0.0  # a 0.2 s black flash: too brief to drop
    steps = label.Steps(actions, confidence, brightness, np.full(200, 0.1, np.float32))
    config = label.LabelConfig(idle_seconds=3, low_confidence_seconds=0.2, chunk_seconds=4, min_segment_seconds=1)
    reasons = np.array(label.REASONS)[label.drop_reasons(steps, 10.0, 0.5, config)]
    assert (reasons[:40] == "kept").all() and (reasons[40:80] == "idle").all()
    assert (reasons[80:100] == "kept").all() and (reasons[100:103] == "low_confidence").all()
    # The kept stretch from 103 is written as 4 s chunks from its start: 103-143, 143-183, 183-200.
    assert (reasons[103:183] == "kept").all() and (reasons[183:200] == "inactive_chunk").all()
    config.min_segment_seconds = 2.5
    reasons = np.array(label.REASONS)[label.drop_reasons(steps, 10.0, 0.5, config)]
    assert (reasons[80:100] == "short").all() and (reasons[:40] == "kept").all()


def test_any_video_in_gives_rows_at_the_idm_rate(idm_run, walkthroughs, tmp_path):
    """VP9 webm at 25 fps pillarboxed to 16:9, H.264 mkv at 60 fps and 2x size, variable-rate mkv."""
    frames = [f for _, f in video.iter_frames(walkthroughs / "Breakout-random-s0100.mp4")]  # 210x160
    clips = tmp_path / "clips"
    clips.mkdir()
    with video.VideoWriter(clips / "boxed.webm", 25, codec="libvpx-vp9") as writer:
        for _, frame in zip(range(75), video.iter_frames(walkthroughs / "Breakout-random-s0100.mp4", 25)):
            writer.write(np.pad(frame[1], ((0, 0), (107, 107), (0, 0))))  # 210 x 374
    with video.VideoWriter(clips / "big.mkv", 60) as writer:
        for frame in frames[:90]:
            big = frame.repeat(2, 0).repeat(2, 1)
            writer.write(big)
            writer.write(big)
    with av.open(str(clips / "vfr.mkv"), "w") as container:  # frames 20 to 50 ms apart
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 160, 210, "yuv420p"
        stream.time_base = Fraction(1, 1000)
        pts = np.cumsum(np.random.default_rng(0).integers(20, 51, size=90))
        for frame, t in zip(frames, pts):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture.pts, picture.time_base = int(t), Fraction(1, 1000)
            container.mux(stream.encode(picture))
        container.mux(stream.encode(None))
    out = tmp_path / "labels"
    summary = run_label([clips], idm_run, out, min_segment_seconds=0.0, static_seconds=1e9)
    assert summary["videos_labeled"] == 3 and summary["videos_failed"] == 0
    for episode in ChunkStore(out):
        name = episode.video.name
        np.testing.assert_allclose(np.diff(episode.times), 1 / FPS, atol=1e-9)
        assert episode.start_time * FPS == pytest.approx(round(episode.start_time * FPS))
        if name == "boxed.webm":
            x, y, w, h = episode.crop()
            assert abs(x - 107) <= 2 and abs(w - 160) <= 4 and (y, h) == (0, 210)
        else:
            assert episode.crop() is None
    durations = {Path(d["path"]).name: d["seconds_in"] for d in map(json.loads, map(Path.read_text,
                                                                                    (out / "done").glob("*.json")))}
    assert durations["boxed.webm"] == pytest.approx(3.0, abs=0.15)
    assert durations["big.mkv"] == pytest.approx(3.0, abs=0.15)


def test_letterbox_is_not_found_in_atari_screens(walkthroughs):
    for clip in sorted(walkthroughs.glob("*.mp4")):
        assert label.find_letterbox(clip, video.probe(clip)) is None


def test_restart_after_kill_9_loses_and_duplicates_nothing(idm_run, walkthroughs, tmp_path):
    inputs = tmp_path / "videos"
    inputs.mkdir()
    for copy in range(2):
        for clip in sorted(walkthroughs.glob("*.mp4")):
            shutil.copy(clip, inputs / f"{clip.stem}-{copy}.mp4")
    command = [str(Path(sys.executable).parent / "walkthrough"), "label", str(inputs), "--ckpt", str(idm_run),
               "--min-confidence", "0", "--json", "--out"]
    # Both runs in fresh processes: torch settings other tests change must not tell them apart.
    subprocess.run(command + [str(tmp_path / "whole")], check=True, capture_output=True)

    killed = tmp_path / "killed"
    command.append(str(killed))
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # a loaded machine can take minutes to start it; normally seconds
    while time.time() < deadline and len(list((killed / "done").glob("*.json"))) < 2:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(list((killed / "done").glob("*.json")))
    assert 2 <= done_before < 8, "the run must be killed midway"
    subprocess.run(command, check=True, capture_output=True)
    assert chunk_files(killed) == chunk_files(tmp_path / "whole")
    assert not list(killed.rglob("*.tmp"))
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["run"]["skipped_done"] == done_before and summary["videos_labeled"] == 8


def test_the_threshold_is_the_one_eval_idm_calibrated(idm_run, walkthroughs, tmp_path):
    clip = sorted(walkthroughs.glob("*.mp4"))[0]
    with pytest.raises(ValueError, match="eval-idm"):
        label.label([clip], idm_run, tmp_path / "none", progress=False)
    run = tmp_path / "run"
    shutil.copytree(idm_run, run)
    (run / idm.CALIBRATION_FILE).write_text(json.dumps({"confidence_threshold": 1e-3, "target_precision": 0.9}))
    config = label.LabelConfig(idle_seconds=1e9, min_active_share=0.0)
    summary = label.label([clip], run, tmp_path / "labels", config, progress=False)
    assert summary["confidence_threshold"] == 1e-3 and summary["hours_kept"] > 0
    assert all(e.info["confidence_threshold"] == 1e-3 for e in ChunkStore(tmp_path / "labels"))


def test_a_restart_clears_leftovers_of_an_unfinished_video(idm_run, walkthroughs, tmp_path):
    clip = sorted(walkthroughs.glob("*.mp4"))[0]
    run_label([clip], idm_run, tmp_path)
    job = label.VideoJob.for_path(clip)
    (tmp_path / "done" / f"{job.key}.json").unlink()  # as if killed before the marker
    stale = tmp_path / "actions" / f"{job.key}-seg007"
    staging = tmp_path / "actions" / f".{job.key}-seg000.123.abc.tmp"
    stale.mkdir()
    staging.mkdir()
    summary = run_label([clip], idm_run, tmp_path)
    assert not stale.exists() and not staging.exists() and summary["run"]["labeled_now"] == 1


def test_shards_split_the_inputs(idm_run, walkthroughs, tmp_path):
    for i in range(3):
        summary = run_label([walkthroughs], idm_run, tmp_path, shard=f"{i}/3")
        assert summary["run"]["skipped_done"] == 0
    assert summary["videos_labeled"] == 4  # the store's totals cover every shard written so far


def test_grade_against_the_true_actions(idm_run, recorded, tmp_path):
    run_label([recorded / "videos"], idm_run, tmp_path, min_confidence=0.0, dark_brightness=0.0)
    graded = label.grade(tmp_path, recorded)
    assert graded["before"]["steps"] == 4 * (6 * FPS - 1)
    assert 0 < graded["hours_kept"] <= graded["hours_in"]
    for part in ("before", "after"):
        assert set(graded[part]["buttons"]) == set(label.A.BUTTONS) and "event_f1" in graded[part]


def test_ray_backend_writes_what_local_writes(idm_run, walkthroughs, tmp_path):
    pytest.importorskip("ray")
    clips = sorted(walkthroughs.glob("*.mp4"))[:2]
    run_label(clips, idm_run, tmp_path / "local")
    run_label(clips, idm_run, tmp_path / "ray", backend="ray")
    local, ray = ChunkStore(tmp_path / "local"), ChunkStore(tmp_path / "ray")
    assert [e.video_id for e in local] == [e.video_id for e in ray]
    for a, b in zip(local, ray):
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.times, b.times)
        np.testing.assert_allclose(a.column("confidence"), b.column("confidence"), rtol=1e-4)
