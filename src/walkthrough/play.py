"""Acting with a trained policy: closed-loop play in ALE games, and offline grading on held-out data.

Closed loop (``play``): each step the game's screen is turned into a model input by the same pixel
path training frames took (``preprocess``); every ``replan_every`` steps the agent samples a chunk
of H actions from the latest context frames and executes its first ``replan_every`` actions
(receding horizon). Scores go to PLAY/scores.json, the first episodes to PLAY/<game>_ep<i>.mp4.
In games with a scripted expert, each step is also graded against what the expert would do there
(without its aim noise and lapses): ``expert_agreement``, a dense closed-loop measure beside the score,
and per action the expert wanted, how often the agent did the same (e.g. Breakout's serve, FIRE).

Offline (``evaluate_offline``): chunks sampled for held-out windows against their true actions:
per-button F1 and stick error of the first action and of the whole chunk.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.utils.data import default_collate

from walkthrough import actions as A
from walkthrough import metrics
from walkthrough.chunks import ChunkStore, episode_exists, video_path, write_json_atomic
from walkthrough.games import EXPERT_GAMES, AtariGame, ExpertPlayer, write_played_episode
from walkthrough.policy import Policy, PolicyDataset, to_flow
from walkthrough.train import check_device, load_model, read_run_config
from walkthrough.video import VideoWriter


def preprocess(frame: np.ndarray, size: int) -> np.ndarray:
    """A raw game screen (H, W, 3) uint8 -> the model's (size, size, 3) uint8 input.

    Training frames were stored as yuv420p H.264 and decoded by ``video.iter_frames``, which scales
    them with libswscale's area filter straight to RGB. Doing the same two conversions here gives
    the very same pixels for the same picture: only the H.264 compression loss (crf 18) differs.
    """
    yuv = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")
    return yuv.reformat(size, size, format="rgb24", interpolation="AREA").to_ndarray()


# --- 1. Closed loop ------------------------------------------------------------------------------------
class Agent:
    """Acts from pixels with action chunks: re-plans every ``replan_every`` steps, follows the plan between.

    It can act in ``slots`` games at once (``act_all``): each keeps its own context and plan, and the
    chunks of all games due to re-plan at a step are sampled in one batch.
    """

    def __init__(self, policy: Policy, game: str, replan_every: int = 2, sample_steps: int | None = None,
                 cfg_scale: float = 1.0, seed: int = 0, slots: int = 1):
        horizon = policy.config.horizon
        if not 1 <= replan_every <= horizon:
            raise ValueError(f"replan_every must be in 1..{horizon} (the policy's chunk), got {replan_every}")
        self.policy = policy.eval()
        self.replan_every, self.sample_steps, self.cfg_scale = replan_every, sample_steps, cfg_scale
        self.device = next(policy.parameters()).device
        self.game = torch.tensor([policy.config.game_id(game)], device=self.device)
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.contexts = [deque(maxlen=policy.config.context_frames) for _ in range(slots)]
        self.plans: list[deque[np.ndarray]] = [deque() for _ in range(slots)]
        self.latencies: list[float] = []  # seconds per sampled batch of chunks

    def reset(self, slot: int = 0) -> None:
        self.contexts[slot].clear()
        self.plans[slot].clear()

    def act(self, frame: np.ndarray) -> np.ndarray:
        """The screen now (H, W, 3) uint8 -> the (21,) gamepad action to take (one game, slot 0)."""
        return self.act_all({0: frame})[0]

    def act_all(self, frames: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """The screen now of each game in play, by slot -> the (21,) action to take in each."""
        for slot, frame in frames.items():
            context = self.contexts[slot]
            context.append(preprocess(frame, self.policy.config.image_size))
            while len(context) < context.maxlen:  # episode start: repeat the first frame
                context.appendleft(context[0])
        due = [slot for slot in frames if not self.plans[slot]]
        if due:
            stacked = np.stack([np.stack(self.contexts[slot]) for slot in due])  # (B, F, H, W, 3)
            batch = torch.from_numpy(stacked).permute(0, 1, 4, 2, 3).to(self.device)  # (B, F, 3, H, W)
            start = time.perf_counter()
            chunks = self.policy.sample(batch, self.game.expand(len(due)), self.sample_steps, self.cfg_scale,
                                        self.generator)  # (B, H, 21)
            self.latencies.append(time.perf_counter() - start)
            for slot, chunk in zip(due, chunks[:, : self.replan_every].cpu().numpy()):
                self.plans[slot].extend(chunk)  # (n, 21)
        return {slot: self.plans[slot].popleft() for slot in frames}


@dataclass
class _Episode:
    """One episode in play: its game, the videos it is written to, and its tallies."""
    index: int
    env: AtariGame
    frame: np.ndarray  # the screen now
    judge: ExpertPlayer | None  # the noise-free expert grading each step, where the game has one
    recording: VideoWriter | None  # PLAY/<game>_ep<i>.mp4
    relabelled: VideoWriter | None  # the relabel store's video
    score: float = 0.0
    agreed: int = 0  # steps where the agent did what the expert would
    experts: list[int] = field(default_factory=list)  # per step: the expert's ALE action
    applied: list[int] = field(default_factory=list)  # ...and the one the game applied

    @property
    def writers(self) -> list[VideoWriter]:
        return [v for v in (self.recording, self.relabelled) if v is not None]


def play(policy: Policy, game: str, episodes: int, out: Path, replan_every: int = 2,
         sample_steps: int | None = None, cfg_scale: float = 1.0, seed: int = 0, max_seconds: float = 300.0,
         sticky: float = 0.0, videos: int = 1, progress: bool = True, relabel: Path | None = None,
         batch: int = 1) -> dict:
    """Play ``episodes`` episodes of ``game`` (episode i seeded ``seed + i``); write and return the scores.

    ``batch`` episodes are played at once, their chunks sampled together: one policy call serves
    them all, which pays off on a GPU and, less, on CPU cores. Each episode's game is seeded as
    alone, but the policy's sampling noise depends on which episodes share a batch, so ``batch``
    is part of what makes a play reproducible.

    ``relabel``: also write every episode into this chunk store, each screen the policy saw with the
    action the scripted expert would have taken there (DAgger's data: the states the policy visits,
    which expert recordings lack, labelled by the expert). Such episodes name their labeler, so
    ``train-policy`` trains on them as it does on pseudo-labels and ``train-idm`` leaves them out
    (their actions did not make the next frame).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    graded = game in EXPERT_GAMES  # a scripted expert can judge each step
    if relabel is not None:
        if not graded:
            raise ValueError(f"--relabel needs a scripted expert; {game} has none (games with one: {', '.join(EXPERT_GAMES)})")
        video_path(relabel, "_").parent.mkdir(parents=True, exist_ok=True)
    slots, fps = min(batch, episodes), policy.config.fps
    envs = [AtariGame(game, seed=seed, fps=fps, sticky=sticky, max_seconds=max_seconds) for _ in range(slots)]
    agent = Agent(policy, game, replan_every, sample_steps, cfg_scale, seed, slots=slots)
    runs, wanted, agreed_on = [], Counter(), Counter()  # per ALE action the expert wanted

    def relabel_id(i: int) -> str:
        return f"{game}-relabel-s{seed + i:04d}"

    def begin(slot: int, i: int) -> _Episode:
        env = envs[slot]
        frame = env.reset(seed + i)
        agent.reset(slot)
        video_id = relabel_id(i)
        return _Episode(i, env, frame, ExpertPlayer.judge(env) if graded else None,
                        VideoWriter(out / f"{game}_ep{i}.mp4", fps) if i < videos else None,
                        VideoWriter(video_path(relabel, video_id), fps)
                        if relabel is not None and not episode_exists(relabel, video_id) else None)

    def finish(episode: _Episode) -> None:
        env = episode.env
        for video in episode.writers:
            video.close()
        if episode.relabelled is not None:
            write_played_episode(relabel, relabel_id(episode.index), env,
                                 np.asarray(episode.experts),
                                 {"player": "policy", "labeler": "scripted expert (DAgger relabel)", "score": episode.score},
                                 {"ale_action": np.asarray(episode.applied, dtype=np.int64)})
        runs.append({"seed": seed + episode.index, "score": episode.score, "steps": env.steps,
                     "truncated": env.truncated, "expert_agreement": episode.agreed / env.steps if graded else None})

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    queue = iter(range(episodes))
    active: dict[int, _Episode] = {}
    with Progress(*columns, disable=not progress) as bar, torch.inference_mode():
        task = bar.add_task(f"{game}", total=episodes)
        try:
            for slot in range(slots):
                active[slot] = begin(slot, next(queue))
            while active:
                for episode in active.values():
                    for video in episode.writers:
                        video.write(episode.frame)
                chosen = agent.act_all({slot: episode.frame for slot, episode in active.items()})
                for slot, episode in list(active.items()):
                    env = episode.env
                    action = A.gamepad_to_ale(chosen[slot], env.minimal_actions)
                    if episode.judge is not None:
                        expert = episode.judge.act(env)
                        wanted[A.ALE_ACTIONS[expert]] += 1
                        agreed_on[A.ALE_ACTIONS[expert]] += action == expert
                        episode.agreed += action == expert
                        episode.experts.append(expert)
                    episode.frame, reward, done = env.step_ale(action)
                    episode.applied.append(env.applied)
                    episode.score += reward
                    if slot == min(active) and env.steps % int(fps) == 0:
                        bar.update(task, description=f"{game} ep {episode.index} t={env.steps / env.fps:.0f}s "
                                                     f"score {episode.score:g}")
                    if done:
                        finish(active.pop(slot))
                        bar.update(task, advance=1, description=f"{game} ep {episode.index} score {episode.score:g}")
                        following = next(queue, None)
                        if following is not None:
                            active[slot] = begin(slot, following)
        finally:  # stopped by an error: no half-written video is left behind
            for episode in active.values():
                for video in episode.writers:
                    video.discard()
    runs.sort(key=lambda r: r["seed"])
    scores = np.array([r["score"] for r in runs])
    result = {
        "game": game, "game_known": game in policy.config.games, "episodes": runs,
        "mean": float(scores.mean()), "std": float(scores.std()),
        "expert_agreement": float(np.mean([r["expert_agreement"] for r in runs])) if graded else None,
        "expert_agreement_by_action": {name: agreed_on[name] / n for name, n in sorted(wanted.items())},
        "expert_actions": dict(sorted(wanted.items())),  # steps at which the expert wanted each action
        "replan_every": replan_every, "sample_steps": sample_steps or policy.config.sample_steps,
        "cfg_scale": cfg_scale, "sticky": sticky, "max_seconds": max_seconds, "batch": slots,
        "chunk_latency_ms": 1000 * float(np.mean(agent.latencies)),  # per policy call (a batch of chunks)
    }
    write_json_atomic(out / "scores.json", result)
    return result


