"""The chunk store: NitroGen's on-disk layout, read and written.

    ROOT/actions/<video_id>/<video_id>_chunk_NNNN/actions_raw.parquet
                                                /actions_processed.parquet   (optional)
                                                /metadata.json
    ROOT/videos/<video_id>.mp4                   (our recordings; NitroGen users bring their own)

One reader serves real NitroGen shards (extracted directories or the ``SHARD_XXXX.tar.gz``
files), our game recordings and pseudo-labels. Each chunk covers ~20 s of one video. NitroGen
stores 60 action rows per second; our writers record their own rate in
``metadata["walkthrough"]["action_fps"]`` (NitroGen's metadata has no such key, so 60 is assumed).
Action row i of a chunk happens at video time ``original_video.start_time + i / action_fps``.

Everything we add to NitroGen's metadata lives under the ``"walkthrough"`` key, so files we write
stay readable by NitroGen's own tools.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import uuid as uuidlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from walkthrough import actions as A

NITROGEN_ACTION_FPS = 60.0
CHUNK_SECONDS = 20.0
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".flv", ".ts")
REQUIRED_META = ("uuid", "chunk_id", "game", "original_video")
REQUIRED_VIDEO_META = ("video_id", "start_time", "end_time")
_CHUNK_DIR = re.compile(r"^(?P<video_id>.+)_chunk_(?P<index>\d+)$")


class StoreError(ValueError):
    """A chunk store (or one file in it) that cannot be read; the message names the file."""


# --- writing ------------------------------------------------------------------------------------

def video_path(root: Path, video_id: str) -> Path:
    return Path(root) / "videos" / f"{video_id}.mp4"


def episode_dir(root: Path, video_id: str) -> Path:
    return Path(root) / "actions" / video_id


def episode_exists(root: Path, video_id: str) -> bool:
    """True when the episode's chunks were all written (episodes appear atomically)."""
    return episode_dir(root, video_id).is_dir()


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, (np.ndarray,)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_episode(root: Path, video_id: str, actions: np.ndarray, fps: float, game: str,
                  resolution: tuple[int, int], info: dict,
                  extra_columns: dict[str, np.ndarray] | None = None,
                  chunk_seconds: float = CHUNK_SECONDS, start_time: float = 0.0,
                  source: str = "walkthrough", url: str = "",
                  controller_type: str = "xboxone",
                  bbox_controller_overlay: list[float] | None = None,
                  bbox_game_area: list[float] | None = None) -> list[Path]:
    """Write one video's actions as 20-second chunks. Atomic: the episode appears all at once.

    ``actions`` is (N, 21), one row per step at ``fps`` starting at ``start_time`` seconds of the
    video; ``info`` lands in each chunk's metadata under ``"walkthrough"``.
    """
    actions = A.validate(actions, f"episode {video_id}")
    extra_columns = extra_columns or {}
    for name, values in extra_columns.items():
        if len(values) != len(actions):
            raise A.ActionError(f"episode {video_id}: column '{name}' has {len(values)} rows, "
                                f"actions have {len(actions)}")
    final = episode_dir(root, video_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{video_id}.{os.getpid()}.{uuidlib.uuid4().hex[:8]}.tmp"
    staging.mkdir()
    rows_per_chunk = max(1, int(round(chunk_seconds * fps)))
    try:
        for index, first in enumerate(range(0, max(len(actions), 1), rows_per_chunk)):
            rows = slice(first, first + rows_per_chunk)
            chunk_actions = actions[rows]
            chunk_start = start_time + first / fps
            name = f"{video_id}_chunk_{index:04d}"
            chunk_dir = staging / name
            chunk_dir.mkdir()
            table = A.to_table(chunk_actions, {k: v[rows] for k, v in extra_columns.items()})
            pq.write_table(table, chunk_dir / "actions_raw.parquet")
            meta = {
                "uuid": f"{name}_actions",
                "chunk_id": f"{index:04d}",
                "chunk_size": len(chunk_actions),
                "game": game,
                "controller_type": controller_type,
                "bbox_controller_overlay": bbox_controller_overlay,
                "original_video": {
                    "video_id": video_id,
                    "source": source,
                    "url": url,
                    "resolution": list(resolution),
                    "start_time": chunk_start,
                    "end_time": chunk_start + len(chunk_actions) / fps,
                    "duration": len(chunk_actions) / fps,
                    "start_frame": first,
                    "end_frame": first + len(chunk_actions),
                },
                "walkthrough": {"action_fps": fps, **info},
            }
            if bbox_game_area is not None:
                meta["bbox_game_area"] = bbox_game_area
            (chunk_dir / "metadata.json").write_text(json.dumps(meta, indent=2, default=_json_default))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return sorted(final.iterdir())


# --- reading ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Box:
    """An axis-aligned box, [x, y, w, h] in pixels of some frame."""
    x: float
    y: float
    w: float
    h: float

    @staticmethod
    def parse(value, resolution: tuple[int, int], where: str) -> "Box | None":
        """NitroGen boxes are [x, y, w, h]; values all <= 1 are read as fractions of the frame."""
        if value is None:
            return None
        try:
            x, y, w, h = (float(v) for v in value)
        except (TypeError, ValueError):
            raise StoreError(f"{where}: bounding box must be [x, y, w, h], got {value!r}") from None
        if max(x, y, w, h) <= 1.0:
            height, width = resolution
            x, y, w, h = x * width, y * height, w * width, h * height
        if w <= 0 or h <= 0:
            raise StoreError(f"{where}: bounding box has no area: {value!r}")
        return Box(x, y, w, h)


@dataclass
class Chunk:
    """One chunk directory: ~20 s of actions of one video."""
    path: Path
    meta: dict

    @property
    def where(self) -> str:
        return str(self.path)

    @property
    def video_id(self) -> str:
        return self.meta["original_video"]["video_id"]

    @property
    def index(self) -> int:
        return int(self.meta["chunk_id"])

    @property
    def game(self) -> str:
        return str(self.meta.get("game") or "other")

    @property
    def action_fps(self) -> float:
        return float(self.meta.get("walkthrough", {}).get("action_fps", NITROGEN_ACTION_FPS))

    @property
    def start_time(self) -> float:
        return float(self.meta["original_video"]["start_time"])

    @property
    def end_time(self) -> float:
        return float(self.meta["original_video"]["end_time"])

    def read_table(self, processed: bool = False) -> pa.Table:
        name = "actions_processed.parquet" if processed else "actions_raw.parquet"
        file = self.path / name
        if not file.exists():
            raise StoreError(f"{file}: missing")
        try:
            return pq.read_table(file)
        except (pa.ArrowInvalid, OSError) as e:
            raise StoreError(f"{file}: not a readable parquet file ({e})") from None

    def actions(self, processed: bool = False) -> np.ndarray:
        """(N, 21) float32 actions of this chunk."""
        name = "actions_processed.parquet" if processed else "actions_raw.parquet"
        return A.from_table(self.read_table(processed), str(self.path / name))

    def row_times(self, num_rows: int) -> np.ndarray:
        """(N,) video time in seconds of each action row."""
        return self.start_time + np.arange(num_rows) / self.action_fps


def _check_meta(meta: object, file: Path) -> dict:
    if not isinstance(meta, dict):
        raise StoreError(f"{file}: metadata must be a JSON object")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise StoreError(f"{file}: missing key(s) {', '.join(missing)}")
    video = meta["original_video"]
    if not isinstance(video, dict):
        raise StoreError(f"{file}: 'original_video' must be an object")
    missing = [f"original_video.{k}" for k in REQUIRED_VIDEO_META if k not in video]
    if missing:
        raise StoreError(f"{file}: missing key(s) {', '.join(missing)}")
    try:
        int(meta["chunk_id"])
        float(video["start_time"]), float(video["end_time"])
    except (TypeError, ValueError):
        raise StoreError(f"{file}: chunk_id, start_time and end_time must be numbers") from None
    resolution = video.get("resolution")
    if resolution is not None and (not isinstance(resolution, list) or len(resolution) != 2):
        raise StoreError(f"{file}: original_video.resolution must be [H, W], got {resolution!r}")
    return meta


def read_chunk(chunk_dir: Path) -> Chunk:
    file = chunk_dir / "metadata.json"
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise StoreError(f"{file}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{file}: broken JSON ({e})") from None
    return Chunk(chunk_dir, _check_meta(meta, file))


@dataclass
class Episode:
    """All chunks of one video, in time order, and where its video file is."""
    video_id: str
    chunks: list[Chunk]
    video: Path | None
    mask_overlay: bool = True

    @property
    def game(self) -> str:
        return self.chunks[0].game

    @property
    def info(self) -> dict:
        """Our own metadata (player, seed, score, labeler...), empty for NitroGen data."""
        return self.chunks[0].meta.get("walkthrough", {})

    @property
    def resolution(self) -> tuple[int, int] | None:
        res = self.chunks[0].meta["original_video"].get("resolution")
        return (int(res[0]), int(res[1])) if res else None

    @property
    def start_time(self) -> float:
        return self.chunks[0].start_time

    @property
    def end_time(self) -> float:
        return self.chunks[-1].end_time

    @property
    def duration(self) -> float:
        return self.end_time - self.start_time

    @cached_property
    def chunk_tables(self) -> list[pa.Table]:
        return [chunk.read_table() for chunk in self.chunks]

    @cached_property
    def table(self) -> pa.Table:
        """All rows of all chunks, concatenated, with a ``time`` column (video seconds)."""
        tables = [t.append_column("time", pa.array(c.row_times(t.num_rows)))
                  for c, t in zip(self.chunks, self.chunk_tables)]
        try:
            return pa.concat_tables(tables, promote_options="default")
        except pa.ArrowInvalid as e:
            raise StoreError(f"{self.chunks[0].path.parent}: chunks disagree on columns ({e})") from None

    @cached_property
    def actions(self) -> np.ndarray:
        """(N, 21) float32: every action row of the video."""
        return np.concatenate([A.from_table(t, str(c.path / "actions_raw.parquet"))
                               for c, t in zip(self.chunks, self.chunk_tables)])

    @cached_property
    def times(self) -> np.ndarray:
        """(N,) float64: video time of each row."""
        return self.table.column("time").to_numpy()

    def column(self, name: str) -> np.ndarray | None:
        """An extra per-row column (e.g. ``confidence`` of pseudo-labels), None when absent."""
        return self.table.column(name).to_numpy() if name in self.table.column_names else None

    def actions_at(self, times: np.ndarray, span: float) -> tuple[np.ndarray, np.ndarray]:
        """Actions over the intervals [t, t + span) for each t in ``times`` (seconds).

        Resampling actions to a model's frame rate: a button counts as pressed if it was pressed
        in any row of the interval (a 1-row tap at 60 Hz survives downsampling to 15 fps),
        sticks are averaged. Returns (actions (N, 21), valid (N,) bool); times with no labelled
        row in their interval are invalid.
        """
        times = np.asarray(times, dtype=np.float64)
        eps = 1e-6  # row times are k / fps: tolerate float error at interval edges
        lo = np.searchsorted(self.times, times - eps, side="left")
        hi = np.searchsorted(self.times, times + span - eps, side="left")
        valid = hi > lo
        out = np.zeros((len(times), A.ACTION_DIM), dtype=np.float32)
        rows = self.actions
        for i in np.flatnonzero(valid):
            window = rows[lo[i]:hi[i]]
            out[i, :A.NUM_BUTTONS] = window[:, :A.NUM_BUTTONS].max(0)
            out[i, A.NUM_BUTTONS:] = window[:, A.NUM_BUTTONS:].mean(0)
        return out, valid

    def column_at(self, name: str, times: np.ndarray, span: float, reduce=np.min) -> np.ndarray | None:
        """A per-row column resampled like ``actions_at`` (default: the interval's minimum)."""
        values = self.column(name)
        if values is None:
            return None
        times = np.asarray(times, dtype=np.float64)
        lo = np.searchsorted(self.times, times - 1e-6, side="left")
        hi = np.searchsorted(self.times, times + span - 1e-6, side="left")
        out = np.full(len(times), np.nan, dtype=np.float32)
        for i in np.flatnonzero(hi > lo):
            out[i] = reduce(values[lo[i]:hi[i]])
        return out

    # -- frame geometry: NitroGen's overlay mask and game-area crop --

    def _box(self, key: str) -> Box | None:
        meta = self.chunks[0].meta
        resolution = self.resolution
        if meta.get(key) is None:
            return None
        if resolution is None:
            raise StoreError(f"{self.chunks[0].path / 'metadata.json'}: {key} needs original_video.resolution")
        return Box.parse(meta[key], resolution, str(self.chunks[0].path / "metadata.json"))

    @property
    def game_area(self) -> Box | None:
        return self._box("bbox_game_area")

    @property
    def overlay(self) -> Box | None:
        return self._box("bbox_controller_overlay") if self.mask_overlay else None

    def crop(self) -> tuple[int, int, int, int] | None:
        """Source-pixel crop (x, y, w, h) to the game area, or None for the whole frame."""
        area = self.game_area
        if area is None:
            return None
        return int(round(area.x)), int(round(area.y)), int(round(area.w)), int(round(area.h))

    def mask_box(self, out_size: tuple[int, int]) -> tuple[int, int, int, int] | None:
        """The controller overlay in output pixels (y0, y1, x0, x1), after crop and resize.

        Rounded outwards, so no overlay pixel survives resizing.
        """
        overlay = self.overlay
        if overlay is None:
            return None
        resolution = self.resolution
        crop = self.crop() or (0, 0, resolution[1], resolution[0])
        out_h, out_w = out_size
        sx, sy = out_w / crop[2], out_h / crop[3]
        x0 = int(np.floor((overlay.x - crop[0]) * sx))
        x1 = int(np.ceil((overlay.x + overlay.w - crop[0]) * sx))
        y0 = int(np.floor((overlay.y - crop[1]) * sy))
        y1 = int(np.ceil((overlay.y + overlay.h - crop[1]) * sy))
        x0, x1 = max(x0, 0), min(x1, out_w)
        y0, y1 = max(y0, 0), min(y1, out_h)
        if x0 >= x1 or y0 >= y1:
            return None
        return y0, y1, x0, x1

    def apply_mask(self, frames: np.ndarray) -> np.ndarray:
        """Black out the controller overlay in frames (..., H, W, 3) already cropped and resized."""
        box = self.mask_box(frames.shape[-3:-1])
        if box is not None:
            y0, y1, x0, x1 = box
            frames[..., y0:y1, x0:x1, :] = 0
        return frames


def _extract_tar(tar_path: Path, cache: Path) -> Path:
    """Extract a NitroGen shard once (atomically: a killed extraction is redone next time)."""
    target = cache / tar_path.name.split(".")[0]
    if (target / ".complete").exists():
        return target
    staging = cache / f".{target.name}.{os.getpid()}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            tar.extractall(staging, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise StoreError(f"{tar_path}: not a readable tar archive ({e})") from None
    (staging / ".complete").touch()
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def _index_videos(directories: list[Path]) -> dict[str, Path]:
    """video_id -> file, from every video file under the given directories (searched recursively)."""
    index: dict[str, Path] = {}
    for directory in directories:
        if directory.is_dir():
            for file in sorted(directory.rglob("*")):
                if file.suffix.lower() in VIDEO_EXTENSIONS and file.is_file():
                    index.setdefault(file.stem, file)
    return index


class ChunkStore:
    """Every episode found under one or more sources.

    A source is a store root (holding ``actions/``), an ``actions`` directory or a NitroGen
    shard directory, a ``SHARD_XXXX.tar.gz`` file, or a directory of such files. Videos are looked
    up by ``video_id`` in ``videos`` (the user's downloads, searched recursively), then in each
    root's ``videos/``, then at the local path a pseudo-label's metadata names.

    ``mask_overlay`` (default: on) blacks out ``bbox_controller_overlay`` when frames are loaded,
    so a model cannot learn to read the controller overlay instead of the game.
    """

    def __init__(self, sources: Path | str | list[Path | str], videos: Path | str | None = None,
                 mask_overlay: bool = True, cache: Path | str | None = None):
        self.sources = [Path(s) for s in (sources if isinstance(sources, list) else [sources])]
        self.mask_overlay = mask_overlay
        chunk_dirs: list[Path] = []
        video_dirs = [Path(videos)] if videos is not None else []
        for source in self.sources:
            if not source.exists():
                raise StoreError(f"{source}: no such file or directory")
            roots = self._roots(source, cache)
            found = [d.parent for r in roots for d in sorted(r.rglob("metadata.json"))]
            if not found:
                raise StoreError(f"{source}: no chunks found (expected actions/<video_id>/"
                                 f"<video_id>_chunk_NNNN/metadata.json)")
            chunk_dirs += found
            video_dirs += [source / "videos"] if source.is_dir() else []
        by_video: dict[str, list[Chunk]] = {}
        for chunk_dir in chunk_dirs:
            if chunk_dir.name.startswith(".") or any(p.name.startswith(".") and p.name.endswith(".tmp")
                                                     for p in chunk_dir.parents):
                continue
            chunk = read_chunk(chunk_dir)
            by_video.setdefault(chunk.video_id, []).append(chunk)
        video_index = _index_videos(video_dirs)
        self.episodes: list[Episode] = []
        for video_id in sorted(by_video):
            chunks = sorted(by_video[video_id], key=lambda c: c.index)
            self.episodes.append(Episode(video_id, chunks, self._find_video(video_id, chunks, video_index),
                                         mask_overlay))

    @staticmethod
    def _roots(source: Path, cache: Path | str | None) -> list[Path]:
        if source.is_file():
            if not source.name.endswith((".tar.gz", ".tgz", ".tar")):
                raise StoreError(f"{source}: not a chunk store (expected a directory or SHARD_XXXX.tar.gz)")
            return [_extract_tar(source, Path(cache) if cache else source.parent / ".walkthrough_shards")]
        tars = sorted(source.glob("*.tar.gz")) + sorted(source.glob("*.tar"))
        cache_dir = Path(cache) if cache else source / ".walkthrough_shards"
        roots = [_extract_tar(t, cache_dir) for t in tars]
        actions = source / "actions"
        if actions.is_dir():
            roots.append(actions)
        elif not tars:
            roots.append(source)
        return roots

    @staticmethod
    def _find_video(video_id: str, chunks: list[Chunk], index: dict[str, Path]) -> Path | None:
        if video_id in index:
            return index[video_id]
        local = chunks[0].meta.get("walkthrough", {}).get("source_video", {}).get("path")
        if local and Path(local).is_file():
            return Path(local)
        return None

    def __len__(self) -> int:
        return len(self.episodes)

    def __iter__(self):
        return iter(self.episodes)

    @property
    def games(self) -> list[str]:
        return sorted({e.game for e in self.episodes})

    def check(self) -> list[str]:
        """Read every file and report every problem found (one line each); empty when clean."""
        problems = []
        for episode in self.episodes:
            if episode.video is None:
                problems.append(f"{episode.video_id}: video file not found")
            indices = [c.index for c in episode.chunks]
            if indices != list(range(indices[0], indices[0] + len(indices))):
                problems.append(f"{episode.video_id}: chunk ids not consecutive: {indices}")
            for chunk in episode.chunks:
                try:
                    chunk.actions()
                    if (chunk.path / "actions_processed.parquet").exists():
                        chunk.actions(processed=True)
                except (StoreError, A.ActionError) as e:
                    problems.append(str(e))
            try:
                episode.game_area, episode.overlay
            except StoreError as e:
                problems.append(str(e))
        return problems

    def summary(self) -> dict:
        """Totals, per-game figures and per-button press rates over every readable row."""
        per_game: dict[str, dict] = {}
        totals = np.zeros(A.ACTION_DIM)
        rows = active = 0
        for episode in self.episodes:
            game = per_game.setdefault(episode.game, {"episodes": 0, "seconds": 0.0})
            game["episodes"] += 1
            game["seconds"] += episode.duration
            try:
                acts = episode.actions
            except (StoreError, A.ActionError):
                continue  # reported by check()
            totals[:A.NUM_BUTTONS] += acts[:, :A.NUM_BUTTONS].sum(0)
            totals[A.NUM_BUTTONS:] += (np.abs(acts[:, A.NUM_BUTTONS:]) > 0.2).sum(0)
            rows += len(acts)
            active += int(A.is_active(acts).sum())
        seconds = sum(g["seconds"] for g in per_game.values())
        return {
            "episodes": len(self.episodes),
            "chunks": sum(len(e.chunks) for e in self.episodes),
            "hours": seconds / 3600,
            "action_rows": rows,
            "active_share": active / max(rows, 1),
            "videos_found": sum(e.video is not None for e in self.episodes),
            "games": per_game,
            "press_rate": {name: float(totals[i] / max(rows, 1)) for i, name in enumerate(A.BUTTONS)},
            "stick_usage": {name: float(totals[A.NUM_BUTTONS + i] / max(rows, 1))
                            for i, name in enumerate(A.STICK_AXES)},
        }
