"""Real Atari games from ale-py: the embedded default source of labeled gameplay.

Three parts, top to bottom:

1. ``AtariGame``: one seeded ALE emulator that we step ourselves. ALE runs at 60 Hz; recording at
   ``fps`` holds each action for ``60 / fps`` emulator frames. Frame k is the screen *before*
   action k, so action k first shows in frame k + 1. Sticky actions are applied here, once per
   recorded step, and ``applied`` says which action really ran: that is the label we record.
2. Players: a RAM-reading ``ExpertPlayer`` (imperfect on purpose: aim jitter and brief lapses,
   so the data has variety) and a ``PersistentRandomPlayer`` that holds random actions for
   human-like durations.
3. ``record``: plays episodes and writes each one as a video plus its action chunks; ``replay``
   re-runs a recorded action sequence so a test can check the labels are exact.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import ale_py
import gymnasium
import numpy as np
from ale_py import ALEInterface, LoggerMode, roms
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from walkthrough.actions import ALE_ACTIONS, ale_to_gamepad, gamepad_to_ale

ALE_HZ = 60  # the Atari 2600 (NTSC) renders 60 frames per second
FRAME_SHAPE = (210, 160, 3)  # native RGB screen, (H, W, 3) uint8
ALE_ID = {name: i for i, name in enumerate(ALE_ACTIONS)}  # "UPFIRE" -> 10

ALEInterface.setLoggerMode(LoggerMode.Error)  # ALE prints a banner per ROM load otherwise

gymnasium.register_envs(ale_py)
# Every playable bundled ROM, gymnasium name ("MontezumaRevenge") -> ROM id ("montezuma_revenge").
# Taken from ale-py's own ALE/<Name>-v5 registrations: it leaves out the ROMs with no
# single-player mode (Combat, Joust, ...), which ALE cannot load (it exits the process).
ROMS: dict[str, str] = {
    spec.id[len("ALE/"):-len("-v5")]: spec.kwargs["game"]
    for spec in gymnasium.registry.values()
    if spec.id.startswith("ALE/") and spec.id.endswith("-v5")
}


def _key(name: str) -> str:
    """Case/underscore-insensitive form for matching game names: 'Montezuma_Revenge' -> 'montezumarevenge'."""
    return name.lower().replace("_", "").replace("-", "")


def frameskip_for(fps: float) -> int:
    """Emulator frames per recorded step; ``fps`` must divide 60 (60, 30, 20, 15, 12, 10, ...)."""
    skip = round(ALE_HZ / fps) if fps > 0 else 0
    if skip < 1 or abs(skip * fps - ALE_HZ) > 1e-6:
        raise ValueError(f"fps must divide {ALE_HZ} (60, 30, 20, 15, 12, 10, ...), got {fps:g}")
    return skip


# --- 1. The game ------------------------------------------------------------------------------
@dataclass
class AtariGame:
    """One Atari game at ``fps`` recorded steps per second, seeded and deterministic.

    ``reset()`` powers the console on afresh, so the same seed and action sequence always give
    the same frames. (With sticky actions off ALE itself draws nothing random; the seed drives our
    stickiness, and the players carry their own seeds.)
    """

    name: str  # gymnasium-style name, e.g. "Breakout"
    seed: int = 0
    fps: float = 30.0
    sticky: float = 0.0  # per recorded step, probability that the previous action runs again
    max_seconds: float = 300.0  # episode cap, in game time
    frameskip: int = field(init=False)
    minimal_actions: tuple[int, ...] = field(init=False)  # ALE ids, full-action numbering
    applied: int = field(init=False, default=0)  # the ALE id that really ran at the last step
    steps: int = field(init=False, default=0)
    truncated: bool = field(init=False, default=False)  # stopped by the cap, not by game over
    _ale: ALEInterface = field(init=False, repr=False)
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.name not in ROMS:
            raise ValueError(f"unknown game {self.name!r}; see resolve_games()")
        if not 0.0 <= self.sticky <= 1.0:
            raise ValueError(f"sticky must be a probability in [0, 1], got {self.sticky}")
        self.frameskip = frameskip_for(self.fps)
        self.reset()
        self.minimal_actions = tuple(a.value for a in self._ale.getMinimalActionSet())

    @property
    def max_steps(self) -> int:
        return int(round(self.max_seconds * self.fps))

    def reset(self, seed: int | None = None) -> np.ndarray:
        """Start an episode from power-on (optionally with a new seed). Returns frame 0."""
        if seed is not None:
            self.seed = seed
        # A fresh emulator per episode (~0.1 s) is the simplest way to make resets identical.
        self._ale = ALEInterface()
        self._ale.setInt("random_seed", self.seed)
        self._ale.setFloat("repeat_action_probability", 0.0)  # stickiness is ours, per step
        self._ale.setInt("frame_skip", 1)  # frame skip is ours too
        self._ale.loadROM(roms.get_rom_path(ROMS[self.name]))
        self._rng = np.random.default_rng(self.seed)
        self.applied, self.steps, self.truncated = ALE_ID["NOOP"], 0, False
        return self.frame()

    def frame(self) -> np.ndarray:
        """The current screen. (210, 160, 3) uint8."""
        return self._ale.getScreenRGB()

    def ram(self) -> np.ndarray:
        """The console's 128 bytes of RAM. (128,) uint8."""
        return self._ale.getRAM()

    def step_ale(self, ale_id: int) -> tuple[np.ndarray, float, bool]:
        """Hold ALE action ``ale_id`` for one recorded step -> (next frame, reward, done)."""
        if ale_id not in self.minimal_actions:
            raise ValueError(f"{self.name}: ALE action {ale_id} is not in {self.minimal_actions}")
        if self.steps >= self.max_steps or self._ale.game_over():
            raise RuntimeError(f"{self.name}: step after the episode ended; call reset()")
        if self.sticky == 0.0 or self._rng.random() >= self.sticky:
            self.applied = int(ale_id)
        reward = 0.0
        for _ in range(self.frameskip):
            reward += self._ale.act(self.applied)
            if self._ale.game_over():
                break
        self.steps += 1
        over = self._ale.game_over()
        self.truncated = not over and self.steps >= self.max_steps
        return self.frame(), reward, over or self.truncated

    def step_gamepad(self, action: np.ndarray) -> tuple[np.ndarray, float, bool]:
        """Step with a (21,) gamepad action, mapped to the closest action in the minimal set."""
        return self.step_ale(gamepad_to_ale(action, self.minimal_actions))


