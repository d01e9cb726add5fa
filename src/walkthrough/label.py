"""Pseudo-labeling: run an IDM over raw gameplay videos and keep the stretches worth training on.

One code path, whatever the scale (the local backend runs the stages in two threads, ``--backend
ray`` runs them on Ray Data; the rows between stages are the same dicts):

    video files -> decode_rows: stream frames at the IDM's fps and size, cut blocks of frames
                   (K window starts each), then one end row per video           (CPU: a thread / Ray tasks)
                -> predict_batch: a block's frames encoded once, its windows through the
                   transformer, probabilities summed per transition    (IDM: main thread / actor pool)
                -> StepAverager: average where windows overlap -> per-step actions and confidence
                -> drop_reasons: the filters, each step kept or dropped for one reason
                -> LabelStore.write: kept stretches as chunk-store episodes, then the video's done-marker

Output, readable by ``ChunkStore`` like ground truth (pseudo-labels point at their source video
through ``metadata["walkthrough"]["source_video"]["path"]``; nothing is re-encoded):

    LABELS/actions/<stem>-<hash8>-segNNN/...   one episode per kept stretch of a video, rows at the
                                               IDM's fps from the stretch's start in the source video,
                                               with a per-row ``confidence`` column
    LABELS/steps/<stem>-<hash8>.parquet        every step of the video, kept or not, with its drop reason
    LABELS/done/<stem>-<hash8>.json            the video's done-marker (its stats or its error)
    LABELS/failures.jsonl                      videos and inputs that could not be labeled, with the error
    LABELS/summary.json                        hours in, hours kept, drops by reason, mean confidence

``<hash8>`` hashes the video's absolute path, so a restart finds a video's marker without reading
the video. A video is skipped when its marker exists and the file is unchanged (size, mtime);
otherwise its leftovers from a killed run are deleted and it is labeled again. Each episode is
written atomically and the marker last, so a ``kill -9`` loses at most the videos in flight.

Memory: frames are streamed (at most ``prefetch`` blocks of frames are in flight); the per-step
results of the video being labeled are kept (~100 bytes per step, ~11 MB per hour at 30 fps).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from walkthrough import actions as A
from walkthrough import chunks, idm, train, video
from walkthrough.metrics import STICK_BINS, step_active, summarize


# --- 1. Config -----------------------------------------------------------------------------------
@dataclass
class LabelConfig:
    """How to label; saved into every chunk's metadata and the summary."""

    # windows and batching
    stride: int = 1  # frames between window starts: 1 averages T - 1 windows per step (as eval-idm)
    batch_size: int = 256  # window starts per IDM call: a block of K + T + 1 frames, encoded once
    prefetch: int = 4  # blocks decoded ahead of the IDM (bounds memory)
    crop_letterbox: bool = True  # find black bars and feed the IDM the picture inside them
    bf16: bool | None = None  # bfloat16 autocast for the IDM; None: where native (idm.native_bf16)
    # filters: a stretch is dropped when its condition holds for at least the given seconds
    min_confidence: float | None = None  # None: the threshold `walkthrough eval-idm` calibrated
    low_confidence_seconds: float = 0.2  # brief dips (a press's onset) stay, with their low weight
    idle_seconds: float = 3.0  # no predicted input (no button, sticks centred)
    static_motion: float = 0.001  # share of pixels that change, below which a step is static
    static_seconds: float = 1.0
    dark_brightness: float = 20.0  # mean pixel value (0..255) below which a frame is near-black
    dark_seconds: float = 0.5
    min_active_share: float = 0.5  # NitroGen's rule: a chunk needs input in >= half its steps
    min_segment_seconds: float = 1.0  # shorter kept stretches are dropped as "short"
    # output
    chunk_seconds: float = chunks.CHUNK_SECONDS
    game: str = "other"  # the game's name when known; NitroGen writes "other" otherwise
    save_steps: bool = True  # write steps/<video>.parquet (needed by `grade` for before-filtering)
    # execution
    backend: str = "local"  # local | ray
    shard: str = "0/1"  # "i/N": label the i-th of N deterministic slices of the inputs
    device: str = "cpu"  # for the local backend; Ray actors take a GPU when the cluster has one
    threads: int | None = None  # torch threads of the local backend; None: one per core but one,
    # which the decode thread keeps: on 2 shared cores 2 threads ran 2.5x slower (docs/labeling.md)
    ray_actors: int = 1  # IDM replicas in the Ray actor pool

    def __post_init__(self) -> None:
        if self.backend not in ("local", "ray"):
            raise ValueError(f"backend must be 'local' or 'ray', got {self.backend!r}")
        shard_index(self.shard)  # validates "i/N"
        train.check_device(self.device)
        if self.bf16 is None:
            self.bf16 = idm.native_bf16(self.device)
        if self.batch_size < 1 or self.prefetch < 1 or (self.threads is not None and self.threads < 1):
            raise ValueError("batch_size, prefetch and threads must be at least 1")
        if not 0.0 <= self.min_active_share <= 1.0:
            raise ValueError(f"min_active_share must be in [0, 1], got {self.min_active_share}")


