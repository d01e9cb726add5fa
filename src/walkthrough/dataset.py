"""Training samples from the chunk store: windows of frames with the actions between them.

A sample starts at frame k of an episode resampled to the model's ``fps``: ``num_frames`` frames
(k, k+1, ...) and ``num_actions`` action steps (k, k+1, ...), where action step j is everything
the player did during [t_j, t_j + 1/fps), i.e. what turns frame j into frame j+1.

    IDM:    num_frames = T, num_actions = T - 1, context = 1   (the action at every transition in
            the window; frames k-1 and k+T only give the edge frames their motion)
    policy: num_frames = 1, num_actions = H       (one context frame, a chunk of H future actions)

``context`` frames are added before and after the window's frames; past an episode's ends they
repeat its first or last frame (a video's start and end: no motion there), so they never change
which windows exist.

Frames are decoded on demand (only the window), cropped to the game area, resized and the
controller overlay masked; or, with ``preload=True``, whole episodes are decoded once into RAM
(small datasets: no decoding in the training loop at all).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from walkthrough import actions as A
from walkthrough import video
from walkthrough.chunks import ChunkStore, Episode, StoreError


@dataclass(frozen=True)
class WindowSpec:
    num_frames: int
    num_actions: int
    fps: float = 30.0
    size: tuple[int, int] = (64, 64)  # (H, W)
    stride: int = 1  # frames between consecutive window starts
    context: int = 0  # extra frames on each side of the window's frames (see the module docstring)


def split_episodes(episodes: list[Episode], val_fraction: float, seed: int = 0) -> tuple[list[Episode], list[Episode]]:
    """Split by episode (never by frame), deterministically from the video ids.

    Each game gives ``val_fraction`` of its episodes (rounded), so every game with enough
    episodes is scored on held-out play; at least one episode goes to validation when there are
    two or more.
    """
    def key(e: Episode) -> str:
        return hashlib.sha256(f"{seed}:{e.video_id}".encode()).hexdigest()

    ranked = sorted(episodes, key=key)
    val: list[Episode] = []
    for game in sorted({e.game for e in ranked}):
        of_game = [e for e in ranked if e.game == game]
        val += of_game[:int(round(len(of_game) * val_fraction))]
    if not val and val_fraction > 0 and len(ranked) >= 2:
        val = ranked[:1]
    held_out = {e.video_id for e in val}
    return [e for e in ranked if e.video_id not in held_out], [e for e in ranked if e.video_id in held_out]


def decode_episode(episode: Episode, fps: float, size: tuple[int, int],
                   max_frames: int | None = None) -> np.ndarray:
    """An episode's frames at ``fps`` and ``size`` (the first ``max_frames``), cropped to the game
    area and overlay-masked. (N, H, W, 3) uint8."""
    frames = video.iter_frames(episode.video, fps=fps, size=size, crop=episode.crop(),
                               start=episode.start_time, end=episode.end_time)
    with contextlib.closing(frames):
        stacked = np.stack([frame for _, frame in itertools.islice(frames, max_frames)])
    return episode.apply_mask(stacked)


def decode_episodes(episodes: list[Episode], fps: float, size: tuple[int, int], workers: int | None = None,
                    parallel_from_s: float = 300.0) -> list[np.ndarray]:
    """``decode_episode`` for each episode, in ``workers`` processes (default: one per CPU core) once
    the episodes hold ``parallel_from_s`` seconds of video or more. A process starts in a second or
    two, one decoder reads ~1-2k frames/s: preloading hours of play serially takes minutes."""
    workers = min(workers or os.cpu_count() or 1, len(episodes))
    if workers <= 1 or sum(e.duration for e in episodes) < parallel_from_s:
        return [decode_episode(e, fps, size) for e in episodes]
    # spawn, not fork: the parent may hold torch's and FFmpeg's threads
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(decode_episode, episodes, itertools.repeat(fps), itertools.repeat(size)))


class WindowDataset(Dataset):
    """Every window of every episode that has a video, at the spec's fps and size.

    Each item is a dict of tensors:
        frames       (F + 2 * context, 3, H, W) uint8
        actions      (A, 21) float32
        action_mask  (A,) bool      False where no label covers the step
        weight       (A,) float32   per-step weight: the label's confidence for pseudo-labels
                                    (when ``use_confidence``), else 1
        episode      ()  int64      index into ``self.episodes``
    """

    def __init__(self, episodes: list[Episode], spec: WindowSpec, use_confidence: bool = True,
                 preload: bool = False):
        self.spec = spec
        self.use_confidence = use_confidence
        self.episodes = [e for e in episodes if e.video is not None]
        if not self.episodes:
            raise StoreError("no episode has a video file: nothing to train on")
        self.windows: list[tuple[int, int]] = []  # (episode index, first frame)
        span = max(spec.num_frames, spec.num_actions + (1 if spec.num_frames > 1 else 0))
        for e, episode in enumerate(self.episodes):
            num_steps = int(np.floor(episode.duration * spec.fps + 1e-6))
            for start in range(0, num_steps - span + 1, spec.stride):
                self.windows.append((e, start))
        self.frames_cache: dict[int, np.ndarray] = {}
        if preload:
            decoded = decode_episodes(self.episodes, spec.fps, spec.size)
            self.frames_cache = dict(enumerate(decoded))

    @classmethod
    def from_store(cls, store: ChunkStore, spec: WindowSpec, **kwargs) -> "WindowDataset":
        return cls(store.episodes, spec, **kwargs)

    def __len__(self) -> int:
        return len(self.windows)

    def frames(self, e: int, start: int, num: int) -> np.ndarray:
        """(num, H, W, 3) uint8 frames start.. of episode e at the spec's fps; ``start`` may be
        negative and the frames may reach past the episode: its first or last frame stands in."""
        episode = self.episodes[e]
        if e in self.frames_cache:
            cached = self.frames_cache[e]
            return cached[np.clip(np.arange(start, start + num), 0, len(cached) - 1)]
        first = max(start, 0)
        t0 = episode.start_time + first / self.spec.fps
        stream = video.iter_frames(episode.video, self.spec.fps, self.spec.size, episode.crop(), t0, episode.end_time)
        with contextlib.closing(stream):
            read = [frame for _, frame in itertools.islice(stream, start + num - first)]
        if not read:
            raise StoreError(f"{episode.video}: no frame at {t0:.3f}s at {self.spec.fps:g} fps (the video ends first)")
        index = np.clip(np.arange(start, start + num) - first, 0, len(read) - 1)
        return episode.apply_mask(np.stack(read)[index])

    def labels(self, e: int, start: int, num: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Actions (num, 21), mask (num,), weight (num,) for steps start.. of episode e."""
        episode = self.episodes[e]
        step = 1.0 / self.spec.fps
        times = episode.start_time + (start + np.arange(num)) * step
        acts, valid = episode.actions_at(times, step)
        weight = np.ones(num, dtype=np.float32)
        if self.use_confidence:
            confidence = episode.column_at("confidence", times, step)
            if confidence is not None:
                weight = np.nan_to_num(confidence, nan=0.0).astype(np.float32)
        return acts, valid, weight

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        e, start = self.windows[i]
        context = self.spec.context
        frames = self.frames(e, start - context, self.spec.num_frames + 2 * context)
        acts, valid, weight = self.labels(e, start, self.spec.num_actions)
        return {
            "frames": torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2),  # (F + 2 context, 3, H, W)
            "actions": torch.from_numpy(acts),  # (A, 21)
            "action_mask": torch.from_numpy(valid),  # (A,)
            "weight": torch.from_numpy(weight),  # (A,)
            "episode": torch.tensor(e),
        }


def action_stats(dataset: WindowDataset) -> dict[str, float]:
    """Share of steps with each button pressed, over all labelled steps (cheap: no decoding)."""
    totals = np.zeros(A.ACTION_DIM)
    count = 0
    for e, episode in enumerate(dataset.episodes):
        step = 1.0 / dataset.spec.fps
        times = episode.start_time + np.arange(int(episode.duration * dataset.spec.fps)) * step
        acts, valid = episode.actions_at(times, step)
        totals += np.abs(acts[valid]).sum(0)
        count += int(valid.sum())
    return {name: float(totals[i] / max(count, 1)) for i, name in enumerate(A.ACTION_NAMES)}
