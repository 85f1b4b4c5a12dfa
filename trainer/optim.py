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


def warmup_steps(total: int, cfg: OptimConfig) -> int:
    """The warm-up of a run planned for ``total`` steps: at most a tenth of it."""
    return min(cfg.warmup_steps, max(total // 10, 1))


def lr_at(step: int, total: int, cfg: OptimConfig, ceiling: float | None = None) -> float:
    """The rate of ``step`` of a run planned for ``total``: a linear warm-up, then the schedule,
    which falls to min_lr_ratio * lr at ``total``. Progress is the share of the planned steps
    done; with a time budget the plan is fitted to the budget, so progress is the share of the
    budget used. After the warm-up the rate never exceeds ``ceiling`` (the previous step's): a
    refit of the plan that finds time for more steps never raises the rate."""
    warmup = warmup_steps(total, cfg)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "wsd":
        # Stable at the peak, then the 1-sqrt decay over the last decay_share of the run
        # (Hagele et al. 2024 found it better than a linear one).
        decay_from = max(warmup, total - cfg.decay_share * total)
        progress = min(max(step - decay_from, 0) / max(total - decay_from, 1), 1.0)
        shape = 1 - math.sqrt(progress)
    else:
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    lr = cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)
    return lr if ceiling is None else min(lr, ceiling)


def final_decay_lr(step: int, start: int, end: int, rate: float, cfg: OptimConfig) -> float:
    """The rate of ``step`` in a decay begun early (``--patience``) after step ``start``: from
    ``rate``, the rate then, down to the floor (min_lr_ratio * lr) at the last step, ``end - 1``,
    in the schedule's shape (1-sqrt for wsd, half a cosine for cosine). Never above ``rate``."""
    floor = cfg.lr * cfg.min_lr_ratio
    progress = min((step - start + 1) / max(end - start, 1), 1.0)
    if cfg.schedule == "wsd":
        shape = 1 - math.sqrt(progress)
    else:
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    return min(rate, floor + (rate - floor) * shape)
