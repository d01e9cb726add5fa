import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from walkthrough import actions as A
from walkthrough import chunks
from walkthrough.chunks import ChunkStore, StoreError
from walkthrough.dataset import WindowDataset, WindowSpec
from walkthrough.video import VideoWriter

VIDEO_ID = "dQw4w9WgXcQ"
H, W, FPS, SECONDS = 240, 320, 30, 3.0
OVERLAY = [240, 140, 80, 60]  # x, y, w, h: a white "controller overlay" inside the game area
GAME_AREA = [0, 0, 320, 200]  # a red bar below it (y >= 200) is not game


def nitrogen_rows(n: int) -> pa.Table:
    """NitroGen-style actions: south tapped for exactly one 60 Hz row every 10 rows."""
    columns = {name: pa.array(np.zeros(n, bool)) for name in A.BUTTONS}
    columns["south"] = pa.array(np.arange(n) % 10 == 3)
    columns["j_left"] = pa.array([[0.5, -0.25]] * n, pa.list_(pa.float64()))
    columns["j_right"] = pa.array([[0.0, 0.0]] * n, pa.list_(pa.float64()))
    return pa.table(columns)


def nitrogen_meta(chunk: int, start: float, end: float, game_area=True) -> dict:
    meta = {
        "uuid": f"{VIDEO_ID}_chunk_{chunk:04d}_actions", "chunk_id": f"{chunk:04d}",
        "chunk_size": int(round((end - start) * 60)), "game": "other", "controller_type": "xboxone",
        "bbox_controller_overlay": OVERLAY,
        "original_video": {"video_id": VIDEO_ID, "source": "youtube", "url": f"https://youtu.be/{VIDEO_ID}",
                           "resolution": [H, W], "start_time": start, "end_time": end,
                           "duration": end - start, "start_frame": int(start * FPS), "end_frame": int(end * FPS)},
    }
    if game_area:
        meta["bbox_game_area"] = GAME_AREA
    return meta


@pytest.fixture(scope="module")
def nitrogen(tmp_path_factory):
    """A tiny NitroGen release: one shard tarball of two 1.5 s chunks, and the user's video."""
    base = tmp_path_factory.mktemp("nitrogen")
    shard = base / "build" / "SHARD_0000"
    for chunk, start in enumerate((0.0, 1.5)):
        d = shard / VIDEO_ID / f"{VIDEO_ID}_chunk_{chunk:04d}"
        d.mkdir(parents=True)
        pq.write_table(nitrogen_rows(90), d / "actions_raw.parquet")
        (d / "metadata.json").write_text(json.dumps(nitrogen_meta(chunk, start, start + 1.5)))
    (base / "actions").mkdir()
    with tarfile.open(base / "actions" / "SHARD_0000.tar.gz", "w:gz") as tar:
        tar.add(shard, arcname="SHARD_0000")
    videos = base / "downloads" / "nested"
    videos.mkdir(parents=True)
    with VideoWriter(videos / f"{VIDEO_ID}.mp4", FPS) as writer:
        for k in range(int(SECONDS * FPS)):
            frame = np.full((H, W, 3), 60 + k, np.uint8)
            x, y, w, h = OVERLAY
            frame[y:y + h, x:x + w] = 255
            frame[200:] = (255, 0, 0)
            writer.write(frame)
    return base


def test_reads_nitrogen_shard_tarball(nitrogen):
    store = ChunkStore(nitrogen / "actions" / "SHARD_0000.tar.gz", videos=nitrogen / "downloads")
    assert len(store) == 1
    episode = store.episodes[0]
    assert episode.video_id == VIDEO_ID and episode.game == "other"
    assert episode.video.name == f"{VIDEO_ID}.mp4"
    assert episode.actions.shape == (180, A.ACTION_DIM)
    np.testing.assert_allclose(episode.times[:3], [0, 1 / 60, 2 / 60])
    assert episode.times[90] == pytest.approx(1.5)
    assert episode.actions[0, A.BUTTON_INDEX["south"]] == 0
    assert episode.actions[3, A.BUTTON_INDEX["south"]] == 1
    np.testing.assert_allclose(episode.actions[0, 17:19], [0.5, -0.25])
    assert store.check() == []
    # a directory of shards works too, and extraction is cached
    again = ChunkStore(nitrogen / "actions", videos=nitrogen / "downloads")
    assert [e.video_id for e in again] == [VIDEO_ID]


def test_one_row_tap_survives_downsampling(nitrogen):
    episode = ChunkStore(nitrogen / "actions", videos=nitrogen / "downloads").episodes[0]
    times = np.arange(0, 3.0, 1 / 15)  # 4 rows of 60 Hz per step
    acts, valid = episode.actions_at(times, 1 / 15)
    assert valid.all()
    south = acts[:, A.BUTTON_INDEX["south"]]
    expected = [any((r % 10 == 3) for r in range(4 * k, 4 * k + 4)) for k in range(len(times))]
    np.testing.assert_array_equal(south, np.array(expected, np.float32))
    _, valid = episode.actions_at(np.array([3.5]), 1 / 15)  # past the labels
    assert not valid.any()