# --- 2. Players -------------------------------------------------------------------------------
class Player(Protocol):
    def act(self, game: AtariGame) -> int:
        """The ALE action (in ``game.minimal_actions``) to hold for the next recorded step."""
        ...


# A game policy reads RAM now and one step ago (for velocities) plus an aim offset in pixels,
# and returns the ALE action it wants (any full-set name; mapped to the minimal set later).
GamePolicy = Callable[[np.ndarray, np.ndarray, float], str]


def _reflect(x: float, lo: float, hi: float) -> float:
    """Fold a straight-line position back between two walls, as a bouncing ball does."""
    span = hi - lo
    x = (x - lo) % (2 * span)
    return lo + (x if x <= span else 2 * span - x)


def _steer(position: float, target: float, tolerance: float, towards_low: str, towards_high: str) -> str:
    """Move ``position`` to ``target`` along one axis; hold still inside the tolerance."""
    if position < target - tolerance:
        return towards_high
    if position > target + tolerance:
        return towards_low
    return "NOOP"


def _breakout(ram: np.ndarray, prev: np.ndarray, aim: float) -> str:
    # RAM (measured against the screen): paddle x at 72 (screen left edge = x - 47, 16 px wide),
    # ball x at 99 (screen x = x - 49), ball y at 101 (0 while no ball is in play).
    paddle, bx, by = float(ram[72]), float(ram[99]), float(ram[101])
    if by == 0:
        return "FIRE"  # serve
    vx, vy = bx - float(prev[99]), by - float(prev[101])
    target = bx
    if 0 < vy < 20:  # falling (a big jump is a respawn, not motion): predict where it lands
        target = _reflect(bx + vx * max(0.0, 180.0 - by) / vy, 57.0, 199.0)
    # Paddle centre sits at x - 9 relative to the ball's coordinates.
    return _steer(paddle, target - 9 + aim, 4.0, "LEFT", "RIGHT")


