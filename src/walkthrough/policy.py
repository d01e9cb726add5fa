"""The vision-action policy: SigLIP 2 image tokens -> a DiT that denoises a chunk of gamepad actions.

After NitroGen, which follows GR00T N1 (see docs/policy.md):

    frames (B, F, 3, H, W) uint8
      -> SigLIP 2 vision encoder, per frame      (B, F*N, Dv)   N = (H/p) * (W/p) patch tokens
      -> linear to the DiT width + self-attention layers over the image tokens ("neck")  (B, F*N, D)
    noisy actions x_t (B, T, 21), timestep t, game id
      -> DiT: AdaLN(t + game) blocks, cross-attention to the image tokens interleaved with
         self-attention over the chunk                                              (B, T, 21)

Trained by flow matching: x_t = (1 - t) * noise + t * a, the DiT predicts the velocity a - noise,
with a masked, confidence-weighted MSE; acting integrates that velocity from noise (t = 0) to an
action chunk (t = 1) in K Euler steps.

The flow runs in a [-1, 1]^21 action space: buttons 0/1 become -1/+1 (decoded by thresholding at 0),
sticks are kept as they are.

The file reads top to bottom: config, action space, model, data (a weighted mixture of chunk stores),
training entry point. Acting in a game and offline evaluation are in ``walkthrough.play``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from transformers import Siglip2VisionConfig, Siglip2VisionModel

from walkthrough import actions as A
from walkthrough.chunks import ChunkStore, Episode
from walkthrough.dataset import WindowDataset, WindowSpec, split_episodes
from walkthrough.train import TrainConfig, load_model, register, train

NULL_GAME = 0  # game id of "no game / unknown game": also the unconditional id of classifier-free guidance
# Architecture keys of a Siglip2VisionConfig that we keep in our own config (enough to rebuild it).
VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "patch_size", "num_patches", "hidden_act", "layer_norm_eps")


def tiny_vision() -> dict:
    """A SigLIP 2 small enough to train from scratch on a CPU: 128x128 px, 16 px patches -> 64 tokens."""
    return dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                patch_size=16, num_patches=64, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


def large_vision() -> dict:
    """siglip2-large-patch16-256's vision tower (NitroGen's): 16 px patches, 256 tokens at 256 px."""
    return dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                patch_size=16, num_patches=256, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


# --- 1. Config --------------------------------------------------------------------------------------
@dataclass
class PolicyConfig:
    # what the policy sees and does
    image_size: int = 128  # square input, pixels
    context_frames: int = 1  # frames up to and including "now" (NitroGen: 1)
    # Stack the context frames' channels into every patch (early fusion; VPT's IDM starts with a
    # temporal convolution for the same reason) instead of giving each frame its own tokens: one
    # patch embedding then sees a pixel change, where the ball moved, at one frame's token count.
    fuse_frames: bool = False
    horizon: int = 16  # actions per predicted chunk (NitroGen: 16-18)
    fps: float = 30.0  # frame and action rate the policy was trained at
    games: list[str] = field(default_factory=list)  # game-id vocabulary; id i + 1 is games[i]
    # vision encoder (a Siglip2VisionConfig, architecture keys only)
    vision: dict = field(default_factory=tiny_vision)
    freeze_vision: bool = False
    # Standardise every image token (position x channel) over the data before the DiT (BatchNorm,
    # no affine). From scratch, a frame's tokens are nearly the same from one frame to the next (a
    # ball is a few pixels; SigLIP's LayerNorms give a background token the same scale as the
    # ball's), and nothing downstream learns to read them (docs/policy.md, "Where the signal is lost").
    standardize_tokens: bool = False
    # Add an attention-pooled summary of the image tokens (one learned query) to the DiT's adaLN
    # condition, beside the timestep and game: a readout whose query does not depend on the noisy chunk.
    image_summary: bool = False
    # image-token self-attention layers and DiT action head
    width: int = 128
    neck_layers: int = 2
    dit_layers: int = 4  # alternate cross-attention (even) and self-attention (odd) blocks
    heads: int = 4
    mlp_ratio: float = 4.0
    # flow matching
    beta_alpha: float = 1.5  # t = 1 - u, u ~ Beta(alpha, beta): GR00T's (1.5, 1.0) favours noisy t
    beta_beta: float = 1.0
    sample_steps: int = 16  # Euler steps at inference (GR00T: 4 suffice)
    game_dropout: float = 0.1  # training-time probability of the null game (enables CFG)
    # (noise, t) draws per window in training: the image is encoded once and the DiT sees each draw;
    # averages out the flow target's noise, which otherwise drowns what the image says
    noise_samples: int = 1

    def __post_init__(self) -> None:
        patch = self.vision["patch_size"]
        if self.image_size % patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the patch size {patch}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if min(self.context_frames, self.horizon, self.sample_steps, self.noise_samples) < 1:
            raise ValueError("context_frames, horizon, sample_steps and noise_samples must be >= 1")

    @classmethod
    def from_dict(cls, data: dict) -> "PolicyConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def game_id(self, game: str | None) -> int:
        """A game's id; an unknown game (or None) gets the null id."""
        return self.games.index(game) + 1 if game in self.games else NULL_GAME


