"""WindowDataset's context frames: the IDM's window plus a neighbour on each side, the same
whether frames are preloaded or decoded on demand, and no change to which windows exist."""

import dataclasses

import numpy as np
import pytest
import torch

from walkthrough.chunks import ChunkStore
from walkthrough.dataset import WindowDataset, WindowSpec, decode_episode, decode_episodes
from walkthrough.video import VideoError

SPEC = dict(num_frames=4, num_actions=3, fps=15.0, size=(24, 24))


def test_context_frames_are_the_true_neighbours_and_the_ends_repeat(recorded):
    episode = next(iter(ChunkStore(recorded)))
    plain = WindowDataset([episode], WindowSpec(**SPEC))
    with_context = WindowDataset([episode], WindowSpec(**SPEC, context=1))
    preloaded = WindowDataset([episode], WindowSpec(**SPEC, context=1), preload=True)
    assert plain.windows == with_context.windows  # context never changes which windows exist
    frames = torch.from_numpy(decode_episode(episode, 15.0, (24, 24))).permute(0, 3, 1, 2)  # (N, 3, H, W)
    last = len(with_context) - 1
    for i in (0, 1, len(with_context) // 2, last):
        item, start = with_context[i], with_context.windows[i][1]
        assert item["frames"].shape == (6, 3, 24, 24)
        assert torch.equal(item["frames"][1:-1], plain[i]["frames"])  # the window itself is unchanged
        assert torch.equal(item["frames"], preloaded[i]["frames"])
        index = np.clip(np.arange(start - 1, start + 5), 0, len(frames) - 1)
        assert torch.equal(item["frames"], frames[index])
        assert torch.equal(item["actions"], plain[i]["actions"])
    assert torch.equal(with_context[0]["frames"][0], with_context[0]["frames"][1])  # the first frame repeated


def test_parallel_preload_decodes_the_same_frames_and_names_a_bad_file(recorded, tmp_path):
    episodes = list(ChunkStore(recorded))
    parallel = decode_episodes(episodes, 15.0, (24, 24), workers=2, parallel_from_s=0)
    assert len(parallel) == len(episodes)
    for episode, frames in zip(episodes, parallel):
        assert np.array_equal(frames, decode_episode(episode, 15.0, (24, 24)))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(episodes[1].video.read_bytes()[:2000])
    damaged = [episodes[0], dataclasses.replace(episodes[1], video=cut)]
    with pytest.raises(VideoError, match="cut.mp4"):  # raised in a worker, named here
        decode_episodes(damaged, 15.0, (24, 24), workers=2, parallel_from_s=0)