def test_frames_are_cropped_and_overlay_masked(nitrogen):
    store = ChunkStore(nitrogen / "actions", videos=nitrogen / "downloads")
    episode = store.episodes[0]
    assert episode.crop() == (0, 0, 320, 200)
    data = WindowDataset(store.episodes, WindowSpec(num_frames=2, num_actions=1, fps=15, size=(50, 80)))
    frames = data[5]["frames"].numpy()  # (2, 3, 50, 80)
    y0, y1, x0, x1 = episode.mask_box((50, 80))
    assert (y0, x0) == (35, 60) and (y1, x1) == (50, 80)
    assert frames[:, :, y0:y1, x0:x1].max() == 0  # overlay gone
    assert frames[:, 0, :30, :50].mean() > 50  # the game is there
    red = frames[:, 0] - frames[:, 1].astype(int)
    assert red.max() < 60  # the red bar below the game area was cropped away
    unmasked = ChunkStore(nitrogen / "actions", videos=nitrogen / "downloads", mask_overlay=False)
    raw = WindowDataset(unmasked.episodes, data.spec)[5]["frames"].numpy()
    assert raw[:, :, y0 + 2:y1 - 2, x0 + 2:x1 - 2].min() > 200


def make_store_dir(tmp_path, meta_edit=None, table=None):
    d = tmp_path / "actions" / VIDEO_ID / f"{VIDEO_ID}_chunk_0000"
    d.mkdir(parents=True)
    meta = nitrogen_meta(0, 0.0, 1.0, game_area=False)
    if meta_edit:
        meta_edit(meta)
    (d / "metadata.json").write_text(json.dumps(meta))
    pq.write_table(table if table is not None else nitrogen_rows(60), d / "actions_raw.parquet")
    return d


def test_missing_game_area_means_whole_frame(tmp_path):
    make_store_dir(tmp_path)
    episode = ChunkStore(tmp_path).episodes[0]
    assert episode.crop() is None and episode.game_area is None
    assert episode.mask_box((24, 32)) == (14, 20, 24, 32)  # 240x320 frame scaled by 0.1


def test_broken_metadata_is_named(tmp_path):
    d = make_store_dir(tmp_path)
    (d / "metadata.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"metadata\.json: broken JSON"):
        ChunkStore(tmp_path)


def test_missing_metadata_key_is_named(tmp_path):
    make_store_dir(tmp_path, lambda m: m["original_video"].pop("start_time"))
    with pytest.raises(StoreError, match="original_video.start_time"):
        ChunkStore(tmp_path)


def test_missing_and_extra_columns(tmp_path):
    d = make_store_dir(tmp_path, table=nitrogen_rows(60).drop_columns(["west"]).append_column(
        "mystery", pa.array(np.zeros(60))))
    store = ChunkStore(tmp_path)
    with pytest.raises(A.ActionError, match=r"actions_raw\.parquet: missing column\(s\) west"):
        store.episodes[0].actions
    problems = store.check()
    assert any("missing column(s) west" in p for p in problems)
    assert any("video file not found" in p for p in problems)


def test_extra_columns_are_ignored(tmp_path):
    make_store_dir(tmp_path, table=nitrogen_rows(60).append_column("frame", pa.array(np.arange(60))))
    assert ChunkStore(tmp_path).episodes[0].actions.shape == (60, 21)


def test_optional_processed_actions(tmp_path):
    d = make_store_dir(tmp_path)
    pq.write_table(nitrogen_rows(60), d / "actions_processed.parquet")
    chunk = ChunkStore(tmp_path).episodes[0].chunks[0]
    np.testing.assert_array_equal(chunk.actions(processed=True), chunk.actions())


def test_empty_or_missing_source(tmp_path):
    with pytest.raises(StoreError, match="no chunks found"):
        ChunkStore(tmp_path)
    with pytest.raises(StoreError, match="no such file"):
        ChunkStore(tmp_path / "nope")
    bad = tmp_path / "SHARD_0001.tar.gz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(StoreError, match="SHARD_0001.tar.gz: not a readable tar"):
        ChunkStore(bad)


def test_write_episode_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    acts = A.idle(1350)  # 45 s at 30 fps -> chunks of 20, 20, 5 s
    acts[:, :17] = rng.random((1350, 17)) < 0.2
    confidence = rng.random(1350).astype(np.float32)
    paths = chunks.write_episode(tmp_path, "Pong-expert-s0001", acts, 30.0, "Pong", (210, 160),
                                 {"player": "expert", "seed": 1}, {"confidence": confidence})
    assert [p.name for p in paths] == [f"Pong-expert-s0001_chunk_{i:04d}" for i in range(3)]
    assert chunks.episode_exists(tmp_path, "Pong-expert-s0001")
    meta = json.loads((paths[2] / "metadata.json").read_text())
    assert meta["chunk_size"] == 150 and meta["original_video"]["start_time"] == pytest.approx(40.0)
    assert meta["walkthrough"] == {"action_fps": 30.0, "player": "expert", "seed": 1}
    episode = ChunkStore(tmp_path).episodes[0]
    np.testing.assert_array_equal(episode.actions, acts)
    np.testing.assert_allclose(episode.column("confidence"), confidence)
    np.testing.assert_allclose(episode.times[-1], 1349 / 30)
    assert episode.info["player"] == "expert" and episode.game == "Pong"
    assert not list((tmp_path / "actions").glob(".*"))  # no staging left behind


def test_write_episode_rejects_bad_actions_and_leaves_nothing(tmp_path):
    acts = A.idle(10)
    acts[4, 3] = 2.0
    with pytest.raises(A.ActionError):
        chunks.write_episode(tmp_path, "x", acts, 30.0, "Pong", (210, 160), {})
    assert not chunks.episode_exists(tmp_path, "x")
