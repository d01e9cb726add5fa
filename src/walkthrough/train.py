"""The one training loop every model shares (the IDM now, the policy next).

A trainable model is an ``nn.Module`` with

    .config                                   a dataclass, saved as JSON with every checkpoint
    .loss(batch) -> (loss, {name: float})     batch: the dict of tensors a ``WindowDataset`` yields

and ``train`` gives it: AdamW; linear warmup then cosine or warmup-stable-decay (WSD); gradient
clipping; bf16 autocast (CPU too); an optional EMA of the weights; periodic validation on a
held-out split; a rich progress bar and ``RUN/metrics.jsonl`` (TensorBoard too when installed);
checkpoints that resume bit-exactly; and DDP under ``torchrun`` with the very same command.

Run directory:

    RUN/config.json          model_type, model and train configs, data sources, step   (JSON)
    RUN/model.safetensors    weights;  RUN/ema.safetensors: their EMA
    RUN/state.pt             optimizer, RNG, step, training time: what --resume needs
    RUN/metrics.jsonl        one JSON line per log / validation

Data order: global batch s is a fixed slice of a seeded permutation of the training windows
(one permutation per epoch), so the order depends only on the seed and the step. Resuming at
step s therefore consumes exactly the batches an uninterrupted run would have, under DDP each
rank takes every world-size-th window of each global batch, and the augmentation of each drawn
window is seeded by (seed, step, position): a resumed run ends with bit-identical weights.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from walkthrough.chunks import write_json_atomic

CONFIG_FILE, MODEL_FILE, EMA_FILE, STATE_FILE, METRICS_FILE = (
    "config.json", "model.safetensors", "ema.safetensors", "state.pt", "metrics.jsonl")
console = Console(stderr=True)


# --- 1. Config --------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    steps: int = 2000  # schedule length in optimizer steps
    batch_size: int = 64  # global: split over DDP ranks, so the run does not depend on the GPU count
    lr: float = 1e-3
    warmup_steps: int = 100
    schedule: str = "wsd"  # "wsd" (warmup-stable-decay) | "cosine"
    decay_fraction: float = 0.2  # WSD: the share of the run spent decaying
    final_lr_ratio: float = 0.05  # the last lr as a share of ``lr``
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    bf16: bool = True
    ema_decay: float = 0.999  # 0 disables EMA
    eval_every: int = 500
    eval_samples: int = 2048  # validation windows, evenly spread over the held-out split
    batchnorm_samples: int = 512  # training windows that set BatchNorm statistics (models with BatchNorm)
    ckpt_every: int = 1000
    log_every: int = 50
    num_workers: int = 1
    seed: int = 0
    augment: bool = True  # colour jitter + a small shift, the same for every frame of a window
    budget_minutes: float | None = None  # training time that ends the run; the schedule follows it
    clock: str = "wall"  # what training time means: "wall" seconds, or this process's "cpu" seconds
    # ("cpu" keeps runs comparable on a shared machine; use it with 1 thread and num_workers=0)
    max_minutes: float | None = None  # this session's wall time: checkpoint, stop, --resume later

    def __post_init__(self) -> None:
        if self.schedule not in ("wsd", "cosine"):
            raise ValueError(f"schedule must be 'wsd' or 'cosine', got {self.schedule!r}")
        if self.clock not in ("wall", "cpu"):
            raise ValueError(f"clock must be 'wall' or 'cpu', got {self.clock!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def run_progress(cfg: TrainConfig, step: int, train_seconds: float) -> float:
    """How far a run is along: the larger share of its step budget and its time budget; 1 ends it."""
    budget = cfg.budget_minutes * 60 if cfg.budget_minutes else math.inf
    return max(step / cfg.steps, train_seconds / budget)


def run_finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` has a checkpoint and trained to its end."""
    if not (Path(run_dir) / CONFIG_FILE).exists():
        return False
    saved = read_run_config(run_dir)
    return run_progress(TrainConfig.from_dict(saved["train"]), saved["step"], saved["train_seconds"]) >= 1.0


# Fields that may change when a run is resumed: they do not touch the optimisation itself.
RESUMABLE_CHANGES = ("max_minutes", "num_workers", "log_every", "eval_every", "ckpt_every", "eval_samples",
                     "batchnorm_samples")


def resumed_config(saved: TrainConfig, new: TrainConfig) -> TrainConfig:
    """The settings to resume with: the run's own, except those in ``RESUMABLE_CHANGES``."""
    return dataclasses.replace(saved, **{k: getattr(new, k) for k in RESUMABLE_CHANGES})


