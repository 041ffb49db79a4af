"""One fine-tuning run: build a method's adapter on a fresh model, train it, record the loss of every step.

Plain PyTorch, no Trainer: AdamW (no weight decay, constant learning rate) on the trainable parameters,
one fresh batch per step, the loss of step k is the batch's mean answer-token cross-entropy computed
before step k's update (what a Trainer logs with logging_steps=1). The model stays in float32.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .methods import AdapterSettings, Method, trainable_parameters


@dataclass
class RunResult:
    losses: list[float]
    init_s: float  # building the adapter (PiSSA: the SVD and the residual)
    train_s: float
    trainable: int
    diverged_at: int | None = None  # 1-based step whose loss was not finite; the run stops there
    notes: list[str] = field(default_factory=list)


def train(model, batches, lr: float, *, on_step: Callable[[int, float], None] | None = None) -> tuple[list[float], int | None]:
    """Train `model` (its trainable parameters) on `batches`; returns (loss per step, diverged step or None)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    for i, batch in enumerate(batches, 1):
        loss = model(**batch).loss
        value = float(loss.detach())
        losses.append(value)
        if on_step is not None:
            on_step(i, value)
        if not math.isfinite(value):
            return losses, i  # further steps would only propagate NaN through the adapter
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, None


def run_method(load_model: Callable[[], torch.nn.Module], method: Method, settings: AdapterSettings, batches,
               lr: float, seed: int, *, on_step=None) -> RunResult:
    """Fresh model -> method's adapter (seeded, timed) -> training; everything freed on return."""
    model = load_model()
    torch.manual_seed(seed)  # LoRA's Gaussian A (and any other random init) is the same on every run
    t0 = time.perf_counter()
    peft_model = method.build(model, settings)
    init_s = time.perf_counter() - t0
    trainable = trainable_parameters(peft_model)
    t0 = time.perf_counter()
    losses, diverged = train(peft_model, batches, lr, on_step=on_step)
    train_s = time.perf_counter() - t0
    del peft_model, model
    return RunResult(losses, init_s, train_s, trainable, diverged)
