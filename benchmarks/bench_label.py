"""Labeling throughput against its physical limit, and memory against video length.

    python benchmarks/bench_label.py [--seconds 30] [--file-minutes 2] [--minutes 5 20 60] [--run IDM_RUN]

1. Throughput, on the same files: decode + resize alone (``video.iter_frames`` at the IDM's fps
   and size: what no labeler can beat) vs end-to-end ``label.label`` (decode, windows, IDM,
   averaging, filters, writing), as frames per second and their ratio, for the IDM's CPU preset
   (randomly initialised unless ``--run`` names a trained one: speed does not depend on the
   weights), with the labeler's default torch threads (one per core but one) and with one per
   core. Two kinds of files: real Breakout play at its native 210x160, and the same play
   pillarboxed into 1280x720 as walkthroughs on video sites are; each recording is looped (by
   remuxing) to ``--file-minutes``, as walkthroughs last minutes, so that what is paid once per
   file or run (model loading, finding black bars, filling the pipeline) weighs as little as it
   does on them. The IDM alone (frames/s on ready frames:
   every frame encoded once, a window per frame) is shown too: the labeler cannot beat that either.
2. Memory: peak RSS of a fresh process labeling one video looped (by remuxing, no re-encoding)
   to 5, 20 and 60 minutes, with a tiny IDM at 10 fps so that an hour takes minutes. Flat means
   the peak does not grow with the length beyond the per-step results (~100 bytes a step).

With ``--device cuda`` the IDM runs on the GPU (fp32 and bf16; decoding stays on the CPU) and
``--preset gpu`` labels with the GPU preset's IDM.

Prints tables, then one ``JSON: {...}`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

from walkthrough import games, idm, label, train, video

CORES = os.cpu_count() or 1


def save_random_idm(run: Path, config: idm.IDMConfig) -> Path:
    model = idm.IDM(config)
    run.mkdir(parents=True)
    train.save_checkpoint(run, model, None, torch.optim.AdamW(model.parameters()), train.TrainConfig(),
                          step=0, train_seconds=0.0, model_type="idm")
    return run


def make_clips(root: Path, seconds: float, minutes: float) -> dict[str, list[Path]]:
    """Two recordings of Breakout play at 210x160, and the same pillarboxed into 1280x720, each
    looped to ``minutes``."""
    games.record(root / "ale", ["Breakout"], player="random", episodes=2, fps=30, seed=7,
                 max_seconds=seconds, progress=False)
    native = sorted((root / "ale" / "videos").glob("*.mp4"))
    (root / "720p").mkdir()
    wide = []
    for clip in native:
        wide.append(root / "720p" / clip.name)
        with video.VideoWriter(wide[-1], 30) as writer:
            for _, frame in video.iter_frames(clip):
                big = frame.repeat(3, 0).repeat(3, 1)  # 630 x 480
                writer.write(np.pad(big, ((45, 45), (400, 400), (0, 0))))
    clips: dict[str, list[Path]] = {}
    for kind, files in (("ale 210x160", native), ("720p pillarboxed", wide)):
        (root / "long" / kind).mkdir(parents=True)
        clips[kind] = [root / "long" / kind / f.name for f in files]
        for short, long in zip(files, clips[kind]):
            loop_video(short, long, minutes)
    return clips


def decode_fps(files: list[Path], config: idm.IDMConfig) -> float:
    began, frames = time.perf_counter(), 0
    for file in files:
        frames += sum(1 for _ in video.iter_frames(file, config.fps, config.size))
    return frames / (time.perf_counter() - began)


def label_fps(files: list[Path], run: Path, out: Path, config: label.LabelConfig) -> float:
    summary = label.label(files, run, out, config, progress=False)
    return summary["run"]["frames_per_second"]


def model_frames_per_second(run: Path, bf16: bool, device: str, block: int = label.LabelConfig.batch_size,
                            repeats: int = 3) -> float:
    """The IDM on a ready block of frames, as the labeler calls it (stride 1: a window per frame)."""
    model = train.load_model(run).to(device)
    T, (H, W) = model.config.frames, model.config.size
    frames = torch.randint(0, 256, (1, block + T + 1, 3, H, W), dtype=torch.uint8, device=device)
    starts = torch.ones(1, block, dtype=torch.bool, device=device)
    best = 0.0
    for _ in range(repeats + 1):  # the first call warms up (GPU kernels)
        began = time.perf_counter()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            model.block_sums(frames, starts)
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, block / (time.perf_counter() - began))
    return best


def loop_video(source: Path, target: Path, minutes: float) -> None:
    """``source`` repeated to ``minutes`` by copying its packets with shifted timestamps."""
    duration = video.probe(source).duration
    with av.open(str(target), "w") as dst:
        out = None
        for loop in range(int(np.ceil(minutes * 60 / duration))):
            with av.open(str(source)) as src:
                stream = src.streams.video[0]
                out = out or dst.add_stream_from_template(stream)
                shift = round(loop * duration / stream.time_base)
                for packet in src.demux(stream):
                    if packet.pts is None:  # the demuxer's final flush packet
                        continue
                    packet.pts, packet.dts, packet.stream = packet.pts + shift, packet.dts + shift, out
                    dst.mux(packet)


# VmHWM, not getrusage's ru_maxrss: the latter keeps the forking parent's peak across exec.
PEAK_RSS = """
import json, re, sys
from pathlib import Path
from walkthrough import label
config = label.LabelConfig(min_confidence=0.0)
summary = label.label([Path(sys.argv[1])], Path(sys.argv[2]), Path(sys.argv[3]), config, progress=False)
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
print(json.dumps({"peak_rss_mb": peak_kb / 1024, "hours": summary["hours_in"],
                  "fps": summary["run"]["frames_per_second"]}))
