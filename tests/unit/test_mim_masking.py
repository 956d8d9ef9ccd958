"""Masks of masked image modeling (MAE's random mask, BEiT's block mask) and patchify/unpatchify."""

from __future__ import annotations

import pytest
import torch

from components.models.masking import block_mask, patch_grid, patchify, random_patch_mask, unpatchify


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_random_mask_ratio_and_indices():
    m = random_patch_mask(16, 49, 0.75, _gen(0))
    keep_n = int(49 * 0.25)
    assert m.keep.shape == (16, keep_n) and m.mask.shape == (16, 49) and m.restore.shape == (16, 49)
    assert (m.mask.sum(1) == 49 - keep_n).all()  # exactly the same count in every sample
    # The kept indices are exactly the unmasked positions.
    for i in range(16):
        assert set(m.keep[i].tolist()) == set((~m.mask[i]).nonzero().squeeze(1).tolist())
    # Samples differ (per-sample randomness, not one mask for the batch).
    assert len({tuple(row.tolist()) for row in m.mask}) > 1


def test_random_mask_restore_unshuffles():
    m = random_patch_mask(4, 10, 0.6, _gen(1))
    grid = torch.arange(10).expand(4, 10)
    visible = torch.gather(grid, 1, m.keep)
    hidden = torch.stack([row[msk] for row, msk in zip(grid, m.mask)])  # masked ids (any order is fine below)
    # restore maps [visible..., masked...] back to grid order: the visible ones land where they were.
    seq = torch.cat([visible, torch.full_like(hidden, -1)], dim=1)
    back = torch.gather(seq, 1, m.restore)
    assert torch.equal(back[~m.mask], grid[~m.mask])
    assert (back[m.mask] == -1).all()


def test_random_mask_is_deterministic_under_a_seed():
    a, b, c = (random_patch_mask(8, 36, 0.75, _gen(s)) for s in (3, 3, 4))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.keep, b.keep)
    assert not torch.equal(a.mask, c.mask)
    with pytest.raises(ValueError):
        random_patch_mask(2, 16, 1.0)


def _components(mask2d: torch.Tensor) -> list[int]:
    """Sizes of the 4-connected components of a 2-D bool mask (a plain flood fill)."""
    h, w = mask2d.shape
    seen, sizes = set(), []
    for y in range(h):
        for x in range(w):
            if not mask2d[y, x] or (y, x) in seen:
                continue
            stack, size = [(y, x)], 0
            seen.add((y, x))
            while stack:
                cy, cx = stack.pop()
                size += 1
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    if 0 <= ny < h and 0 <= nx < w and mask2d[ny, nx] and (ny, nx) not in seen:
                        seen.add((ny, nx))
                        stack.append((ny, nx))
            sizes.append(size)
    return sizes


def test_block_mask_paper_setting_ratio_and_block_shapes():
    """14x14 patches, 40 %, blocks >= 16 patches (BEiT's ViT-B/16 at 224 px)."""
    m = block_mask(64, (14, 14), 0.4, 16, generator=_gen(0))
    assert m.shape == (64, 196) and m.dtype == torch.bool
    counts = m.sum(1).float()
    target = round(0.4 * 196)
    assert (counts <= target).all()  # never over the budget
    assert counts.mean() > 0.85 * target, counts.mean()  # and close to it on average
    for row in m[:16]:
        sizes = _components(row.reshape(14, 14))
        # Every masked region is a union of whole rectangles of >= 16 patches.
        assert sizes and min(sizes) >= 16, sizes
    # Blocks, not scattered patches: far fewer regions than a random mask of the same count.
    assert max(len(_components(row.reshape(14, 14))) for row in m[:16]) <= target // 16


def test_block_mask_small_grid_and_determinism():
    a, b, c = (block_mask(32, (6, 6), 0.4, 4, generator=_gen(s)) for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a.sum(1) <= round(0.4 * 36)).all() and a.sum(1).float().mean() > 0.8 * round(0.4 * 36)
    assert all(min(_components(r.reshape(6, 6))) >= 4 for r in a)
    with pytest.raises(ValueError, match="min_block"):
        block_mask(2, (4, 4), 0.4, 16)


def test_patchify_layout_and_round_trip():
    x = torch.randn(2, 3, 12, 8, dtype=torch.float64)
    p = patchify(x, 4)
    assert p.shape == (2, 3 * 2, 4 * 4 * 3)
    # Patch (row 1, col 1) holds the pixels of that 4x4 cell, laid out (py, px, channel).
    cell = x[:, :, 4:8, 4:8].permute(0, 2, 3, 1).reshape(2, -1)
    torch.testing.assert_close(p[:, 1 * 2 + 1], cell)
    torch.testing.assert_close(unpatchify(p, 4, (3, 2)), x)
    with pytest.raises(ValueError):
        patchify(torch.randn(1, 3, 10, 8), 4)


def test_patch_grid_needs_a_vit():
    from components.models.backbones import BackboneConfig

    assert patch_grid(24, BackboneConfig(name="vit_tiny", patch_size=4, img_size=24)) == (6, 6)
    with pytest.raises(ValueError, match="ViT"):
        patch_grid(32, BackboneConfig(name="resnet18"))
    with pytest.raises(ValueError, match="multiple"):
        patch_grid(30, BackboneConfig(name="vit_tiny", patch_size=4, img_size=24))