# --- 2. Model registry: config.json's model_type -> (config class, model class) -----------------------
MODELS: dict[str, tuple[type, type]] = {}


def register(model_type: str, config_cls: type, model_cls: type) -> None:
    """Make ``load_model`` able to rebuild a model type (each model module registers itself)."""
    MODELS[model_type] = (config_cls, model_cls)


def read_run_config(run_dir: Path) -> dict:
    file = Path(run_dir) / CONFIG_FILE
    if not file.exists():
        raise FileNotFoundError(f"{run_dir}: no checkpoint here ({CONFIG_FILE} missing)")
    return json.loads(file.read_text())


class OutdatedCheckpoint(ValueError):
    """A model config's ``from_dict`` cannot use a checkpoint written in an older format."""


def run_model_config(run_dir: Path, config_cls: type):
    """The model config saved in a run; an outdated one fails naming the checkpoint."""
    try:
        return config_cls.from_dict(read_run_config(run_dir)["model"])
    except OutdatedCheckpoint as e:
        raise OutdatedCheckpoint(f"checkpoint {run_dir} {e}") from None


def load_model(run_dir: Path, ema: bool = True) -> nn.Module:
    """Rebuild a trained model from its run directory, in eval mode on the CPU.

    ``ema=True`` loads the EMA weights when the run kept them. A model type registers itself
    when its module ``walkthrough.<model_type>`` is imported, which happens here on demand.
    """
    saved = read_run_config(run_dir)
    model_type = saved["model_type"]
    if model_type not in MODELS:
        importlib.import_module(f"walkthrough.{model_type}")
    config_cls, model_cls = MODELS[model_type]
    model = model_cls(run_model_config(run_dir, config_cls))
    file = Path(run_dir) / (EMA_FILE if ema and (Path(run_dir) / EMA_FILE).exists() else MODEL_FILE)
    model.load_state_dict(load_file(file))
    return model.eval()


# --- 3. Data: seeded order, augmentation, loader -------------------------------------------------------
class EpochBatches:
    """Batch sampler: global batch ``s`` is slice ``s % per_epoch`` of epoch ``s // per_epoch``'s
    seeded permutation (the incomplete last slice is dropped); this rank takes every
    ``world``-th window of it. Starts at any step and never ends. Yields (index, seed, step,
    position) keys, so that each drawn window can seed its own augmentation."""

    def __init__(self, size: int, batch_size: int, seed: int, start_step: int = 0,
                 rank: int = 0, world: int = 1):
        if size < batch_size:
            raise ValueError(f"the training split has {size} windows, fewer than one batch of {batch_size}")
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} is not divisible by the {world} DDP ranks")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_step, self.rank, self.world = start_step, rank, world
        self.per_epoch = size // batch_size

    def permutation(self, epoch: int) -> Tensor:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        step, epoch, order = self.start_step, None, None
        while True:
            if step // self.per_epoch != epoch:
                epoch = step // self.per_epoch
                order = self.permutation(epoch)
            first = (step % self.per_epoch) * self.batch_size
            window = order[first:first + self.batch_size].tolist()  # the global batch
            yield [(window[j], self.seed, step, j) for j in range(self.rank, self.batch_size, self.world)]
            step += 1


LUMA = torch.tensor([0.299, 0.587, 0.114])


def augment(frames: Tensor, rng: np.random.Generator) -> Tensor:
    """Colour jitter and a small shift, the same for every frame of the window.

    (T, 3, H, W) uint8 -> same. The motion between frames is untouched, so the action is too:
    brightness, contrast and saturation each by up to +-20%, and a shift of up to 1/16 of the
    frame (edge pixels repeated), as in DrQ.
    """
    T, _, H, W = frames.shape
    s = max(1, round(min(H, W) / 16))
    dy, dx = rng.integers(-s, s + 1, size=2)
    brightness, contrast, saturation = rng.uniform(0.8, 1.2, size=3)
    x = F.pad(frames.float(), (s, s, s, s), mode="replicate")[..., s + dy:s + dy + H, s + dx:s + dx + W]
    gray = torch.einsum("tchw,c->thw", x, LUMA)[:, None]  # (T, 1, H, W)
    x = gray + saturation * (x - gray)
    x = x.mean() + contrast * (x - x.mean())
    return (x * brightness).round_().clamp_(0, 255).to(torch.uint8)