def shard_index(spec: str) -> tuple[int, int]:
    """'2/8' -> (2, 8)."""
    try:
        i, n = (int(part) for part in spec.split("/"))
    except ValueError:
        raise ValueError(f"shard must look like i/N (e.g. 0/4), got {spec!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"shard {spec!r}: need 0 <= i < N")
    return i, n


@dataclass(frozen=True)
class DecodeSpec:
    """What the decode stage needs to know about the IDM."""
    frames: int  # T
    fps: float
    size: tuple[int, int]  # (H, W)
    stride: int
    block: int  # K, window starts per block
    crop_letterbox: bool

    @staticmethod
    def for_model(config: idm.IDMConfig, label_config: LabelConfig) -> "DecodeSpec":
        T, stride = config.frames, label_config.stride
        idm.check_stride(T, stride)
        return DecodeSpec(T, float(config.fps), tuple(config.size), stride, label_config.batch_size,
                          label_config.crop_letterbox)


# --- 2. Inputs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoJob:
    path: str  # absolute
    key: str  # "<stem>-<hash8>": names the video's segments, steps file and done-marker
    size: int
    mtime_ns: int

    @staticmethod
    def for_path(path: Path) -> "VideoJob":
        path = path.resolve()
        stat = path.stat()
        key = f"{path.stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        return VideoJob(str(path), key, stat.st_size, stat.st_mtime_ns)


def find_videos(inputs: Iterable[Path]) -> tuple[list[Path], list[dict]]:
    """Video files named or found (recursively) under the inputs, sorted, plus input problems.

    A file named explicitly is taken whatever its extension (the decoder judges it); inside
    directories only video extensions count.
    """
    found, problems = set(), []
    for item in map(Path, inputs):
        if item.is_file():
            found.add(item.resolve())
        elif item.is_dir():
            videos = [f.resolve() for f in item.rglob("*")
                      if f.suffix.lower() in video.VIDEO_EXTENSIONS and f.is_file()]
            if not videos:
                problems.append({"path": str(item.resolve()), "error": f"{item}: no video files in this "
                                 f"directory (looked for {', '.join(video.VIDEO_EXTENSIONS[:3])}, ...)"})
            found.update(videos)
        else:
            problems.append({"path": str(item), "error": f"{item}: no such file or directory"})
    return sorted(found), problems


# --- 3. Decode stage: one video -> windows -------------------------------------------------------
LETTERBOX_LEVEL = 40  # a bar's pixels stay below this in every channel (codec noise around black)
LETTERBOX_MIN_SHARE = 0.04  # bars thinner than this share of the frame are not letterboxing
LETTERBOX_SAMPLES = 5
MOTION_LEVEL = 10  # a pixel changes when a channel moves by more than this (codec noise is less)


def find_letterbox(path: Path, info: video.VideoInfo) -> list[int] | None:
    """The picture inside black bars as [x, y, w, h] source pixels, or None when there are none.

    Bars are rows (columns) at the edges that stay black in frames sampled across the video, of
    about the same thickness on both sides (letterboxing centres the picture) and at least
    LETTERBOX_MIN_SHARE thick: a game's own dark border is rarely both.
    """
    times = [info.duration * (i + 0.5) / LETTERBOX_SAMPLES for i in range(LETTERBOX_SAMPLES)]
    frames = np.stack([video.read_frames(path, t, 1, info.fps or 30.0)[0] for t in times])  # (S, H, W, 3)
    lit = frames.max(axis=(0, 3)) >= LETTERBOX_LEVEL  # (H, W) some sample shows something there

    def bars(lit_lines: np.ndarray) -> tuple[int, int] | None:
        """Thickness of the black bands at both ends of a (L,) line profile, if letterboxing."""
        if not lit_lines.any():
            return None  # a black video: nothing to centre on
        first, last = np.flatnonzero(lit_lines)[[0, -1]]
        low, high = int(first), len(lit_lines) - 1 - int(last)
        thick_enough = min(low, high) >= LETTERBOX_MIN_SHARE * len(lit_lines)
        centred = abs(low - high) <= max(2, 0.02 * len(lit_lines))
        return (low, high) if thick_enough and centred else None

    rows, cols = bars(lit.any(1)), bars(lit.any(0))
    if rows is None and cols is None:
        return None
    top, bottom = rows or (0, 0)
    left, right = cols or (0, 0)
    return [left, top, info.width - left - right, info.height - top - bottom]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def decode_rows(job: dict, spec: DecodeSpec) -> Iterator[dict]:
    """One video -> its blocks in order, then one end row. Rows share one schema (for Ray Data):

        video       the job's key
        start       the block's first window start, also the first transition it owns; -1 on the end row
        frames      (K+T+1, H, W, 3) uint8: frames start-1 .. start+K+T-1 (the windows' frames and a
                    context frame each side), the video's first and last frame standing in beyond
                    its ends; zeros on the end row
        starts      (K,) bool: a window starts at the block's frame start+i: every ``stride`` frames
                    of the video, and one more that ends on its last frame, so every transition is covered
        steps       how many transitions the block owns, from ``start`` (K, but for the last block)
        brightness  (K+T-2,) float32 per owned transition: mean pixel value of the brighter of its 2 frames
        motion      (K+T-2,) float32 per owned transition: share of pixels that change (by > MOTION_LEVEL)
        end         "" on blocks; on the end row, JSON: frame count, source facts, or the error

    Consecutive blocks share T + 1 frames, so T - 1 frames a block are encoded twice (1.2% at K = 256,
    T = 4): the price of rows that stand alone, which any Ray actor can take in any order.
    """
    T, K, path = spec.frames, spec.block, Path(job["path"])
    length, sums = K + T + 1, K + T - 2  # frames per block, transitions its windows reach
    pending: list[np.ndarray] = []  # frames start-1 .. of the next block

    def block(start: int, starts: np.ndarray, steps: int) -> dict:
        frames = np.stack(pending + [pending[-1]] * (length - len(pending)))  # past the end: the last frame
        # Transition start + j is block frame 1 + j -> 2 + j. Whole blocks, integer sums and channels
        # one by one: frame by frame (or reducing over the axis of 3) this took as long as decoding,
        # and with the IDM on a GPU the labeler waits on it (BENCHMARKS.md).
        pixels = frames[1:2 + steps].reshape(steps + 1, -1)
        level = pixels.sum(1, dtype=np.uint32) / pixels.shape[1]  # (steps + 1,) mean pixel value
        change = np.abs(frames[2:2 + steps].astype(np.int16) - frames[1:1 + steps]) > MOTION_LEVEL  # (steps, H, W, 3)
        changed = (change[..., 0] | change[..., 1] | change[..., 2]).reshape(steps, -1)  # any channel
        brightness, motion = np.zeros(sums, np.float32), np.zeros(sums, np.float32)
        brightness[:steps] = np.maximum(level[:-1], level[1:])
        motion[:steps] = np.count_nonzero(changed, axis=1) / changed.shape[1]
        return {"video": job["key"], "start": start, "frames": frames, "starts": starts, "steps": steps,
                "brightness": brightness, "motion": motion, "end": ""}

    end: dict = {"frames": 0, "error": None}
    try:
        info = video.probe(path)
        crop = find_letterbox(path, info) if spec.crop_letterbox else None
        end["source"] = {"width": info.width, "height": info.height, "fps": info.fps,
                         "duration": info.duration, "codec": info.codec, "crop": crop}
        n, start = 0, 0
        for _, frame in video.iter_frames(path, spec.fps, spec.size, crop):
            if not n:
                pending.append(frame)  # frame -1: the video's first frame stands in
            pending.append(frame)
            n += 1
            if len(pending) == length:  # frames start-1 .. start+K+T-1 are in
                yield block(start, np.arange(start, start + K) % spec.stride == 0, K)
                pending, start = pending[K:], start + K
        end["frames"] = n
        if n < T:
            raise video.VideoError(f"{path}: too short to label: {n} frame(s) at {spec.fps:g} fps, "
                                   f"the IDM needs windows of {T}")
        first = np.arange(start, start + K)  # the last block: windows up to the one ending on frame n-1
        yield block(start, (first % spec.stride == 0) & (first <= n - T) | (first == n - T), n - 1 - start)
        end["sha256"] = file_sha256(path)
    except (video.VideoError, OSError) as e:
        end["error"] = str(e)
    yield {"video": job["key"], "start": -1, "frames": np.zeros((length, *spec.size, 3), np.uint8),
           "starts": np.zeros(K, bool), "steps": 0, "brightness": np.zeros(sums, np.float32),
           "motion": np.zeros(sums, np.float32), "end": json.dumps(end)}


# --- 4. Model stage: blocks of frames -> probabilities summed per transition ---------------------
def batch_rows(rows: Iterable[dict], size: int) -> Iterator[dict[str, np.ndarray]]:
    """Rows -> dicts of stacked columns of ``size`` rows each (the last may be shorter)."""
    rows = iter(rows)
    while group := list(itertools.islice(rows, size)):
        yield {key: np.stack([r[key] for r in group]) if isinstance(group[0][key], np.ndarray)
               else np.array([r[key] for r in group]) for key in group[0]}


def predict_batch(model: idm.IDM, batch: dict[str, np.ndarray], bf16: bool = False) -> dict[str, np.ndarray]:
    """Replace each block's frames and window starts by ``IDM.block_sums``: ``button_sum``
    (B, K+T-2, 17), ``stick_sum`` (B, K+T-2, 4, 11) and ``count`` (B, K+T-2); zeros on end rows."""
    out = {key: value for key, value in batch.items() if key not in ("frames", "starts")}
    B, K = batch["starts"].shape
    sums = K + model.config.frames - 2
    out["button_sum"] = np.zeros((B, sums, A.NUM_BUTTONS), np.float32)
    out["stick_sum"] = np.zeros((B, sums, A.NUM_AXES, STICK_BINS), np.float32)
    out["count"] = np.zeros((B, sums), np.float32)
    blocks = batch["start"] >= 0
    if blocks.any():
        frames = torch.from_numpy(batch["frames"][blocks]).permute(0, 1, 4, 2, 3)  # (b, K+T+1, 3, H, W)
        summed = model.block_sums(frames, torch.from_numpy(batch["starts"][blocks]), bf16)
        for key in ("button_sum", "stick_sum", "count"):
            out[key][blocks] = summed[key].numpy()
    return out


def unbatch(batch: dict[str, np.ndarray]) -> Iterator[dict]:
    for i in range(len(batch["start"])):
        yield {key: value[i] for key, value in batch.items()}


def prefetch(items: Iterator, depth: int) -> Iterator:
    """Run an iterator in a background thread, at most ``depth`` items ahead of the consumer.

    Decoding (PyAV) and inference (torch) both release the GIL, so a thread overlaps them.
    """
    done = object()
    buffer: queue.Queue = queue.Queue(maxsize=depth)

    def work() -> None:
        try:
            for item in items:
                buffer.put(item)
            buffer.put(done)
        except BaseException as e:  # re-raised in the consumer
            buffer.put(e)

    threading.Thread(target=work, daemon=True).start()
    while (item := buffer.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


# --- 5. Averaging overlapping windows into per-step labels --------------------------------------
@dataclass
class Steps:
    """Per transition j of a video (frame j -> j + 1, at time j / fps)."""
    actions: np.ndarray  # (N, 21) decoded as idm.decode does
    confidence: np.ndarray  # (N,) idm.confidence of the averaged probabilities
    brightness: np.ndarray  # (N,)
    motion: np.ndarray  # (N,)

    def __len__(self) -> int:
        return len(self.confidence)


class StepAverager:
    """Averages the probabilities of overlapping windows, fed block by block in start order.

    A block starting at s adds its windows' probability sums over transitions s..s+K+T-3 and
    sets the frame statistics of the transitions it owns; later blocks start after it, so once
    it arrives the transitions before s are final. Sums are held for a stretch of BLOCK
    transitions (at least one block's); when a block would overflow it, the final ones are
    averaged, decoded and released (one torch call per stretch, memory flat).
    """

    SUMMED = ("button_sum", "stick_sum", "count")
    OWNED = ("brightness", "motion")
    BLOCK = 1024

    def __init__(self) -> None:
        self.first = 0  # transition index of the buffers' row 0
        self.used = 0  # rows of the buffers touched so far
        self.end = 0  # one past the last transition owned so far
        self.buffers: dict[str, np.ndarray] = {}
        self.released: list[Steps] = []

    def add(self, row: dict) -> None:
        start, length, steps = int(row["start"]), len(row["count"]), int(row["steps"])
        if not self.buffers:
            rows = max(self.BLOCK, length)
            self.buffers = {key: np.zeros((rows, *np.shape(row[key])[1:]), np.float32)
                            for key in self.SUMMED + self.OWNED}
        if start + length - self.first > len(self.buffers["count"]):
            self._release(start)
        at = start - self.first
        for key in self.SUMMED:
            self.buffers[key][at:at + length] += row[key]
        for key in self.OWNED:
            self.buffers[key][at:at + steps] = row[key][:steps]
        self.used, self.end = max(self.used, at + length), start + steps

    def _release(self, upto: int) -> None:
        k = upto - self.first
        if k <= 0:
            return
        b = self.buffers
        button_prob = torch.from_numpy(b["button_sum"][:k] / b["count"][:k, None])
        stick_prob = torch.from_numpy(b["stick_sum"][:k] / b["count"][:k, None, None])
        self.released.append(Steps(idm.decode(button_prob, stick_prob).numpy(),
                                   idm.confidence(button_prob, stick_prob).numpy(),
                                   b["brightness"][:k].copy(), b["motion"][:k].copy()))
        for buffer in b.values():  # shift the open rows to the front
            buffer[:self.used - k] = buffer[k:self.used]
            buffer[self.used - k:] = 0
        self.first, self.used = upto, self.used - k

    def finish(self) -> Steps:
        """Every transition seen, averaged: (N,) steps for the N + 1 frames of the video."""
        self._release(self.end)
        if not self.released:
            empty = np.zeros(0, np.float32)
            return Steps(A.idle(0), empty, empty, empty)
        return Steps(*(np.concatenate(parts) for parts in zip(*(
            (s.actions, s.confidence, s.brightness, s.motion) for s in self.released))))


def assemble(rows: Iterable[dict]) -> Iterator[tuple[str, Steps, dict]]:
    """Predicted rows, in order -> (video key, its steps, its end info) per video."""
    averager, key = StepAverager(), None
    for row in rows:
        if key is not None and row["video"] != key:
            raise RuntimeError(f"rows of {key} and {row['video']} are interleaved: the stages lost the order")
        if row["start"] >= 0:
            key = row["video"]
            averager.add(row)
        else:
            yield row["video"], averager.finish(), json.loads(row["end"])
            averager, key = StepAverager(), None


# --- 6. Filters -----------------------------------------------------------------------------------
REASONS = ("kept", "dark", "static", "low_confidence", "idle", "inactive_chunk", "short")


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal stretches of True in a (N,) bool array, as [start, end) pairs."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], np.asarray(mask, np.int8), [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def long_runs(mask: np.ndarray, min_length: int) -> np.ndarray:
    """The True stretches of ``mask`` that last at least ``min_length`` steps."""
    out = np.zeros(len(mask), bool)
    for a, b in runs(mask):
        if b - a >= min_length:
            out[a:b] = True
    return out


def drop_reasons(steps: Steps, fps: float, threshold: float, config: LabelConfig) -> np.ndarray:
    """(N,) index into REASONS per step: 0 keeps it, else the first filter that drops it.

    Stretch filters first (a black screen is also static, a static one also idle: the more
    specific reason wins), then NitroGen's rule on the chunks that each kept stretch will be
    written as, then stretches too short to be worth an episode.
    """
    def steps_in(seconds: float) -> int:
        return max(1, int(round(seconds * fps)))  # as write_episode counts rows per chunk

    reason = np.zeros(len(steps), np.int8)
    active = step_active(steps.actions)
    stretch_filters = (
        ("dark", steps.brightness < config.dark_brightness, config.dark_seconds),
        ("static", steps.motion < config.static_motion, config.static_seconds),
        ("low_confidence", steps.confidence < threshold, config.low_confidence_seconds),
        ("idle", ~active, config.idle_seconds),
    )
    for name, flagged, seconds in stretch_filters:
        reason[long_runs(flagged, steps_in(seconds)) & (reason == 0)] = REASONS.index(name)
    per_chunk = steps_in(config.chunk_seconds)
    for a, b in runs(reason == 0):
        for first in range(a, b, per_chunk):
            last = min(first + per_chunk, b)
            if active[first:last].mean() < config.min_active_share:
                reason[first:last] = REASONS.index("inactive_chunk")
    for a, b in runs(reason == 0):
        if b - a < steps_in(config.min_segment_seconds):
            reason[a:b] = REASONS.index("short")
    return reason


# --- 7. Output --------------------------------------------------------------------------------------
@dataclass
class LabelStore:
    """The output directory of a labeling run (see the module docstring for its layout)."""
    root: Path
    config: LabelConfig
    fps: float  # the IDM's: one label row per transition
    threshold: float  # confidence threshold in force
    model: dict  # the IDM run, checkpoint and its config, for the metadata

    def marker(self, job: VideoJob) -> Path:
        return self.root / "done" / f"{job.key}.json"

    def is_done(self, job: VideoJob) -> bool:
        """Labeled (or failed) before, and the file has not changed since."""
        file = self.marker(job)
        if not file.exists():
            return False
        done = json.loads(file.read_text())
        return (done["size"], done["mtime_ns"]) == (job.size, job.mtime_ns)

    def clear(self, job: VideoJob) -> None:
        """Remove what an earlier, unfinished or outdated labeling of this video left: its
        episodes and write_episode's staging directories (``.<video_id>.<pid>.<uuid>.tmp``)."""
        ours = re.compile(rf"\.?{re.escape(job.key)}-seg\d+(\.\d+\.[0-9a-f]+\.tmp)?")
        for leftover in (self.root / "actions").glob(f"*{job.key}-seg*"):
            if ours.fullmatch(leftover.name):
                shutil.rmtree(leftover)
        self.marker(job).unlink(missing_ok=True)

    def write(self, job: VideoJob, steps: Steps, end: dict) -> dict:
        """Filter one video's steps, write its kept stretches and steps file, then its marker."""
        self.clear(job)
        done = {**asdict(job), "status": "failed", "error": end["error"], "finished": time.time()}
        if end["error"] is None:
            done.update(status="labeled", **self._write_labels(job, steps, end))
        (self.root / "done").mkdir(parents=True, exist_ok=True)
        chunks.write_json_atomic(self.marker(job), done)
        return done

    def _write_labels(self, job: VideoJob, steps: Steps, end: dict) -> dict:
        reason = drop_reasons(steps, self.fps, self.threshold, self.config)
        source = end["source"]
        segments = []
        for k, (a, b) in enumerate(runs(reason == 0)):
            video_id = f"{job.key}-seg{k:03d}"
            start, stop = a / self.fps, b / self.fps  # transition j starts at frame j's time
            info = {"label_type": "pseudo", "labeler": asdict(self.config), "idm": self.model,
                    "confidence_threshold": self.threshold,
                    "source_video": {"path": job.path, "sha256": end["sha256"], "duration": source["duration"],
                                     "fps": source["fps"], "codec": source["codec"],
                                     "time_range": [start, stop]}}
            written = chunks.write_episode(
                self.root, video_id, steps.actions[a:b], fps=self.fps, game=self.config.game,
                resolution=(source["height"], source["width"]), info=info,
                extra_columns={"confidence": steps.confidence[a:b]}, chunk_seconds=self.config.chunk_seconds,
                start_time=start, source="walkthrough-label", bbox_game_area=source["crop"])
            segments.append({"video_id": video_id, "time_range": [start, stop], "chunks": len(written)})
        if self.config.save_steps:
            self._write_steps(job, steps, reason)
        kept = reason == 0
        return {
            "sha256": end["sha256"], "source": source, "frames": end["frames"], "fps": self.fps,
            "steps": len(steps), "steps_kept": int(kept.sum()),
            "seconds_in": len(steps) / self.fps, "seconds_kept": int(kept.sum()) / self.fps,
            "dropped_seconds": {name: int((reason == i).sum()) / self.fps for i, name in enumerate(REASONS) if i},
            "confidence_sum": float(steps.confidence.sum()),
            "confidence_sum_kept": float(steps.confidence[kept].sum()),
            "segments": segments,
        }

    def _write_steps(self, job: VideoJob, steps: Steps, reason: np.ndarray) -> None:
        table = A.to_table(steps.actions, {
            "time": np.arange(len(steps)) / self.fps, "confidence": steps.confidence,
            "brightness": steps.brightness, "motion": steps.motion,
            "reason": np.asarray(REASONS, dtype=object)[reason]})
        folder = self.root / "steps"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{job.key}.parquet.tmp"
        pq.write_table(table, tmp)
        tmp.replace(folder / f"{job.key}.parquet")

    def write_summary(self, problems: list[dict], run: dict) -> dict:
        """Totals over every video done in this store (all runs, all shards so far) into
        summary.json; failures.jsonl: this run's input problems and every failed video."""
        done = [json.loads(f.read_text()) for f in sorted((self.root / "done").glob("*.json"))]
        labeled = [d for d in done if d["status"] == "labeled"]
        failed = [{"path": d["path"], "error": d["error"]} for d in done if d["status"] == "failed"]
        seconds_in = sum(d["seconds_in"] for d in labeled)
        seconds_kept = sum(d["seconds_kept"] for d in labeled)
        summary = {
            "videos_labeled": len(labeled), "videos_failed": len(failed), "input_problems": len(problems),
            "hours_in": seconds_in / 3600, "hours_kept": seconds_kept / 3600,
            "kept_share": seconds_kept / seconds_in if seconds_in else 0.0,
            "dropped_hours": {name: sum(d["dropped_seconds"][name] for d in labeled) / 3600
                              for name in REASONS[1:]},
            "mean_confidence": sum(d["confidence_sum"] for d in labeled) / max(sum(d["steps"] for d in labeled), 1),
            "mean_confidence_kept": (sum(d["confidence_sum_kept"] for d in labeled)
                                     / max(sum(d["steps_kept"] for d in labeled), 1)),
            "segments": sum(len(d["segments"]) for d in labeled),
            "chunks": sum(s["chunks"] for d in labeled for s in d["segments"]),
            "confidence_threshold": self.threshold, "idm": self.model, "config": asdict(self.config),
            "run": run,
        }
        chunks.write_json_atomic(self.root / "summary.json", summary)
        lines = "".join(json.dumps(f) + "\n" for f in problems + failed)
        tmp = self.root / ".failures.jsonl.tmp"
        tmp.write_text(lines)
        tmp.replace(self.root / "failures.jsonl")
        return summary


# --- 8. Running ------------------------------------------------------------------------------------
def load_idm(run_dir: Path, device: str = "cpu") -> tuple[idm.IDM, dict]:
    """The run's weights (EMA when kept), in eval mode, and what the metadata says about them."""
    run_dir = Path(run_dir).resolve()
    saved = train.read_run_config(run_dir)
    weights = run_dir / (train.EMA_FILE if (run_dir / train.EMA_FILE).exists() else train.MODEL_FILE)
    model = train.load_model(run_dir).to(device).eval()
    return model, {"run": str(run_dir), "step": saved["step"], "weights": weights.name,
                   "weights_sha256": file_sha256(weights), "config": model.config.to_dict()}


def label(inputs: list[Path], run_dir: Path, out: Path, config: LabelConfig | None = None,
          progress: bool = True) -> dict:
    """Pseudo-label every video under ``inputs`` with the IDM of ``run_dir`` into ``out``.

    Returns the summary (also in ``out/summary.json``). Videos already done are skipped.
    """
    config = config or LabelConfig()
    model, model_info = load_idm(run_dir, config.device)
    threshold = config.min_confidence
    if threshold is None:
        calibration = idm.load_calibration(run_dir)
        if calibration is None:
            raise ValueError(f"{run_dir}: no calibrated confidence threshold; run `walkthrough eval-idm` "
                             f"on it first, or pass --min-confidence")
        if calibration["confidence_threshold"] is None:
            raise ValueError(f"{run_dir}: no confidence threshold reached precision "
                             f"{calibration['target_precision']} in eval-idm; recalibrate with a lower "
                             f"--target-precision, or pass --min-confidence")
        threshold = float(calibration["confidence_threshold"])
    spec = DecodeSpec.for_model(model.config, config)
    store = LabelStore(Path(out), config, spec.fps, threshold, model_info)
    store.root.mkdir(parents=True, exist_ok=True)

    began = time.time()
    paths, problems = find_videos(inputs)
    i, n = shard_index(config.shard)
    jobs = [VideoJob.for_path(p) for p in paths[i::n]]
    todo = {job.key: job for job in jobs if not store.is_done(job)}
    if config.backend == "ray":
        rows = _ray_rows(run_dir, list(todo.values()), spec, config)
    else:
        rows = _local_rows(model, list(todo.values()), spec, config)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    frames = 0
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("labeling", total=len(todo))
        for key, steps, end in assemble(rows):
            done = store.write(todo[key], steps, end)
            frames += end["frames"]
            bar.update(task, advance=1, description=f"{Path(done['path']).name}: {done['status']}")
    seconds = time.time() - began
    run = {"videos": len(jobs), "skipped_done": len(jobs) - len(todo), "labeled_now": len(todo),
           "frames_decoded": frames, "seconds": seconds, "frames_per_second": frames / seconds,
           "shard": config.shard, "backend": config.backend}
    return store.write_summary(problems, run)


def _local_rows(model: idm.IDM, jobs: list[VideoJob], spec: DecodeSpec, config: LabelConfig) -> Iterator[dict]:
    """Decode in a thread, predict here: the predicted rows, in order.

    Batches never mix videos, so a video's labels do not depend on what was labeled before it
    (a resumed run writes the very bytes an uninterrupted one does).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 1) - 1))
    try:
        batches = (batch for job in jobs for batch in batch_rows(decode_rows(asdict(job), spec), 1))
        for batch in prefetch(batches, config.prefetch):
            yield from unbatch(predict_batch(model, batch, config.bf16))
    finally:
        torch.set_num_threads(threads)


class _RayPredictor:
    """The IDM as a Ray Data actor: loaded once per actor, then called on blocks of frames."""

    def __init__(self, run_dir: str, device: str, bf16: bool):
        self.model, _ = load_idm(Path(run_dir), device)
        self.bf16 = bf16

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return predict_batch(self.model, batch, self.bf16)


def _ray_rows(run_dir: Path, jobs: list[VideoJob], spec: DecodeSpec, config: LabelConfig) -> Iterator[dict]:
    """The same stages on Ray Data: decode as CPU tasks (one per video), the IDM as an actor
    pool (a GPU each when the cluster has GPUs). The driver reads the rows back in order and
    does the (cheap) averaging, filtering and writing itself."""
    import ray

    if not jobs:
        return
    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the driver averages each video's windows in order
    context.enable_progress_bars = False  # ours shows videos done
    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    dataset = (ray.data.from_items([asdict(job) for job in jobs], override_num_blocks=len(jobs))
               .flat_map(decode_rows, fn_kwargs={"spec": spec})
               .map_batches(_RayPredictor, fn_constructor_kwargs={"run_dir": str(Path(run_dir).resolve()),
                                                                  "device": "cuda" if gpus else "cpu",
                                                                  "bf16": config.bf16},
                            batch_size=1, batch_format="numpy",  # a block is a batch of K windows
                            concurrency=config.ray_actors, num_gpus=gpus))
    yield from dataset.iter_rows()


# --- 9. Grading pseudo-labels against the true actions ---------------------------------------------
def grade(labels: Path, truth: Path, tolerance: int = 1) -> dict:
    """Pseudo-labels vs the true actions of the same videos (a recorded store, e.g. ALE play).

    ``before``: every step the IDM labeled (from ``steps/``); ``after``: the rows the filters kept,
    read back with ``ChunkStore`` as training will read them. Each is ``metrics.summarize`` (event
    F1, per-button precision/recall, ...) over the steps whose source video is in ``truth``, plus
    the hours they cover.
    """
    labels = Path(labels)
    truth_of = {e.video.resolve(): e for e in chunks.ChunkStore(truth) if e.video is not None}
    before, after = [], []
    for file in sorted((labels / "done").glob("*.json")):
        done = json.loads(file.read_text())
        steps_file = labels / "steps" / f"{done['key']}.parquet"
        if done["status"] == "labeled" and Path(done["path"]) in truth_of and steps_file.exists():
            table = pq.read_table(steps_file)
            before.append(_paired(truth_of[Path(done["path"])], table.column("time").to_numpy(),
                                  A.from_table(table), table.column("confidence").to_numpy(), done["fps"]))
    if not before:
        raise ValueError(f"no video labeled in {labels} (with its steps/ file) is a video of {truth}")
    for episode in chunks.ChunkStore(labels) if (labels / "actions").is_dir() else []:
        source = Path(episode.info["source_video"]["path"])
        if source in truth_of:
            after.append(_paired(truth_of[source], episode.times, episode.actions, episode.column("confidence"),
                                 episode.info["action_fps"]))
    graded = {"before": _score(before, tolerance), "after": _score(after, tolerance)}
    graded["hours_in"], graded["hours_kept"] = graded["before"]["hours"], graded["after"]["hours"]
    return graded


def _paired(truth: chunks.Episode, times: np.ndarray, pred: np.ndarray, confidence: np.ndarray,
            fps: float) -> dict[str, np.ndarray]:
    """Labeled steps at ``times`` with the true actions of the same time spans (where known)."""
    true, known = truth.actions_at(times, 1.0 / fps)
    return {"pred": pred[known], "true": true[known], "confidence": confidence[known],
            "seconds": np.full(int(known.sum()), 1.0 / fps)}


def _score(stretches: list[dict[str, np.ndarray]], tolerance: int) -> dict:
    if not stretches:
        return {"steps": 0, "hours": 0.0}
    pred, true, confidence, seconds = (np.concatenate([s[k] for s in stretches])
                                       for k in ("pred", "true", "confidence", "seconds"))
    segment = np.concatenate([np.full(len(s["pred"]), i) for i, s in enumerate(stretches)])  # no event spans two
    return {"hours": float(seconds.sum()) / 3600, **summarize(pred, true, segment, confidence, tolerance)}
