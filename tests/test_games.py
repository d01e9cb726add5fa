"""Real Atari games: action mapping, exact labels, players and the resumable recorder."""

import shutil

import numpy as np
import pytest

from walkthrough import actions as A, chunks, games, video
from walkthrough.actions import ale_to_gamepad, gamepad_to_ale, idle

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
SAME = 0.0005  # mismatch below this: the same picture up to compression (measured: <= 0.0001)


def mismatch(replayed: list[np.ndarray], decoded: list[np.ndarray]) -> np.ndarray:
    """Per frame, the fraction of pixels whose brightness differs by more than 30 (of 255).

    Lossy H.264 (crf 18) leaves a pixel or two on sharp edges; a paddle or ball out of place, or
    a different score, makes a whole object's worth (a Pong paddle is 64 pixels, 0.19%).
    """
    assert len(replayed) == len(decoded)
    a = np.stack(replayed).astype(np.float32) @ LUMA  # (N, 210, 160)
    b = np.stack(decoded).astype(np.float32) @ LUMA
    return (np.abs(a - b) > 30).mean(axis=(1, 2))  # (N,)


def decoded_frames(episode: chunks.Episode) -> list[np.ndarray]:
    return [frame for _, frame in video.iter_frames(episode.video)]


def replayed_frames(episode: chunks.Episode, actions: np.ndarray) -> list[np.ndarray]:
    info = episode.info
    return list(games.replay(episode.game, info["seed"], info["fps"], actions))


def test_gamepad_round_trip_for_every_minimal_action_set():
    assert len(games.ROMS) > 100
    for name in games.ROMS:
        minimal = games.AtariGame(name).minimal_actions
        for ale_id in minimal:
            assert gamepad_to_ale(ale_to_gamepad(ale_id), minimal) == ale_id, (name, ale_id)


def test_resolve_games():
    assert games.resolve_games("breakout, MONTEZUMA_revenge,pong,Breakout") == [
        "Breakout", "MontezumaRevenge", "Pong"]
    assert games.resolve_games("experts") == list(games.EXPERT_GAMES)
    assert {"Breakout", "Pong"} <= set(games.EXPERT_GAMES)
    assert games.resolve_games("all") == sorted(games.ROMS)
    with pytest.raises(ValueError, match="Breakout"):
        games.resolve_games("breakot")
    with pytest.raises(ValueError, match="no expert for Tennis.*Breakout"):
        games.record(None, ["Tennis"], "expert", 1)
    with pytest.raises(ValueError, match="fps must divide 60"):
        games.AtariGame("Pong", fps=25)


def test_frames_step_and_sticky_semantics():
    game = games.AtariGame("Breakout", fps=20, max_seconds=1.0)
    assert game.frameskip == 3 and game.frame().shape == (210, 160, 3)
    left = games.ALE_ID["LEFT"]
    frames = [game.reset()]
    done = False
    while not done:
        frame, _, done = game.step_ale(left)
        frames.append(frame)
    assert len(frames) == 21 and game.truncated  # 1 s at 20 fps, then the cap
    with pytest.raises(RuntimeError):
        game.step_ale(left)
    # sticky=1: the first applied action (NOOP) is repeated for ever, and `applied` says so.
    stuck = games.AtariGame("Breakout", sticky=1.0)
    stuck.step_ale(left)
    assert stuck.applied == games.ALE_ID["NOOP"]
    half = games.AtariGame("Breakout", sticky=0.5, seed=3)
    intended = [games.ALE_ID["LEFT"], games.ALE_ID["RIGHT"]] * 50
    repeats = 0
    for action in intended:
        half.step_ale(action)
        repeats += half.applied != action
    repeats /= len(intended)
    assert 0.3 < repeats < 0.7  # with alternating intents, every sticky step is a repeat


def test_recording_has_one_action_row_per_video_frame(recorded):
    store = chunks.ChunkStore(recorded)
    assert {e.video_id for e in store} == {
        "Breakout-expert-s0000", "Pong-expert-s0000", "Breakout-random-s0100", "Pong-random-s0100"}
    for episode in store:
        info = episode.info
        assert info["frames"] == len(episode.actions) == len(decoded_frames(episode)) == 6 * 30
        assert info["truncated"] and info["frameskip"] == 2 and info["source"] == "ale"
        assert episode.column("ale_action").tolist() == [
            gamepad_to_ale(a) for a in episode.actions]


