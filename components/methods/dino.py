"""DINO (Caron et al., ICCV 2021): a student matches a centred, sharpened EMA teacher across crops.

student:  backbone -> DINO head, on 2 global + N local crops       (trained)
teacher:  EMA(backbone) -> EMA(head), on the 2 global crops only   (0.996 -> 1 along a cosine)
loss:     H(P_t(x), P_s(x')) over all pairs of different views (Eq. 3), teacher centred (EMA of
          its batch mean, momentum 0.9, over all ranks) and sharpened (tau_t 0.04 -> 0.07)
extras:   the head's last layer is frozen in the first epoch; AdamW with weight decay 0.04 -> 0.4.
The representation is the teacher's backbone, which the paper evaluates (it outperforms the student).
"""

from __future__ import annotations

import torch
from pydantic import Field, ValidationInfo, field_validator

from components.data.views import ViewRecipe, ViewSpec
from components.losses.dino import dino_center, dino_loss, teacher_temperature
from components.methods.base import Method, MethodConfig
from components.models.backbones import build_backbone
from components.models.ema import cosine_momentum, ema_update, frozen_copy
from components.models.heads import DINOHead
from components.models.multicrop import multicrop_forward


class DINOConfig(MethodConfig):
    """DINO settings; defaults follow the paper (App. and its code) except where noted."""

    out_dim: int = Field(65536, ge=2, description="K, the head's output dimension")
    hidden_dim: int = Field(2048, ge=1)
    bottleneck_dim: int = Field(256, ge=1)
    head_layers: int = Field(3, ge=1)
    head_batch_norm: bool = Field(False, description="BN in the head's MLP (the paper's use_bn_in_head)")
    norm_last_layer: bool = Field(True, description="keep the last layer's rows unit vectors (the paper's default); "
                                                    "False trains their norms, unbounding the logits")
    n_local: int = Field(6, ge=0, le=16, description="local crops per image (paper: 6-10)")
    local_size: int | None = Field(None, ge=4, validate_default=True, description="side of the local crops; None: half of image_size (paper: 96 for 224)")
    global_scale: tuple[float, float] = Field((0.4, 1.0))
    local_scale: tuple[float, float] = Field((0.05, 0.4))
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: float = Field(0.07, gt=0, description="teacher temperature after the warm-up")
    warmup_teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp_epochs: float = Field(30, ge=0)
    center_momentum: float = Field(0.9, ge=0, lt=1)
    momentum: float = Field(0.996, ge=0, le=1, description="base teacher momentum; rises to 1 along a cosine")
    freeze_last_layer_epochs: float = Field(1, ge=0)
    jitter_strength: float = Field(1.0, ge=0, le=4, description="multiplies the colour jitter of every crop (BYOL's 0.4, 0.4, 0.2, 0.1); "
                                                                "2 is about SimCLR's s = 1, for data whose colours say nothing of the content")

    @classmethod
    def paper_optim(cls, settings: dict) -> dict:
        """AdamW, lr 5e-4 x B/256 to 1e-6, weight decay 0.04 -> 0.4 (cosine), 10 warm-up epochs."""
        return {"name": "adamw", "lr": 5e-4, "min_lr_ratio": 0.002, "weight_decay": 0.04, "weight_decay_end": 0.4, "warmup_epochs": 10}

    @field_validator("local_size")
    @classmethod
    def _check_local_size(cls, size: int | None, info: ValidationInfo) -> int:
        image, backbone = info.data.get("image_size"), info.data.get("backbone")
        if image is None or backbone is None:
            return size  # an earlier field failed; that error is reported
        size = size or image // 2
        if size > image:
            raise ValueError(f"local_size {size} exceeds image_size {image}")
        p = backbone.patch_size
        if backbone.is_vit and (size % p or image % p):
            raise ValueError(f"image_size {image} and local_size {size} must be multiples of the ViT patch_size {p}")
        return size


class DINO(Method):
    """Student backbone + DINO head; teacher = their EMA; a centre buffer; multi-crop views."""

    name = "dino"
    Config = DINOConfig

    def __init__(self, cfg: DINOConfig):
        super().__init__(cfg)
        self.student = build_backbone(cfg.backbone)
        self.student_head = DINOHead(self.student.feature_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers, cfg.head_batch_norm,
                                     cfg.norm_last_layer)
        self.teacher = frozen_copy(self.student)
        self.teacher_head = frozen_copy(self.student_head)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        # Optimizer steps taken: the teacher-temperature and last-layer schedules read it in
        # forward, and as a buffer it survives a resume.
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    @property
    def encoder(self):
        """The teacher's backbone (the paper evaluates the teacher)."""
        return self.teacher

    @property
    def views(self) -> ViewRecipe:
        c = self.cfg
        # BYOL's colour recipe; global crop 1 always blurred, crop 2 rarely but solarized (App. / code).
        s = c.jitter_strength
        colour = dict(brightness=0.4 * s, contrast=0.4 * s, saturation=0.2 * s, hue=min(0.5, 0.1 * s))
        g = dict(size=c.image_size, scale=tuple(c.global_scale), **colour)
        local = ViewSpec(size=c.local_size, scale=tuple(c.local_scale), blur_p=0.5, **colour)
        return ViewRecipe(views=(ViewSpec(**g, blur_p=1.0), ViewSpec(**g, blur_p=0.1, solarize_p=0.2), *[local] * c.n_local))

    def _steps_per_epoch(self) -> int:
        if self.steps_per_epoch is None:
            raise RuntimeError("DINO's schedules are in epochs: call on_train_start(steps_per_epoch, total_steps) first (TrainStep does)")
        return self.steps_per_epoch

    def forward(self, batch):
        c = self.cfg
        views = [batch[k] for k in self.views.keys]
        student = multicrop_forward(self.student, self.student_head, views)
        with torch.no_grad():
            teacher = multicrop_forward(self.teacher, self.teacher_head, views[:2])
        t_temp = teacher_temperature(int(self.steps_done), self._steps_per_epoch(), c.warmup_teacher_temp, c.teacher_temp, c.warmup_teacher_temp_epochs)
        loss = dino_loss(student, teacher, self.center, c.student_temp, t_temp)
        with torch.no_grad():
            # Centring flattens the teacher, so the cross-entropy may rise while the student
            # learns; KL = loss - H(P_t) is the part the student controls.
            p_t = [torch.softmax((t - self.center) / t_temp, dim=-1) for t in teacher]
            entropy = sum(-(p * p.clamp_min(1e-12).log()).sum(-1).mean() for p in p_t) / len(p_t)
        if self.training:
            self.center.copy_(dino_center(self.center, teacher, c.center_momentum))
        return {"loss": loss, "kl": loss.detach() - entropy, "teacher_entropy": entropy, "teacher_temp": t_temp}

    def on_after_backward(self, step: int) -> None:
        """Cancel the last layer's update during the first epoch(s): the paper's stabiliser."""
        if step < self.cfg.freeze_last_layer_epochs * self._steps_per_epoch():
            self.student_head.last_layer.weight.grad = None
            if self.student_head.last_layer_g is not None:
                self.student_head.last_layer_g.grad = None

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Move the teacher towards the student with the cosine-scheduled momentum."""
        m = cosine_momentum(step, total_steps, self.cfg.momentum)
        ema_update(self.teacher, self.student, m)
        ema_update(self.teacher_head, self.student_head, m)
        self.steps_done.fill_(step + 1)