class TrainItems(Dataset):
    """The training view of a dataset: an item is an ``EpochBatches`` key, augmented when asked."""

    def __init__(self, dataset: Dataset, augment: bool):
        self.dataset, self.augment = dataset, augment

    def __getitem__(self, key: tuple[int, int, int, int]) -> dict[str, Tensor]:
        index, seed, step, position = key
        item = self.dataset[index]
        if self.augment:
            item["frames"] = augment(item["frames"], np.random.default_rng([seed, step, position]))
        return item


def make_loader(dataset: Dataset, cfg: TrainConfig, start_step: int = 0, rank: int = 0,
                world: int = 1) -> DataLoader:
    """The training batches from ``start_step`` on, decoded and augmented in worker processes."""
    sampler = EpochBatches(len(dataset), cfg.batch_size, cfg.seed, start_step, rank, world)
    return DataLoader(TrainItems(dataset, cfg.augment), batch_sampler=sampler,
                      num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                      pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(cfg.seed))  # keeps the global RNG untouched


def validation_loader(dataset: Dataset, cfg: TrainConfig) -> DataLoader:
    """Up to ``eval_samples`` windows evenly spread over the held-out split, in order, unaugmented."""
    index = np.unique(np.linspace(0, len(dataset) - 1, min(len(dataset), cfg.eval_samples)).astype(int))
    return DataLoader(Subset(dataset, index.tolist()), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                      persistent_workers=cfg.num_workers > 0, generator=torch.Generator().manual_seed(cfg.seed))


def batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: DataLoader, device: torch.device) -> None:
    """Precise BatchNorm: set every BatchNorm's running statistics to their exact average over
    ``batches`` under ``model``'s current weights (a no-op for models without BatchNorm).

    The running averages kept during training trail weights that keep moving, and the EMA model
    copies the live model's, which do not belong to its weights; a model whose BatchNorm amplifies
    small differences (the policy's ``token_norm``) is thrown off by either.
    """
    norms = batchnorms(model)
    if not norms:
        return
    was_training, momenta = model.training, [m.momentum for m in norms]
    model.train()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the run's RNG stays as it was
        for batch in batches:
            if len(batch["frames"]) > 1:  # BatchNorm cannot take statistics of one window
                model.loss({k: v.to(device) for k, v in batch.items()})
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


# --- 4. Schedule and EMA --------------------------------------------------------------------------------
def lr_factor(cfg: TrainConfig, step: int, progress: float) -> float:
    """Multiplier of ``cfg.lr``: linear warmup over ``warmup_steps``, then a decay driven by
    ``progress`` in [0, 1] (the share of the step or time budget used, whichever is larger)."""
    warmup = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    low = cfg.final_lr_ratio
    if cfg.schedule == "cosine":
        decay = low + (1 - low) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    else:  # WSD: hold the peak, then fall linearly over the last decay_fraction of the run
        into_decay = (progress - (1 - cfg.decay_fraction)) / max(cfg.decay_fraction, 1e-9)
        decay = 1 - (1 - low) * min(max(into_decay, 0.0), 1.0)
    return warmup * decay


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """ema <- decay * ema + (1 - decay) * model; the decay ramps up over the first steps so the
    average is not dominated by the random initialisation."""
    decay = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


# --- 5. Distributed: torchrun sets the environment, the command stays the same -------------------------
def check_device(name: str) -> torch.device:
    """A device named on the command line ("cpu", "cuda", "cuda:1"), if this machine has it; else ValueError."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: this machine has no CUDA GPU that torch {torch.__version__} can use")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: only cpu and cuda are supported")
    return device


@dataclass(frozen=True)
class Distributed:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env() -> "Distributed":
        world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return Distributed(rank, world, device)

    def share(self, values: list[float]) -> list[float]:
        """Rank 0's numbers on every rank (the clock, the stop flag), so all ranks decide alike."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return t.tolist()


def main_process() -> bool:
    """True on DDP rank 0, or without DDP: the process that writes files and prints."""
    return int(os.environ.get("RANK", 0)) == 0


