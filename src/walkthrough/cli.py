"""The `walkthrough` command line. Each subcommand is a thin shell over a library function."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Turn unlabeled gameplay video into training data for gaming agents.")
console = Console(stderr=True)


def fail(message: str) -> None:
    """Exit non-zero with a one-line reason."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)  # one line, however long
    raise typer.Exit(code=2)


@app.command()
def record(
    out: Path = typer.Option(..., "--out", help="Dataset directory (chunk store) to write into."),
    game: str = typer.Option("Breakout", "--game", help="ALE game name(s), comma-separated, or a shortcut (see below)."),
    player: str = typer.Option("expert", "--player", help="expert | random (persistent random)."),
    episodes: int = typer.Option(4, "--episodes", min=1, help="Episodes per game."),
    fps: float = typer.Option(30.0, "--fps", help="Recording frame rate (ALE runs at 60 Hz; must divide 60)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first episode; episode i uses seed + i."),
    max_seconds: float = typer.Option(300.0, "--max-seconds", help="Cap on each episode's length."),
    sticky: float = typer.Option(0.0, "--sticky", min=0.0, max=1.0, help="Probability of repeating the previous action (recorded as applied)."),
) -> None:
    """Record real Atari games with their true gamepad actions into a chunk store.

    Example: `walkthrough record --game Breakout --player expert --episodes 4 --fps 30 --out DATA`
    """
    from walkthrough import games

    try:
        names = games.resolve_games(game)
        games.record(out, names, player=player, episodes=episodes, fps=fps, seed=seed,
                     max_seconds=max_seconds, sticky=sticky)
    except (ValueError, OSError) as e:
        fail(str(e))


