"""One optimisation step of any method, with no Ray in sight.

The Ray Train loop in ``pipelines/`` and the benchmarks both call :class:`TrainStep`, so a
plain PyTorch loop trains any method exactly as the pipeline does:

    method = build_method("simclr", {...})
    step = TrainStep(method, global_batch=256, steps_per_epoch=len(loader), epochs=100)
    for i, batch in enumerate(loader):          # batch: {"view_0": uint8 NCHW, ...}
        metrics = step(prepare_batch(batch, device), i)
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from components.data.views import normalize
from components.methods.base import Method
from components.optim import Schedule, build_optimizer


def prepare_batch(batch: dict[str, Any], device: torch.device | str = "cpu", channels_last: bool = False) -> dict[str, torch.Tensor]:
    """Move a batch to ``device``; uint8 image tensors (``view_*``) become normalised floats."""
    out = {}
    for key, value in batch.items():
        t = torch.as_tensor(value).to(device, non_blocking=True)
        if key.startswith("view_") and t.dtype == torch.uint8:
            t = normalize(t)
            if channels_last:
                t = t.contiguous(memory_format=torch.channels_last)
        out[key] = t
    return out


class TrainStep:
    """Optimizer, schedules and the forward/backward/step of a method (optionally DDP-wrapped).

    ``model`` is what forward is called on (a DDP wrapper in distributed runs); ``method`` is
    the unwrapped method whose recipe and ``on_step_end`` are used.
    """

    def __init__(self, method: Method, global_batch: int, steps_per_epoch: int, epochs: int, model: nn.Module | None = None, amp_dtype: torch.dtype | None = None):
        self.method = method
        self.model = model if model is not None else method
        recipe = method.optim
        self.peak_lr = recipe.base_lr(global_batch)
        self.optimizer = build_optimizer(method.param_groups(), recipe, self.peak_lr)
        self.total_steps = max(1, steps_per_epoch * epochs)
        self.schedule = Schedule(self.optimizer, recipe, self.peak_lr, self.total_steps, steps_per_epoch)
        self.amp_dtype = amp_dtype
        method.on_train_start(steps_per_epoch, self.total_steps)

    def __call__(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        lr = self.schedule.apply(step)
        device_type = next(iter(batch.values())).device.type
        ctx = torch.autocast(device_type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        with ctx:
            out = self.model(batch)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower the learning rate or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.method.on_after_backward(step)
        self.optimizer.step()
        self.method.on_step_end(step, self.total_steps)
        metrics = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()}
        metrics["lr"] = lr
        return metrics

    def state_dict(self) -> dict:
        """Optimizer state for checkpoints (the method's own state is ``method.state_dict()``)."""
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.optimizer.load_state_dict(state["optimizer"])
