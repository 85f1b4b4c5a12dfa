"""The optimizer and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from trainer.config import OptimConfig


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Matrices decay; biases, norms and embeddings (position and tied token) do not.
        (
            decay if p.dim() == 2 and "embed" not in name and "position" not in name else no_decay
        ).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel exists for CPU and CUDA; on CPU it is hundreds of times faster than the
    # default per-parameter loop, which otherwise dominates a small model's step.
    fused = True if cfg.fused_adamw else None  # None: PyTorch's own choice
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-6, fused=fused)


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr at ``total``."""
    warmup = min(cfg.warmup_steps, max(total // 10, 1))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    )