def _pong(ram: np.ndarray, prev: np.ndarray, aim: float) -> str:
    # RAM: our (right) paddle y at 51 (centred on the ball when y = ball_y - 7), ball x at 49,
    # ball y at 54 (both 0 between points). In Pong RIGHT moves the paddle up, LEFT down.
    paddle, bx, by = float(ram[51]), float(ram[49]), float(ram[54])
    paddle += paddle - float(prev[51])  # the paddle drifts on: steer where it is about to be
    target = 125.0  # wait mid-court
    if bx != 0:
        vx, vy = bx - float(prev[49]), by - float(prev[54])
        target = by
        if 0 < vx < 20:  # coming our way: predict the height where it reaches our paddle
            target = _reflect(by + vy * max(0.0, 190.0 - bx) / vx, 45.0, 208.0)
    # Hitting off-centre sends the ball out at a steep angle the computer often misses; a centred
    # hit only prolongs the rally. The sign of the aim picks the paddle's upper or lower half.
    edge = 5.0 if aim >= 0 else -5.0
    return _steer(paddle, target - 7 + edge + 0.3 * aim, 3.0, "RIGHT", "LEFT")


def _freeway(ram: np.ndarray, prev: np.ndarray, aim: float) -> str:
    # Always forward scores ~20 crossings a game; aim < 0 makes it wait a moment, as people do.
    return "NOOP" if aim < -4.0 else "UP"


EXPERT_POLICIES: dict[str, GamePolicy] = {"Breakout": _breakout, "Pong": _pong, "Freeway": _freeway}
EXPERT_GAMES: tuple[str, ...] = tuple(sorted(EXPERT_POLICIES))


def require_experts(games: list[str]) -> None:
    """ValueError unless every game has an expert player."""
    missing = [g for g in games if g not in EXPERT_POLICIES]
    if missing:
        raise ValueError(f"no expert for {', '.join(missing)}; games with one: {', '.join(EXPERT_GAMES)}")


def _hold_steps(rng: np.random.Generator, mean_s: float, fps: float, sigma: float = 0.75) -> int:
    """A human-like hold duration in steps: lognormal with mean ``mean_s`` seconds."""
    seconds = rng.lognormal(np.log(mean_s) - sigma**2 / 2, sigma)
    return max(1, int(round(seconds * fps)))


@dataclass
class ExpertPlayer:
    """A scripted player that reads RAM, with human-like noise.

    Noise: where it aims on the paddle drifts (resampled ~once a second), now and then it lapses:
    for a short lognormal stretch it holds a random action instead of the right one, and it takes
    a moment before it serves. Without that pause the recordings hold almost no frame without a
    ball (0.1% of Breakout's), and a policy cloned from them never learns to serve.
    """

    game: AtariGame
    seed: int = 0
    aim_px: float = 3.0  # sd of the aim offset, in screen pixels
    lapses_per_s: float = 0.2
    lapse_s: float = 0.15  # mean length of a lapse
    serve_delay_s: float = 0.5  # mean pause (lognormal) before FIRE when the game wants a serve
    _policy: GamePolicy = field(init=False, repr=False)
    _rng: np.random.Generator = field(init=False, repr=False)
    _prev: np.ndarray | None = field(init=False, default=None, repr=False)
    _aim: float = field(init=False, default=0.0)
    _lapse: tuple[int, int] = field(init=False, default=(0, 0))  # (steps left, action)
    _serve_wait: int | None = field(init=False, default=None)  # steps left before serving; None: not waiting

    @classmethod
    def judge(cls, game: AtariGame) -> "ExpertPlayer":
        """The noise-free expert that grades a player's steps (``play``'s agreement, DAgger's labels):
        no aim noise, no lapses, serving at once."""
        return cls(game, aim_px=0.0, lapses_per_s=0.0, serve_delay_s=0.0)

    def __post_init__(self) -> None:
        require_experts([self.game.name])
        self._policy = EXPERT_POLICIES[self.game.name]
        self._rng = np.random.default_rng([self.seed, 1])  # independent of the game's stream

    def act(self, game: AtariGame) -> int:
        ram = game.ram()
        prev = ram if self._prev is None else self._prev
        self._prev = ram
        if self._rng.random() < 1.0 / game.fps:
            self._aim = float(self._rng.normal(0.0, self.aim_px))
        left, action = self._lapse
        if left == 0 and self._rng.random() < self.lapses_per_s / game.fps:
            left = _hold_steps(self._rng, self.lapse_s, game.fps)
            action = int(self._rng.choice(game.minimal_actions))
        if left > 0:
            self._lapse = (left - 1, action)
            return action
        wanted = self._policy(ram, prev, self._aim)
        if wanted != "FIRE":  # the game policies fire only to serve
            self._serve_wait = None
        elif self.serve_delay_s > 0:
            if self._serve_wait is None:
                self._serve_wait = _hold_steps(self._rng, self.serve_delay_s, game.fps)
            if self._serve_wait > 0:
                self._serve_wait -= 1
                wanted = "NOOP"
        return gamepad_to_ale(ale_to_gamepad(ALE_ID[wanted]), game.minimal_actions)


