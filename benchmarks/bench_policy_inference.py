"""Policy inference speed on this machine: can the CPU preset play in real time?

Closed-loop play at 30 fps that re-plans every 8 frames needs one chunk per 8 / 30 s = 267 ms,
together with preprocessing the 8 frames in between. For K = 4 and K = 16 Euler steps this reports
the latency of one chunk (batch 1: what acting needs), actions sampled per second, and the
real-time ratio: the time budget over the time used (>= 1 means real time). Then, at K = 4, the
cost of a chunk per game when B games are played at once (``play --batch B``: one policy call
samples the chunks of all B), as a speed-up over one call per game.

    python benchmarks/bench_policy_inference.py [--ckpt RUN] [--threads 1] [--repeats 50]
    python benchmarks/bench_policy_inference.py --context-frames 2 [--fuse-frames] [--batches 1,4,16]

Without --ckpt the CPU preset is built with random weights (latency does not depend on them), seeing
--context-frames frames: each with tokens of its own, or stacked in each patch (--fuse-frames).
The last line is ``JSON: {...}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from walkthrough.games import AtariGame
from walkthrough.play import preprocess
from walkthrough.policy import PRESETS, Policy, PolicyConfig
from walkthrough.train import load_model


def timed(fn, repeats: int) -> np.ndarray:
    fn()  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return np.array(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="policy run directory (default: CPU preset, random weights)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (play uses 1)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--replan-every", type=int, default=8)
    parser.add_argument("--context-frames", type=int, default=1, help="without --ckpt: frames the policy sees")
    parser.add_argument("--fuse-frames", action="store_true", help="without --ckpt: frames stacked in each patch")
    parser.add_argument("--batches", default="1,4,16", help="games played at once, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    policy = load_model(args.ckpt) if args.ckpt else Policy(PolicyConfig(
        **PRESETS["cpu"], context_frames=args.context_frames, fuse_frames=args.fuse_frames)).eval()
    cfg = policy.config
    screen = AtariGame("Breakout").reset()  # (210, 160, 3)
    frames = torch.from_numpy(preprocess(screen, cfg.image_size)).permute(2, 0, 1)[None, None]
    frames = frames.expand(1, cfg.context_frames, *frames.shape[2:])  # (1, F, 3, H, W)
    preprocess_s = float(np.median(timed(lambda: preprocess(screen, cfg.image_size), args.repeats)))
    budget_s = args.replan_every / args.fps
    params = sum(p.numel() for p in policy.parameters())
    print(f"policy: {params / 1e6:.2f}M params, {cfg.image_size}px, {cfg.context_frames} frame(s)"
          f"{' fused' if cfg.fuse_frames else ''}, horizon {cfg.horizon}, "
          f"{args.threads} thread(s), {platform.processor() or platform.machine()}")
    print(f"preprocess: {1000 * preprocess_s:.2f} ms/frame")
    result = {"params_m": round(params / 1e6, 3), "image_size": cfg.image_size, "horizon": cfg.horizon,
              "context_frames": cfg.context_frames, "fuse_frames": cfg.fuse_frames,
              "threads": args.threads, "preprocess_ms": round(1000 * preprocess_s, 3),
              "budget_ms": round(1000 * budget_s, 1), "sample_steps": {}}
    with torch.inference_mode():
        for steps in (4, 16):
            seconds = timed(lambda: policy.sample(frames, steps=steps), args.repeats)
            latency = float(np.median(seconds))
            ratio = budget_s / (latency + args.replan_every * preprocess_s)
            result["sample_steps"][steps] = {
                "latency_ms": round(1000 * latency, 2), "p90_ms": round(1000 * float(np.quantile(seconds, 0.9)), 2),
                "actions_per_s": round(cfg.horizon / latency, 1), "realtime_ratio": round(ratio, 2)}
            print(f"K={steps:2d}: {1000 * latency:7.2f} ms/chunk (p90 {1000 * np.quantile(seconds, 0.9):.2f}), "
                  f"{cfg.horizon / latency:8.1f} actions/s, real-time ratio {ratio:.1f}x "
                  f"at {args.fps:g} fps re-planning every {args.replan_every}")
        result["batched"] = {}
        for batch in [int(b) for b in args.batches.split(",")]:
            many = frames.expand(batch, *frames.shape[1:])  # (B, F, 3, H, W)
            per_game = float(np.median(timed(lambda: policy.sample(many, steps=4), args.repeats))) / batch
            speedup = result["sample_steps"][4]["latency_ms"] / (1000 * per_game)
            result["batched"][batch] = {"ms_per_game_chunk": round(1000 * per_game, 2), "speedup": round(speedup, 2)}
            print(f"K= 4, {batch:3d} games at once: {1000 * per_game:7.2f} ms per game's chunk, "
                  f"{speedup:.1f}x one call per game")
    print("JSON: " + json.dumps(result))


if __name__ == "__main__":
    main()
