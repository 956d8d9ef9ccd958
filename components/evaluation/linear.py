"""Linear probe: multinomial logistic regression on frozen, standardised features.

Weight decay is chosen on the validation features from a small grid; the chosen probe is then
reported on validation and test alike (the test split never chooses anything).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LinearProbe:
    """A fitted probe: standardisation statistics and the linear layer."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    weight_decay: float

    def predict(self, feats: torch.Tensor) -> torch.Tensor:
        x = (feats.float() - self.mean) / self.std
        return (x @ self.weight.T + self.bias).argmax(dim=1)

    def top1(self, feats: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 accuracy (%)."""
        return float((self.predict(feats) == labels).float().mean() * 100) if len(labels) else float("nan")


def _fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, wd: float, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(num_classes, x.shape[1], generator=g) * 0.01).requires_grad_()
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + wd * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def fit_linear_probe(train_feats, train_labels, val_feats, val_labels, num_classes: int, weight_decays=(1e-5, 1e-4, 1e-3, 1e-2), steps: int = 200, seed: int = 0) -> LinearProbe:
    """Fit one probe per weight decay on train, keep the best on val."""
    with torch.enable_grad():
        mean = train_feats.float().mean(0)
        std = train_feats.float().std(0).clamp_min(1e-6)
        x = (train_feats.float() - mean) / std
        best = None
        for wd in weight_decays:
            w, b = _fit(x, train_labels, num_classes, wd, steps, seed)
            probe = LinearProbe(mean, std, w, b, wd)
            acc = probe.top1(val_feats, val_labels)
            if best is None or acc > best[0]:
                best = (acc, probe)
    return best[1]
