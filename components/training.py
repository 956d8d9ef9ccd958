"""One optimisation step of any method, with no Ray in sight.

The Ray Train loop in ``pipelines/`` and the benchmarks both call :class:`TrainStep`, so a
plain PyTorch loop trains any method exactly as the pipeline does:

    method = build_method("simclr", {...})
    step = TrainStep(method, global_batch=256, steps_per_epoch=len(loader), epochs=100)
    for i, batch in enumerate(loader):          # batch: {"view_0": uint8 NCHW, ...}
        metrics = step(prepare_batch(batch, device), i)

Speed options (channels-last, torch.compile, fused optimizers, no host sync per step) are
opt-in through :class:`PerfOptions`; with all of them off the step is the plain one above.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from components.data.views import normalize
from components.methods.base import Method
from components.optim import OptimRecipe, Schedule, build_optimizer


class PerfOptions(BaseModel):
    """Opt-in speed settings of :class:`TrainStep`. Each also runs on the CPU (slower, or as a no-op).

    None changes what is computed beyond rounding: ``tests/unit/test_perf_options.py`` checks
    every option against the plain step. On one H200 (bench/gpu.py) the useful set for a ResNet
    is ``channels_last + compile=method + fused_optimizer + tf32 + cudnn_benchmark`` with bf16
    autocast (TrainStep's ``amp_dtype``), and the same without ``channels_last`` for a ViT.
    """

    model_config = ConfigDict(extra="forbid")
    channels_last: bool = Field(False, description="NHWC weights and inputs (tensor-core convolutions without transposes); convnets only gain")
    compile: Literal["off", "method", "modules"] = Field(
        "off", description="torch.compile the method's whole forward ('method') or each top-level sub-module ('modules': "
        "for methods whose forward has host-side logic, e.g. DINO's schedules); weights keep their names")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"] = Field(
        "default", description="torch.compile mode; 'reduce-overhead' adds CUDA graphs (fixed shapes only)")
    compile_backend: str = Field("inductor", description="torch.compile backend ('eager' only traces: tests, smoke runs)")
    fused_optimizer: bool = Field(False, description="fused AdamW/SGD kernels (LARS: timm's multi-tensor path); same update rule")
    sync_metrics: bool = Field(True, description="False: return metrics as device tensors and check the loss lazily "
                               "(check_finite), so the host never waits for the GPU between steps")
    tf32: bool = Field(False, description="TF32 matrix products and convolutions for float32 work (process-wide)")
    cudnn_benchmark: bool = Field(False, description="let cuDNN time its algorithms for fixed shapes (process-wide)")


def apply_memory_format(method: nn.Module, perf: PerfOptions | None) -> nn.Module:
    """Put a method's weights in channels-last layout when ``perf`` asks for it (in place).

    Call it before wrapping the method in DDP (DDP's gradient buckets keep the layout they were
    built with); :class:`TrainStep` calls it again, which is then a no-op.
    """
    if perf is not None and perf.channels_last:
        method.to(memory_format=torch.channels_last)
    return method


def build_fused_optimizer(groups: list[dict], recipe: OptimRecipe, lr: float) -> torch.optim.Optimizer:
    """The recipe's optimizer with fused kernels: one launch per step instead of several per tensor.

    Same update rule as :func:`components.optim.build_optimizer`; LARS keeps timm's
    implementation, forced onto its multi-tensor (``foreach``) path.
    """
    if recipe.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=recipe.betas, fused=True)
    if recipe.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=recipe.momentum, fused=True)
    from timm.optim import Lars

    try:
        return Lars(groups, lr=lr, momentum=recipe.momentum, trust_clip=False, always_adapt=False, foreach=True)
    except TypeError:  # a timm without the multi-tensor path
        return Lars(groups, lr=lr, momentum=recipe.momentum, trust_clip=False, always_adapt=False)


def _channels_last(t: Any) -> Any:
    if torch.is_tensor(t) and t.ndim == 4 and t.is_floating_point():
        return t.contiguous(memory_format=torch.channels_last)
    return t


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

    def __init__(self, method: Method, global_batch: int, steps_per_epoch: int, epochs: int, model: nn.Module | None = None,
                 amp_dtype: torch.dtype | None = None, perf: PerfOptions | dict | None = None):
        self.method = method
        self.model = model if model is not None else method
        self.perf = perf if isinstance(perf, PerfOptions) else PerfOptions.model_validate(perf or {})
        if self.perf.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.perf.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        apply_memory_format(method, self.perf)
        recipe = method.optim
        self.peak_lr = recipe.base_lr(global_batch)
        build = build_fused_optimizer if self.perf.fused_optimizer else build_optimizer
        self.optimizer = build(method.param_groups(), recipe, self.peak_lr)
        self.total_steps = max(1, steps_per_epoch * epochs)
        self.schedule = Schedule(self.optimizer, recipe, self.peak_lr, self.total_steps, steps_per_epoch)
        self.amp_dtype = amp_dtype
        self._finite: torch.Tensor | None = None  # lazily checked losses (sync_metrics=False)
        self._since_step: int | None = None
        if self.perf.compile != "off":
            mode = None if self.perf.compile_mode == "default" else self.perf.compile_mode
            # Module.compile compiles in place: state_dict keys (checkpoints) stay unprefixed.
            # dynamic=False: one graph per input shape (DINO's two crop sizes) instead of
            # symbolic shapes, which compile slower and run slower.
            targets = [self.model] if self.perf.compile == "method" else list(method.children())
            for m in targets:
                m.compile(dynamic=False, mode=mode, backend=self.perf.compile_backend)
        method.on_train_start(steps_per_epoch, self.total_steps)

    def __call__(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, Any]:
        """One optimizer step on a prepared batch; returns the method's metrics and ``lr``.

        Metrics are floats, or detached device tensors when ``perf.sync_metrics`` is False
        (call :meth:`check_finite` now and then: a non-finite loss is then caught late).
        """
        lr = self.schedule.apply(step)
        if self.perf.channels_last:
            batch = {k: _channels_last(v) for k, v in batch.items()}
        device_type = next(iter(batch.values())).device.type
        ctx = torch.autocast(device_type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        with ctx:
            out = self.model(batch)
        loss = out["loss"]
        if self.perf.sync_metrics:
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower the learning rate or check the data")
        else:
            finite = torch.isfinite(loss.detach())
            self._finite = finite if self._finite is None else self._finite & finite
            if self._since_step is None:
                self._since_step = step
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.method.on_after_backward(step)
        self.optimizer.step()
        self.method.on_step_end(step, self.total_steps)
        if self.perf.sync_metrics:
            metrics = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()}
        else:
            metrics = {k: v.detach() if torch.is_tensor(v) else float(v) for k, v in out.items()}
        metrics["lr"] = lr
        return metrics

    def check_finite(self) -> None:
        """Raise FloatingPointError if a loss since the last check was not finite (one host sync).

        Only needed with ``perf.sync_metrics`` False; otherwise every step checks its own loss.
        """
        finite, first = self._finite, self._since_step
        self._finite, self._since_step = None, None
        if finite is not None and not bool(finite):
            raise FloatingPointError(f"a loss since step {first} was not finite; lower the learning rate or check the data")

    def state_dict(self) -> dict:
        """Optimizer state for checkpoints (the method's own state is ``method.state_dict()``)."""
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.optimizer.load_state_dict(state["optimizer"])
