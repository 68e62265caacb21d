"""Learning-rate schedules of the collection trainers, stepped per epoch like nnU-Net's (``step(epoch)``)."""
from __future__ import annotations

import math


class ScaledPolyLRScheduler:
    """nnU-Net's poly schedule, lr = initial_lr (1 - step / max_steps)^0.9, times each parameter group's
    ``lr_scale`` (nnU-Net's ``PolyLRScheduler`` gives every group the same lr). Subclasses change ``lr_at``."""

    def __init__(self, optimizer, initial_lr: float, max_steps: int, exponent: float = 0.9):
        self.optimizer, self.initial_lr, self.max_steps, self.exponent = optimizer, initial_lr, max_steps, exponent
        self.ctr = 0
        self.step(0)

    def lr_at(self, step: int) -> float:
        return self.initial_lr * (1 - step / self.max_steps) ** self.exponent

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = self.lr_at(int(current_step))
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self):
        return self._last_lr

    def state_dict(self) -> dict:
        return {"ctr": self.ctr}

    def load_state_dict(self, state: dict) -> None:
        self.ctr = state.get("ctr", 0)


class WarmupPolyLRScheduler(ScaledPolyLRScheduler):
    """The official Hermes schedule::

        lr(e) = lr0 * exp(10 * (e / W - 1))   for e < W     (exponential warm-up from lr0 * e^-10)
        lr(W) = lr0
        lr(e) = lr0 * (1 - e / E) ** 0.9      for e > W     (poly decay)

    ``W = 0``: poly decay from the first epoch (nnU-Net's schedule)."""

    def __init__(self, optimizer, initial_lr: float, max_steps: int, warmup_steps: int, exponent: float = 0.9):
        self.warmup_steps = int(warmup_steps)
        super().__init__(optimizer, initial_lr, max_steps, exponent)

    def lr_at(self, step: int) -> float:
        if 0 < self.warmup_steps and step <= self.warmup_steps:
            return self.initial_lr * (1.0 if step == self.warmup_steps else math.exp(10 * (step / self.warmup_steps - 1)))
        return self.initial_lr * max(0.0, 1 - step / self.max_steps) ** self.exponent