class LossOf(nn.Module):
    """``model.loss`` as ``forward``, so DDP's gradient hooks see it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        return self.model.loss(batch)


# --- 6. Checkpoints -------------------------------------------------------------------------------------
def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, model: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer,
                    cfg: TrainConfig, step: int, train_seconds: float, model_type: str,
                    data: dict | None = None) -> None:
    """Write the run's files, each atomically; ``config.json`` goes last and names the step, which
    the weights (safetensors metadata) and ``state.pt`` repeat, so a torn write is detected."""
    run_dir = Path(run_dir)
    meta = {"step": str(step), "model_type": model_type}
    state = {"step": step, "train_seconds": train_seconds, "optimizer": optimizer.state_dict(),
             "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic(run_dir / STATE_FILE, lambda p: torch.save(state, p))
    _atomic(run_dir / MODEL_FILE, lambda p: save_file(weights, p, metadata=meta))
    if ema is not None:
        ema_weights = {k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}
        _atomic(run_dir / EMA_FILE, lambda p: save_file(ema_weights, p, metadata=meta))
    write_json_atomic(run_dir / CONFIG_FILE, {
        "model_type": model_type, "step": step, "train_seconds": round(train_seconds, 1),
        "model": asdict(model.config), "train": asdict(cfg), "data": data or {},
    })


def load_checkpoint(run_dir: Path, model: nn.Module, ema: nn.Module | None,
                    optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights and optimizer in place; returns ``state.pt`` (step, training time, RNG)."""
    run_dir = Path(run_dir)
    step = read_run_config(run_dir)["step"]
    state = torch.load(run_dir / STATE_FILE, map_location="cpu", weights_only=False)
    if state["step"] != step:
        raise RuntimeError(f"{run_dir}: {STATE_FILE} is at step {state['step']} but {CONFIG_FILE} at "
                           f"{step} (interrupted while saving?)")
    device = next(model.parameters()).device
    model.load_state_dict(load_file(run_dir / MODEL_FILE, device=str(device)))
    if ema is not None:
        ema.load_state_dict(load_file(run_dir / EMA_FILE, device=str(device)))
    optimizer.load_state_dict(state["optimizer"])
    return state


def check_resumable(run_dir: Path, model: nn.Module, cfg: TrainConfig, model_type: str) -> None:
    """A resumed run must be the same run: same model, same optimisation settings."""
    saved = read_run_config(run_dir)
    if saved["model_type"] != model_type or saved["model"] != json.loads(json.dumps(asdict(model.config))):
        raise ValueError(f"{run_dir}: holds a different model ({saved['model_type']} {saved['model']})")
    changed = [f"{k}: {saved['train'].get(k)} -> {v}" for k, v in asdict(cfg).items()
               if k not in RESUMABLE_CHANGES and saved["train"].get(k) != v]
    if changed:
        raise ValueError(f"{run_dir}: resuming with other training settings ({'; '.join(changed)})")