@dataclass
class PersistentRandomPlayer:
    """Random actions from the minimal set, each held for a lognormal time (mean ~0.3 s), with
    idle stretches (NOOP, held longer) as when a person pauses."""

    game: AtariGame
    seed: int = 0
    hold_s: float = 0.3
    idle_prob: float = 0.2
    idle_s: float = 0.8
    _rng: np.random.Generator = field(init=False, repr=False)
    _left: int = field(init=False, default=0)
    _action: int = field(init=False, default=ALE_ID["NOOP"])

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng([self.seed, 2])

    def act(self, game: AtariGame) -> int:
        if self._left == 0:
            if self._rng.random() < self.idle_prob:
                self._action = ALE_ID["NOOP"]
                self._left = _hold_steps(self._rng, self.idle_s, game.fps)
            else:
                self._action = int(self._rng.choice(game.minimal_actions))
                self._left = _hold_steps(self._rng, self.hold_s, game.fps)
        self._left -= 1
        return self._action


PLAYERS: dict[str, Callable[[AtariGame, int], Player]] = {
    "expert": ExpertPlayer,
    "random": PersistentRandomPlayer,
}


# --- 3. Recording and replay ------------------------------------------------------------------
def resolve_games(spec: str) -> list[str]:
    """'breakout,MontezumaRevenge' -> ['Breakout', 'MontezumaRevenge'].

    Names match ale-py's ROMs ignoring case and underscores; 'experts' means every game with an
    expert player, 'all' every bundled ROM.
    """
    by_key = {_key(name): name for name in ROMS}
    games: list[str] = []
    for word in (w.strip() for w in spec.split(",")):
        if not word:
            continue
        if word.lower() == "all":
            found = sorted(ROMS)
        elif word.lower() == "experts":
            found = list(EXPERT_GAMES)
        elif _key(word) in by_key:
            found = [by_key[_key(word)]]
        else:
            close = difflib.get_close_matches(_key(word), by_key, n=5, cutoff=0.6)
            hint = ", ".join(by_key[k] for k in close) or "none (try 'all' or 'experts')"
            raise ValueError(f"unknown game {word!r}; close matches: {hint}")
        games += [g for g in found if g not in games]
    if not games:
        raise ValueError("no game given")
    return games


def video_id_for(game: str, player: str, seed: int) -> str:
    return f"{game}-{player}-s{seed:04d}"


