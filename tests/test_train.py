"""The shared training loop: schedule, data order, augmentation, checkpoints, resume, DDP."""

import json
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import Dataset

from walkthrough import actions as A
from walkthrough import train as T
from walkthrough.idm import IDM, IDMConfig

TINY = dict(frames=3, size=(16, 16), channels=(4,), dim=16, depth=1, heads=2)


class ToyWindows(Dataset):
    """Random windows shaped like WindowDataset's items, the same for the same index."""

    def __init__(self, size: int = 48, frames: int = 3):
        self.size, self.frames = size, frames

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        actions = torch.zeros(self.frames - 1, A.ACTION_DIM)
        actions[:, :A.NUM_BUTTONS] = (torch.rand(self.frames - 1, A.NUM_BUTTONS, generator=g) < 0.2).float()
        # the IDM's window and a context frame on each side (WindowSpec(context=1))
        return {"frames": torch.randint(0, 256, (self.frames + 2, 3, 16, 16), generator=g, dtype=torch.uint8),
                "actions": actions, "action_mask": torch.ones(self.frames - 1, dtype=torch.bool),
                "weight": torch.ones(self.frames - 1), "episode": torch.tensor(0)}


def config(**changes) -> T.TrainConfig:
    base = dict(steps=6, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=3, ckpt_every=3, log_every=1,
                num_workers=0, eval_samples=16)
    return T.TrainConfig(**{**base, **changes})


def fresh_model() -> IDM:
    torch.manual_seed(0)
    return IDM(IDMConfig(**TINY))


def weights(run, name=T.MODEL_FILE):
    return load_file(run / name)


def test_schedules_warm_up_then_decay():
    wsd, cos = config(steps=100, warmup_steps=10), config(steps=100, warmup_steps=10, schedule="cosine")
    assert T.lr_factor(wsd, 0, 0.0) == pytest.approx(0.1)
    assert T.lr_factor(wsd, 50, 0.5) == 1.0  # stable phase
    assert T.lr_factor(wsd, 90, 0.9) == pytest.approx(1 - 0.95 * 0.5)  # halfway down the decay
    assert T.lr_factor(wsd, 100, 1.0) == pytest.approx(wsd.final_lr_ratio)
    assert T.lr_factor(cos, 50, 0.5) == pytest.approx(0.05 + 0.95 * 0.5)
    assert T.lr_factor(cos, 100, 1.0) == pytest.approx(cos.final_lr_ratio)


def test_batches_follow_a_seeded_order_and_shard_by_rank():
    keys = lambda sampler, n: [[k[0] for k in b] for b, _ in zip(sampler, range(n))]  # noqa: E731
    full = keys(T.EpochBatches(10, 4, seed=1), 6)  # 2 batches per epoch, the remainder dropped
    assert len(set(full[0] + full[1])) == 8 and full[:2] != full[2:4]  # a new permutation per epoch
    assert keys(T.EpochBatches(10, 4, seed=1, start_step=3), 3) == full[3:6]  # resumable anywhere
    ranks = [keys(T.EpochBatches(10, 4, seed=1, rank=r, world=2), 6) for r in (0, 1)]
    for step in range(6):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(full[step])


def test_augmentation_is_one_transform_per_window():
    frame = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    window = frame.expand(4, 3, 32, 32).clone()
    out = T.augment(window, np.random.default_rng([0, 1, 2]))
    assert out.dtype == torch.uint8 and out.shape == window.shape and not torch.equal(out, window)
    assert all(torch.equal(out[0], out[t]) for t in range(4))  # same shift and colour for all frames
    assert torch.equal(out, T.augment(window, np.random.default_rng([0, 1, 2])))


def test_checkpoint_holds_configs_weights_and_ema(tmp_path):
    run = T.train(fresh_model(), config(), ToyWindows(), ToyWindows(16), tmp_path / "run",
                  data={"sources": ["toy"]})
    saved = json.loads((run / T.CONFIG_FILE).read_text())
    assert saved["model_type"] == "idm" and saved["step"] == 6 and saved["data"] == {"sources": ["toy"]}
    assert saved["model"]["frames"] == 3 and saved["train"]["batch_size"] == 8
    with safe_open(run / T.MODEL_FILE, "pt") as f:
        assert f.metadata()["step"] == "6"
    lines = [json.loads(line) for line in (run / T.METRICS_FILE).read_text().splitlines()]
    assert [line["step"] for line in lines if line["split"] == "val"] == [3, 6]
    assert all(np.isfinite(line["loss"]) for line in lines)
    ema, raw = T.load_model(run), T.load_model(run, ema=False)
    assert not ema.training and torch.equal(raw.pos, weights(run)["pos"])
    assert torch.equal(ema.pos, weights(run, T.EMA_FILE)["pos"]) and not torch.equal(ema.pos, raw.pos)


