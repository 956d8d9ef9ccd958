"""MIM losses against their formulas (float64, written as plain loops) and the tokenizers' codebook."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from components.losses.mim import mae_loss, masked_token_loss, vq_commitment_loss, vqkd_loss
from components.tokenizers.image_vq import CosineCodebook


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_mae_loss_equals_formula_on_masked_patches():
    pred = torch.randn(2, 5, 6, dtype=torch.float64, generator=_g(0))
    target = torch.randn(2, 5, 6, dtype=torch.float64, generator=_g(1))
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    for norm in (False, True):
        total, count = 0.0, 0
        for i in range(2):
            for j in range(5):
                if not mask[i, j]:
                    continue
                t = target[i, j].tolist()
                if norm:
                    mu = sum(t) / len(t)
                    sd = math.sqrt(sum((v - mu) ** 2 for v in t) / (len(t) - 1) + 1e-6)
                    t = [(v - mu) / sd for v in t]
                total += sum((p - v) ** 2 for p, v in zip(pred[i, j].tolist(), t)) / len(t)
                count += 1
        assert math.isclose(mae_loss(pred, target, mask, norm_pix=norm).item(), total / count, rel_tol=1e-12)


def test_mae_loss_ignores_visible_patches():
    pred = torch.randn(3, 8, 12, generator=_g(2), requires_grad=True)
    target = torch.randn(3, 8, 12, generator=_g(3))
    mask = torch.rand(3, 8, generator=_g(4)) < 0.75
    mask[:, 0] = False
    loss = mae_loss(pred, target, mask)
    loss.backward()
    assert (pred.grad[~mask] == 0).all() and (pred.grad[mask].abs().sum(-1) > 0).all()
    wild = pred.detach().clone()
    wild[~mask] += 100.0  # any prediction on a visible patch
    torch.testing.assert_close(mae_loss(wild, target, mask), loss.detach())


def test_masked_token_loss_equals_formula():
    logits = torch.randn(2, 4, 7, dtype=torch.float64, generator=_g(5))
    codes = torch.randint(0, 7, (2, 4), generator=_g(6))
    mask = torch.tensor([[True, False, True, True], [False, True, False, False]])
    terms = []
    for i in range(2):
        for j in range(4):
            if mask[i, j]:
                row = logits[i, j].tolist()
                log_z = math.log(sum(math.exp(v) for v in row))
                terms.append(log_z - row[codes[i, j]])
    expected = sum(terms) / len(terms)
    assert math.isclose(masked_token_loss(logits, codes, mask).item(), expected, rel_tol=1e-6)
    # The (M, K) form used by the methods (classifier only on masked positions) agrees.
    assert math.isclose(masked_token_loss(logits[mask], codes, mask).item(), expected, rel_tol=1e-6)


def test_vqkd_loss_equals_formula():
    o = torch.randn(2, 3, 5, dtype=torch.float64, generator=_g(7))
    t = torch.randn(2, 3, 5, dtype=torch.float64, generator=_g(8))
    z = F.normalize(torch.randn(2, 3, 4, dtype=torch.float64, generator=_g(9)), dim=-1)
    e = F.normalize(torch.randn(2, 3, 4, dtype=torch.float64, generator=_g(10)), dim=-1)
    beta = 0.7
    cos_terms, commit_terms = [], []
    for i in range(2):
        for j in range(3):
            a, b = o[i, j].tolist(), t[i, j].tolist()
            dot = sum(x * y for x, y in zip(a, b))
            cos_terms.append(1 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))))
            commit_terms.append(sum((x - y) ** 2 for x, y in zip(z[i, j].tolist(), e[i, j].tolist())))
    expected = sum(cos_terms) / 6 + beta * sum(commit_terms) / 6
    assert math.isclose(vqkd_loss(o, t, z, e, beta).item(), expected, rel_tol=1e-6)
    assert math.isclose(vq_commitment_loss(z, e).item(), sum(commit_terms) / 6, rel_tol=1e-12)
    # Neither the teacher nor the codes receive gradient; the decoder and the encoder side do.
    o.requires_grad_(True)
    t.requires_grad_(True)
    z.requires_grad_(True)
    e.requires_grad_(True)
    vqkd_loss(o, t, z, e, beta).backward()
    assert t.grad is None and e.grad is None and o.grad.abs().sum() > 0 and z.grad.abs().sum() > 0


def test_codebook_lookup_equals_brute_force():
    cb = CosineCodebook(13, 4)
    cb.embed.copy_(F.normalize(torch.randn(13, 4, generator=_g(11)), dim=-1))
    z = torch.randn(3, 5, 4, generator=_g(12)) * 3
    got = cb.lookup(z)
    for i in range(3):
        for j in range(5):
            v = z[i, j].tolist()
            norm = math.sqrt(sum(x * x for x in v))
            v = [x / norm for x in v]
            dists = [sum((a - b) ** 2 for a, b in zip(v, cb.embed[k].tolist())) for k in range(13)]
            assert got[i, j].item() == min(range(13), key=dists.__getitem__)
    cb.eval()
    q, codes, zn = cb(z)
    assert torch.equal(codes, got)
    torch.testing.assert_close(q, cb.embed[got])  # the forward value is the code vector
    torch.testing.assert_close(zn, F.normalize(z, dim=-1))


def test_codebook_straight_through_and_ema():
    torch.manual_seed(0)
    cb = CosineCodebook(8, 3, decay=0.5)
    z = torch.randn(40, 3, requires_grad=True)
    q, codes, _ = cb(z)  # first training call: initialised from the batch
    assert bool(cb.initialised)
    assert torch.allclose(cb.embed.norm(dim=-1), torch.ones(8))
    (q * torch.arange(3.0)).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # straight-through reaches the encoder
    # EMA: a code used by a batch moves towards its (normalised) mean assigned vector.
    before = cb.embed.clone()
    batch = F.normalize(torch.randn(64, 3), dim=-1)
    assigned = (batch @ before.T).argmax(-1)
    cb(batch)
    for k in assigned.unique():
        mean = F.normalize(batch[assigned == k].sum(0), dim=-1)
        expected = F.normalize(0.5 * before[k] + 0.5 * mean, dim=-1)
        torch.testing.assert_close(cb.embed[k], expected)


def test_codebook_restarts_dead_codes():
    cb = CosineCodebook(4, 2, decay=0.9, dead_fraction=0.5)
    cb.initialised.fill_(True)
    cb.embed.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    batch = F.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.9, 0.05]]), dim=-1)  # all near code 0
    for _ in range(10):
        cb(batch)
    # Codes 1-3 were never picked: they have been moved onto batch vectors.
    moved = (cb.embed[1:] @ batch.T).max(dim=1).values
    assert (moved > 0.99).all()
