"""The inverse dynamics model (IDM): a window of T frames -> the action at each of its T - 1 transitions.

After VPT's IDM (a space-time conv stem, an IMPALA ResNet per frame, a non-causal transformer):

    frames (B, T + 2, 3, H, W) uint8: the window and one context frame on each side
      -> encode_frames: each of the T frames with its differences to its true neighbours (the
         context frames only supply those), then a 3x3 conv: a 3x3x3 space-time conv that sees
         motion from the first step; IMPALA stages, flatten, linear              (B, T, D)
      -> temporal: non-causal transformer over the T frame tokens               (B, T, D)
      -> transition j reads [h_j, h_j+1]: 17 button logits + 4 x 11 stick-bin logits

A frame's features depend on the frame and its two neighbours only, never on the window it is
in, so a labeler encodes every frame of a video once and runs the (cheap) transformer over all
the overlapping windows of those features. At a video's first and last frame the missing
neighbour is the frame itself (no motion there), as ``repeat_edges`` makes it.

Buttons are independent sigmoids; each stick axis is an 11-way categorical over bins centred at
-1, -0.8, ..., 1, so every head states a probability. The training loss is the negative
log-likelihood of the true action, summed over the 21 heads.

Inference for the labeler: ``IDM.predict`` on windows, ``IDM.label`` over a whole clip (frames
encoded once, overlapping windows, probabilities averaged where they overlap), ``IDM.block_sums``
for the streaming labeler, ``decode`` to (N, 21) actions and
``confidence`` per step (defined there). ``load_calibration`` reads the confidence threshold
that ``walkthrough eval-idm`` picked for a target precision.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from walkthrough import actions as A
from walkthrough.chunks import ChunkStore, Episode, StoreError, write_json_atomic
from walkthrough.dataset import WindowDataset, WindowSpec, decode_episode, split_episodes
from walkthrough.metrics import STICK_BINS, STICK_CENTRES, stick_bin, summarize
from walkthrough.train import (CONFIG_FILE, OutdatedCheckpoint, TrainConfig, console, main_process,
                              read_run_config, register, resumed_config, run_model_config, train)


# --- 1. Config ------------------------------------------------------------------------------------
# What a window of input is. 1: T frames, each frame's motion taken inside the window (edge
# frames repeated at the window's borders). 2: T frames plus a context frame on each side, so a
# frame's features do not depend on the window. Weights of one format are garbage in the other.
INPUT_FORMAT = 2


@dataclass
class IDMConfig:
    # what the model sees: a labeler resamples video to this rate and size
    frames: int = 2  # T, the window (plus a context frame each side): T - 1 actions (T = 2 won the ablation)
    size: tuple[int, int] = (64, 64)  # (H, W) input pixels
    fps: float = 30.0
    # per-frame encoder: an IMPALA ResNet, one stage per entry (each halves the resolution)
    channels: tuple[int, ...] = (16, 32, 32)
    # transformer over the window
    dim: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    # output
    button_pos_weight: float = 1.0  # > 1 up-weights presses (recall up, calibration off)
    input_format: int = INPUT_FORMAT  # saved with the checkpoint: which input the weights expect

    def __post_init__(self) -> None:
        self.size = tuple(int(s) for s in self.size)
        self.channels = tuple(int(c) for c in self.channels)
        if self.frames < 2:
            raise ValueError(f"an IDM needs at least 2 frames per window, got {self.frames}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")

    @classmethod
    def from_dict(cls, data: dict) -> "IDMConfig":
        found = data.get("input_format", 1)  # checkpoints before the format was recorded are format 1
        if found != INPUT_FORMAT:
            raise OutdatedCheckpoint(f"was written by an older walkthrough (IDM input format {found}); retrain it")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict] = {
    # 0.8M parameters: ~100 windows (T=4) per CPU-second of training on one thread.
    "cpu": dict(size=(64, 64), channels=(16, 32, 32), dim=128, depth=2, heads=4),
    # 26M parameters for GPU nodes: 128 px as VPT, a wide 4-stage ResNet, 6 transformer layers.
    "gpu": dict(size=(128, 128), channels=(64, 128, 128, 128), dim=512, depth=6, heads=8),
}


def preset(name: str, **overrides) -> IDMConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return IDMConfig(**{**PRESETS[name], **overrides})


# --- 2. Model ---------------------------------------------------------------------------------------
MOTION_GAIN = 4.0  # few pixels change between frames: amplify the differences to the frame's scale


def with_motion(frames: Tensor) -> Tensor:
    """Each frame with its change to the next frame and from the previous one, along channels.

    (B, N + 2, H, W, C) -> (B, N, H, W, 3C), channels last: [x_t, g (x_t+1 - x_t), g (x_t - x_t-1)]
    for the N frames between the first and the last, which are only their neighbours. A 2D conv
    over this is a 3D conv with temporal kernel 3, reparametrised so that motion is its input from
    the start: on Atari it leaves the loss plateau of the plain [x_t-1, x_t, x_t+1] stack ~3x
    sooner (docs/idm.md).
    """
    prev, now, next_ = frames[:, :-2], frames[:, 1:-1], frames[:, 2:]
    return torch.cat([now, MOTION_GAIN * (next_ - now), MOTION_GAIN * (now - prev)], dim=-1)


def repeat_edges(frames: Tensor) -> Tensor:
    """A clip's first and last frame repeated once, as context: (B, N, ...) -> (B, N + 2, ...).
    What a video's start and end look like to ``with_motion``: no change beyond them."""
    return torch.cat([frames[:, :1], frames, frames[:, -1:]], dim=1)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv1(F.relu(self.conv0(F.relu(x))))


