"""The optimizer and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from trainer.config import OptimConfig


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer | MuonAdamW:
    """AdamW for every parameter, or with ``cfg.optimizer`` "muon", ``MuonAdamW``."""
    if cfg.optimizer == "muon":
        return MuonAdamW(model, cfg)
    return _adamw(model.named_parameters(), cfg)


def _adamw(named_parameters, cfg: OptimConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in named_parameters:
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


def muon_parameters(model: torch.nn.Module) -> list[str]:
    """The parameters Muon trains: the blocks' 2-D weights but attention's fused q/k/v (its
    output projection, the feed-forward's two). Not the embeddings (the output layer is tied to
    one), norms, biases or the copy gate. Orthogonalised as one matrix, the fused q/k/v ties
    the three projections' updates together: with rotary positions the masked-LM loss then
    stalled (6.21 after 300 steps of the default job, AdamW 5.22); with q/k/v left to AdamW,
    5.15 (docs/performance.md, "Muon and the fused q/k/v matrix")."""
    return [
        n
        for n, p in model.named_parameters()
        if n.startswith("blocks.") and p.dim() == 2 and ".attn.qkv." not in n
    ]


class MuonAdamW:
    """torch.optim.Muon for the blocks' matrices but q/k/v (``muon_parameters``), AdamW as
    ``_adamw`` for the rest, seen by the loop and the checkpoints as one optimizer:
    ``param_groups`` are Muon's then AdamW's, the same dicts (the loop sets each one's rate),
    and ``state_dict`` numbers the parameters across both in that order, the format of one
    optimizer's. torch.distributed.checkpoint takes ``parts``, the two optimizers.

    Muon's update, an orthogonalised momentum (singular values near 1), has a size set by the
    matrix's shape alone; ``match_rms_adamw`` scales it per matrix (0.2 sqrt(max(rows, columns))) to the RMS of an AdamW update, so one rate,
    its schedule and the weight decay serve both (Liu et al. 2025, "Muon is Scalable for LLM
    Training"). Muon's momentum is PyTorch's default, 0.95 with Nesterov.

    Under FSDP2 the matrices are sharded DTensors: Muon's Newton-Schulz iteration runs on them
    as DTensor operations, which compute the whole matrix's result (gathering or reducing
    across ranks as each product needs), and the momentum stays sharded."""

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig) -> None:
        matrices = set(muon_parameters(model))
        muon = torch.optim.Muon(
            [p for n, p in model.named_parameters() if n in matrices],
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            adjust_lr_fn="match_rms_adamw",
        )
        rest = [(n, p) for n, p in model.named_parameters() if n not in matrices]
        self.parts: tuple[torch.optim.Optimizer, ...] = (muon, _adamw(rest, cfg))

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts for group in part.param_groups]

    def step(self) -> None:
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for part in self.parts:
            saved = part.state_dict()
            state.update({i + offset: s for i, s in saved["state"].items()})
            groups += [
                {**g, "params": [i + offset for i in g["params"]]} for g in saved["param_groups"]
            ]
            offset += sum(len(g["params"]) for g in part.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups, offset = list(state_dict["param_groups"]), 0
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"it holds {len(groups)} parameter groups, Muon with AdamW has "
                f"{len(self.param_groups)} (was the run trained with another --optimizer?)"
            )
        for part in self.parts:
            mine, groups = groups[: len(part.param_groups)], groups[len(part.param_groups) :]
            ids = [i for g in mine for i in g["params"]]
            part.load_state_dict(
                {
                    "state": {
                        i - offset: state_dict["state"][i] for i in ids if i in state_dict["state"]
                    },
                    "param_groups": [
                        {**g, "params": [i - offset for i in g["params"]]} for g in mine
                    ],
                }
            )
            offset += len(ids)


def optimizer_parts(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers behind a run's optimizer (for torch.distributed.checkpoint)."""
    return list(getattr(optimizer, "parts", [optimizer]))


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