def test_labels_are_exact_and_a_shift_by_one_is_caught(recorded):
    for episode in chunks.ChunkStore(recorded):
        actions = episode.actions  # read back from the parquet files
        decoded = decoded_frames(episode)
        exact = mismatch(replayed_frames(episode, actions), decoded)
        assert exact.max() < SAME, episode.video_id
        late = np.concatenate([idle(1), actions[:-1]])  # label k taken from step k - 1
        early = np.concatenate([actions[1:], actions[-1:]])  # label k taken from step k + 1
        for shifted in (late, early):
            changed = np.flatnonzero(np.any(shifted != actions, axis=1))
            assert len(changed), episode.video_id  # a shift that changes nothing proves nothing
            wrong = mismatch(replayed_frames(episode, shifted), decoded)
            # Frame k + 1 is the first to show action k: nothing before may differ...
            assert wrong[: changed[0] + 1].max() < SAME
            # ...and the wrong labels must show in the frames after, clearly and often.
            assert wrong.max() > 4 * SAME and (wrong > SAME).sum() >= 10, episode.video_id


def test_sticky_recording_replays_exactly(tmp_path):
    [result] = games.record(tmp_path, ["Pong"], "expert", episodes=1, fps=30, seed=7,
                            max_seconds=4, sticky=0.5, progress=False)
    assert result["sticky"] == 0.5
    [episode] = chunks.ChunkStore(tmp_path)
    assert mismatch(replayed_frames(episode, episode.actions), decoded_frames(episode)).max() < SAME
    # The same player without stickiness acts differently: stickiness really changed the labels.
    games.record(tmp_path / "plain", ["Pong"], "expert", episodes=1, fps=30, seed=7,
                 max_seconds=4, progress=False)
    [plain_episode] = chunks.ChunkStore(tmp_path / "plain")
    assert not np.array_equal(plain_episode.actions, episode.actions)


@pytest.mark.parametrize("name", ["Breakout", "Pong"])
def test_expert_beats_random(name):
    def score(player: str, seed: int) -> float:
        game = games.AtariGame(name, seed=seed, fps=30, max_seconds=45)
        _, rewards = games.play_episode(game, games.PLAYERS[player](game, seed), lambda f: None)
        return float(rewards.sum())

    expert = [score("expert", s) for s in range(2)]
    random = [score("random", s) for s in range(2)]
    assert min(expert) > max(random), (expert, random)


def test_expert_pauses_before_serving():
    def first_fire(serve_delay_s: float, seed: int) -> int:
        game = games.AtariGame("Breakout", seed=seed, fps=30, max_seconds=10)
        game.reset()
        player = games.ExpertPlayer(game, seed, lapses_per_s=0.0, serve_delay_s=serve_delay_s)
        for step in range(game.max_steps):
            action = player.act(game)
            if A.ALE_ACTIONS[action] == "FIRE":
                return step
            game.step_ale(action)
        raise AssertionError("never served")

    assert [first_fire(0.0, s) for s in range(3)] == [0, 0, 0]
    waits = [first_fire(0.5, s) for s in range(3)]
    assert min(waits) >= 1 and len(set(waits)) > 1 and np.mean(waits) < 3 * 0.5 * 30, waits


def test_rerun_skips_complete_episodes(tmp_path):
    first = games.record(tmp_path, ["Breakout"], "random", episodes=2, fps=15, max_seconds=1,
                         progress=False)
    assert [r["skipped"] for r in first] == [False, False]
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    # A run killed between the video and the chunks leaves no chunks: that episode is redone.
    redo = chunks.episode_dir(tmp_path, "Breakout-random-s0001")
    shutil.rmtree(redo)
    second = games.record(tmp_path, ["Breakout"], "random", episodes=2, fps=15, max_seconds=1,
                          progress=False)
    assert [r["skipped"] for r in second] == [True, False]
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items() if "s0000" in str(p))
    assert chunks.episode_exists(tmp_path, "Breakout-random-s0001")
