"""BRIEF (Calonder et al., ECCV 2010): patterns, tests, invariances, Hamming distances, matching, bag of words."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.brief.bow import BagOfBinaryWords, bow_histograms, k_majority
from components.brief.descriptor import BriefConfig, BriefExtractor, binary_tests, pack_bits, unpack_bits
from components.brief.detector import detect_keypoints, fast_response, harris_response
from components.brief.matching import hamming_distance, match_descriptors, popcount64
from components.brief.patterns import PATTERNS, sampling_pattern
from components.brief.smoothing import gaussian_kernel1d, gaussian_smooth


def _texture(h: int, w: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """A smooth random texture in 0..255 without flat areas (no ties between test pixels)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, h // 4 + 2, w // 4 + 2, generator=g, dtype=torch.float64)
    img = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0, 0]
    img = img + 0.05 * torch.rand(h, w, generator=g, dtype=torch.float64)
    img = (img - img.min()) / (img.max() - img.min())
    return (20 + 200 * img).to(dtype)


# ------------------------------------------------------------------ sampling patterns


def test_gii_pattern_is_isotropic_gaussian_with_std_s_over_5_clipped_to_the_patch():
    s = 48
    p = sampling_pattern("GII", n_bits=20_000, patch_size=s).double()
    coords = p.flatten()
    assert abs(coords.mean().item()) < 0.2
    # sigma^2 = S^2/25 -> std S/5 = 9.6; clipping at 2.5 sigma and rounding move it by < 2 %.
    assert coords.std().item() == pytest.approx(s / 5, rel=0.03)
    assert [abs(c.mean().item()) < 0.3 for c in p.T] == [True] * 4  # every coordinate centred
    assert int(p.abs().max()) == s // 2  # some draws hit the border and were clipped, none beyond
    assert sampling_pattern("GII").dtype == torch.int64


def test_patterns_are_deterministic_under_the_fixed_seed():
    for kind in PATTERNS:
        a, b = sampling_pattern(kind, 256, 48), sampling_pattern(kind, 256, 48)
        assert torch.equal(a, b), kind
        assert a.shape == (256, 4) and int(a.abs().max()) <= 24
    assert not torch.equal(sampling_pattern("GII", 256, 48, seed=1), sampling_pattern("GII", 256, 48, seed=2))