class ImpalaStage(nn.Module):
    """IMPALA's stage: conv, 3x3 max-pool with stride 2, two residual blocks."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.blocks = nn.Sequential(ResidualBlock(channels), ResidualBlock(channels))

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.pool(self.conv(x)))


class Block(nn.Module):
    """Pre-norm transformer block; attention is non-causal (every frame sees the whole window)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, D/heads)
        x = x + self.proj(attn.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.norm2(x))


ENCODE_BATCH = 64  # frames per conv call at inference (measured on the CPU preset: 32-64 is fastest)


class IDM(nn.Module):
    def __init__(self, config: IDMConfig):
        super().__init__()
        self.config = config
        c = config
        in_channels, stages = 9, []  # RGB of the frame and of its changes to both neighbours
        for channels in c.channels:
            stages.append(ImpalaStage(in_channels, channels))
            in_channels = channels
        self.encoder = nn.Sequential(*stages)
        h, w = c.size
        for _ in c.channels:
            h, w = (h + 1) // 2, (w + 1) // 2  # each max-pool halves, rounding up
        self.embed = nn.Linear(in_channels * h * w, c.dim)
        self.pos = nn.Parameter(torch.zeros(1, c.frames, c.dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(Block(c.dim, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Sequential(nn.Linear(2 * c.dim, c.dim), nn.GELU(),
                                  nn.Linear(c.dim, A.NUM_BUTTONS + A.NUM_AXES * STICK_BINS))

    def encode_frames(self, frames: Tensor, context: bool = False) -> Tensor:
        """Per-frame features, whatever window a frame ends up in: frames (B, N, 3, H, W) uint8 -> (B, N, D).

        Each frame's motion comes from its true neighbours; the clip's first and last frame see
        themselves beyond its ends, as a video's start and end do. With ``context=True`` the first
        and last frames are only neighbours: (B, N + 2, 3, H, W) -> (B, N, D) for the frames between.
        """
        if not context:
            frames = repeat_edges(frames)
        B, N, _, H, W = frames.shape
        if (H, W) != self.config.size:
            raise ValueError(f"IDM expects frames of {self.config.size}, got {(H, W)}")
        # Channels last is oneDNN's fast conv layout on CPUs (2x here); decoded video already is.
        x = frames.permute(0, 1, 3, 4, 2).contiguous().float().mul_(1 / 255.0).sub_(0.5)  # (B, N, H, W, 3)
        x = with_motion(x).flatten(0, 1).permute(0, 3, 1, 2)  # (B*(N-2), 9, H, W), channels-last strides
        x = F.relu(self.encoder(x)).flatten(1)  # (B*(N-2), C*h*w)
        return self.embed(x).view(B, N - 2, -1)  # (B, N-2, D)

    def temporal(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Windows of T frame features (B, T, D) -> button logits (B, T-1, 17), stick logits (B, T-1, 4, 11)."""
        x = features + self.pos  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        pairs = torch.cat([x[:, :-1], x[:, 1:]], dim=-1)  # (B, T-1, 2D): the frames around each transition
        out = self.head(pairs).float()  # (B, T-1, 17 + 44)
        buttons = out[..., :A.NUM_BUTTONS]
        sticks = out[..., A.NUM_BUTTONS:].unflatten(-1, (A.NUM_AXES, STICK_BINS))
        return buttons, sticks

    def forward(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """frames (B, T + 2, 3, H, W) uint8, a window with a context frame on each side ->
        button logits (B, T-1, 17), stick logits (B, T-1, 4, 11) for the window's transitions."""
        B, N, _, H, W = frames.shape
        if N != self.config.frames + 2 or (H, W) != self.config.size:
            raise ValueError(f"IDM expects windows of {self.config.frames} frames plus 2 context frames of "
                             f"{self.config.size}, got {N} of {(H, W)}")
        return self.temporal(self.encode_frames(frames, context=True))

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """NLL of the true actions (summed over heads), averaged over labelled steps.

        Each step counts with its ``weight`` (a pseudo-label's confidence, else 1) and not at all
        where ``action_mask`` says no label covers it.
        """
        button_logits, stick_logits = self(batch["frames"])
        actions = batch["actions"]  # (B, T-1, 21)
        weight = batch["action_mask"].float() * batch["weight"]  # (B, T-1)
        labelled = batch["action_mask"].sum().clamp(min=1)
        pressed = actions[..., :A.NUM_BUTTONS]
        pos_weight = torch.tensor(self.config.button_pos_weight, device=actions.device)
        button_nll = F.binary_cross_entropy_with_logits(
            button_logits, pressed, pos_weight=pos_weight, reduction="none").sum(-1)  # (B, T-1)
        bins = stick_targets(actions[..., A.NUM_BUTTONS:])  # (B, T-1, 4)
        stick_nll = F.cross_entropy(stick_logits.flatten(0, -2), bins.flatten(), reduction="none")
        stick_nll = stick_nll.view(bins.shape).sum(-1)  # (B, T-1)
        button_loss = (button_nll * weight).sum() / labelled
        stick_loss = (stick_nll * weight).sum() / labelled
        loss = button_loss + stick_loss
        with torch.no_grad():
            mask = batch["action_mask"]
            right = ((button_logits > 0) == (pressed > 0.5)).all(-1) & (stick_logits.argmax(-1) == bins).all(-1)
            step_accuracy = (right & mask).sum() / labelled
        return loss, {"loss": loss.item(), "button_nll": button_loss.item(), "stick_nll": stick_loss.item(),
                      "step_accuracy": step_accuracy.item()}

    # -- inference --------------------------------------------------------------------------------

    @torch.inference_mode()
    def predict(self, frames: Tensor) -> dict[str, Tensor]:
        """frames (B, T + 2, 3, H, W) uint8 (as ``forward``) -> per transition (B, T-1, ...):

        ``button_prob`` (.., 17), ``stick_logits`` and ``stick_prob`` (.., 4, 11),
        ``actions`` (.., 21) decoded, ``confidence`` (..,) as defined in ``confidence``.
        """
        device = next(self.parameters()).device
        button_logits, stick_logits = self(frames.to(device))
        button_prob, stick_prob = torch.sigmoid(button_logits), stick_logits.softmax(-1)
        return {"button_prob": button_prob, "stick_logits": stick_logits, "stick_prob": stick_prob,
                "actions": decode(button_prob, stick_prob), "confidence": confidence(button_prob, stick_prob)}

    @torch.inference_mode()
    def block_sums(self, frames: Tensor, starts: Tensor, bf16: bool = False) -> dict[str, Tensor]:
        """Every frame of a block encoded once, then the windows asked for, their probabilities
        summed per transition: what ``label`` and the streaming labeler average.

        frames (B, K + T + 1, 3, H, W) uint8: the frames of K window starts, the T - 1 frames
            the last windows reach beyond them, and a context frame on each side;
        starts (B, K) bool: run the window starting at block frame i (its transitions i..i+T-2).
        Returns ``button_sum`` (B, K+T-2, 17), ``stick_sum`` (B, K+T-2, 4, 11) and ``count``
        (B, K+T-2): how many windows cover each transition; on the CPU. ``bf16``: autocast the
        model (see ``native_bf16``).
        """
        T, (B, K) = self.config.frames, starts.shape
        frames = frames.to(next(self.parameters()).device)
        device = frames.device
        b, i = starts.to(device).nonzero(as_tuple=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            # A few dozen frames per conv call stay in the CPU's caches: 1.5x faster than 256 at
            # once. Each call's first and last frame are context, so no frame is encoded twice.
            features = torch.cat([self.encode_frames(frames[:, a:a + ENCODE_BATCH + 2], context=True)
                                  for a in range(0, K + T - 1, ENCODE_BATCH)], dim=1)  # (B, K+T-1, D)
            windows = features.unfold(1, T, 1).transpose(-1, -2)  # (B, K, T, D): window i = features i..i+T-1
            button_logits, stick_logits = self.temporal(windows[b, i])  # (W, T-1, ...)
        # flat index of each window's transitions in the (B, K+T-2) output
        rows = (b * (K + T - 2) + i)[:, None] + torch.arange(T - 1, device=device)  # (W, T-1)
        rows = rows.flatten().cpu()
        button_sum = torch.zeros(B * (K + T - 2), A.NUM_BUTTONS)
        stick_sum = torch.zeros(B * (K + T - 2), A.NUM_AXES, STICK_BINS)
        count = torch.zeros(B * (K + T - 2))
        button_sum.index_add_(0, rows, torch.sigmoid(button_logits).flatten(0, 1).cpu())
        stick_sum.index_add_(0, rows, stick_logits.softmax(-1).flatten(0, 1).cpu())
        count.index_add_(0, rows, torch.ones(len(rows)))
        return {"button_sum": button_sum.view(B, K + T - 2, A.NUM_BUTTONS),
                "stick_sum": stick_sum.view(B, K + T - 2, A.NUM_AXES, STICK_BINS),
                "count": count.view(B, K + T - 2)}

    @torch.inference_mode()
    def label(self, frames: Tensor, stride: int = 1, block: int = 256, bf16: bool = False) -> dict[str, Tensor]:
        """Actions for every transition of a clip: frames (N, 3, H, W) uint8 -> (N-1, ...) as ``predict``.

        Each frame is encoded once (the clip's ends repeated as context), then windows of T
        frames start every ``stride`` frames, plus one that ends on the last frame; where windows
        overlap their probabilities are averaged. Stride 1 (the default, as the labeler's) puts
        every transition in every position of a window, for the transformer's small cost. A clip
        shorter than a window is padded by repeating its last frame. Work goes in blocks of
        ``block`` window starts, as ``walkthrough label`` streams a video; memory here is O(N).
        """
        T, n = self.config.frames, len(frames)
        if n < 2:
            raise ValueError(f"need at least 2 frames to label a transition, got {n}")
        if n < T:
            frames = torch.cat([frames, frames[-1:].expand(T - n, *frames.shape[1:])])
        N = len(frames)
        starts = window_starts(N, T, stride)  # (N-T+1,) bool
        padded = repeat_edges(frames[None])[0]  # (N+2, 3, H, W): padded[j] is frame j - 1
        button_sum = torch.zeros(N - 1, A.NUM_BUTTONS)
        stick_sum = torch.zeros(N - 1, A.NUM_AXES, STICK_BINS)
        count = torch.zeros(N - 1)
        for s in range(0, N - T + 1, block):
            k = min(block, N - T + 1 - s)  # window starts s..s+k-1 need frames s-1..s+k+T-1
            out = self.block_sums(padded[None, s:s + k + T + 1], starts[None, s:s + k], bf16)
            button_sum[s:s + k + T - 2] += out["button_sum"][0]
            stick_sum[s:s + k + T - 2] += out["stick_sum"][0]
            count[s:s + k + T - 2] += out["count"][0]
        button_prob = (button_sum / count[:, None])[:n - 1]
        stick_prob = (stick_sum / count[:, None, None])[:n - 1]
        return {"button_prob": button_prob, "stick_prob": stick_prob,
                "actions": decode(button_prob, stick_prob), "confidence": confidence(button_prob, stick_prob)}


def check_stride(T: int, stride: int) -> None:
    if not 1 <= stride <= T - 1:
        raise ValueError(f"stride must be in 1..{T - 1} so that windows cover every transition, got {stride}")


def window_starts(n: int, T: int, stride: int) -> Tensor:
    """Which of the n - T + 1 possible windows of an n-frame clip to run: one every ``stride``
    frames, plus the one that ends on the last frame, so every transition is covered. (n-T+1,) bool."""
    check_stride(T, stride)
    starts = torch.zeros(n - T + 1, dtype=torch.bool)
    starts[::stride] = True
    starts[-1] = True
    return starts


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(model: IDM) -> str:
    """One line for logs: 'IDM T=4 64x64 @30fps, 0.80M params'."""
    c = model.config
    return f"IDM T={c.frames} {c.size[0]}x{c.size[1]} @{c.fps:g}fps, {parameter_count(model) / 1e6:.2f}M params"


# --- 3. Between actions and the heads ------------------------------------------------------------------
def stick_targets(values: Tensor) -> Tensor:
    """Stick values in [-1, 1] -> index of the nearest bin centre (as ``metrics.stick_bin``)."""
    return ((values + 1) / 2 * (STICK_BINS - 1)).round().clamp(0, STICK_BINS - 1).long()


def decode(button_prob: Tensor, stick_prob: Tensor) -> Tensor:
    """(..., 17) and (..., 4, 11) probabilities -> (..., 21) actions: buttons pressed above 0.5,
    each stick axis at the centre of its most likely bin."""
    centres = torch.as_tensor(STICK_CENTRES, dtype=torch.float32, device=stick_prob.device)
    return torch.cat([(button_prob > 0.5).float(), centres[stick_prob.argmax(-1)]], dim=-1)


def confidence(button_prob: Tensor, stick_prob: Tensor) -> Tensor:
    """Per-step confidence: the model's probability that the decoded action is right in every head.

    The product, over the 17 buttons of max(p, 1 - p) and over the 4 stick axes of the top bin's
    probability (heads taken as independent). It is in (0, 1] and is what ``metrics.step_correct``
    checks, so ECE and the precision-vs-coverage threshold grade exactly this number.
    """
    buttons = torch.maximum(button_prob, 1 - button_prob).log().sum(-1)
    sticks = stick_prob.max(-1).values.log().sum(-1)
    return (buttons + sticks).exp()


# --- 4. Calibration written by eval-idm ---------------------------------------------------------------
def native_bf16(device: str | torch.device) -> bool:
    """Whether bf16 autocast pays at inference on ``device``: GPUs with bf16, CPUs with AMX or
    AVX512-BF16 (2.8x on the CPU preset, the same actions; docs/labeling.md). Elsewhere bf16 is
    emulated and slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(getattr(torch.cpu, probe, lambda: False)()
                   for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return False


CALIBRATION_FILE = "calibration.json"


def load_calibration(run_dir: Path) -> dict | None:
    """The calibration ``walkthrough eval-idm`` wrote for a run (None before any eval):
    ``confidence_threshold`` (keep steps with confidence >= it), ``target_precision``, the
    ``coverage`` and ``precision`` it reached on held-out data, and the checkpoint ``step`` it graded."""
    file = Path(run_dir) / CALIBRATION_FILE
    return json.loads(file.read_text()) if file.exists() else None


# --- 5. Labelling stored episodes (evaluation) -----------------------------------------------------------
@dataclass
class Labelled:
    """The labelled transitions of one or more episodes: IDM predictions beside the truth.

    Steps without a true label are dropped; ``segment`` numbers the contiguous stretches left
    (what ``metrics`` needs to tell where "the previous step" exists).
    """
    game: np.ndarray  # (n,) str
    pred: np.ndarray  # (n, 21)
    confidence: np.ndarray  # (n,)
    true: np.ndarray  # (n, 21)
    segment: np.ndarray  # (n,) int

    @staticmethod
    def concat(parts: list["Labelled"]) -> "Labelled":
        segments, offset = [], 0
        for part in parts:  # renumber so that no two episodes share a segment
            segments.append(part.segment + offset)
            offset += int(part.segment.max()) + 1 if len(part.segment) else 0
        return Labelled(*(np.concatenate([getattr(p, name) for p in parts])
                          for name in ("game", "pred", "confidence", "true")), np.concatenate(segments))

    def where(self, keep: np.ndarray) -> "Labelled":
        return Labelled(*(getattr(self, f.name)[keep] for f in fields(Labelled)))


def label_episode(model: IDM, episode: Episode, frames: np.ndarray | None = None,
                  max_seconds: float | None = None, bf16: bool = False) -> Labelled:
    """Run the IDM over a stored episode (decoded at its fps and size unless ``frames`` are given)
    and pair every transition with the true action of that step."""
    c = model.config
    if frames is None:
        max_frames = int(max_seconds * c.fps) + 1 if max_seconds else None
        frames = decode_episode(episode, c.fps, c.size, max_frames)  # (N, H, W, 3)
    out = model.label(torch.from_numpy(frames).permute(0, 3, 1, 2), bf16=bf16)
    times = episode.start_time + np.arange(len(frames) - 1) / c.fps
    true, valid = episode.actions_at(times, 1.0 / c.fps)
    segment = np.cumsum(~valid)  # a new stretch after every unlabelled step
    return Labelled(np.full(len(true), episode.game), out["actions"].numpy(), out["confidence"].numpy(),
                    true, segment).where(valid)


def validation_metrics(episodes: list[Episode], config: IDMConfig,
                       max_seconds: float = 20.0) -> Callable[[IDM], dict[str, float]]:
    """The training loop's ``evaluate``: headline metrics on the first ``max_seconds`` of each
    held-out episode (decoded at the first call, which only the DDP rank 0 makes)."""
    frames: list[np.ndarray] = []

    def evaluate(model: IDM) -> dict[str, float]:
        if not frames:
            frames.extend(decode_episode(e, config.fps, config.size, int(max_seconds * config.fps) + 1)
                          for e in episodes)
        rows = Labelled.concat([label_episode(model, e, f) for e, f in zip(episodes, frames)])
        scores = summarize(rows.pred, rows.true, rows.segment, rows.confidence)
        return {k: scores[k] for k in ("event_f1", "button_f1", "step_accuracy", "ece")}

    return evaluate


# --- 6. Training entry point (`walkthrough train-idm`) ------------------------------------------------------
def preload_fits(episodes: list[Episode], config: IDMConfig, share_of_ram: float = 0.25) -> bool:
    """Do all decoded frames fit in ``share_of_ram`` of this machine's memory?"""
    frames = sum(e.duration for e in episodes) * config.fps
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return frames * config.size[0] * config.size[1] * 3 < share_of_ram * ram


def start_at_marginals(model: IDM, episodes: list[Episode]) -> None:
    """Start every head at the data's marginal: each button's sigmoid at its press rate and each
    stick axis at its bins' frequencies, instead of 0.5 and uniform. Buttons and stick bins that
    a game never uses then cost nothing from step 0, and learning goes to what can be seen."""
    rows = np.concatenate([e.actions for e in episodes])  # (N, 21) every labelled row
    press = np.clip(rows[:, :A.NUM_BUTTONS].mean(0), 1e-4, 1 - 1e-4)
    bins = stick_bin(rows[:, A.NUM_BUTTONS:])  # (N, 4)
    freq = np.stack([np.bincount(bins[:, a], minlength=STICK_BINS) for a in range(A.NUM_AXES)]) + 1.0
    freq /= freq.sum(-1, keepdims=True)  # (4, 11), add-one smoothed
    with torch.no_grad():
        bias = model.head[-1].bias
        bias[:A.NUM_BUTTONS] = torch.as_tensor(np.log(press / (1 - press)), dtype=torch.float32)
        bias[A.NUM_BUTTONS:] = torch.as_tensor(np.log(freq).reshape(-1), dtype=torch.float32)


SPLIT_FILE = "split.json"


def run_split(out: Path, episodes: list[Episode], val_fraction: float,
              seed: int) -> tuple[list[Episode], list[Episode]]:
    """The run's (training, held-out) episodes: drawn by ``split_episodes`` when the run starts and
    kept in ``RUN/split.json``, so a resumed run and ``eval-idm`` use exactly the same ones."""
    file = Path(out) / SPLIT_FILE
    if (Path(out) / CONFIG_FILE).exists() and file.exists():
        saved = json.loads(file.read_text())
        by_id = {e.video_id: e for e in episodes}
        missing = [i for i in saved["train"] + saved["val"] if i not in by_id]
        if missing:
            raise StoreError(f"{out}: {len(missing)} episode(s) of the run are not in the data, "
                             f"e.g. {missing[0]}")
        return [by_id[i] for i in saved["train"]], [by_id[i] for i in saved["val"]]
    train_eps, val_eps = split_episodes(episodes, val_fraction, seed)
    if main_process() and not (Path(out) / CONFIG_FILE).exists():
        Path(out).mkdir(parents=True, exist_ok=True)
        write_json_atomic(file, {"train": [e.video_id for e in train_eps], "val": [e.video_id for e in val_eps]})
    return train_eps, val_eps


def train_idm(sources: list[Path] | None, out: Path, model_cfg: IDMConfig | None = None,
              train_cfg: TrainConfig | None = None, val_fraction: float = 0.1, resume: bool = False,
              preload: bool | None = None) -> Path:
    """Train an IDM on chunk stores; held-out episodes (``val_fraction``, by episode) validate it.

    ``resume=True`` continues the run in ``out``: its saved model, data split and training
    settings win, except the few that may change (``train.RESUMABLE_CHANGES``: session limit,
    workers, logging), taken from ``train_cfg``; ``sources`` default to the run's. ``preload``
    decodes every frame into RAM once (default: when it fits in a quarter of it); otherwise
    windows are decoded on demand in the loader's workers.
    """
    out = Path(out)
    model_cfg, train_cfg = model_cfg or IDMConfig(), train_cfg or TrainConfig()
    if resume and (out / CONFIG_FILE).exists():
        saved = read_run_config(out)
        model_cfg = run_model_config(out, IDMConfig)
        train_cfg = resumed_config(TrainConfig.from_dict(saved["train"]), train_cfg)
        sources = sources or [Path(s) for s in saved["data"]["sources"]]
        val_fraction = saved["data"]["val_fraction"]
    if not sources:
        raise ValueError("no training data: pass --data DATA (a chunk store)")
    store = ChunkStore(sources)
    # Labels from a labeler (pseudo-labels, expert relabels) are not the actions that made the next frame.
    episodes = [e for e in store.episodes if e.video is not None and "labeler" not in e.info]
    if not episodes:
        raise StoreError(f"{', '.join(map(str, sources))}: no episode has both its video file and the actions played")
    train_eps, val_eps = run_split(out, episodes, val_fraction, train_cfg.seed)
    spec = WindowSpec(model_cfg.frames, model_cfg.frames - 1, model_cfg.fps, model_cfg.size, context=1)
    preload = preload_fits(episodes, model_cfg) if preload is None else preload
    train_set = WindowDataset(train_eps, spec, preload=preload)
    val_set = WindowDataset(val_eps, spec, preload=preload) if val_eps else None
    torch.manual_seed(train_cfg.seed)
    model = IDM(model_cfg)
    start_at_marginals(model, train_eps)
    data = {"sources": [str(Path(s).resolve()) for s in sources], "val_fraction": val_fraction,
            "split_seed": train_cfg.seed, "games": sorted({e.game for e in episodes}),
            "train_episodes": len(train_eps), "val_episodes": len(val_eps), "train_windows": len(train_set),
            "preload": preload}
    if main_process():
        console.print(f"{describe(model)}; {len(train_eps)} training episodes ({len(train_set)} windows), "
                      f"{len(val_eps)} held out", highlight=False)
    evaluate = validation_metrics(val_eps, model_cfg) if val_eps else None
    return train(model, train_cfg, train_set, val_set, out, resume=resume, evaluate=evaluate,
                 model_type="idm", data=data)


register("idm", IDMConfig, IDM)