"""


def peak_rss(clip: Path, run: Path, out: Path) -> dict:
    """Label ``clip`` in a fresh process; its peak RSS and labeling rate."""
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, str(clip), str(run), str(out)],
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="Length of each recording.")
    parser.add_argument("--file-minutes", type=float, default=2.0, help="Each recording looped to this length.")
    parser.add_argument("--minutes", type=float, nargs="*", default=[5, 20, 60],
                        help="Looped video lengths for the memory test (none: skip it).")
    parser.add_argument("--run", type=Path, help="A trained IDM run (default: a random IDM of --preset).")
    parser.add_argument("--preset", default="cpu", choices=sorted(idm.PRESETS), help="IDM preset without --run.")
    parser.add_argument("--device", default="cpu", help="Where the IDM runs: cpu | cuda.")
    args = parser.parse_args()
    results: dict = {"throughput": [], "memory": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = args.run or save_random_idm(root / f"idm-{args.preset}", idm.preset(args.preset))
        model_config = train.load_model(run).config
        clips = make_clips(root, args.seconds, args.file_minutes)
        default = max(1, (os.cpu_count() or 1) - 1)  # the labeler's default torch threads
        settings = {
            f"fp32 (--no-bf16, {default} thr.)": label.LabelConfig(min_confidence=0.0, bf16=False),
            f"fp32, {CORES} threads": label.LabelConfig(min_confidence=0.0, bf16=False, threads=CORES),
            f"--bf16 ({default} thr.)": label.LabelConfig(min_confidence=0.0, bf16=True),
            f"--bf16, {CORES} threads": label.LabelConfig(min_confidence=0.0, bf16=True, threads=CORES),
        } if args.device == "cpu" else {
            f"fp32 on {args.device}": label.LabelConfig(min_confidence=0.0, bf16=False, device=args.device),
            f"bf16 on {args.device}": label.LabelConfig(min_confidence=0.0, bf16=True, device=args.device),
        }
        for bf16 in (False, True):
            results[f"idm_frames_per_s_{'bf16' if bf16 else 'fp32'}"] = model_frames_per_second(run, bf16, args.device)
        results["cores"], results["idm_threads"], results["device"] = CORES, torch.get_num_threads(), args.device
        print(f"IDM alone ({idm.describe(train.load_model(run))}, {torch.get_num_threads()} threads): "
              f"{results['idm_frames_per_s_fp32']:.0f} frames/s fp32, "
              f"{results['idm_frames_per_s_bf16']:.0f} bf16")
        print(f"{'files':<20} {'setting':<26} {'decode+resize fps':>18} {'label fps':>10} {'ratio':>7}")
        for kind, files in clips.items():
            for name, config in settings.items():
                # Decode right before labeling, so that both see the same load on the machine.
                decode = decode_fps(files, model_config)
                end_to_end = label_fps(files, run, root / f"out-{len(results['throughput'])}", config)
                row = {"files": kind, "setting": name, "decode_fps": decode, "label_fps": end_to_end,
                       "ratio": end_to_end / decode}
                results["throughput"].append(row)
                print(f"{kind:<20} {name:<26} {decode:>18.0f} {end_to_end:>10.0f} {row['ratio']:>7.3f}")

        # Memory does not depend on the IDM's size; a tiny one at 10 fps labels an hour in minutes.
        tiny = save_random_idm(root / "idm-tiny", idm.IDMConfig(frames=2, size=(16, 16), fps=10.0, channels=(4,),
                                                                dim=8, depth=1, heads=1))
        print(f"\n{'video':<10} {'peak RSS MB':>12} {'label fps':>10}")
        for minutes in args.minutes:
            looped = root / f"loop-{minutes:g}min.mp4"
            loop_video(clips["ale 210x160"][0], looped, minutes)  # a looped file, looped again
            row = {"minutes": minutes, **peak_rss(looped, tiny, root / f"mem-{minutes:g}")}
            results["memory"].append(row)
            looped.unlink()
            print(f"{minutes:>6g} min {row['peak_rss_mb']:>12.0f} {row['fps']:>10.0f}")
    print("JSON: " + json.dumps(results))


if __name__ == "__main__":
    main()