def test_other_patterns_follow_the_paper():
    s = 48
    g1 = sampling_pattern("GI", 20_000, s).double()
    assert g1.std().item() == pytest.approx(s / 12**0.5, rel=0.03)  # uniform over (-S/2, S/2)
    g3 = sampling_pattern("GIII", 20_000, s).double()
    # y_i ~ N(x_i, S^2/100): the second point stays close to the first (std S/10 per axis).
    assert (g3[:, 2:] - g3[:, :2]).std().item() == pytest.approx(s / 10, rel=0.08)
    g4 = sampling_pattern("GIV", 4096, s)
    assert len(torch.unique(torch.cat([g4[:, :2], g4[:, 2:]]), dim=0)) <= 33  # a coarse polar grid (+ centre)
    g5 = sampling_pattern("GV", 256, s)
    assert torch.equal(g5[:, :2], torch.zeros(256, 2, dtype=torch.long))  # x_i = centre
    radii = g5[:, 2:].double().norm(dim=1)
    assert radii.max().item() == pytest.approx(s // 2, abs=1) and len(torch.unique(g5[:, 2:], dim=0)) > 200


# ------------------------------------------------------------------ descriptor


def test_bits_are_packed_msb_first_like_numpy():
    bits = torch.rand(5, 7, 256, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 7, 32)
    assert np.array_equal(packed.numpy(), np.packbits(bits.numpy(), axis=-1))
    assert torch.equal(unpack_bits(packed), bits)


def test_descriptor_bits_equal_the_paper_tests_computed_one_by_one():
    img = _texture(80, 96, seed=1)
    cfg = BriefConfig(bits=128, patch_size=24)
    ext = BriefExtractor(cfg)
    kps = torch.tensor([[[30, 40], [12, 12], [83, 67], [50.4, 20.6]]], dtype=torch.float64)
    desc, valid = ext(img.unsqueeze(0), kps)
    sm = gaussian_smooth(img.unsqueeze(0), 2.0, 9)[0]
    for j, (x, y) in enumerate([(30, 40), (12, 12), (83, 67), (50, 21)]):
        expect = [float(sm[y + dy1, x + dx1] < sm[y + dy2, x + dx2]) for dx1, dy1, dx2, dy2 in ext.pattern.tolist()]
        assert unpack_bits(desc[0, j]).float().tolist() == expect
    assert valid.tolist() == [[True, True, True, True]]


def test_keypoints_whose_patch_leaves_the_image_are_invalid_and_zero():
    img = _texture(64, 64).unsqueeze(0)
    ext = BriefExtractor(BriefConfig(patch_size=32))  # border 16
    kps = torch.tensor([[[16, 16], [15, 30], [30, 48], [47, 47], [48, 30]]])
    desc, valid = ext(img, kps)
    assert valid.tolist() == [[True, False, False, True, False]]
    assert int(desc[0, ~valid[0]].sum()) == 0
    box = BriefExtractor(BriefConfig(patch_size=32, smoothing="box"))  # + 4 px for the 9x9 box
    assert box.border == 20 and box(img, kps)[1].tolist() == [[False] * 5]


def test_descriptors_are_invariant_to_a_brightness_offset():
    img = _texture(96, 96, seed=2)
    ext = BriefExtractor(BriefConfig(patch_size=48))
    kps = torch.tensor([[[x, y] for x in range(30, 70, 7) for y in range(28, 70, 9)]])
    d0, v0 = ext(img.unsqueeze(0), kps)
    d1, v1 = ext((img + 31.0).unsqueeze(0), kps)
    assert v0.all() and torch.equal(v0, v1)
    assert torch.equal(d0, d1)
    # Not a test that cannot fail: a different image does change the bits.
    assert not torch.equal(d0, ext(_texture(96, 96, seed=3).unsqueeze(0), kps)[0])


def test_translation_gives_identical_descriptors_at_translated_keypoints():
    big = _texture(160, 176, seed=4, dtype=torch.float32)  # float32: the default path
    dx, dy = 11, 6
    a, b = big[:128, :128], big[dy : dy + 128, dx : dx + 128]
    cfg = BriefConfig(patch_size=32)
    # Keypoints far enough from every edge that the smoothing's border padding never reaches a test.
    margin = cfg.patch_size // 2 + cfg.kernel_size // 2 + max(dx, dy)
    kp = detect_keypoints(a.unsqueeze(0), 40, margin)
    assert int(kp.counts()[0]) >= 10
    ext = BriefExtractor(cfg)
    da, va = ext(a.unsqueeze(0), kp.xy, kp.valid)
    db, vb = ext(b.unsqueeze(0), kp.xy - torch.tensor([dx, dy]), kp.valid)
    assert torch.equal(va, kp.valid) and torch.equal(vb, kp.valid)
    assert torch.equal(da, db)
    # The detector is translation-equivariant too: every local maximum found in A is one of B's,
    # shifted (B keeps all its maxima: top-k and the relative threshold depend on the frame).
    kb = detect_keypoints(b.unsqueeze(0), 128 * 128, margin - max(dx, dy), threshold_rel=0.0)
    found = {tuple(p) for p in kb.xy[0][kb.valid[0]].tolist()}
    assert {(x - dx, y - dy) for x, y in kp.xy[0][kp.valid[0]].tolist()} <= found


def test_batched_descriptors_equal_per_image_descriptors():
    imgs = torch.stack([_texture(72, 72, seed=s, dtype=torch.float32) for s in range(3)])
    ext = BriefExtractor(BriefConfig(patch_size=24, pattern="GIII", bits=512))
    kp = detect_keypoints(imgs, 25, ext.border)
    d, v = ext(imgs, kp.xy, kp.valid)
    for i in range(3):
        di, vi = ext(imgs[i : i + 1], kp.xy[i : i + 1], kp.valid[i : i + 1])
        assert torch.equal(d[i : i + 1], di) and torch.equal(v[i : i + 1], vi)


# ------------------------------------------------------------------ detector


def _squares() -> torch.Tensor:
    img = torch.full((2, 64, 64), 40.0)
    img[0, 20:44, 16:40] = 200.0  # corners (16,20) (39,20) (16,43) (39,43)
    img[1, 10:30, 30:54] = 220.0  # corners (30,10) (53,10) (30,29) (53,29)
    return img


@pytest.mark.parametrize("method", ["harris", "fast"])
def test_detector_finds_the_corners_of_squares_in_a_batch(method):
    kp = detect_keypoints(_squares(), 4, border=4, method=method, nms_radius=3)
    truth = [[(16, 20), (39, 20), (16, 43), (39, 43)], [(30, 10), (53, 10), (30, 29), (53, 29)]]
    for i in range(2):
        got = kp.xy[i][kp.valid[i]].tolist()
        assert len(got) == 4
        for c in truth[i]:
            assert min(abs(x - c[0]) + abs(y - c[1]) for x, y in got) <= 3, (method, c, got)
    assert kp.score.shape == (2, 4) and bool((kp.score[:, :-1] >= kp.score[:, 1:]).all())  # sorted


def test_detector_drops_and_counts_corners_too_close_to_the_border():
    img = _squares()[:1]
    kp = detect_keypoints(img, 10, border=18, nms_radius=3)
    xy = kp.xy[0][kp.valid[0]]
    # (16, 20) and (16, 43) lie within 18 px of the left edge: dropped, and counted.
    assert len(xy) == 2 and bool((xy >= 18).all() & (xy < 64 - 18).all())
    assert int(kp.dropped_border[0]) == 2


def test_fast_response_is_zero_on_flat_images_and_harris_is_zero_too():
    flat = torch.full((1, 32, 32), 99.0)
    assert float(fast_response(flat).abs().max()) == 0.0 and float(harris_response(flat).abs().max()) == 0.0
    kp = detect_keypoints(flat, 5, border=2)
    assert not kp.valid.any()


# ------------------------------------------------------------------ Hamming distances and matching


def _random_desc(shape, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("nbytes,method", [(32, "swar"), (32, "lut"), (32, "matmul"), (64, "auto"), (3, "auto"), (3, "matmul")])
def test_hamming_distance_equals_a_direct_bit_count(nbytes, method):
    a, b = _random_desc((2, 37, nbytes), 1), _random_desc((2, 29, nbytes), 2)
    d = hamming_distance(a, b, method)
    x = a.numpy()[:, :, None, :] ^ b.numpy()[:, None, :, :]
    assert d.shape == (2, 37, 29) and d.dtype == torch.int32
    assert np.array_equal(d.numpy(), np.unpackbits(x, axis=-1).sum(-1))


def test_popcount64_handles_the_sign_bit():
    x = torch.tensor([0, -1, -(2**63), 2**63 - 1, 0x0F0F, -2], dtype=torch.int64)
    assert popcount64(x).tolist() == [0, 64, 1, 63, 8, 63]


def _brute_force(a, b, va, vb, ratio, cross):
    a, b = np.unpackbits(a.numpy(), axis=-1).astype(int), np.unpackbits(b.numpy(), axis=-1).astype(int)
    out = []
    for i in range(len(a)):
        if not va[i]:
            out.append(-1)
            continue
        d = [(int(np.sum(a[i] != b[j])), j) for j in range(len(b)) if vb[j]]
        if not d:
            out.append(-1)
            continue
        d.sort()
        (d1, j), rest = d[0], d[1:]
        if ratio is not None and rest and not d1 < ratio * rest[0][0]:
            j = -1
        if cross and j >= 0:
            back = min((int(np.sum(a[k] != b[j])), k) for k in range(len(a)) if va[k])[1]
            j = j if back == i else -1
        out.append(j)
    return out


@pytest.mark.parametrize("ratio,cross", [(None, False), (0.8, False), (None, True), (0.9, True)])
def test_matching_equals_brute_force(ratio, cross):
    g = torch.Generator().manual_seed(3)
    b = _random_desc((40, 16), 4)
    # Queries: noisy copies of some of b (a few bits flipped) plus unrelated descriptors, so that
    # the ratio test and the cross-check both accept and reject some.
    idx = torch.randint(0, 40, (25,), generator=g)
    flips = pack_bits(torch.rand(25, 128, generator=g) < torch.linspace(0.02, 0.45, 25).unsqueeze(1))
    a = torch.cat([b[idx] ^ flips, _random_desc((10, 16), 5)])
    va = torch.rand(35, generator=g) > 0.1
    vb = torch.rand(40, generator=g) > 0.1
    m = match_descriptors(a, b, va, vb, ratio=ratio, cross_check=cross)
    expect = _brute_force(a, b, va.tolist(), vb.tolist(), ratio, cross)
    assert m.index.tolist() == expect
    n = int(m.matched.sum())
    assert 0 < n < 35  # both outcomes occur, so the comparison means something
    # Batched matching gives the same answer per pair.
    mb = match_descriptors(a.unsqueeze(0).repeat(2, 1, 1), b.unsqueeze(0).repeat(2, 1, 1), va.expand(2, -1), vb.expand(2, -1), ratio=ratio, cross_check=cross)
    assert mb.index.tolist() == [expect, expect]


# ------------------------------------------------------------------ bag of binary words


def test_k_majority_recovers_planted_words_and_is_deterministic():
    g = torch.Generator().manual_seed(6)
    centres = _random_desc((4, 32), 7)
    members = centres.repeat_interleave(60, 0)
    noise = pack_bits(torch.rand(240, 256, generator=g) < 0.1)  # 10 % of bits flipped per member
    desc = members ^ noise
    words = k_majority(desc, 4, seed=0)
    assert torch.equal(words, k_majority(desc, 4, seed=0))
    d = hamming_distance(centres, words)
    # Each planted centre is exactly one learnt word: the bitwise majority cancels the noise.
    assert d.min(1).values.tolist() == [0, 0, 0, 0]
    assert len(set(d.argmin(1).tolist())) == 4


def test_bow_histograms_are_normalised_and_empty_images_are_zero():
    codebook = _random_desc((8, 32), 8)
    desc = torch.cat([codebook[[0, 0, 3, 5]].unsqueeze(0), codebook[[1, 2, 3, 4]].unsqueeze(0)])
    valid = torch.tensor([[True, True, True, False], [False] * 4])
    h = bow_histograms(desc, valid, codebook)
    assert h.shape == (2, 8)
    assert h[0].tolist() == pytest.approx([2 / 3, 0, 0, 1 / 3, 0, 0, 0, 0])
    assert h[1].abs().sum().item() == 0.0


def test_bag_of_binary_words_embeds_a_batch_of_uint8_images():
    imgs = torch.stack([_texture(64, 64, seed=s) for s in range(4)]).round().to(torch.uint8)
    rgb = imgs.unsqueeze(1).repeat(1, 3, 1, 1)
    cfg = BriefConfig(patch_size=24, bits=256)
    ext = BriefExtractor(cfg)
    kp = detect_keypoints(imgs.float(), 16, ext.border)
    d, v = ext(imgs.float(), kp.xy, kp.valid)
    codebook = k_majority(d[v], 12, seed=0)
    model = BagOfBinaryWords(cfg, codebook, keypoints=16).eval()
    z = model(rgb)
    assert z.shape == (4, 12) and torch.allclose(z.sum(1), torch.ones(4))
    assert torch.allclose(z, bow_histograms(d, v, codebook))


# ------------------------------------------------------------------ devices


def test_smoothing_kernel_is_the_normalised_gaussian():
    k = gaussian_kernel1d(2.0, 9, torch.float64)
    x = torch.arange(-4, 5, dtype=torch.float64)
    ref = torch.exp(-(x**2) / 8)
    assert torch.allclose(k, ref / ref.sum()) and k.sum().item() == pytest.approx(1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_gives_the_same_keypoints_descriptors_and_matches_as_cpu():
    imgs = torch.stack([_texture(96, 96, seed=s, dtype=torch.float32) for s in range(3)])
    ext = BriefExtractor(BriefConfig(patch_size=32))
    kp = detect_keypoints(imgs, 30, ext.border)
    kg = detect_keypoints(imgs.cuda(), 30, ext.border)
    assert torch.equal(kp.xy, kg.xy.cpu()) and torch.equal(kp.valid, kg.valid.cpu())
    d, v = ext(imgs, kp.xy, kp.valid)
    dg, vg = ext(imgs.cuda(), kg.xy, kg.valid)
    assert torch.equal(v, vg.cpu())
    # Float sums may differ in the last ulp between devices; a tie flip is the only allowed change.
    assert (unpack_bits(d) != unpack_bits(dg.cpu())).float().mean().item() < 1e-3
    m, mg = match_descriptors(d[0], d[1]), match_descriptors(dg[0], dg[1])
    assert torch.equal(hamming_distance(d[0], d[1]), hamming_distance(d[0].cuda(), d[1].cuda()).cpu())
    assert (m.index == mg.index.cpu()).float().mean().item() > 0.95


def test_binary_tests_on_any_dtype_and_shapes_without_keypoints():
    sm = _texture(40, 40, dtype=torch.float32).unsqueeze(0)
    pattern = sampling_pattern("GII", 64, 16)
    desc, valid = binary_tests(sm, torch.zeros(1, 0, 2, dtype=torch.long), pattern)
    assert desc.shape == (1, 0, 8) and valid.shape == (1, 0)
