"""The method contract: what every self-supervised method in reprflow declares.


A method is an ``nn.Module`` that says
- ``views``: the :class:`~components.data.views.ViewRecipe` each sample must become;
- ``forward(batch) -> dict`` with ``loss`` and any metrics worth logging, where ``batch`` maps
  the recipe's keys (``view_0``, ...) to normalised float tensors;
- ``on_step_end(step, total_steps)``: momentum/EMA updates, temperature schedules;
  optional ``on_train_start(steps_per_epoch, total_steps)`` (epoch-based schedules) and
  ``on_after_backward(step)`` (gradient surgery between backward and the optimizer step);
- ``optim``: its :class:`~components.optim.OptimRecipe`, and ``param_groups()`` for it;
- ``encoder``: the module whose pooled output is "the representation".
Extra training state (memory banks, EMA teachers, centres) lives in buffers/sub-modules, so
``state_dict()`` is the whole state a checkpoint needs.

References between steps: a method (or an image tokenizer, which is a method with
``is_tokenizer = True``) may need another step's output - BEiT v2's VQ-KD tokenizer needs a
trained teacher, BEiT needs its tokenizer, VisualBERT a frozen visual encoder. It lists the
config fields holding such references in ``references``; a value names another method of the
pipeline, an entry of its ``tokenizers:`` section, or a ``models:/name@alias`` URI. The DAG
makes the referenced step an input, and the training loop calls ``attach({field: Upstream})``
on every worker before any state is loaded. Attached frozen modules stay out of
``state_dict()`` (hold them in a plain list) and are moved to the batch's device in ``forward``.
A method evaluated otherwise than by embedding images sets ``dag_steps`` to
``"module:function"``, which adds its own evaluate/register steps (see pipelines/run.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from components.data.views import ViewRecipe, override_views
from components.models.backbones import BackboneConfig
from components.optim import OptimRecipe, param_groups


class ViewOverrides(BaseModel):
    """Augmentation settings set on *every* view of a method's recipe (None keeps the method's
    own); see :class:`components.data.views.ViewSpec`. For data whose nuisances the papers'
    recipes leave intact, e.g. ``{invert_p: 0.5}`` on the scenes (README, "View overrides")."""

    model_config = ConfigDict(extra="forbid")
    flip_p: float | None = Field(None, ge=0, le=1, description="horizontal flip probability")
    jitter_p: float | None = Field(None, ge=0, le=1, description="colour jitter probability")
    brightness: float | None = Field(None, ge=0, description="colour jitter brightness strength")
    contrast: float | None = Field(None, ge=0, description="colour jitter contrast strength")
    saturation: float | None = Field(None, ge=0, description="colour jitter saturation strength")
    hue: float | None = Field(None, ge=0, le=0.5, description="colour jitter hue strength (0.5 = any hue)")
    gray_p: float | None = Field(None, ge=0, le=1, description="grayscale probability")
    blur_p: float | None = Field(None, ge=0, le=1, description="Gaussian blur probability")
    solarize_p: float | None = Field(None, ge=0, le=1, description="solarisation probability (pixels >= 128 inverted)")
    invert_p: float | None = Field(None, ge=0, le=1, description="whole-view inversion probability (x -> 255 - x)")

    def as_dict(self) -> dict:
        """The fields that are set."""
        return self.model_dump(exclude_none=True)


class MethodConfig(BaseModel):
    """Settings shared by every method; a method's own config subclasses this."""

    model_config = ConfigDict(extra="forbid")
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    optim: OptimRecipe = Field(default_factory=OptimRecipe)
    image_size: int = Field(32, ge=8, le=1024, description="side of the training views in pixels")
    view_overrides: ViewOverrides = Field(default_factory=ViewOverrides,
                                          description="augmentation settings set on every view of the method's recipe, e.g. {invert_p: 0.5}")

    @classmethod
    def paper_optim(cls, settings: dict) -> dict:
        """The method's default optimisation recipe as a dict; it may depend on other settings
        (e.g. AdamW for a ViT, LARS for a ResNet). The user's ``optim`` keys override it one by
        one, so ``optim: {lr: 0.01}`` keeps the paper's optimizer. Empty = OptimRecipe's defaults."""
        return {}

    @model_validator(mode="before")
    @classmethod
    def _merge_paper_optim(cls, data: Any) -> Any:
        if isinstance(data, dict):
            base = cls.paper_optim(data)
            if base:
                user = data.get("optim") or {}
                if isinstance(user, OptimRecipe):
                    user = user.model_dump(exclude_unset=True)
                data = {**data, "optim": {**base, **user}}
        return data


