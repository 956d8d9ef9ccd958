"""lightly's side of bench/quality.py: methods assembled from lightly's modules behind our contract.

Each adapter takes our method's config and view recipe (same data) and our backbone, and adds
lightly's heads, memory bank and loss, so the same plain loop trains both sides.
"""

from __future__ import annotations

import copy

import torch

from components.methods.base import Method
from components.models.backbones import build_backbone


def lightly_version() -> str | None:
    """The installed lightly version, or None."""
    try:
        import lightly

        return lightly.__version__
    except ImportError:
        return None


class LightlyMethod(Method):
    """A method assembled from lightly's modules behind our contract, so the same loop trains it.

    It takes the views of our method (same data) and our backbone; subclasses add lightly's heads,
    memory bank and loss.
    """

    def __init__(self, cfg, views):
        super().__init__(cfg)
        self._views = views
        self.encoder = build_backbone(cfg.backbone)

    @property
    def views(self):
        """Our method's view recipe, so both sides see the same kind of data."""
        return self._views


class LightlySimCLR(LightlyMethod):
    """SimCLR from lightly's projection head and NT-Xent loss."""

    def __init__(self, cfg, views):
        super().__init__(cfg, views)
        from lightly.loss import NTXentLoss
        from lightly.models.modules.heads import SimCLRProjectionHead

        self.projector = SimCLRProjectionHead(self.encoder.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.criterion = NTXentLoss(temperature=cfg.temperature)

    def forward(self, batch):
        z0 = self.projector(self.encoder(batch["view_0"]))
        z1 = self.projector(self.encoder(batch["view_1"]))
        return {"loss": self.criterion(z0, z1)}


class LightlyNNCLR(LightlyMethod):
    """NNCLR as in lightly's example: its heads, NN memory bank and NT-Xent loss."""

    def __init__(self, cfg, views):
        super().__init__(cfg, views)
        from lightly.loss import NTXentLoss
        from lightly.models.modules import NNMemoryBankModule
        from lightly.models.modules.heads import NNCLRPredictionHead, NNCLRProjectionHead

        self.projector = NNCLRProjectionHead(self.encoder.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.predictor = NNCLRPredictionHead(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)
        self.support = NNMemoryBankModule(size=(cfg.support_set_size, cfg.proj_dim))
        self.criterion = NTXentLoss(temperature=cfg.temperature)

    def forward(self, batch):
        z0 = self.projector(self.encoder(batch["view_0"]))
        z1 = self.projector(self.encoder(batch["view_1"]))
        p0, p1 = self.predictor(z0), self.predictor(z1)
        nn0 = self.support(z0.detach(), update=False)
        nn1 = self.support(z1.detach(), update=True)
        return {"loss": 0.5 * (self.criterion(nn0, p1) + self.criterion(nn1, p0))}


class LightlyMomentumPair(LightlyMethod):
    """BYOL's and MoCo v3's shared shape with lightly's momentum helpers and schedule: an online
    encoder -> projector -> predictor, a momentum target encoder -> projector, and a symmetrised
    ``pair_loss(prediction of one view, target of the other)``. Subclasses build the heads."""

    def on_train_start(self, steps_per_epoch, total_steps):
        """Copy the target now: run_one loads the shared initial weights after construction."""
        from lightly.models.utils import deactivate_requires_grad

        super().on_train_start(steps_per_epoch, total_steps)
        self.target_encoder, self.target_projector = copy.deepcopy(self.encoder), copy.deepcopy(self.projector)
        deactivate_requires_grad(self.target_encoder)
        deactivate_requires_grad(self.target_projector)

    def pair_loss(self, p, z):
        raise NotImplementedError

    def forward(self, batch):
        x0, x1 = batch["view_0"], batch["view_1"]
        p0 = self.predictor(self.projector(self.encoder(x0)))
        p1 = self.predictor(self.projector(self.encoder(x1)))
        with torch.no_grad():
            z0 = self.target_projector(self.target_encoder(x0))
            z1 = self.target_projector(self.target_encoder(x1))
        return {"loss": self.pair_loss(p0, z1) + self.pair_loss(p1, z0)}

    def on_step_end(self, step, total_steps):
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        m = cosine_schedule(step, total_steps, self.cfg.momentum, 1.0)
        update_momentum(self.encoder, self.target_encoder, m)
        update_momentum(self.projector, self.target_projector, m)


class LightlyBYOL(LightlyMomentumPair):
    """BYOL as in lightly's example: its heads, momentum helpers and negative-cosine loss."""

    def __init__(self, cfg, views):
        super().__init__(cfg, views)
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead

        self.projector = BYOLProjectionHead(self.encoder.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.predictor = BYOLPredictionHead(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)
        self.criterion = NegativeCosineSimilarity()

    def pair_loss(self, p, z):
        return 0.5 * self.criterion(p, z)


class LightlyDINO(LightlyMethod):
    """DINO as in lightly's example: its head (frozen last layer), loss (centring, temperature
    warm-up by epoch) and momentum helpers; each crop through the backbone on its own."""

    def __init__(self, cfg, views):
        super().__init__(cfg, views)
        from lightly.loss import DINOLoss
        from lightly.models.modules.heads import DINOProjectionHead

        self.student_backbone = self.encoder
        self.student_head, self.teacher_head = (
            DINOProjectionHead(self.encoder.feature_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.out_dim,
                               batch_norm=cfg.head_batch_norm, freeze_last_layer=int(cfg.freeze_last_layer_epochs))
            for _ in range(2)
        )
        self.criterion = DINOLoss(cfg.out_dim, cfg.warmup_teacher_temp, cfg.teacher_temp, int(cfg.warmup_teacher_temp_epochs),
                                  cfg.student_temp, cfg.center_momentum)
        self.steps_done = 0

    def on_train_start(self, steps_per_epoch, total_steps):
        """Copy the teacher from the shared initial weights; like ours, the teacher is the representation."""
        from lightly.models.utils import deactivate_requires_grad

        super().on_train_start(steps_per_epoch, total_steps)
        self.teacher_backbone = copy.deepcopy(self.student_backbone)
        self.teacher_head.load_state_dict(self.student_head.state_dict())  # weight_norm'd heads cannot be deep-copied
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.encoder = self.teacher_backbone

    def forward(self, batch):
        views = [batch[k] for k in self.views.keys]
        with torch.no_grad():
            teacher = [self.teacher_head(self.teacher_backbone(v)) for v in views[:2]]
        student = [self.student_head(self.student_backbone(v)) for v in views]
        return {"loss": self.criterion(teacher, student, epoch=self.steps_done // self.steps_per_epoch)}

    def on_after_backward(self, step):
        self.student_head.cancel_last_layer_gradients(step // self.steps_per_epoch)

    def on_step_end(self, step, total_steps):
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        m = cosine_schedule(step, total_steps, self.cfg.momentum, 1.0)
        update_momentum(self.student_backbone, self.teacher_backbone, m)
        update_momentum(self.student_head, self.teacher_head, m)
        self.steps_done = step + 1


class LightlyMoCoV3(LightlyMomentumPair):
    """MoCo v3 from lightly's pieces: its MoCo head (MoCo v3's BN on every layer), BYOL's
    prediction head, momentum helpers and schedule. lightly 1.6 has no MoCo v3 loss (its NTXentLoss
    adds same-view negatives), so the loss is the paper's pseudocode: 2 tau CE(q k^T / tau)."""

    def __init__(self, cfg, views):
        super().__init__(cfg, views)
        from lightly.models.modules.heads import BYOLPredictionHead, MoCoProjectionHead

        self.projector = MoCoProjectionHead(self.encoder.feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, num_layers=cfg.proj_layers, batch_norm=True)
        self.predictor = BYOLPredictionHead(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim)
        if cfg.freeze_patch_embed:  # the paper's trick is a setting of the method, so both sides get it
            self.encoder.vit.patch_embed.requires_grad_(False)

    def pair_loss(self, q, k):
        """The paper's loss of one query/key view pair: 2 tau CE(q k^T / tau), the batch's keys as negatives."""
        q, k = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
        logits = q @ k.T / self.cfg.temperature
        return 2 * self.cfg.temperature * torch.nn.functional.cross_entropy(logits, torch.arange(len(q)))


LIGHTLY = {"simclr": LightlySimCLR, "nnclr": LightlyNNCLR, "byol": LightlyBYOL, "dino": LightlyDINO, "mocov3": LightlyMoCoV3}
# Not in lightly 1.6, so not compared: MSF and SCL.
