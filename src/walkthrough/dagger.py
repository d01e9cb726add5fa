"""DAgger: play, have the scripted expert label the screens the policy saw, train on them, repeat.

A policy trained on expert recordings only sees the expert's states; once it errs it reaches screens
(the empty court before a serve, the ball past the paddle) the recordings never show, and it has no
label there. DAgger (Ross et al. 2011) closes that gap: each round the current policy plays
(``play --relabel``), every screen it saw is labelled with the action the noise-free expert would
take there, and training goes on from the current weights on the expert data plus all relabelled
rounds so far (the data aggregate, so what earlier rounds taught is not forgotten).

Layout of ``--out``, one folder per round; a killed run resumes where it stopped:

    round0/play/scores.json          the starting policy, evaluated (seeds 0..)
    roundR/rollouts/scores.json      round R's rollouts of the policy from round R-1
    roundR/data/                     ...relabelled by the expert: a chunk store
    roundR/run/                      training from round R-1's weights on the expert data + data of rounds 1..R
    roundR/play/scores.json          the round's policy, evaluated on the same seeds as round 0
    dagger.json                      an entry per round: scores, agreement with the expert, new data
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from walkthrough.chunks import write_json_atomic
from walkthrough.games import EXPERT_GAMES
from walkthrough.play import play
from walkthrough.policy import PolicyConfig, Source, train_policy
from walkthrough.train import TrainConfig, check_device, load_model, run_finished, run_model_config


@dataclass(frozen=True)
class DaggerConfig:
    game: str
    rounds: int = 3
    rollouts: int = 16  # episodes played (and relabelled) per round
    rollout_seed: int = 1000  # round R plays seeds rollout_seed + (R - 1) * rollouts on: never the evaluation's
    eval_episodes: int = 10  # per round, seeds 0..eval_episodes-1; 0 skips evaluation
    max_seconds: float = 180.0  # cap on every episode, rollouts and evaluation alike
    replan_every: int = 2  # as play's default
    sample_steps: int | None = None  # Euler steps per chunk; None: the run's own
    # Frames the policy sees; more than the start run's grows it in round 1 (``policy.initialised_from``)
    context_frames: int | None = None
    fuse_frames: bool = False  # grow to the context frames stacked in each patch (``PolicyConfig.fuse_frames``)
    play_batch: int = 1  # episodes played at once, rollouts and evaluation alike (``play``'s ``batch``)

    def __post_init__(self) -> None:
        if self.game not in EXPERT_GAMES:
            raise ValueError(f"DAgger needs a scripted expert to label; {self.game} has none "
                             f"(games with one: {', '.join(EXPERT_GAMES)})")
        if self.rounds < 1 or self.rollouts < 1 or self.eval_episodes < 0 or self.play_batch < 1:
            raise ValueError("rounds, rollouts and play_batch must be >= 1, eval_episodes >= 0")


def dagger(start: Path, sources: list[Source], out: Path, cfg: DaggerConfig, train_cfg: TrainConfig,
           device: str = "cpu", progress: bool = True, preload: bool = True) -> dict:
    """Run ``cfg.rounds`` DAgger rounds from the policy run ``start``, training each round with
    ``train_cfg`` on ``sources`` (the expert data) plus every round's relabelled episodes. Returns
    (and writes to ``out/dagger.json``) the summary; rounds already done in ``out`` are not redone.
    ``preload=False`` streams windows from video instead of decoding the whole (growing) aggregate
    into RAM each round."""
    out, start = Path(out), Path(start)
    out.mkdir(parents=True, exist_ok=True)
    where = check_device(device)
    config = run_model_config(start, PolicyConfig)  # the architecture every round keeps
    if cfg.context_frames is not None:
        config = replace(config, context_frames=cfg.context_frames)
    if cfg.fuse_frames:
        config = replace(config, fuse_frames=True)

    def played(run: Path, folder: Path, episodes: int, seed: int, relabel: Path | None = None) -> dict:
        if (folder / "scores.json").exists():  # written last, atomically: the play finished
            return json.loads((folder / "scores.json").read_text())
        policy = load_model(run).to(where)
        return play(policy, cfg.game, episodes, folder, replan_every=cfg.replan_every,
                    sample_steps=cfg.sample_steps, seed=seed, max_seconds=cfg.max_seconds,
                    videos=0 if relabel is not None else 1, progress=progress, relabel=relabel,
                    batch=cfg.play_batch)

    def evaluated(run: Path, folder: Path) -> dict | None:
        return summary_of(played(run, folder, cfg.eval_episodes, 0)) if cfg.eval_episodes else None

    summary = {"start": str(start), "game": cfg.game, "config": asdict(cfg), "train": asdict(train_cfg),
               "data": [str(s.path) for s in sources], "rounds": []}
    summary["rounds"].append({"round": 0, "run": str(start), "eval": evaluated(start, out / "round0" / "play")})
    write_json_atomic(out / "dagger.json", summary)
    relabelled, policy_run = [], start
    for r in range(1, cfg.rounds + 1):
        here = out / f"round{r}"
        rollouts = played(policy_run, here / "rollouts", cfg.rollouts, cfg.rollout_seed + (r - 1) * cfg.rollouts,
                          relabel=here / "data")
        relabelled.append(Source(here / "data"))
        run = here / "run"
        if not run_finished(run):
            train_policy(sources + relabelled, run, config, train_cfg, init_from=policy_run,
                         resume=(run / "config.json").exists(), preload=preload)
        summary["rounds"].append({"round": r, "run": str(run), "rollouts": summary_of(rollouts),
                                  "eval": evaluated(run, here / "play")})
        write_json_atomic(out / "dagger.json", summary)
        policy_run = run
    return summary


def summary_of(result: dict) -> dict:
    """The figures of a ``play`` result that a round is judged by."""
    wanted = result["expert_actions"]
    steps = sum(wanted.values())
    return {"mean": result["mean"], "std": result["std"], "scores": [e["score"] for e in result["episodes"]],
            "steps": steps, "expert_agreement": result["expert_agreement"],
            "expert_agreement_by_action": result["expert_agreement_by_action"],
            "expert_action_shares": {name: n / steps for name, n in wanted.items()}}