def play_episode(game: AtariGame, player: Player, on_frame: Callable[[np.ndarray], None],
                 on_step: Callable[[int, float], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Play one episode from reset. ``on_frame`` gets every frame shown before an action.

    Returns (applied ALE ids (N,) int64, rewards (N,) float32): one per frame passed on.
    """
    frame, done = game.reset(), False
    applied, rewards, score = [], [], 0.0
    while not done:
        on_frame(frame)  # (210, 160, 3) uint8, the screen the action is chosen on
        frame, reward, done = game.step_ale(player.act(game))
        applied.append(game.applied)
        rewards.append(reward)
        score += reward
        if on_step is not None:
            on_step(game.steps, score)
    return np.asarray(applied, dtype=np.int64), np.asarray(rewards, dtype=np.float32)


def record(out: Path, games: list[str], player: str, episodes: int, fps: float = 30,
           seed: int = 0, max_seconds: float = 300, sticky: float = 0.0,
           progress: bool = True) -> list[dict]:
    """Record ``episodes`` episodes per game (episode i uses ``seed + i``) into the chunk store.

    Each episode becomes one video (written first) plus its action chunks, one action row per
    video frame. Episodes already complete in ``out`` are skipped, so a killed run resumes.
    Returns one dict per episode: its video_id, whether it was skipped, and (when recorded) the
    info written to metadata.
    """
    from walkthrough import chunks
    from walkthrough.video import VideoWriter

    if player not in PLAYERS:
        raise ValueError(f"unknown player {player!r}; choose from {', '.join(PLAYERS)}")
    if player == "expert":
        require_experts(games)  # before anything is recorded
    frameskip_for(fps)  # fail before any work on a bad fps
    out = Path(out)
    chunks.video_path(out, "_").parent.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("recording", total=len(games) * episodes)
        for name in games:
            for episode in range(episodes):
                episode_seed = seed + episode
                video_id = video_id_for(name, player, episode_seed)
                if chunks.episode_exists(out, video_id):
                    results.append({"video_id": video_id, "game": name, "skipped": True})
                    bar.update(task, advance=1, description=f"{video_id} already recorded")
                    continue
                game = AtariGame(name, seed=episode_seed, fps=fps, sticky=sticky, max_seconds=max_seconds)
                agent = PLAYERS[player](game, episode_seed)

                def show(step: int, score: float) -> None:
                    if step % int(fps) == 0:  # once per game second is plenty
                        bar.update(task, description=f"{video_id} t={step / fps:.0f}s score {score:g}")

                with VideoWriter(chunks.video_path(out, video_id), fps) as video:
                    applied, rewards = play_episode(game, agent, video.write, show)
                score = float(rewards.sum())
                info = write_played_episode(out, video_id, game, applied, {"player": player, "score": score},
                                            {"ale_action": applied, "reward": rewards})
                results.append({"video_id": video_id, "game": name, "skipped": False, **info})
                bar.update(task, advance=1, description=f"{video_id} score {score:g}")
    return results


def write_played_episode(out: Path, video_id: str, game: AtariGame, labels: np.ndarray, info: dict,
                         extra_columns: dict[str, np.ndarray]) -> dict:
    """Write the actions of the episode just played in ``game`` (its video written already) into the
    chunk store ``out``: ``labels`` (N,) ALE ids, one per frame; ``info`` plus the game's settings go
    to the metadata, which is returned."""
    from walkthrough import chunks

    info = {"source": "ale", **info, "seed": game.seed, "frames": int(len(labels)), "fps": float(game.fps),
            "sticky": float(game.sticky), "frameskip": game.frameskip, "max_seconds": float(game.max_seconds),
            "truncated": game.truncated, "ale_version": ale_py.__version__}
    actions = np.stack([ale_to_gamepad(a) for a in labels])  # (N, 21) float32
    chunks.write_episode(out, video_id, actions, fps=game.fps, game=game.name, resolution=FRAME_SHAPE[:2],
                         info=info, source="ale", extra_columns=extra_columns)
    return info


def replay(game: str, seed: int, fps: float, actions: np.ndarray) -> Iterator[np.ndarray]:
    """Re-run recorded (N, 21) gamepad actions in the same seeded game.

    Yields the frame before each action, i.e. what the recording's video holds, (210, 160, 3)
    uint8; stops early if the game ends first.
    """
    env = AtariGame(game, seed=seed, fps=fps, max_seconds=(len(actions) + 1) / fps)
    frame = env.frame()  # a new AtariGame is already reset
    for action in actions:
        yield frame
        frame, _, done = env.step_gamepad(action)
        if done:  # game over (the cap lies beyond the last action)
            return