class AsymmetricViewsConfig(MethodConfig):
    """Settings of BYOL's asymmetric view pair (:func:`components.data.views.byol_views`),
    shared by BYOL, MoCo v3 and NNCLR."""

    crop_scale: tuple[float, float] = Field((0.2, 1.0), description="random-resized-crop area range (papers: 0.08-1 on ImageNet)")
    jitter_strength: float = Field(1.0, ge=0, le=4, description="multiplies the papers' colour jitter (0.4, 0.4, 0.2, 0.1); "
                                                                "2 is about SimCLR's s = 1, for data whose colours say nothing of the content")


@dataclass
class Upstream:
    """A finished upstream step a method refers to (see "References" in the module docstring).

    ``kind`` is "method" (a train step or a registered model) or "tokenizer"; ``name`` the
    registry name (method name / tokenizer kind); ``state_path`` the trained state file (a
    ``torch.save`` dict whose "method" entry is the state_dict), ``files`` other outputs by
    logical name (e.g. a text tokenizer's JSON).
    """

    kind: str
    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    state_path: str | None = None
    files: dict[str, str] = field(default_factory=dict)

    def load_method(self) -> "Method":
        """Build the upstream method and load its trained weights: checked against the state's sha256
        manifest (a tampered or unfinished state is refused), loaded ``weights_only`` (no code runs)."""
        from components.methods.registry import build_method

        if self.state_path is None:
            raise ValueError(f"upstream {self.kind} '{self.name}' has no trained state to load")
        from components.checkpoint import load_state

        m = build_method(self.name, self.settings)
        m.load_state_dict(load_state(self.state_path)["method"])
        return m.eval()


class Method(nn.Module):
    """Base class of the method contract (see the module docstring)."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # Config fields naming an upstream method / tokenizer / models:/ URI (see the module docstring).
    references: ClassVar[tuple[str, ...]] = ()
    # An image tokenizer trained by the generic loop (a ``tokenizers:`` entry, not a table row).
    is_tokenizer: ClassVar[bool] = False
    # "module:function" adding this method's own evaluate/register steps instead of embed -> kNN.
    dag_steps: ClassVar[str | None] = None
    encoder: nn.Module
    steps_per_epoch: int | None = None  # set by on_train_start

    def __init__(self, cfg: MethodConfig):
        super().__init__()
        self.cfg = cfg

    def __init_subclass__(cls, **kwargs):
        # A method's ``views`` property returns its paper's recipe; the config's
        # ``view_overrides`` are applied on top here, once, so no method has to remember to.
        super().__init_subclass__(**kwargs)
        prop = cls.__dict__.get("views")
        if isinstance(prop, property) and not getattr(prop.fget, "_overridden", False):
            def views(self, _recipe=prop.fget):
                return override_views(_recipe(self), self.cfg.view_overrides.as_dict())

            views.__doc__, views._overridden = prop.fget.__doc__, True
            cls.views = property(views)

    @property
    def views(self) -> ViewRecipe:
        raise NotImplementedError

    @property
    def optim(self) -> OptimRecipe:
        return self.cfg.optim

    def param_groups(self) -> list[dict]:
        """Parameter groups for the optimizer (no weight decay on norms and biases; layer-wise
        lr decay when the recipe sets ``layer_decay`` and the encoder has ``layer_id``, i.e. ViTs)."""
        enc = self.encoder
        if hasattr(enc, "layer_id"):
            return param_groups(self, self.cfg.optim, enc.layer_id, enc.num_layers)
        return param_groups(self, self.cfg.optim)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        raise NotImplementedError

    def attach(self, resources: dict[str, Upstream]) -> None:
        """Receive the upstream steps named by ``references`` (before any state is loaded).
        The default does nothing; keep what you attach out of ``state_dict()``."""

    def on_train_start(self, steps_per_epoch: int, total_steps: int) -> None:
        """Called once before training (and again on resume); the default records ``steps_per_epoch``."""
        self.steps_per_epoch = steps_per_epoch

    def on_after_backward(self, step: int) -> None:
        """Called after ``loss.backward()``, before the optimizer step; the default does nothing."""

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Called after every optimizer step; the default does nothing."""

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The representation of a normalised image batch (the encoder's pooled output)."""
        return self.encoder(x)
