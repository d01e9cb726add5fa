"""Shared fixtures: tiny real data, recorded once per test session from real Atari games."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run no faster on two threads, and far slower when other jobs share the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def recorded(tmp_path_factory):
    """A chunk store of a few seconds of Breakout and Pong: expert and persistent-random play.

    4 episodes x 6 s at 30 fps (~720 frames of 210x160 video with their true actions).
    """
    from walkthrough import games

    root = tmp_path_factory.mktemp("recorded")
    games.record(root, ["Breakout", "Pong"], player="expert", episodes=1, fps=30, seed=0,
                 max_seconds=6, progress=False)
    games.record(root, ["Breakout", "Pong"], player="random", episodes=1, fps=30, seed=100,
                 max_seconds=6, progress=False)
    return root