@app.command()
def info(
    data: list[Path] = typer.Argument(..., help="Chunk store(s): directories or NitroGen SHARD_XXXX.tar.gz files."),
    videos: Optional[Path] = typer.Option(None, "--videos", help="Directory of the source videos (NitroGen: your downloads)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Summarise a dataset: episodes, hours, frames, games, button press rates, problems.

    Example: `walkthrough info DATA`
    """
    import json

    from rich.table import Table

    from walkthrough.actions import ActionError
    from walkthrough.chunks import ChunkStore, StoreError

    try:
        store = ChunkStore(list(data), videos=videos)
        summary = store.summary()
        problems = store.check()
    except (StoreError, ActionError, OSError) as e:
        fail(str(e))
    summary["problems"] = problems
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    out = Console()
    out.print(f"[bold]{', '.join(map(str, data))}[/]: {summary['episodes']} episodes, "
              f"{summary['chunks']} chunks, {summary['hours']:.3f} h, {summary['action_rows']} action rows, "
              f"{summary['active_share']:.0%} of rows with input, "
              f"videos found for {summary['videos_found']}/{summary['episodes']}")
    games = Table("game", "episodes", "minutes", title="Games")
    for name, g in sorted(summary["games"].items()):
        games.add_row(name, str(g["episodes"]), f"{g['seconds'] / 60:.1f}")
    out.print(games)
    usage = Table("input", "share of rows", title="Button presses and stick use (|axis| > 0.2)")
    for name, rate in {**summary["press_rate"], **summary["stick_usage"]}.items():
        if rate > 0:
            usage.add_row(name, f"{rate:.1%}")
    out.print(usage)
    if problems:
        out.print(f"[bold yellow]{len(problems)} problem(s):[/]")
        for line in problems:
            out.print(f"  - {line}", highlight=False)
    else:
        out.print("[green]no problems found[/]")


@app.command("train-policy")
def train_policy(
    data: list[str] = typer.Option(..., "--data", help="Chunk store, as PATH or PATH:WEIGHT (its sampling share, default 1). Repeat to mix ground truth and pseudo-labels."),
    out: Path = typer.Option(..., "--out", help="Run directory (checkpoints, metrics.jsonl)."),
    preset: str = typer.Option("cpu", "--preset", help="cpu (2M params, SigLIP 2 from scratch at 128 px) | gpu (NitroGen-sized, 510M, 256 px) | test (smoke tests)."),
    horizon: int = typer.Option(16, "--horizon", min=1, help="Actions per predicted chunk."),
    context_frames: int = typer.Option(1, "--context-frames", min=1, help="Frames the policy sees, up to now."),
    fuse_frames: bool = typer.Option(False, "--fuse-frames", help="Stack the context frames in each patch (early fusion: one frame's tokens, motion inside a patch)."),
    fps: float = typer.Option(30.0, "--fps", help="Frame and action rate (the recordings' rate)."),
    sample_steps: int = typer.Option(16, "--sample-steps", min=1, help="Euler steps when sampling (validation and play default)."),
    vision_pretrained: Optional[Path] = typer.Option(None, "--vision-pretrained", help="Local directory of a SigLIP 2 saved with save_pretrained."),
    freeze_vision: bool = typer.Option(False, "--freeze-vision", help="Keep the vision encoder's weights fixed."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start from the weights of an earlier policy run (same architecture, or more --context-frames; a new optimizer and schedule; games it has not seen are added)."),
    standardize_tokens: Optional[bool] = typer.Option(None, "--standardize-tokens/--raw-tokens", help="BatchNorm over the image tokens before the DiT (default: the preset's; on for cpu and test)."),
    game_dropout: float = typer.Option(0.1, "--game-dropout", min=0.0, max=1.0, help="Probability of hiding the game id (trains the CFG unconditional)."),
    no_confidence_weighting: bool = typer.Option(False, "--no-confidence-weighting", help="Weight pseudo-label steps 1 instead of by their confidence."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", min=0.0, max=0.9, help="Share of ground-truth episodes held out."),
    steps: int = typer.Option(2000, "--steps", min=1, help="Optimizer steps."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    lr: float = typer.Option(5e-4, "--lr"),
    warmup_steps: int = typer.Option(100, "--warmup-steps", min=0),
    schedule: str = typer.Option("wsd", "--schedule", help="wsd | cosine"),
    ema_decay: float = typer.Option(0.999, "--ema-decay", min=0.0, max=1.0, help="0 disables EMA."),
    bf16: bool = typer.Option(True, "--bf16/--no-bf16", help="bf16 autocast."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Colour jitter and small shifts."),
    preload: bool = typer.Option(True, "--preload/--stream", help="Decode all frames into RAM once, or windows on demand."),
    eval_every: int = typer.Option(500, "--eval-every", min=1),
    ckpt_every: int = typer.Option(500, "--ckpt-every", min=1),
    log_every: int = typer.Option(50, "--log-every", min=1),
    num_workers: int = typer.Option(1, "--num-workers", min=0),
    seed: int = typer.Option(0, "--seed"),
    budget_minutes: Optional[float] = typer.Option(None, "--budget-minutes", help="End after this much training time, or at --steps if that comes first (the schedule follows whichever ends the run)."),
    clock: str = typer.Option("wall", "--clock", help="wall | cpu: what --budget-minutes counts (cpu: this process's CPU time, fair on a shared machine)."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Checkpoint and stop this session after this long; --resume continues."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
) -> None:
    """Train the vision-action policy (SigLIP 2 + DiT flow matching) on ground truth and pseudo-labels.

    Example: `walkthrough train-policy --data DATA --data LABELS:0.5 --out RUN --steps 3000`
    """
    options = dict(locals())  # the training-loop flags: each one named like a TrainConfig field sets it
    from walkthrough import policy
    from walkthrough.train import TrainConfig
    from walkthrough.video import VideoError

    try:
        if preset not in policy.PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(policy.PRESETS)}")
        config = policy.PolicyConfig(**policy.PRESETS[preset], horizon=horizon, context_frames=context_frames,
                                     fuse_frames=fuse_frames, fps=fps, sample_steps=sample_steps,
                                     freeze_vision=freeze_vision, game_dropout=game_dropout)
        if standardize_tokens is not None:
            config = replace(config, standardize_tokens=standardize_tokens)
        train_cfg = TrainConfig.from_dict(options)
        sources = [policy.Source.parse(d) for d in data]
        policy.train_policy(sources, out, config, train_cfg, val_fraction=val_fraction,
                            use_confidence=not no_confidence_weighting,
                            vision_pretrained=vision_pretrained, preload=preload, resume=resume,
                            init_from=init_from)
    except (ValueError, OSError, VideoError) as e:
        fail(str(e))


@app.command()
def play(
    ckpt: Path = typer.Option(..., "--ckpt", help="Policy run directory (from train-policy)."),
    game: str = typer.Option("Breakout", "--game", help="ALE game name."),
    episodes: int = typer.Option(10, "--episodes", min=1),
    out: Path = typer.Option(..., "--out", help="Directory for scores.json and the videos."),
    replan_every: int = typer.Option(2, "--replan-every", min=1, help="Steps executed from each chunk before re-planning (2 played best: docs/policy.md)."),
    sample_steps: Optional[int] = typer.Option(None, "--sample-steps", min=1, help="Euler steps per chunk (default: the run's)."),
    cfg_scale: float = typer.Option(1.0, "--cfg-scale", help="Classifier-free guidance on the game id (1 = off)."),
    seed: int = typer.Option(0, "--seed", help="Episode i uses seed + i."),
    max_seconds: float = typer.Option(300.0, "--max-seconds", help="Cap on each episode's length (game time)."),
    sticky: float = typer.Option(0.0, "--sticky", min=0.0, max=1.0, help="Probability of repeating the previous action."),
    videos: int = typer.Option(1, "--videos", min=0, help="How many of the first episodes to save as mp4."),
    relabel: Optional[Path] = typer.Option(None, "--relabel", help="Also write each episode to this chunk store, labelled with the scripted expert's action for every screen (DAgger data for train-policy --data)."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use the EMA weights when the run has them."),
    batch: int = typer.Option(1, "--batch", min=1, help="Episodes played at once, their chunks sampled in one policy call (faster, most on a GPU; the sampling noise then depends on it)."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads; one chunk for one frame is too small to split, so 1 is fastest."),
    device: str = typer.Option("cpu", "--device", help="Where the policy runs: cpu | cuda | cuda:N (large presets need a GPU to act in real time)."),
) -> None:
    """Play an Atari game closed-loop from pixels with a trained policy; write scores and videos.

    Example: `walkthrough play --ckpt RUN --game Breakout --episodes 10 --out PLAY`
    """
    import torch

    from walkthrough import games
    from walkthrough.play import play as play_games
    from walkthrough.train import check_device, load_model
    from walkthrough.video import VideoError

    torch.set_num_threads(threads)
    try:
        where = check_device(device)
        name = games.resolve_games(game)
        if len(name) != 1:
            raise ValueError(f"play one game at a time, got {', '.join(name)}")
        policy = load_model(ckpt, ema=ema).to(where)
        result = play_games(policy, name[0], episodes, out, replan_every=replan_every,
                            sample_steps=sample_steps, cfg_scale=cfg_scale, seed=seed, max_seconds=max_seconds,
                            sticky=sticky, videos=videos, relabel=relabel, batch=batch)
    except (ValueError, OSError, VideoError) as e:
        fail(str(e))
    agreement = result["expert_agreement"]
    console.print(f"[bold]{result['game']}[/]: {result['mean']:g} +- {result['std']:g} over {episodes} episodes"
                  + (f", agreement with the expert {agreement:.3f}" if agreement is not None else "")
                  + f" ({result['chunk_latency_ms']:.1f} ms per chunk) -> {out / 'scores.json'}")


@app.command()
def dagger(
    ckpt: Path = typer.Option(..., "--ckpt", help="Policy run to start from (from train-policy)."),
    game: str = typer.Option(..., "--game", help="ALE game with a scripted expert (Breakout, Pong, Freeway)."),
    data: list[str] = typer.Option(..., "--data", help="Expert data trained on every round, as PATH or PATH:WEIGHT (as train-policy)."),
    out: Path = typer.Option(..., "--out", help="Directory for every round's rollouts, data, run and evaluation, and dagger.json."),
    rounds: int = typer.Option(3, "--rounds", min=1),
    rollouts: int = typer.Option(16, "--rollouts", min=1, help="Episodes played and relabelled by the expert per round."),
    eval_episodes: int = typer.Option(10, "--eval-episodes", min=0, help="Episodes (seeds 0..) scoring each round's policy; 0 skips."),
    max_seconds: float = typer.Option(180.0, "--max-seconds", help="Cap on each episode's length (game time)."),
    replan_every: int = typer.Option(2, "--replan-every", min=1, help="As play's, in rollouts and evaluation."),
    sample_steps: Optional[int] = typer.Option(None, "--sample-steps", min=1, help="Euler steps per chunk (default: the run's)."),
    rollout_seed: int = typer.Option(1000, "--rollout-seed", help="Round R's rollouts use seeds from rollout-seed + (R-1) x rollouts."),
    context_frames: Optional[int] = typer.Option(None, "--context-frames", min=1, help="Frames the policy sees (default: the start run's); more grows it in round 1."),
    fuse_frames: bool = typer.Option(False, "--fuse-frames", help="Stack the context frames in each patch (as train-policy's; default: the start run's choice)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Optimizer steps per round (default: the start run's)."),
    budget_minutes: Optional[float] = typer.Option(None, "--budget-minutes", help="Training time per round (default: the start run's)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate of each round (default: the start run's; lower suits fine-tuning, e.g. 3e-4)."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", min=0),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", min=0),
    play_batch: int = typer.Option(1, "--play-batch", min=1, help="Episodes played at once in rollouts and evaluation (as play's --batch)."),
    preload: bool = typer.Option(True, "--preload/--stream", help="Decode all training frames into RAM each round, or windows on demand (less RAM; give it --num-workers)."),
    device: str = typer.Option("cpu", "--device", help="Where the policy plays: cpu | cuda | cuda:N (training takes a GPU when there is one)."),
) -> None:
    """DAgger: the policy plays, the scripted expert labels every screen it saw, training goes on from
    its weights on the expert data plus all relabelled rounds; repeated. Each round is scored on the
    same seeds; a killed run resumes where it stopped. Training settings not given are the start run's.

    Example: `walkthrough dagger --ckpt RUN --game Breakout --data DATA --rounds 3 --budget-minutes 20 --lr 3e-4 --out DAGGER`
    """
    from walkthrough import dagger as dagger_rounds
    from walkthrough.policy import Source
    from walkthrough.train import TrainConfig, read_run_config
    from walkthrough.video import VideoError

    changes = {k: v for k, v in dict(steps=steps, budget_minutes=budget_minutes, batch_size=batch_size, lr=lr,
                                     warmup_steps=warmup_steps, num_workers=num_workers).items() if v is not None}
    try:
        train_cfg = replace(TrainConfig.from_dict(read_run_config(ckpt)["train"]), max_minutes=None, **changes)
        cfg = dagger_rounds.DaggerConfig(game=game, rounds=rounds, rollouts=rollouts, rollout_seed=rollout_seed,
                                         eval_episodes=eval_episodes, max_seconds=max_seconds,
                                         replan_every=replan_every, sample_steps=sample_steps,
                                         context_frames=context_frames, fuse_frames=fuse_frames, play_batch=play_batch)
        summary = dagger_rounds.dagger(ckpt, [Source.parse(d) for d in data], out, cfg, train_cfg, device=device,
                                       preload=preload)
    except (ValueError, OSError, VideoError) as e:
        fail(str(e))
    for r in summary["rounds"]:
        score = r["eval"]
        console.print(f"round {r['round']}: " + (f"{score['mean']:g} +- {score['std']:g}, agreement with the expert "
                                                  f"{score['expert_agreement']:.3f}" if score else "not evaluated"))
    console.print(f"-> {out / 'dagger.json'}")


@app.command("eval-policy")
def eval_policy(
    ckpt: Path = typer.Option(..., "--ckpt", help="Policy run directory."),
    data: list[Path] = typer.Option(..., "--data", help="Chunk store(s) with true actions."),
    all_episodes: bool = typer.Option(False, "--all-episodes", help="Grade every episode, not only those the run held out."),
    max_windows: int = typer.Option(512, "--max-windows", min=1, help="Windows graded, spread evenly."),
    sample_steps: Optional[int] = typer.Option(None, "--sample-steps", min=1),
    cfg_scale: float = typer.Option(1.0, "--cfg-scale"),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the metrics here as JSON (else stdout)."),
    device: str = typer.Option("cpu", "--device", help="Where the policy runs: cpu | cuda | cuda:N."),
) -> None:
    """Grade a policy offline: per-button F1 and stick error of the first action and the whole chunk, and how much the image helps (image gain: flow error with another window's frames / with its own, - 1).

    Example: `walkthrough eval-policy --ckpt RUN --data DATA`
    """
    import json

    from walkthrough.chunks import write_json_atomic
    from walkthrough.play import evaluate_run
    from walkthrough.video import VideoError

    try:
        result = evaluate_run(ckpt, data, all_episodes, device=device, max_windows=max_windows,
                              sample_steps=sample_steps, cfg_scale=cfg_scale)
    except (ValueError, OSError, VideoError) as e:
        fail(str(e))
    if out is None:
        print(json.dumps(result, indent=2))
    else:
        write_json_atomic(out, result)
    console.print(f"first action: button F1 {result['first']['button_f1']:.3f}, stick MAE "
                  f"{result['first']['stick_mae']:.3f};  chunk: button F1 {result['chunk']['button_f1']:.3f}, "
                  f"stick MAE {result['chunk']['stick_mae']:.3f};  image gain {result['image_gain']:.3f}"
                  + (f", motion gain {result['motion_gain']:.3f}" if "motion_gain" in result else "")
                  + f"  ({result['windows']} windows)")


@app.command()
def label(
    inputs: list[Path] = typer.Argument(..., help="Video files and/or directories (searched recursively)."),
    ckpt: Path = typer.Option(..., "--ckpt", help="IDM run directory (from train-idm)."),
    out: Path = typer.Option(..., "--out", help="Output chunk store of pseudo-labels (a rerun resumes it)."),
    min_confidence: Optional[float] = typer.Option(None, "--min-confidence", help="Confidence threshold [default: the one eval-idm calibrated]."),
    low_confidence_seconds: Optional[float] = typer.Option(None, "--low-confidence-seconds", help="Drop low-confidence stretches at least this long (0: every step) [default: 0.2]."),
    idle_seconds: Optional[float] = typer.Option(None, "--idle-seconds", help="Drop stretches with no predicted input this long [default: 3]."),
    static_motion: Optional[float] = typer.Option(None, "--static-motion", help="Share of changing pixels below which a step is static [default: 0.001]."),
    static_seconds: Optional[float] = typer.Option(None, "--static-seconds", help="Drop static stretches this long [default: 1]."),
    dark_brightness: Optional[float] = typer.Option(None, "--dark-brightness", help="Mean pixel value (0-255) below which a frame is near-black [default: 20]."),
    dark_seconds: Optional[float] = typer.Option(None, "--dark-seconds", help="Drop near-black stretches this long [default: 0.5]."),
    min_active_share: Optional[float] = typer.Option(None, "--min-active-share", help="Drop chunks with input in fewer of their steps (NitroGen) [default: 0.5]."),
    min_segment_seconds: Optional[float] = typer.Option(None, "--min-segment-seconds", help="Drop kept stretches shorter than this [default: 1]."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Frames between window starts, 1 to T-1 [default: 1, as eval-idm]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Windows per IDM call: a block of the video's frames, each encoded once [default: 256]."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="bfloat16 autocast for the IDM [default: on where native: GPUs, CPUs with AMX or AVX512-BF16]."),
    crop_letterbox: bool = typer.Option(True, "--crop-letterbox/--no-crop-letterbox", help="Feed the IDM the picture inside black bars."),
    game: Optional[str] = typer.Option(None, "--game", help="Game name for the metadata [default: other]."),
    backend: str = typer.Option("local", "--backend", help="local | ray (Ray Data; `pip install walkthrough[ray]`)."),
    shard: str = typer.Option("0/1", "--shard", help="i/N: label the i-th of N deterministic slices of the inputs (array jobs)."),
    device: Optional[str] = typer.Option(None, "--device", help="Device of the local backend's IDM [default: cpu]."),
    ray_actors: Optional[int] = typer.Option(None, "--ray-actors", help="IDM replicas in Ray's actor pool [default: 1]."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch threads of the local backend [default: one per core but one, left to decoding]."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Pseudo-label gameplay videos with an IDM, filter them, write a chunk store.

    Example: `walkthrough label --ckpt runs/idm VIDEOS/ --out LABELS`
    """
    import json

    from rich.table import Table

    from walkthrough import label as L

    given = dict(min_confidence=min_confidence, low_confidence_seconds=low_confidence_seconds,
                 idle_seconds=idle_seconds, static_motion=static_motion, static_seconds=static_seconds,
                 dark_brightness=dark_brightness, dark_seconds=dark_seconds, min_active_share=min_active_share,
                 min_segment_seconds=min_segment_seconds, stride=stride, batch_size=batch_size, game=game,
                 device=device, ray_actors=ray_actors, threads=threads)
    try:
        config = L.LabelConfig(**{k: v for k, v in given.items() if v is not None}, bf16=bf16,
                               crop_letterbox=crop_letterbox, backend=backend, shard=shard)
        summary = L.label(list(inputs), ckpt, out, config, progress=not as_json)
    except (ValueError, OSError) as e:
        fail(str(e))
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    run = summary["run"]
    table = Table("", "hours", "share", title=f"Pseudo-labels in {out}")
    hours_in = summary["hours_in"] or float("nan")
    table.add_row("in", f"{summary['hours_in']:.3f}", "100%")
    table.add_row("[green]kept", f"{summary['hours_kept']:.3f}", f"{summary['hours_kept'] / hours_in:.0%}")
    for reason, hours in summary["dropped_hours"].items():
        table.add_row(f"dropped: {reason}", f"{hours:.3f}", f"{hours / hours_in:.0%}")
    console_out = Console()
    console_out.print(table)
    console_out.print(f"{summary['videos_labeled']} videos labeled, {summary['videos_failed']} failed, "
                      f"{summary['input_problems']} input problems (see {out / 'failures.jsonl'}); "
                      f"{summary['segments']} segments in {summary['chunks']} chunks; mean confidence "
                      f"{summary['mean_confidence_kept']:.3f} kept, {summary['mean_confidence']:.3f} all "
                      f"(threshold {summary['confidence_threshold']:.3g})", highlight=False)
    console_out.print(f"this run: {run['labeled_now']} videos labeled, {run['skipped_done']} already done, "
                      f"{run['frames_decoded']} frames at {run['frames_per_second']:.0f} frames/s", highlight=False)


@app.command("train-idm")
def train_idm(
    data: Optional[list[Path]] = typer.Option(None, "--data", help="Chunk store with true actions; repeat to train on several. Optional with --resume."),
    out: Path = typer.Option(..., "--out", help="Run directory (checkpoints, metrics.jsonl)."),
    preset: str = typer.Option("cpu", "--preset", help="cpu (0.8M params, 64 px) | gpu (25M params, 128 px)."),
    frames: Optional[int] = typer.Option(None, "--frames", min=2, help="T: frames per window; the T-1 actions between them are predicted [default: the IDM's, 2]."),
    size: Optional[int] = typer.Option(None, "--size", min=8, help="Input height = width in pixels (default: the preset's)."),
    fps: float = typer.Option(30.0, "--fps", help="Frame rate the IDM sees (the recordings' rate)."),
    pos_weight: float = typer.Option(1.0, "--pos-weight", min=0.0, help="Weight of pressed buttons in the loss (>1 trades calibration for recall)."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", min=0.0, max=0.9, help="Share of episodes held out (by episode, never by frame)."),
    steps: int = typer.Option(2000, "--steps", min=1, help="Optimizer steps (the schedule's length)."),
    budget_minutes: Optional[float] = typer.Option(None, "--budget-minutes", help="End after this much training time, or at --steps if that comes first (the schedule follows whichever ends the run)."),
    clock: str = typer.Option("wall", "--clock", help="wall | cpu: what --budget-minutes counts (cpu: this process's CPU time, fair on a shared machine with 1 thread and --num-workers 0)."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Checkpoint and stop this session after this long; --resume continues."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Global batch (split over DDP ranks)."),
    lr: float = typer.Option(1e-3, "--lr"),
    warmup_steps: int = typer.Option(50, "--warmup-steps", min=0),
    schedule: str = typer.Option("wsd", "--schedule", help="wsd | cosine"),
    ema_decay: float = typer.Option(0.995, "--ema-decay", min=0.0, max=1.0, help="0 disables EMA (0.995 suits CPU runs of a few thousand steps)."),
    bf16: bool = typer.Option(True, "--bf16/--no-bf16", help="bf16 autocast (CPU too)."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Colour jitter and small shifts, the same for a whole window."),
    preload: Optional[bool] = typer.Option(None, "--preload/--stream", help="Decode all frames into RAM once, or windows on demand (default: preload when it fits in 1/4 of RAM)."),
    eval_every: int = typer.Option(500, "--eval-every", min=1),
    ckpt_every: int = typer.Option(500, "--ckpt-every", min=1),
    log_every: int = typer.Option(50, "--log-every", min=1),
    num_workers: int = typer.Option(0, "--num-workers", min=0, help="Data loader worker processes: 0 loads in the training process, best on a few CPU cores with preloaded data; streaming from video wants ~1 worker per 100 windows/s."),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out (its saved settings; --max-minutes and --num-workers may change)."),
) -> None:
    """Train the inverse dynamics model on recordings with true actions. `torchrun --nproc_per_node N` runs the same command on N GPUs (or CPU processes).

    Example: `walkthrough train-idm --data DATA --out RUN --budget-minutes 10`
    """
    options = dict(locals())  # the training-loop flags: each one named like a TrainConfig field sets it
    from walkthrough import idm
    from walkthrough.train import TrainConfig
    from walkthrough.video import VideoError

    try:
        overrides = dict(fps=fps, button_pos_weight=pos_weight)
        if frames is not None:
            overrides["frames"] = frames
        if size is not None:
            overrides["size"] = (size, size)
        model_cfg = idm.preset(preset, **overrides)
        train_cfg = TrainConfig.from_dict(options)
        idm.train_idm(data, out, model_cfg, train_cfg, val_fraction=val_fraction, resume=resume, preload=preload)
    except (ValueError, OSError, VideoError) as e:
        fail(str(e))


@app.command("eval-idm")
def eval_idm(
    ckpt: Path = typer.Option(..., "--ckpt", help="Run directory written by train-idm."),
    data: Optional[list[Path]] = typer.Option(None, "--data", help="Chunk store(s) with true actions (default: the run's training data)."),
    out: Path = typer.Option(..., "--out", help="Directory for report.json and the plots."),
    split: str = typer.Option("held-out", "--split", help="held-out: episodes the run did not train on | all: every episode."),
    target_precision: float = typer.Option(0.95, "--target-precision", min=0.0, max=1.0, help="Precision the confidence threshold must reach."),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate", help="Write the threshold to RUN/calibration.json for the labeler."),
    raw: bool = typer.Option(False, "--raw", help="Evaluate the raw weights instead of the EMA."),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", help="Evaluate only the first seconds of each episode."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="bfloat16 autocast, as `label` decides it [default: on where native: GPUs, CPUs with AMX or AVX512-BF16]."),
) -> None:
    """Evaluate an IDM against the repeat-previous and always-idle baselines, calibrate its confidence, plot.

    Example: `walkthrough eval-idm --ckpt RUN --data DATA --out EVAL`
    """
    from rich.table import Table

    from walkthrough import evaluate
    from walkthrough.train import read_run_config
    from walkthrough.video import VideoError

    try:
        sources = data or [Path(s) for s in read_run_config(ckpt)["data"].get("sources", [])]
        if not sources:
            raise ValueError("no data: pass --data DATA")
        report = evaluate.evaluate_run(ckpt, sources, out, split=split, target_precision=target_precision,
                                       ema=not raw, max_seconds=max_seconds, calibrate=calibrate, bf16=bf16)
    except (ValueError, OSError, VideoError) as e:
        fail(str(e))
    table = Table(title=f"IDM step {report['step']} on {len(report['episodes'])} episodes ({split}): "
                        f"idm / repeat_previous / always_idle")
    for column in ("game", "steps", "event F1 (+-1 step)", "exact-onset F1", "step accuracy"):
        table.add_column(column, justify="right")
    games = {**report["per_game"], "all": {"steps": report["steps"], **report["overall"]}}
    for game, scores in games.items():
        table.add_row(game, str(scores["steps"]), *(
            " / ".join(f"{scores[p][metric]:.3f}" for p in evaluate.PREDICTORS)
            for metric in ("event_f1", "exact_onset_f1", "step_accuracy")))
    Console().print(table)
    sel = report["selective"]
    threshold = "none reaches it" if sel["threshold"] is None else (
        f"{sel['threshold']:.4f} keeps {sel['coverage']:.1%} of steps at precision {sel['precision']:.3f}")
    console.print(f"confidence threshold for precision {target_precision:g}: {threshold}; "
                  f"report in {out / 'report.json'}", highlight=False)


@app.command()
def demo(
    out: Path = typer.Option(Path("DEMO"), "--out", help="Directory for every stage's outputs and the report."),
    quick: bool = typer.Option(False, "--quick", help="The same stages on tiny budgets (a couple of minutes): a smoke test, not a result."),
    seed: int = typer.Option(0, "--seed", help="Seed of every stage."),
) -> None:
    """Run the whole pipeline on real Atari games and write DEMO/report.html and report.md.

    Records labeled play and "walkthroughs" (actions hidden), trains and calibrates an IDM,
    pseudo-labels the walkthroughs, trains labeled-only / labeled+pseudo / oracle policies on the
    same budget and plays them. About 25 minutes on 2 CPU cores; every stage's command is in the
    report so any stage can be rerun alone.

    Example: `walkthrough demo --out DEMO` (or `walkthrough demo --quick --out /tmp/demo`)
    """
    from walkthrough.demo import DemoConfig, run_demo

    config = DemoConfig.quick() if quick else DemoConfig()
    config.seed = seed
    try:
        run_demo(out, config)
    except (ValueError, OSError, RuntimeError) as e:
        fail(str(e))
    console.print(f"report: {out / 'report.html'} and {out / 'report.md'}")


def main() -> None:
    app()