PRESETS: dict[str, dict] = {
    # ~0.1M parameters, 32 px: seconds to train; for tests and smoke runs, not for playing.
    "test": dict(image_size=32, vision=dict(tiny_vision(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, patch_size=8, num_patches=16),
                 standardize_tokens=True, width=32, neck_layers=1, dit_layers=2, heads=2),
    # ~2M parameters; plays in real time on one CPU thread. 128 px, not 64: an Atari ball is ~2x2 px
    # there instead of one dim pixel. 16 px patches (64 tokens, NitroGen's patch size): 3.5x the
    # training throughput of 8 px patches. Standardised tokens and 8 noise draws per window: the
    # setting that played best (Breakout 4.2 vs random 0.8; docs/policy.md, "Session 10").
    "cpu": dict(image_size=128, vision=tiny_vision(), standardize_tokens=True, noise_samples=8, width=128,
                neck_layers=2, dit_layers=4, heads=4),
    # NitroGen-sized: SigLIP 2 large at 256 px (load its weights with --vision-pretrained) + a wide DiT.
    "gpu": dict(image_size=256, vision=large_vision(), width=1024, neck_layers=4, dit_layers=8, heads=16),
}


# --- 2. Action space of the flow ------------------------------------------------------------------
def to_flow(actions: Tensor) -> Tensor:
    """Schema actions (..., 21) (buttons 0/1, sticks in [-1, 1]) -> flow space [-1, 1]^21."""
    return torch.cat([actions[..., :A.NUM_BUTTONS] * 2 - 1, actions[..., A.NUM_BUTTONS:]], dim=-1)


def from_flow(x: Tensor) -> Tensor:
    """Flow-space samples (..., 21) -> schema actions: buttons thresholded at 0, sticks clipped."""
    buttons = (x[..., :A.NUM_BUTTONS] > 0).float()
    return torch.cat([buttons, x[..., A.NUM_BUTTONS:].clamp(-1, 1)], dim=-1)


# --- 3. Model ---------------------------------------------------------------------------------------
def patchify(frames: Tensor, patch: int) -> Tensor:
    """(B, 3, H, W) float -> (B, N, p*p*3) patches, row-major, pixels (p, p, C) inside a patch.

    The layout of transformers' Siglip2 image processor, so pretrained patch embeddings apply.
    """
    B, C, H, W = frames.shape
    x = frames.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def sincos_2d(side: int, dim: int) -> Tensor:
    """A (side * side, dim) 2D sine-cosine position table (as in MAE), rows in patch order."""
    quarter = dim // 4
    freqs = 1.0 / 10_000 ** (torch.arange(quarter) / quarter)  # (dim/4,)
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    y, x = y.reshape(-1, 1) * freqs, x.reshape(-1, 1) * freqs  # (side*side, dim/4) each
    return torch.cat([torch.sin(y), torch.cos(y), torch.sin(x), torch.cos(x)], dim=1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """(B,) flow times in [0, 1] -> (B, dim) sinusoidal features (of 1000 t, as in DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = 1000.0 * t[:, None].float() * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class Attention(nn.Module):
    """Multi-head attention of x over a context (itself for self-attention)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.heads, -1).transpose(1, 2)  # (B, h, T, D/h)
        k, v = self.kv(context).view(B, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, h, S, D/h) each
        y = F.scaled_dot_product_attention(q, k, v)  # (B, h, T, D/h)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class DiTBlock(nn.Module):
    """adaLN-Zero block (DiT): attention then MLP, each shifted, scaled and gated by the condition.

    ``cross`` blocks attend to the image tokens, the others to the action chunk itself.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, cross: bool):
        super().__init__()
        self.cross = cross
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, cond: Tensor, image: Tensor) -> Tensor:
        # x (B, T, D) action tokens, cond (B, D), image (B, S, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(cond)[:, None].chunk(6, dim=-1)  # (B, 1, D) each
        h = modulate(self.norm1(x), shift1, scale1)
        x = x + gate1 * self.attn(h, image if self.cross else h)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        shift, scale = self.adaln(cond)[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        return self.linear(modulate(self.norm(x), shift, scale))


class Policy(nn.Module):
    """SigLIP 2 + DiT flow-matching policy over chunks of ``horizon`` gamepad actions."""

    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.config = config
        D, vision = config.width, config.vision
        # --- image tokens
        self.token_frames = 1 if config.fuse_frames else config.context_frames  # frames with tokens of their own
        channels = 3 * config.context_frames if config.fuse_frames else 3
        self.vision = Siglip2VisionModel(Siglip2VisionConfig(**vision, num_channels=channels, vision_use_head=False))
        self.vision_proj = nn.Linear(vision["hidden_size"], D)
        self.frame_pos = nn.Parameter(torch.zeros(self.token_frames, 1, D))  # which context frame
        layer = nn.TransformerEncoderLayer(D, config.heads, int(D * config.mlp_ratio), dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.neck = nn.TransformerEncoder(layer, config.neck_layers, norm=nn.LayerNorm(D),
                                          enable_nested_tensor=False)
        tokens = self.token_frames * (config.image_size // vision["patch_size"]) ** 2
        # Its statistics are recomputed on training batches before every validation and checkpoint
        # (``train.recompute_batchnorm``), so EMA weights get statistics of their own.
        self.token_norm = nn.BatchNorm1d(tokens * D, affine=False) if config.standardize_tokens else None
        # --- action head
        self.action_in = nn.Linear(A.ACTION_DIM, D)
        self.action_pos = nn.Parameter(torch.zeros(config.horizon, D))
        self.time_mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.game_embed = nn.Embedding(len(config.games) + 1, D)  # row 0: the null game
        if config.image_summary:
            self.summary_query = nn.Parameter(torch.zeros(D))
            self.summary_proj = nn.Linear(D, D)
        self.blocks = nn.ModuleList(
            DiTBlock(D, config.heads, config.mlp_ratio, cross=(i % 2 == 0)) for i in range(config.dit_layers))
        self.final = FinalLayer(D, A.ACTION_DIM)
        self._init_weights()
        if config.freeze_vision:
            self.vision.requires_grad_(False)
            if self.token_frames < config.context_frames:  # fused: the earlier frames enter only here
                self.vision.embeddings.patch_embedding.requires_grad_(True)

    def _init_weights(self) -> None:
        # SigLIP 2's own init draws its position table from N(0, 1/D): ~10x weaker than a patch's
        # content, so a model trained from scratch barely knows where a patch is and the action head
        # never learns where the ball is. Start it as 2D sine-cosine (MAE's fixed table) instead.
        # (Pretrained weights replace all of this; see ``with_pretrained_vision``.)
        table = self.vision.embeddings.position_embedding.weight
        with torch.no_grad():
            table.copy_(sincos_2d(math.isqrt(table.shape[0]), table.shape[1]))
        # The head: DiT's init: Xavier linears, small position embeddings, and adaLN-Zero: every block
        # and the output start as the identity / zero, so training begins from a stable, small network.
        summary = [self.summary_proj] if self.config.image_summary else []
        for module in [self.vision_proj, self.neck, self.action_in, self.time_mlp, self.blocks, self.final, *summary]:
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
        queries = [self.summary_query] if self.config.image_summary else []
        for p in (self.frame_pos, self.action_pos, self.game_embed.weight, *queries):
            nn.init.normal_(p, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaln[-1].weight)
            nn.init.zeros_(block.adaln[-1].bias)
        for m in (self.final.adaln[-1], self.final.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    # -- forward pieces
    def vision_tokens(self, patches: Tensor, side: int) -> Tensor:
        """SigLIP 2 on (B, side*side, p*p*C) patches of same-sized images -> (B, side*side, Dv).

        ``Siglip2VisionModel.forward`` with the position table resized once for the whole batch:
        transformers 5.17 (at least) resizes it image by image, with a GPU sync for each: the ``cpu``
        preset trained 3.2x slower on an H200 at batch 256 (BENCHMARKS.md). A test checks both agree.
        """
        embeddings = self.vision.embeddings
        grid = embeddings.position_embedding_size
        table = embeddings.position_embedding.weight.reshape(grid, grid, -1).permute(2, 0, 1)[None]  # (1, Dv, g, g)
        table = F.interpolate(table.float(), size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        x = embeddings.patch_embedding(patches) + table.flatten(2).transpose(1, 2)  # (B, N, Dv)
        return self.vision.post_layernorm(self.vision.encoder(inputs_embeds=x).last_hidden_state)

    def encode(self, frames: Tensor) -> Tensor:
        """(B, F, 3, H, W) uint8 frames -> (B, F*N, D) image tokens ((B, N, D) with fused frames)."""
        B, H, W = frames.shape[0], *frames.shape[-2:]
        patch = self.config.vision["patch_size"]
        side = self.config.image_size // patch
        pixels = frames.float() / 127.5 - 1.0  # SigLIP normalisation: mean 0.5, std 0.5
        pixels = pixels.reshape(B * self.token_frames, -1, H, W)  # (B*F, 3, H, W), or fused (B, 3F, H, W)
        patches = patchify(pixels, patch)  # (B*F, N, p*p*3), or fused (B, N, p*p*3F): frames inside a pixel
        out = self.vision_tokens(patches, side)  # (B*F, N, Dv)
        tokens = self.vision_proj(out).view(B, self.token_frames, -1, self.config.width) + self.frame_pos  # (B, F, N, D)
        tokens = self.neck(tokens.flatten(1, 2))  # (B, F*N, D)
        if self.token_norm is not None:
            tokens = self.token_norm(tokens.flatten(1)).view(tokens.shape)
        return tokens

    def velocity(self, x: Tensor, t: Tensor, image: Tensor, game: Tensor) -> Tensor:
        """The DiT: noisy chunk x (B, T, 21) at times t (B,) -> predicted velocity (B, T, 21)."""
        cond = self.time_mlp(timestep_embedding(t, self.config.width)) + self.game_embed(game)  # (B, D)
        if self.config.image_summary:
            attention = torch.softmax(image @ self.summary_query / image.shape[-1] ** 0.5, dim=1)  # (B, S)
            cond = cond + self.summary_proj((attention[..., None] * image).sum(1))
        h = self.action_in(x) + self.action_pos  # (B, T, D)
        for block in self.blocks:
            h = block(h, cond, image)
        return self.final(h, cond)

    def sample_t(self, batch: int, device: torch.device) -> Tensor:
        beta = torch.distributions.Beta(torch.tensor(self.config.beta_alpha), torch.tensor(self.config.beta_beta))
        return (1.0 - beta.sample((batch,))).to(device)

    # -- training
    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Flow-matching loss on a batch of windows (see ``PolicyDataset``).

        The MSE of each step is weighted by ``has_real_action`` (0 where no label covers the step)
        times ``weight`` (a pseudo-label's confidence, else 1), and divided by the number of
        labelled steps, so low-confidence labels count for less rather than being renormalised.
        """
        frames, actions = batch["frames"], batch["actions"]  # (B, F, 3, H, W) uint8, (B, T, 21)
        has_real_action = batch["action_mask"].float()  # (B, T)
        weight = has_real_action * batch["weight"]  # (B, T)
        game = batch["game"]  # (B,)
        if self.training and self.config.game_dropout > 0:
            dropped = torch.rand(game.shape, device=game.device) < self.config.game_dropout
            game = game.masked_fill(dropped, NULL_GAME)
        n = self.config.noise_samples
        image = self.encode(frames).repeat_interleave(n, dim=0)  # (B*n, S, D)
        a = to_flow(actions).repeat_interleave(n, dim=0)  # (B*n, T, 21)
        game, weight = game.repeat_interleave(n), weight.repeat_interleave(n, dim=0)
        noise = torch.randn_like(a)
        t = self.sample_t(a.shape[0], a.device)  # (B*n,)
        x_t = (1 - t[:, None, None]) * noise + t[:, None, None] * a
        v = self.velocity(x_t, t, image, game)
        err = (v.float() - (a - noise)) ** 2  # (B*n, T, 21)
        labelled = has_real_action.sum().clamp(min=1) * n
        loss = (err.mean(-1) * weight).sum() / labelled
        with torch.no_grad():
            button_mse = (err[..., :A.NUM_BUTTONS].mean(-1) * weight).sum() / labelled
            stick_mse = (err[..., A.NUM_BUTTONS:].mean(-1) * weight).sum() / labelled
        return loss, {"loss": loss.item(), "button_mse": button_mse.item(), "stick_mse": stick_mse.item(),
                      "labelled": has_real_action.mean().item()}

    # -- acting
    @torch.no_grad()
    def sample(self, frames: Tensor, game: Tensor | None = None, steps: int | None = None,
               cfg_scale: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Frames (B, F, 3, H, W) uint8 -> a chunk of schema actions (B, T, 21), by K Euler steps.

        ``cfg_scale`` != 1 mixes game-conditioned and unconditional velocities (classifier-free
        guidance): v = v_null + s * (v_game - v_null).
        """
        steps = steps or self.config.sample_steps
        B, device = frames.shape[0], frames.device
        game = torch.full((B,), NULL_GAME, device=device) if game is None else game
        image = self.encode(frames)  # (B, S, D), computed once for all steps
        guided = cfg_scale != 1.0
        if guided:  # conditional and unconditional halves in one batch
            image = torch.cat([image, image])
            game = torch.cat([game, torch.full_like(game, NULL_GAME)])
        x = torch.randn(B, self.config.horizon, A.ACTION_DIM, generator=generator, device=device)
        for i in range(steps):
            t = torch.full((B,), i / steps, device=device)
            if guided:
                v_game, v_null = self.velocity(torch.cat([x, x]), torch.cat([t, t]), image, game).chunk(2)
                v = v_null + cfg_scale * (v_game - v_null)
            else:
                v = self.velocity(x, t, image, game)
            x = x + v / steps
        return from_flow(x)


def with_pretrained_vision(config: PolicyConfig, directory: Path | str) -> Policy:
    """A policy whose vision encoder starts from a SigLIP 2 saved with ``save_pretrained``.

    ``directory`` is local (the hub is never asked); it may hold a vision tower or a full SigLIP 2
    (text tower and pooling head are ignored). The encoder's architecture comes from it.
    """
    vision, info = Siglip2VisionModel.from_pretrained(directory, local_files_only=True, vision_use_head=False,
                                                      output_loading_info=True)
    if info["missing_keys"]:
        raise ValueError(f"{directory}: not a SigLIP 2 vision checkpoint (missing e.g. {sorted(info['missing_keys'])[0]})")
    policy = Policy(replace(config, vision={k: getattr(vision.config, k) for k in VISION_KEYS}))
    weights = vision.state_dict()
    if config.fuse_frames:  # the pretrained embedding reads the newest frame; earlier ones start at weight 0
        key = "embeddings.patch_embedding.weight"
        weights[key] = with_earlier_frames(weights[key], 1, config.context_frames, vision.config.patch_size)
    policy.vision.load_state_dict(weights)
    return policy


def with_earlier_frames(weight: Tensor, frames_before: int, frames: int, patch: int) -> Tensor:
    """A patch embedding of fused frames, (Dv, p*p*3*F0) -> (Dv, p*p*3*F): the added, earlier frames
    weigh 0, so the embedding is unchanged whatever they show and training finds what they add."""
    per_frame = weight.view(weight.shape[0], patch, patch, frames_before, 3)  # patchify's (p, p, F, C) pixels
    earlier = per_frame.new_zeros(weight.shape[0], patch, patch, frames - frames_before, 3)
    return torch.cat([earlier, per_frame], dim=3).flatten(1)


# Config fields that shape only training or sampling: a run may start from weights trained with others.
TRAINING_ONLY = ("games", "sample_steps", "game_dropout", "noise_samples", "beta_alpha", "beta_beta", "freeze_vision")


def initialised_from(run_dir: Path | str, config: PolicyConfig) -> Policy:
    """A policy for ``config`` that starts from the weights (EMA where kept) of the policy run in
    ``run_dir``: to train on with new data or a new budget (e.g. across GPU leases), or on a new game.
    The architecture must be the same, except that ``config`` may see more context frames.

    - Games: the vocabulary is the earlier run's, its ids kept, with the games of ``config`` it lacks
      appended; each new game's embedding starts as the null game's, so a new game is first played as
      the earlier policy played an unnamed one.
    - Context frames: each added (earlier) frame starts with the oldest known frame's position and
      token statistics. Shown a still screen, the grown policy then acts exactly as the earlier one
      (every key and value of its attention appears once per frame); the frames' differences, which
      one frame cannot show (where the ball is going), are what training on them teaches it to read.
      With fused frames (``fuse_frames``; from a fused run or a one-frame one) the added frames'
      pixels start at weight 0 in the patch embedding instead: the grown policy acts as the earlier
      one whatever they show.
    """
    earlier = load_model(Path(run_dir))
    if not isinstance(earlier, Policy):
        raise ValueError(f"{run_dir}: not a policy run")
    before, now = asdict(earlier.config), asdict(config)
    differ = [f"{k}: {before[k]} -> {now[k]}" for k in now if k not in TRAINING_ONLY and before[k] != now[k]
              and not (k == "context_frames" and now[k] > before[k])
              and not (k == "fuse_frames" and before["context_frames"] == 1)]  # one frame: fused or not
    if differ:
        raise ValueError(f"{run_dir}: a policy of another architecture ({'; '.join(differ)})")
    new_games = sorted(set(config.games) - set(earlier.config.games))
    policy = Policy(replace(config, games=earlier.config.games + new_games))
    weights = earlier.state_dict()
    known = weights["game_embed.weight"]  # (1 + known games, D)
    weights["game_embed.weight"] = torch.cat([known, known[NULL_GAME].expand(len(new_games), -1)])
    added = config.context_frames - earlier.config.context_frames

    def grow(per_frame: Tensor) -> Tensor:  # (F0, ...) -> (F0 + added, ...): frame 0 is the oldest
        return torch.cat([per_frame[:1].expand(added, *per_frame.shape[1:]), per_frame])

    if config.fuse_frames:  # one frame's tokens still: only the patch embedding sees the added frames
        key = "vision.embeddings.patch_embedding.weight"
        weights[key] = with_earlier_frames(weights[key], earlier.config.context_frames, config.context_frames,
                                           config.vision["patch_size"])
    else:
        weights["frame_pos"] = grow(weights["frame_pos"])  # (F, 1, D)
        if config.standardize_tokens:
            for stat in ("token_norm.running_mean", "token_norm.running_var"):  # (F*N*D,)
                weights[stat] = grow(weights[stat].view(earlier.config.context_frames, -1)).flatten()
    policy.load_state_dict(weights)
    return policy


register("policy", PolicyConfig, Policy)


# --- 4. Data: a weighted mixture of chunk stores -------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One ``--data PATH[:WEIGHT]``: a chunk store (ground truth or pseudo-labels) and its weight."""
    path: Path
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "Source":
        path, colon, weight = text.rpartition(":")
        try:
            value = float(weight) if colon else None
        except ValueError:  # the colon belongs to the path
            value = None
        if value is None:
            return cls(Path(text))
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"--data {text}: the weight after ':' must be a positive number")
        return cls(Path(path), value)


def is_pseudo_label(episode: Episode) -> bool:
    """Episodes labelled by something other than the player name their labeler: the IDM's pseudo-labels
    (``walkthrough.label``) and the scripted expert's DAgger labels (``play --relabel``)."""
    return "labeler" in episode.info


class PolicyDataset(Dataset):
    """Policy training windows from one or more sources, mixed by weight.

    An item is a ``WindowDataset`` item cut for acting: ``frames`` (F, 3, H, W) the context up to
    "now", ``actions`` (T, 21), ``action_mask`` (T,) and ``weight`` (T,) for the T steps from "now"
    on, plus ``game`` () the game id.

    Mixing: there are as many items as the sources have windows together, and source s fills a share
    w_s / sum(w) of them, cycling through its windows in a seeded order. The shared training loop
    permutes the items every epoch, so the sources are drawn in proportion to their weights while
    data order, resume and DDP sharding stay the loop's own.
    """

    def __init__(self, parts: list[tuple[list[Episode], float]], config: PolicyConfig,
                 use_confidence: bool = True, preload: bool = False, seed: int = 0):
        self.config = config
        spec = WindowSpec(num_frames=config.context_frames,
                          num_actions=config.context_frames - 1 + config.horizon,
                          fps=config.fps, size=(config.image_size, config.image_size))
        self.sets = [WindowDataset(episodes, spec, use_confidence, preload) for episodes, _ in parts]
        weights = np.array([w for _, w in parts], dtype=np.float64)
        total = sum(len(s) for s in self.sets)
        counts = np.round(total * weights / weights.sum()).astype(int)
        rng = np.random.default_rng(seed)
        items = []  # (source, window) per item
        for s, (windows, n) in enumerate(zip(self.sets, counts)):
            cycles = max(1, -(-n // len(windows)))  # ceil
            order = np.concatenate([rng.permutation(len(windows)) for _ in range(cycles)])[:n]
            items.append(np.stack([np.full(n, s), order], axis=1))
        self.items = np.concatenate(items)  # (N, 2)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        s, w = self.items[i]
        item = self.sets[s][int(w)]
        skip = self.config.context_frames - 1  # the steps between context frames are on screen already
        for key in ("actions", "action_mask", "weight"):
            item[key] = item[key][skip:]
        game = self.sets[s].episodes[int(item["episode"])].game
        item["game"] = torch.tensor(self.config.game_id(game))
        return item


# --- 5. Training --------------------------------------------------------------------------------------
def train_policy(sources: list[Source], out: Path, config: PolicyConfig, train_cfg: TrainConfig,
                 val_fraction: float = 0.1, use_confidence: bool = True,
                 vision_pretrained: Path | None = None, preload: bool = True, resume: bool = False,
                 eval_windows: int = 256, init_from: Path | None = None) -> Path:
    """Train a policy on a weighted mixture of chunk stores into the run directory ``out``.

    Validation (loss, and the offline action metrics of ``play.evaluate_offline``) runs on held-out
    ground-truth episodes only: pseudo-labels all go to training. The game vocabulary is every game
    in the data; with ``init_from``, that run's vocabulary, extended by the data's new games.
    """
    from walkthrough.play import evaluate_offline  # play imports this module

    if init_from and vision_pretrained:
        raise ValueError("start from an earlier run (--init-from) or from pretrained vision (--vision-pretrained), not both")

    if config.standardize_tokens and train_cfg.batch_size < 2:
        raise ValueError("token standardisation (BatchNorm) needs batches of at least 2 windows; "
                         "raise --batch-size or pass --raw-tokens")

    stores = [(ChunkStore(s.path), s) for s in sources]
    config = replace(config, games=sorted({e.game for store, _ in stores for e in store}))
    model = initialised_from(init_from, config) if init_from else None
    config = model.config if model is not None else config
    parts, held_out, summary = [], [], []
    for store, source in stores:
        truth = [e for e in store if not is_pseudo_label(e)]
        pseudo = [e for e in store if is_pseudo_label(e)]
        fit, val = split_episodes(truth, val_fraction, train_cfg.seed)
        parts.append((fit + pseudo, source.weight))
        held_out += val
        summary.append({"path": str(source.path), "weight": source.weight, "episodes": len(fit) + len(pseudo),
                        "pseudo_episodes": len(pseudo)})
    train_set = PolicyDataset(parts, config, use_confidence, preload, seed=train_cfg.seed)
    val_set = PolicyDataset([(held_out, 1.0)], config, use_confidence, preload) if held_out else None
    if model is None:
        model = with_pretrained_vision(config, vision_pretrained) if vision_pretrained else Policy(config)

    def evaluate(policy: nn.Module) -> dict[str, float]:
        metrics = evaluate_offline(policy, val_set, max_windows=eval_windows)
        return {**{f"{part}_{name}": metrics[part][name] for part in ("first", "chunk")
                   for name in ("button_f1", "stick_mae")},
                **{k: metrics[k] for k in ("image_gain", "motion_gain") if k in metrics}}

    data = {"sources": summary, "val_episodes": [e.video_id for e in held_out],
            "use_confidence": use_confidence, "vision_pretrained": str(vision_pretrained or ""),
            "init_from": str(init_from or ""), "preload": preload}
    return train(model, train_cfg, train_set, val_set, out, resume=resume,
                 evaluate=evaluate if val_set is not None else None, model_type="policy", data=data)
