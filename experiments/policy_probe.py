"""Can an image encoder read the expert's next action off one frame? A supervised probe.

The policy's flow-matching loss is a weak signal; this asks the easier question with a direct
cross-entropy loss, on the policy's own training items (``PolicyDataset``, the `cpu` preset's input):
classify the first action of each window as none / left / right / fire from its frame.

    python experiments/policy_probe.py --data DATA --encoder cnn      # a 3-stage conv net + MLP
    python experiments/policy_probe.py --data DATA --encoder policy   # the policy's SigLIP 2 + neck
                                                                      #   (+ token standardisation),
                                                                      #   attention-pooled, + linear
    python experiments/policy_probe.py --data DATA --encoder policy --raw-tokens   # without it
    python experiments/policy_probe.py --data DATA --encoder cnn --context-frames 2   # this frame and the last
    python experiments/policy_probe.py --data DATA --encoder policy --context-frames 2 --fuse-frames  # stacked in a patch
Prints held-out accuracy and left / right F1 every 100 steps (``--eval-every``), beside the majority class's accuracy.
Results and commands: docs/policy.md ("Why it does not learn").
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import default_collate

from walkthrough import actions as A
from walkthrough.chunks import ChunkStore
from walkthrough.dataset import split_episodes
from walkthrough.policy import PRESETS, Policy, PolicyConfig, PolicyDataset
from walkthrough.train import recompute_batchnorm

CLASSES = ("none", "left", "right", "fire")


def first_action_class(actions: Tensor) -> Tensor:
    """(B, 21) schema actions -> (B,) class index; fire wins over a direction."""
    pressed = actions > 0.5
    out = torch.zeros(len(actions), dtype=torch.long)
    out[pressed[:, A.BUTTON_INDEX["dpad_left"]]] = 1
    out[pressed[:, A.BUTTON_INDEX["dpad_right"]]] = 2
    out[pressed[:, A.BUTTON_INDEX["south"]]] = 3
    return out


def cnn(image_size: int, frames: int = 1) -> nn.Module:
    """Three conv + ReLU + max-pool /2 stages, flattened into an MLP: (B, 3F, H, W) [-1, 1] -> (B, 4)."""
    layers, c_in = [], 3 * frames
    for c in (16, 32, 32):
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1)]
        c_in = c
    side = image_size // 8
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * side * side, 128), nn.ReLU(), nn.Linear(128, len(CLASSES)))


class PolicyEncoderProbe(nn.Module):
    """The policy's image path (SigLIP 2 + neck), then one learned query attends over its tokens."""

    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.policy = Policy(config)
        self.query = nn.Parameter(torch.randn(config.width) * 0.02)
        self.head = nn.Linear(config.width, len(CLASSES))

    def forward(self, frames: Tensor) -> Tensor:
        tokens = self.policy.encode(frames)  # (B, S, D)
        attention = torch.softmax(tokens @ self.query / tokens.shape[-1] ** 0.5, dim=1)  # (B, S)
        return self.head((attention[..., None] * tokens).sum(1))  # (B, 4)


def batch(dataset: PolicyDataset, indices) -> tuple[Tensor, Tensor]:
    items = [dataset[int(i)] for i in indices]
    frames = torch.stack([item["frames"] for item in items])  # (B, F, 3, H, W) uint8
    return frames, first_action_class(torch.stack([item["actions"][0] for item in items]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a chunk store of one game's expert recordings")
    parser.add_argument("--encoder", choices=("cnn", "policy"), required=True)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--train-episodes", type=int, default=4, help="preloaded, to keep RAM and start-up small")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="the policy input and encoder")
    parser.add_argument("--raw-tokens", action="store_true", help="turn the preset's token standardisation off")
    parser.add_argument("--context-frames", type=int, default=1, help="frames up to now (2 show the ball's motion)")
    parser.add_argument("--fuse-frames", action="store_true", help="the policy's early fusion: frames stacked in a patch")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = PolicyConfig(**PRESETS[args.preset], context_frames=args.context_frames, fuse_frames=args.fuse_frames)
    if args.raw_tokens:
        config = replace(config, standardize_tokens=False)
    fit, held = split_episodes(list(ChunkStore(args.data)), 0.15)
    train_set = PolicyDataset([(fit[:args.train_episodes], 1.0)], config, preload=True)
    held_set = PolicyDataset([(held[:1], 1.0)], config, preload=True)
    held_frames, held_truth = batch(held_set, np.linspace(0, len(held_set) - 1, 512).astype(int))
    majority = np.bincount(held_truth.numpy(), minlength=4).max() / len(held_truth)

    if args.encoder == "cnn":
        net = cnn(config.image_size, config.context_frames)
        model = lambda frames: net(frames.flatten(1, 2).float() / 127.5 - 1.0)  # noqa: E731
    else:
        net = PolicyEncoderProbe(config)
        model = net
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr)
    print(f"{args.encoder}: {sum(p.numel() for p in net.parameters()):,} params, {len(train_set)} training "
          f"windows, held-out majority class {majority:.3f}", flush=True)
    rng, calibration, start = np.random.default_rng(0), np.random.default_rng(1), time.time()
    for step in range(1, args.steps + 1):
        frames, truth = batch(train_set, rng.integers(0, len(train_set), 32))
        loss = nn.functional.cross_entropy(model(frames), truth)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.eval_every == 0:
            if args.encoder == "policy":  # token statistics of the current weights, as train-policy keeps them
                windows = [default_collate([train_set[int(i)] for i in calibration.integers(0, len(train_set), 64)])
                           for _ in range(8)]
                recompute_batchnorm(net.policy, windows, torch.device("cpu"))
            net.eval()
            with torch.no_grad():
                guess = torch.cat([model(f).argmax(-1) for f in held_frames.split(64)])
            f1 = [2 * ((guess == c) & (held_truth == c)).sum().item()
                  / max(1, (guess == c).sum().item() + (held_truth == c).sum().item()) for c in (1, 2)]
            net.train()
            print(f"step {step}: loss {loss.item():.3f}  held-out accuracy {(guess == held_truth).float().mean():.3f}"
                  f"  F1 left {f1[0]:.2f} right {f1[1]:.2f}  ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
