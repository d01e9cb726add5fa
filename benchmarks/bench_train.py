"""Training throughput of the IDM and the policy on one device (a GPU where there is one), per preset.

    python benchmarks/bench_train.py [--device cuda] [--data DATA] [--models idm-cpu,policy-cpu,...] [--compile]

For each model, the training loop's step (bf16 autocast, AdamW, clipping) runs on batches already on
the device (the model's ceiling) and on batches from the real loader (preloaded episodes, worker
processes, pinned memory, copy to the device), in alternating rounds; medians are reported with their
ratio, the loader's share of the ceiling. Peak device memory per model is shown where it is a GPU.
``--compile`` runs the loss through ``torch.compile`` (not used by training yet: on the 2-core CPU it
gained nothing, 1.0-1.2x on the policy's CPU preset; on a GPU, where small models are launch-bound,
this is how to find out).

Without --data it records ~1 minute of Breakout and Pong into a temporary chunk store. Prints a table
and a last line ``JSON: {...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from itertools import cycle, islice
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from walkthrough import idm, policy
from walkthrough.chunks import ChunkStore
from walkthrough.dataset import WindowDataset, WindowSpec
from walkthrough.idm import parameter_count
from walkthrough.train import TrainConfig, make_loader, training_step

MODELS = ("idm-cpu", "idm-gpu", "policy-cpu", "policy-gpu")
GPU_BATCHES = "idm-cpu:256,idm-gpu:128,policy-cpu:256,policy-gpu:32"
CPU_BATCHES = "idm-cpu:64,policy-cpu:32"


def build(name: str, episodes: list, preload: bool) -> tuple[nn.Module, torch.utils.data.Dataset]:
    """The model and training set that `train-idm` / `train-policy --preset P` would build."""
    kind, preset = name.split("-")
    if kind == "idm":
        config = idm.preset(preset)
        spec = WindowSpec(config.frames, config.frames - 1, config.fps, config.size, context=1)
        return idm.IDM(config), WindowDataset(episodes, spec, preload=preload)
    config = replace(policy.PolicyConfig(**policy.PRESETS[preset]), games=sorted({e.game for e in episodes}))
    return policy.Policy(config), policy.PolicyDataset([(episodes, 1.0)], config, preload=preload)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def samples_per_s(model: nn.Module, loss_of, optimizer, batches, steps: int, batch_size: int,
                  device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for batch in islice(batches, steps):
        training_step(loss_of, model, optimizer, batch, device)  # the training loop's own step
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - start)


def measure(name: str, episodes: list, device: torch.device, batch_size: int, workers: int, steps: int,
            rounds: int, compile: bool) -> dict:
    torch.manual_seed(0)
    model, dataset = build(name, episodes, preload=True)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    loss_of = torch.compile(model.loss) if compile else model.loss
    loader = iter(make_loader(dataset, TrainConfig(batch_size=batch_size, num_workers=workers, augment=True)))
    on_device = cycle([{k: v.to(device) for k, v in next(loader).items()} for _ in range(4)])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    samples_per_s(model, loss_of, optimizer, on_device, 3, batch_size, device)  # warm up (and compile)
    ceiling, loaded = [], []
    for _ in range(rounds):
        ceiling.append(samples_per_s(model, loss_of, optimizer, on_device, steps, batch_size, device))
        loaded.append(samples_per_s(model, loss_of, optimizer, loader, steps, batch_size, device))
    result = {"model": name, "compiled": compile, "params_m": round(parameter_count(model) / 1e6, 2), "batch_size": batch_size,
              "on_device_samples_per_s": round(statistics.median(ceiling), 1),
              "loader_samples_per_s": round(statistics.median(loaded), 1)}
    result["ratio"] = round(result["loader_samples_per_s"] / result["on_device_samples_per_s"], 3)
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del loader, model, optimizer, on_device
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", type=Path, help="chunk store (default: record a small one)")
    parser.add_argument("--models", help=f"comma-separated, from {', '.join(MODELS)} (default: all on a GPU, "
                        "the cpu presets on the CPU)")
    parser.add_argument("--batch-sizes", help="MODEL:BATCH pairs, comma-separated (default: a GPU's "
                        f"{GPU_BATCHES}; on the CPU {CPU_BATCHES})")
    parser.add_argument("--workers", type=int, help="loader workers (default: up to 8 on a GPU machine, 1 on the CPU)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and path")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the loss")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    models = args.models or ",".join(MODELS if gpu else ("idm-cpu", "policy-cpu"))
    batches = args.batch_sizes or (GPU_BATCHES if gpu else CPU_BATCHES)
    batch_sizes = {pair.split(":")[0]: int(pair.split(":")[1]) for pair in batches.split(",")}
    if args.workers is None:
        args.workers = min(8, max(1, (os.cpu_count() or 2) - 2)) if gpu else 1
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    data = args.data
    if data is None:
        from walkthrough import games

        data = Path(tempfile.mkdtemp(prefix="bench_train_")) / "store"
        games.record(data, ["Breakout", "Pong"], player="random", episodes=1, max_seconds=30, progress=False)
    episodes = ChunkStore(data).episodes
    results = []
    for name in models.split(","):
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        results.append(measure(name, episodes, device, batch_sizes.get(name, 64), args.workers, args.steps,
                               args.rounds, args.compile))
        print(json.dumps(results[-1]), flush=True)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    table = Table(title=f"Training throughput on {where}, bf16, {args.workers} loader workers"
                        + (", torch.compile" if args.compile else ""))
    for column in ("model", "params (M)", "batch", "on-device samples/s", "loader samples/s", "ratio", "peak GiB"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(r["model"], f"{r['params_m']:.2f}", str(r["batch_size"]), f"{r['on_device_samples_per_s']:.0f}",
                      f"{r['loader_samples_per_s']:.0f}", f"{r['ratio']:.2f}", str(r.get("peak_memory_gib", "-")))
    Console(width=120).print(table)
    print("JSON: " + json.dumps({"device": where, "torch": torch.__version__, "workers": args.workers,
                                 "results": results}))


if __name__ == "__main__":
    main()
