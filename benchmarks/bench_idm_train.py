"""IDM training throughput: the real data loader vs. the same model on in-memory tensors.

    python benchmarks/bench_idm_train.py [--data DATA] [--frames 2] [--size 64] [--workers 1]

Both paths run the training loop's step (bf16 autocast, AdamW, clipping) on the same model;
the loader path also draws, decodes (or indexes) and augments windows in its worker processes,
which get their own cores: the training process uses the rest (``--threads`` overrides).
Two loader modes: ``preload`` (episodes decoded into RAM once, what `train-idm` picks when it
fits) and ``stream`` (each window decoded from the video on demand). Rounds alternate between
the paths, so load from other jobs on the machine hits both alike; medians are reported.

Without --data it records ~1 minute of Breakout and Pong into a temporary chunk store. Prints a
table and a last line ``JSON: {...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from itertools import cycle, islice
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from walkthrough.chunks import ChunkStore
from walkthrough.dataset import WindowDataset, WindowSpec
from walkthrough.idm import IDM, IDMConfig, describe, preset
from walkthrough.train import TrainConfig, make_loader, training_step


def samples_per_s(model, optimizer, batches, steps: int, batch_size: int) -> float:
    start = time.perf_counter()
    for batch in islice(batches, steps):
        training_step(model.loss, model, optimizer, batch, torch.device("cpu"))  # the loop's own step
    return steps * batch_size / (time.perf_counter() - start)


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process and of its (finished) worker processes, in MB."""
    return {"main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="chunk store (default: record a small one)")
    parser.add_argument("--frames", type=int, default=IDMConfig.frames, help="T (default: the IDM default)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round and path")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="preload,stream")
    parser.add_argument("--threads", type=int, help="torch threads of the training process "
                        "(default: the cores the workers leave free)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) - args.workers))

    data = args.data
    if data is None:
        from walkthrough import games

        data = Path(tempfile.mkdtemp(prefix="bench_idm_")) / "store"
        games.record(data, ["Breakout", "Pong"], player="random", episodes=1, max_seconds=30, progress=False)
    config = preset("cpu", frames=args.frames, size=(args.size, args.size))
    spec = WindowSpec(config.frames, config.frames - 1, config.fps, config.size, context=1)  # as train-idm
    cfg = TrainConfig(batch_size=args.batch_size, num_workers=args.workers)
    episodes = ChunkStore(data).episodes
    torch.manual_seed(0)
    model = IDM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    results = {}
    for mode in args.modes.split(","):
        dataset = WindowDataset(episodes, spec, preload=mode == "preload")
        loader = iter(make_loader(dataset, cfg))
        in_memory = cycle([next(loader) for _ in range(4)])  # the same kind of batches, already in RAM
        samples_per_s(model, optimizer, in_memory, 2, args.batch_size)  # warm up kernels and workers
        memory_runs, loader_runs = [], []
        for _ in range(args.rounds):
            memory_runs.append(samples_per_s(model, optimizer, in_memory, args.steps, args.batch_size))
            loader_runs.append(samples_per_s(model, optimizer, loader, args.steps, args.batch_size))
        del loader
        memory, loaded = statistics.median(memory_runs), statistics.median(loader_runs)
        results[mode] = {"in_memory_samples_per_s": round(memory, 1), "loader_samples_per_s": round(loaded, 1),
                         "ratio": round(loaded / memory, 3), "windows": len(dataset)}

    table = Table(title=f"{describe(model)}, batch {args.batch_size}, {args.workers} worker(s), "
                        f"{torch.get_num_threads()} threads")
    for column in ("loader", "windows", "in-memory samples/s", "loader samples/s", "ratio"):
        table.add_column(column, justify="right")
    for mode, r in results.items():
        table.add_row(mode, str(r["windows"]), f"{r['in_memory_samples_per_s']:.0f}",
                      f"{r['loader_samples_per_s']:.0f}", f"{r['ratio']:.2f}")
    Console().print(table)
    memory = peak_rss_mb()
    print(f"peak RSS: main {memory['main']:.0f} MB, workers {memory['workers']:.0f} MB")
    print("JSON: " + json.dumps({"model": describe(model), "batch_size": args.batch_size, "workers": args.workers,
                                 "threads": torch.get_num_threads(), "results": results,
                                 "peak_rss_mb": {k: round(v) for k, v in memory.items()},
                                 "loadavg_1m": round(float(Path("/proc/loadavg").read_text().split()[0]), 2)}))


if __name__ == "__main__":
    main()
