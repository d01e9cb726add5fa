"""Decode throughput of walkthrough.video against hand-written PyAV loops doing the same work.

    python benchmarks/bench_decode.py [--seconds 60] [--windows 300]

Records real Breakout play (random sticky actions, 210x160 at 30 fps) with our VideoWriter
(H.264, keyframe every 30 frames) into a temp dir, then measures:

1. raw PyAV: decode only (the ceiling), the common `frame.to_ndarray(format="rgb24")` loop, and a
   tuned loop (frame threads, one reused swscale context): the physical baseline;
2. our iter_frames, sequentially at native size and resized to 64x64, against the tuned loop;
3. random 8-frame training windows: read_frames against raw open + seek + decode of the same
   windows (each opens the file, as a data loader's worker does per sample).

Each figure is the best of a few runs, raw and ours taking turns. Frames per wall second is the
headline; frames per CPU second (all threads) is shown too, as other processes on a shared machine
disturb it much less. Prints a table, then one `JSON: {...}` line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ale_py
import av
import gymnasium as gym
import numpy as np
from av.video.reformatter import VideoReformatter

from walkthrough.video import VideoWriter, iter_frames, probe, read_frames

WINDOW = 8


def record_breakout(path: Path, seconds: float, fps: int = 30, seed: int = 0) -> None:
    """Random play that holds each action for a while, as a person would (not 1-frame jitter)."""
    gym.register_envs(ale_py)
    env = gym.make("ALE/Breakout-v5", frameskip=2)  # 60 Hz emulator / 2 = 30 frames per second
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    action = 0
    with VideoWriter(path, fps, gop=30) as writer:
        for _ in range(int(seconds * fps)):
            if rng.random() < 0.1:
                action = int(rng.integers(env.action_space.n))
            obs, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                obs, _ = env.reset()
            writer.write(obs)  # (210, 160, 3) uint8
    env.close()


def best_rates(*works: Callable[[], int], repeats: int) -> list[tuple[float, float]]:
    """(items per wall second, items per CPU second) of each `work` (which returns how many it
    did), best of `repeats`. The works take turns, so a busy spell on the machine hits them alike;
    CPU time (all threads of this process) is what other processes on the machine disturb least."""
    best = [(0.0, 0.0)] * len(works)
    for _ in range(repeats):
        for i, work in enumerate(works):
            wall, cpu = time.perf_counter(), time.process_time()
            n = work()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[i] = (max(best[i][0], n / wall), max(best[i][1], n / cpu))
    return best


def raw_decode_only(path: Path) -> int:
    # PyAV's default threading: with nothing else to overlap, frame threads only add hand-offs.
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def raw_naive_rgb(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for f in container.decode(video=0) if f.to_ndarray(format="rgb24") is not None)


def raw_tuned_rgb(path: Path, size: tuple[int, int] | None = None) -> int:
    h, w = size or (None, None)
    scaler = VideoReformatter()  # one swscale context for all frames, single-threaded
    n = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            scaler.reformat(frame, w, h, "rgb24", interpolation="AREA", threads=1).to_ndarray()
            n += 1
    return n


def raw_window(path: Path, start: float, fps: float) -> np.ndarray:
    """The same window as read_frames, by hand: seek, decode, hold the latest frame per step."""
    scaler = VideoReformatter()
    out: list[np.ndarray] = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        container.seek(int(start / stream.time_base), stream=stream, backward=True)
        held = None
        for frame in container.decode(stream):
            while held is not None and start + len(out) / fps < frame.time - 1e-6:
                out.append(scaler.reformat(held, format="rgb24", threads=1).to_ndarray())
                if len(out) == WINDOW:
                    return np.stack(out)
            held = frame
    raise RuntimeError("window past the end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the test video")
    parser.add_argument("--windows", type=int, default=300, help="random windows to read")
    parser.add_argument("--repeats", type=int, default=7, help="best of this many runs")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "breakout.mp4"
        t = time.perf_counter()
        record_breakout(path, args.seconds)
        info = probe(path)
        print(f"test video: {info.num_frames} frames of {info.width}x{info.height} {info.codec} "
              f"at {info.fps:g} fps, {path.stat().st_size / 1e6:.2f} MB "
              f"(recorded + encoded in {time.perf_counter() - t:.1f} s)")

        rng = np.random.default_rng(0)
        starts = rng.uniform(0, info.duration - 1.0, args.windows)
        # Same frames both ways, so the comparison is like for like.
        for start in starts[:20]:
            np.testing.assert_array_equal(read_frames(path, start, WINDOW, info.fps),
                                          raw_window(path, start, info.fps))

        def ours(**kwargs) -> Callable[[], int]:
            return lambda: sum(1 for _ in iter_frames(path, **kwargs))

        def windows(read: Callable[[Path, float], np.ndarray]) -> Callable[[], int]:
            return lambda: sum(len(read(path, s)) for s in starts)

        rows = [  # name, what, raw PyAV, ours
            ("decode_only", "decode only, no RGB (the ceiling)",
             lambda: raw_decode_only(path), None),
            ("to_ndarray", "frame.to_ndarray('rgb24'), the common loop",
             lambda: raw_naive_rgb(path), None),
            ("rgb", "sequential, native size, RGB", lambda: raw_tuned_rgb(path), ours()),
            ("rgb64", "sequential, resized to 64x64, RGB",
             lambda: raw_tuned_rgb(path, (64, 64)), ours(size=(64, 64))),
            ("window", f"random {WINDOW}-frame windows (open+seek+decode)",
             windows(lambda p, s: raw_window(p, s, info.fps)),
             windows(lambda p, s: read_frames(p, s, WINDOW, info.fps))),
        ]
        fig: dict[str, float | str] = {
            "video": f"{info.num_frames} frames {info.width}x{info.height} {info.codec} gop 30"}
        print(f"\n{'frames/s':46s} {'raw PyAV':>9s} {'ours':>9s} {'ours/raw':>9s} "
              f"{'per CPU-s: raw':>15s} {'ours':>7s} {'ours/raw':>9s}")
        for name, what, raw, mine in rows:
            works = [raw] if mine is None else [raw, mine]
            (raw_wall, raw_cpu), *ours_rates = best_rates(*works, repeats=args.repeats)
            fig |= {f"raw_{name}_fps": raw_wall, f"raw_{name}_fps_per_cpu": raw_cpu}
            if not ours_rates:
                print(f"{what:46s} {raw_wall:9.0f} {'':>9s} {'':>9s} {raw_cpu:15.0f}")
                continue
            wall, cpu = ours_rates[0]
            fig |= {f"ours_{name}_fps": wall, f"ours_{name}_fps_per_cpu": cpu,
                    f"ratio_{name}": wall / raw_wall, f"ratio_{name}_per_cpu": cpu / raw_cpu}
            print(f"{what:46s} {raw_wall:9.0f} {wall:9.0f} {wall / raw_wall:9.2f} "
                  f"{raw_cpu:15.0f} {cpu:7.0f} {cpu / raw_cpu:9.2f}")
        print(f"windows/s: raw {fig['raw_window_fps'] / WINDOW:.0f}, "
              f"ours {fig['ours_window_fps'] / WINDOW:.0f}")
    print("JSON: " + json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                 for k, v in fig.items()}))


if __name__ == "__main__":
    main()