# --- 2. Offline ----------------------------------------------------------------------------------------
def _grade(pred: np.ndarray, true: np.ndarray) -> dict:
    """(N, 21) sampled vs true actions: F1 of each button pressed in ``true`` and their mean, stick MAE."""
    f1 = {name: s["f1"] for name, s in metrics.button_scores(pred, true).items() if s["support"] > 0}
    return {"steps": len(true),
            "button_f1": float(np.mean(list(f1.values()))) if f1 else math.nan,
            "per_button_f1": f1,
            "stick_mae": float(np.abs(pred[:, A.NUM_BUTTONS:] - true[:, A.NUM_BUTTONS:]).mean()) if len(true) else math.nan}


@torch.no_grad()
def evaluate_offline(policy: Policy, dataset: PolicyDataset, max_windows: int = 256, batch_size: int = 64,
                     sample_steps: int | None = None, cfg_scale: float = 1.0, seed: int = 0) -> dict:
    """Sample one chunk for each of up to ``max_windows`` windows spread evenly over ``dataset`` and
    grade it against the true actions (labelled steps only): ``first`` the action executed right
    away, ``chunk`` all H actions; ``image_gain`` and, with more than one context frame,
    ``motion_gain`` (``flow_errors``)."""
    was_training = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    index = np.unique(np.linspace(0, len(dataset) - 1, min(len(dataset), max_windows)).astype(int))
    generator = torch.Generator(device).manual_seed(seed)
    preds, trues, masks, errors = [], [], [], torch.zeros(3)
    for start in range(0, len(index), batch_size):
        batch = default_collate([dataset[int(i)] for i in index[start:start + batch_size]])
        chunk = policy.sample(batch["frames"].to(device), batch["game"].to(device), sample_steps, cfg_scale, generator)
        preds.append(chunk.cpu())
        trues.append(batch["actions"])
        masks.append(batch["action_mask"])
        errors += flow_errors(policy, {k: v.to(device) for k, v in batch.items()}, generator)
    policy.train(was_training)
    pred, true = torch.cat(preds).numpy(), torch.cat(trues).numpy()  # (W, T, 21) each
    mask = torch.cat(masks).numpy()  # (W, T)
    own = errors[0].clamp(min=1e-12)
    motion = {"motion_gain": float(errors[2] / own - 1)} if policy.config.context_frames > 1 else {}
    return {"windows": len(index),
            "first": _grade(pred[:, 0][mask[:, 0]], true[:, 0][mask[:, 0]]),
            "chunk": _grade(pred[mask], true[mask]),
            "image_gain": float(errors[1] / own - 1), **motion}