# --- 7. The loop ----------------------------------------------------------------------------------------
def training_step(loss_of: Callable, model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Tensor],
                  device: torch.device, bf16: bool = True, grad_clip: float = 1.0) -> tuple[dict, Tensor, int]:
    """One optimizer step on ``batch`` (moved to ``device``): the loop's, and the benchmarks' too.
    Returns the loss's metrics, the gradient norm before clipping and the batch's window count."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, metrics = loss_of(batch)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return metrics, grad_norm, len(batch["frames"])


def train(model: nn.Module, train_cfg: TrainConfig, train_set: Dataset, val_set: Dataset | None, out: Path,
          resume: bool = False, evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
          model_type: str = "idm", data: dict | None = None) -> Path:
    """Train ``model`` into the run directory ``out``; returns ``out``.

    ``resume=True`` continues the run saved in ``out`` (same step, optimizer state, data order);
    without a checkpoint there it starts one. ``evaluate(model)`` adds metrics to each validation
    (it gets the EMA model when there is one). ``data`` (sources, split) is recorded in config.json.
    """
    cfg, out = train_cfg, Path(out)
    env = Distributed.from_env()
    has_checkpoint = (out / CONFIG_FILE).exists()
    if has_checkpoint and not resume:
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or pick another --out")
    if env.main:
        out.mkdir(parents=True, exist_ok=True)

    model = model.to(env.device)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay > 0 else None
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)  # no weight decay on biases and norms
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.95), fused=env.device.type == "cuda")
    step, train_seconds, state = 0, 0.0, None
    if has_checkpoint:
        check_resumable(out, model, cfg, model_type)
        state = load_checkpoint(out, model, ema, optimizer)
        step, train_seconds = state["step"], state["train_seconds"]
    loss_of = LossOf(model)
    if env.world > 1:
        loss_of = nn.parallel.DistributedDataParallel(loss_of)

    batches = iter(make_loader(train_set, cfg, step, env.rank, env.world))
    val_batches = validation_loader(val_set, cfg) if val_set is not None and env.main else None
    # Unaugmented training windows for ``recompute_batchnorm`` (only models with BatchNorm use them).
    norm_batches = (validation_loader(train_set, dataclasses.replace(cfg, eval_samples=cfg.batchnorm_samples))
                    if batchnorms(model) and env.main else None)
    if state is not None:  # after the loaders, which must not shift the restored RNG streams
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def precise_batchnorm() -> None:
        if norm_batches is not None:
            for m in (model, ema):
                if m is not None:
                    recompute_batchnorm(m, norm_batches, env.device)

    def checkpoint() -> None:
        if env.main:
            precise_batchnorm()
            save_checkpoint(out, model, ema, optimizer, cfg, step, train_seconds, model_type, data)

    def validate() -> None:
        if env.main and (val_batches is not None or evaluate is not None):
            precise_batchnorm()
            log.write(step, "val", run_validation(ema if ema is not None else model, val_batches,
                                                  evaluate, env.device, cfg.bf16))

    clock = time.process_time if cfg.clock == "cpu" else time.perf_counter
    session_start = time.perf_counter()
    progress = run_progress(cfg, step, train_seconds)
    finished = progress >= 1.0
    log = RunLog(out, env.main, progress, step)
    model.train()
    while not finished:
        t0 = clock()
        lr = cfg.lr * lr_factor(cfg, step, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        metrics, grad_norm, windows = training_step(loss_of, model, optimizer, next(batches), env.device,
                                                    cfg.bf16, cfg.grad_clip)
        if ema is not None:
            update_ema(ema, model, cfg.ema_decay, step)
        step += 1
        # Validation and checkpoints do not count as training time: the budget buys steps.
        seconds, session = env.share([clock() - t0, time.perf_counter() - session_start])
        train_seconds += seconds
        progress = run_progress(cfg, step, train_seconds)
        finished = progress >= 1.0
        log.step(step, progress, windows * env.world, seconds,
                 {**metrics, "lr": lr, "grad_norm": float(grad_norm)}, every=cfg.log_every)
        if finished or step % cfg.eval_every == 0:
            validate()
        if finished or step % cfg.ckpt_every == 0:
            checkpoint()
        if not finished and cfg.max_minutes is not None and session > cfg.max_minutes * 60:
            log.note(f"stopping at step {step} after {cfg.max_minutes:g} min; --resume continues")
            checkpoint()
            break
    log.close()
    if env.world > 1:
        dist.barrier()  # every rank returns once the checkpoint is on disk
    return out


@torch.no_grad()
def run_validation(model: nn.Module, batches: DataLoader | None, evaluate: Callable | None,
                   device: torch.device, bf16: bool) -> dict[str, float]:
    """Mean of ``model.loss``'s metrics over the validation windows, plus ``evaluate(model)``."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    count = 0
    for batch in batches or []:
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            _, metrics = model.loss(batch)
        n = len(batch["frames"])
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v * n
        count += n
    out = {k: v / count for k, v in totals.items()}
    if evaluate is not None:
        out.update(evaluate(model))
    model.train(was_training)
    return out


class RunLog:
    """Progress bar, ``metrics.jsonl`` and TensorBoard (when installed); silent on ranks > 0."""

    def __init__(self, out: Path, enabled: bool, progress: float, step: int):
        self.enabled = enabled
        self.file = open(out / METRICS_FILE, "a") if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                pass
        self.bar = Progress(TextColumn("[bold]train[/]"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                            TimeElapsedColumn(), TextColumn("{task.fields[status]}"),
                            console=console, disable=not enabled)
        self.bar.start()
        self.task = self.bar.add_task("train", total=1.0, completed=progress, status=f"step {step}")
        self.window: dict[str, float] = {}
        self.samples, self.seconds, self.count = 0, 0.0, 0

    def step(self, step: int, progress: float, samples: int, seconds: float, metrics: dict[str, float],
             every: int) -> None:
        for k, v in metrics.items():
            self.window[k] = self.window.get(k, 0.0) + v
        self.samples, self.seconds, self.count = self.samples + samples, self.seconds + seconds, self.count + 1
        if step % every:
            return
        means = {k: v / self.count for k, v in self.window.items()}
        means["samples_per_s"] = self.samples / max(self.seconds, 1e-9)
        self.write(step, "train", means)
        self.bar.update(self.task, completed=min(progress, 1.0),
                        status=f"step {step}  loss {means['loss']:.4f}  {means['samples_per_s']:.0f} samples/s")
        self.window, self.samples, self.seconds, self.count = {}, 0, 0.0, 0

    def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "split": split, "time": round(time.time(), 2),
                                    **{k: round(v, 6) for k, v in metrics.items()}}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{split}/{k}", v, step)
        if split != "train":
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            self.note(f"step {step} {split}: {shown}")

    def note(self, message: str) -> None:
        if self.enabled:
            self.bar.console.print(message, highlight=False)

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()
            self.file.close()
            if self.tb is not None:
                self.tb.close()