class NormedFeatures(torch.nn.Module):
    """A linear feature + BatchNorm, with the ``loss(batch)`` the training loop calls."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 4)
        self.norm = torch.nn.BatchNorm1d(4, affine=False)

    def features(self, batch):
        return self.linear(batch["frames"].float().mean((1, 3, 4)))  # (B, 4)

    def loss(self, batch):
        return self.norm(self.features(batch)).square().mean(), {}


def test_precise_batchnorm_uses_exact_statistics_of_the_current_weights():
    torch.manual_seed(0)
    model = NormedFeatures().eval()
    loader = torch.utils.data.DataLoader(ToyWindows(32), batch_size=8)
    model.norm.running_mean.fill_(5.0)  # stale statistics, as after weights moved on
    rng = torch.get_rng_state()
    T.recompute_batchnorm(model, loader, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random stream is untouched
    with torch.no_grad():
        features = torch.cat([model.features(batch) for batch in loader])  # (32, 4)
    assert torch.allclose(model.norm.running_mean, features.mean(0), atol=1e-5)
    assert model.norm.momentum == 0.1 and not model.training
    T.recompute_batchnorm(fresh_model(), loader, torch.device("cpu"))  # no BatchNorm: nothing to do


def test_resume_continues_the_same_run_bit_exactly(tmp_path):
    cfg = config(num_workers=1)  # worker processes too: the order must not depend on them
    whole = T.train(fresh_model(), cfg, ToyWindows(), None, tmp_path / "whole")
    # max_minutes=0 stops the session (with a checkpoint) after its first step.
    split = T.train(fresh_model(), T.TrainConfig(**{**cfg.__dict__, "max_minutes": 0.0}), ToyWindows(), None,
                    tmp_path / "split")
    assert json.loads((split / T.CONFIG_FILE).read_text())["step"] == 1
    T.train(fresh_model(), cfg, ToyWindows(), None, split, resume=True)
    for name in (T.MODEL_FILE, T.EMA_FILE):
        a, b = weights(whole, name), weights(split, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    state_a = torch.load(whole / T.STATE_FILE, weights_only=False)["optimizer"]["state"]
    state_b = torch.load(split / T.STATE_FILE, weights_only=False)["optimizer"]["state"]
    assert all(torch.equal(state_a[i]["exp_avg_sq"], state_b[i]["exp_avg_sq"]) for i in state_a)


def test_a_run_is_never_overwritten_nor_resumed_with_other_settings(tmp_path):
    run = T.train(fresh_model(), config(steps=2), ToyWindows(), None, tmp_path / "run")
    with pytest.raises(FileExistsError, match="--resume"):
        T.train(fresh_model(), config(steps=2), ToyWindows(), None, run)
    with pytest.raises(ValueError, match="lr"):
        T.train(fresh_model(), config(steps=4, lr=1e-2), ToyWindows(), None, run, resume=True)
    resumed = T.resumed_config(config(steps=2), config(steps=9, num_workers=2))
    assert resumed.steps == 2 and resumed.num_workers == 2


def _ddp_worker(rank: int, port: int, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        T.train(fresh_model(), config(bf16=False, ema_decay=0.0), ToyWindows(), None, out)
    finally:
        dist.destroy_process_group()


def test_ddp_on_two_gloo_processes_matches_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path / "ddp")), nprocs=2)
    single = T.train(fresh_model(), config(bf16=False, ema_decay=0.0), ToyWindows(), None, tmp_path / "one")
    # The same global batches, gradients averaged over ranks: the same function. (Compared by
    # outputs: the key bias gets a zero gradient up to rounding, which AdamW blows up to lr-size steps.)
    frames = torch.stack([ToyWindows()[i]["frames"] for i in range(8)])
    ddp, one = T.load_model(tmp_path / "ddp"), T.load_model(single)
    assert not torch.equal(ddp.head[-1].weight, fresh_model().head[-1].weight)
    for key in ("button_prob", "stick_prob"):
        assert torch.allclose(ddp.predict(frames)[key], one.predict(frames)[key], atol=1e-5)
    lines = (tmp_path / "ddp" / T.METRICS_FILE).read_text().splitlines()
    assert len([line for line in lines if '"train"' in line]) == 6  # rank 0 alone writes


def test_devices_named_on_the_command_line_are_checked():
    assert T.check_device("cpu") == torch.device("cpu")
    for name, message in (("tpu:9", "unknown device"), ("mps", "only cpu and cuda"),
                          (f"cuda:{torch.cuda.device_count()}", "CUDA GPU")):
        with pytest.raises(ValueError, match=message):
            T.check_device(name)