@torch.no_grad()
def flow_errors(policy: Policy, batch: dict, generator: torch.Generator) -> torch.Tensor:
    """Does the policy look at the screen, and at how it moves? Its flow-matching error (summed over
    labelled steps) for the same noise and t with each window's own frames, with the next window's,
    and with its screen held still (every context frame replaced by the last one): (3,).

    ``image_gain`` = other / own - 1: 0 when the image changes nothing (a policy that learned only
    the action prior), > 0 as it reads the screen; it moves long before sampled actions do.
    ``motion_gain`` = still / own - 1, the same for the earlier context frames: > 0 as the policy
    reads what one frame cannot show (where the ball is going). With one context frame, still = own.
    """
    a = to_flow(batch["actions"])  # (B, T, 21)
    if len(a) < 2:
        return torch.zeros(3)
    noise = torch.randn(a.shape, generator=generator, device=a.device)
    t = torch.rand(len(a), generator=generator, device=a.device)  # (B,)
    x_t = (1 - t[:, None, None]) * noise + t[:, None, None] * a
    frames = batch["frames"]  # (B, F, 3, H, W)
    image = policy.encode(frames)  # (B, S, D)
    still = policy.encode(frames[:, -1:].expand_as(frames)) if frames.shape[1] > 1 else image
    mask = batch["action_mask"].float()[..., None]  # (B, T, 1)
    return torch.stack([(((policy.velocity(x_t, t, tokens, batch["game"]) - (a - noise)) ** 2) * mask).sum()
                        for tokens in (image, image.roll(1, dims=0), still)]).cpu()


def evaluate_run(run_dir: Path, data: list[Path], all_episodes: bool = False, ema: bool = True,
                 device: str = "cpu", **kwargs) -> dict:
    """Grade the run's policy offline on ``data``: the episodes the run held out for validation, or
    with ``all_episodes`` every episode (for data recorded apart from the training set)."""
    where = check_device(device)
    policy = load_model(run_dir, ema=ema).to(where)
    held_out = set(read_run_config(run_dir)["data"].get("val_episodes", []))
    episodes = [e for source in data for e in ChunkStore(source)]
    if not all_episodes:
        episodes = [e for e in episodes if e.video_id in held_out]
        if not episodes:
            raise ValueError(f"none of the episodes in {', '.join(map(str, data))} were held out by {run_dir}; "
                             f"pass --all-episodes to grade on all of them")
    dataset = PolicyDataset([(episodes, 1.0)], policy.config)
    return {"run": str(run_dir), "episodes": [e.video_id for e in episodes],
            **evaluate_offline(policy, dataset, **kwargs)}
