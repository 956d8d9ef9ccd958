"""VisualBERT components: tokenizer, region features, embeddings, masking, negatives, loss, probe."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from components.data.decode import decode_image
from components.data.regions import decode_captions, decoded_boxes, encode_captions
from components.data.scenes import scene_rows
from components.data.views import ViewRecipe, ViewSpec, views_from_encoded
from components.errors import ReprflowError
from components.evaluation.vl import WORD_TYPES, hard_negative, itm_pairs, retrieval_recall
from components.losses.vl import visualbert_loss
from components.methods.visualbert import itm_negatives
from components.models.visualbert import VisualBert, VisualBertEmbeddings, grid_boxes, region_features, sample_regions
from components.tokenizers.text import SPECIAL_TOKENS, TextTokenizer, fit_wordpiece, mask_tokens


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return [r["captions"][0] for r in scene_rows(0, "train", 300, 32)]


@pytest.fixture(scope="module")
def tokenizer(captions, tmp_path_factory) -> TextTokenizer:
    out = tmp_path_factory.mktemp("tok")
    fit_wordpiece(captions, {"vocab_size": 300}, out)
    return TextTokenizer(out / "tokenizer.json", max_length=32)


# ------------------------------------------------------------------ tokenizer


def test_wordpiece_fit_is_deterministic_and_round_trips(captions, tmp_path):
    # tokenizers' own trainer gives different vocabularies run to run (huggingface/tokenizers#1794);
    # several fits in one process would catch a regression of the workaround.
    files = []
    for i, texts in enumerate([captions, captions, captions[::-1], captions]):
        fit_wordpiece(texts, {"vocab_size": 300}, tmp_path / str(i))
        files.append((tmp_path / str(i) / "tokenizer.json").read_bytes())
    assert all(f == files[0] for f in files)
    tok = TextTokenizer(tmp_path / "0" / "tokenizer.json", max_length=40)
    assert tok.special_ids == tuple(range(len(SPECIAL_TOKENS)))
    ids, mask = tok(captions)
    assert ids.shape == mask.shape == (len(captions), 40)
    assert (ids[:, 0] == tok.cls_id).all()
    lengths = mask.sum(1)
    assert (ids[torch.arange(len(ids)), lengths - 1] == tok.sep_id).all()
    assert (ids[~mask] == tok.pad_id).all()
    assert [tok.decode(row) for row in ids] == [c.lower() for c in captions]
    # Unseen words fall back to pieces (or [UNK]) but never crash; scene words are whole pieces.
    assert all(tok.word_id(w) is not None for w in ("red", "circle", "left"))
    assert tok.word_id("zebra") is None


def test_wordpiece_rejects_empty_corpus(tmp_path):
    with pytest.raises(ReprflowError, match="no captions"):
        fit_wordpiece(["", "  "], {}, tmp_path)
    with pytest.raises(ReprflowError, match="vocab"):
        fit_wordpiece(["a b"], {"vocab_sise": 10}, tmp_path)


# ------------------------------------------------------------------ regions


def test_roi_align_region_features_equal_crop_and_pool():
    torch.manual_seed(0)
    fmap = torch.randn(2, 5, 8, 8, dtype=torch.float64)  # an 8x8 map of a 32-px image: 4 px per cell
    # Boxes on cell boundaries (pixels / 32), each an even number of cells wide and high.
    boxes = torch.tensor([[[8, 4, 24, 20], [0, 0, 32, 32], [4, 16, 12, 32]],
                          [[0, 0, 16, 16], [16, 16, 32, 24], [8, 8, 24, 24]]], dtype=torch.float64) / 32
    got = region_features(fmap, boxes, image_size=32, output_size=2)
    assert got.shape == (2, 3, 5 * 2 * 2)
    for n in range(2):
        for r in range(3):
            x0, y0, x1, y1 = (boxes[n, r] * 8).round().long().tolist()
            crop = fmap[n, :, y0:y1, x0:x1]  # crop, then average-pool into 2x2 bins
            want = F.adaptive_avg_pool2d(crop, 2).reshape(-1)
            torch.testing.assert_close(got[n, r], want)
    pooled = region_features(fmap, boxes, image_size=32, output_size=1)
    torch.testing.assert_close(pooled[0, 1], fmap[0].mean(dim=(1, 2)))  # the whole image: global average


def test_sample_regions_whole_image_first_and_grid_fallback():
    boxes = torch.tensor([[[0.1, 0.2, 0.5, 0.6], [-1, -1, -1, -1]], [[-1, -1, -1, -1], [-1, -1, -1, -1]]])
    regions, mask = sample_regions(boxes, grid=2)
    assert regions.shape == (2, 5, 4) and mask.shape == (2, 5)
    assert torch.equal(regions[:, 0], torch.tensor([[0.0, 0, 1, 1]] * 2))
    assert mask[0].tolist() == [True, True, False, False, False]
    torch.testing.assert_close(regions[0, 1], boxes[0, 0])
    assert mask[1].all()  # no boxes: whole image + a 2x2 grid
    torch.testing.assert_close(regions[1, 1:], grid_boxes(2))
    assert torch.equal(grid_boxes(2)[3], torch.tensor([0.5, 0.5, 1.0, 1.0]))


def test_boxes_follow_decode_resize_and_crop():
    # A 100x50 image with a red rectangle; decoding to 32 px resizes to 64x32 and crops x 16..48.
    img = np.zeros((50, 100, 3), np.uint8)
    img[10:40, 60:90] = (255, 0, 0)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    decoded, _ = decode_image(buf.getvalue(), 32)
    box = decoded_boxes([[60, 10, 90, 40]], 100, 50, 32)[0] * 32  # right edge clipped by the crop
    np.testing.assert_allclose(box, [60 * 0.64 - 16, 10 * 0.64, 32, 40 * 0.64], atol=1e-4)
    x0, y0, x1, y1 = int(math.ceil(box[0])) + 1, int(math.ceil(box[1])) + 1, int(box[2]) - 1, int(box[3]) - 1
    assert (decoded[y0:y1, x0:x1, 0] > 200).all() and (decoded[y0:y1, x0:x1, 2] < 50).all()
    assert decoded_boxes([[0, 0, 10, 50]], 100, 50, 32).shape == (0, 4)  # cropped away entirely


def test_caption_bytes_round_trip_and_data_path_columns():
    caps = ["a red circle", "ünïcödé " * 10, ""]
    codes = encode_captions(caps, 32)
    back = decode_captions(codes)
    assert back[0] == caps[0] and back[2] == ""
    assert caps[1].startswith(back[1]) and len(back[1].encode()) <= 32  # cut at a character boundary
    rows = list(scene_rows(0, "val", 6, 32))
    rows[2]["image"] = b"not an image"
    batch = {k: [r[k] for r in rows] for k in ("id", "image", "captions", "boxes")}
    recipe = ViewRecipe(views=(ViewSpec(size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0, jitter_p=0, gray_p=0, blur_p=0),), caption_bytes=200, max_boxes=2)
    assert recipe.columns == ["id", "image", "captions", "boxes"]
    out = views_from_encoded(batch, recipe, 32)
    assert out["view_0"].shape == (5, 3, 32, 32) and out["caption"].shape == (5, 200) and out["boxes"].shape == (5, 2, 4)
    kept = [r for i, r in enumerate(rows) if i != 2]  # the bad row is dropped from every column alike
    assert decode_captions(out["caption"]) == [r["captions"][0] for r in kept]
    for got, r in zip(out["boxes"], kept):
        want = np.asarray(r["boxes"], np.float32)[:2] / 32
        np.testing.assert_allclose(got[: len(want)], want, atol=1e-6)
        assert (got[len(want):] == -1).all()
    assert np.array_equal(out["view_0"][0].transpose(1, 2, 0), decode_image(rows[0]["image"], 32)[0])  # the whole image, untouched


# ------------------------------------------------------------------ embeddings and model


def test_embedding_assembly_shapes_and_segment_ids():
    emb = VisualBertEmbeddings(vocab_size=50, hidden=16, max_text_len=12, visual_dim=7, dropout=0.0)
    ids = torch.randint(0, 50, (3, 9))
    feats, boxes = torch.randn(3, 4, 7), torch.rand(3, 4, 4)
    x, seg = emb(ids, feats, boxes)
    assert x.shape == (3, 13, 16)
    assert seg.tolist() == [[0] * 9 + [1] * 4] * 3
    # Text tokens: word + position + segment 0; regions: projection + box + segment 1 (before the norm).
    with torch.no_grad():
        emb.norm.weight.fill_(1.0), emb.norm.bias.zero_()
        raw_text = emb.word(ids) + emb.position(torch.arange(9))[None] + emb.segment.weight[0]
        torch.testing.assert_close(x[:, :9], F.layer_norm(raw_text, (16,)))


def test_padded_regions_and_tokens_do_not_change_the_others():
    torch.manual_seed(0)
    model = VisualBert(vocab_size=40, visual_dim=6, hidden=16, depth=2, heads=2, max_text_len=10, dropout=0.0).eval()
    ids = torch.randint(5, 40, (2, 8))
    tmask = torch.ones(2, 8, dtype=torch.bool)
    tmask[1, 6:] = False
    feats, boxes = torch.randn(2, 3, 6), torch.rand(2, 3, 4)
    rmask = torch.tensor([[True, True, False], [True, False, False]])
    h = model(ids, tmask, feats, boxes, rmask)
    feats2, ids2 = feats.clone(), ids.clone()
    feats2[~rmask] = 100.0
    ids2[1, 6:] = 0
    h2 = model(ids2, tmask, feats2, boxes, rmask)
    keep = torch.cat([tmask, rmask], dim=1)
    torch.testing.assert_close(h[keep], h2[keep])
    assert model.mlm_logits(h[:, :8]).shape == (2, 8, 40) and model.itm_logits(h).shape == (2, 2)


# ------------------------------------------------------------------ pretraining inputs and loss


def test_mlm_masking_never_masks_special_tokens():
    g = torch.Generator().manual_seed(0)
    special = (0, 1, 2, 3, 4)
    ids = torch.randint(5, 60, (400, 30), generator=g)
    ids[:, 0], ids[:, 20] = 2, 3
    ids[:, 21:] = 0
    protect = torch.zeros_like(ids, dtype=torch.bool)
    protect[:, 5] = True
    masked, labels = mask_tokens(ids, special, mask_id=4, vocab_size=60, prob=0.15, protect=protect, generator=g)
    chosen = labels != -100
    is_special = torch.isin(ids, torch.tensor(special))
    assert not (chosen & (is_special | protect)).any()
    assert torch.equal(masked[is_special | protect], ids[is_special | protect])
    assert torch.equal(labels[chosen], ids[chosen])
    normal = ~is_special & ~protect
    assert abs(chosen[normal].float().mean().item() - 0.15) < 0.01
    as_mask = (masked == 4) & chosen
    replaced = (masked != ids) & chosen & ~as_mask
    assert abs(as_mask.sum().item() / chosen.sum().item() - 0.8) < 0.03
    assert abs(replaced.sum().item() / chosen.sum().item() - 0.1) < 0.03  # (a few random picks equal the original)
    assert not torch.isin(masked[replaced], torch.tensor(special)).any()


def test_itm_negatives_never_equal_the_positive():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 30, (64, 10), generator=g)
    ids[10:20] = ids[10]  # ten identical captions: none may serve as another's negative
    mask = torch.ones_like(ids, dtype=torch.bool)
    groups = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
    for hard_p in (0.0, 0.5, 1.0):
        new, new_mask, labels, changed = itm_negatives(ids, mask, negative_p=0.7, hard_p=hard_p, groups=groups, generator=g)
        neg = labels == 0
        assert neg.float().mean() > 0.4
        assert (new[neg] != ids[neg]).any(dim=1).all()
        assert torch.equal(new[~neg], ids[~neg])
        hard = changed.any(dim=1)
        if hard_p == 0.0:
            assert not hard.any()
        else:
            assert hard.any()
            assert ((new != ids) == changed)[hard].all()  # exactly the substituted token differs
            for i, p in changed.nonzero().tolist():
                assert any(ids[i, p] in grp and new[i, p] in grp for grp in groups)
    same = ids[10:20]
    _, _, labels, _ = itm_negatives(same, torch.ones_like(same, dtype=torch.bool), negative_p=1.0)
    assert (labels == 1).all()  # no different caption exists: stays matched


def test_visualbert_loss_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    mlm_logits = torch.randn(6, 11, generator=g, dtype=torch.float64)
    mlm_labels = torch.tensor([3, -100, 0, 10, -100, 7])
    itm_logits = torch.randn(4, 2, generator=g, dtype=torch.float64)
    itm_labels = torch.tensor([1, 0, 0, 1])
    out = visualbert_loss(mlm_logits, mlm_labels, itm_logits, itm_labels)
    sel = [0, 2, 3, 5]
    mlm = -sum(math.log(math.exp(mlm_logits[i, mlm_labels[i]].item()) / mlm_logits[i].exp().sum().item()) for i in sel) / 4
    itm = -sum(math.log(math.exp(itm_logits[i, itm_labels[i]].item()) / itm_logits[i].exp().sum().item()) for i in range(4)) / 4
    assert out["mlm_loss"].item() == pytest.approx(mlm, rel=1e-6)
    assert out["itm_loss"].item() == pytest.approx(itm, rel=1e-6)
    assert out["loss"].item() == pytest.approx(mlm + itm, rel=1e-6)
    none = visualbert_loss(mlm_logits, torch.full((6,), -100), itm_logits, itm_labels)
    assert none["mlm_loss"].item() == 0.0 and none["loss"].item() == pytest.approx(itm, rel=1e-6)


# ------------------------------------------------------------------ evaluation helpers


def test_hard_negatives_change_exactly_one_colour_or_shape_word(captions):
    rng = np.random.default_rng(0)
    kinds = set(WORD_TYPES["colour"]) | set(WORD_TYPES["shape"])
    for cap in captions[:100]:
        neg = hard_negative(cap, rng)
        a, b = cap.split(" "), neg.split(" ")
        diff = [(x, y) for x, y in zip(a, b) if x != y]
        assert len(a) == len(b) and len(diff) == 1 and diff[0][0] in kinds
        (x, y), = diff
        assert (x in WORD_TYPES["colour"]) == (y in WORD_TYPES["colour"])
    assert hard_negative("a photo of nothing", rng) is None
    pairs = itm_pairs(captions[:50], rng)
    negatives = [p for p in pairs if p[2] == 0]
    assert sum(p[3] == "hard" for p in negatives) / len(negatives) == 0.5
    assert all(p[1] != captions[p[0]] for p in negatives)


def test_retrieval_recall_on_a_hand_made_score_matrix():
    scores = torch.tensor([[9.0, 1, 2, 3], [5, 1, 8, 0], [0, 0, 9, 1], [1, 2, 3, 4]])  # rows: images, columns: captions
    # image->text top-1: 0 -> 0, 1 -> 2 (miss), 2 -> 2, 3 -> 3; text->image top-1: 0 -> 0, 1 -> 3 (miss), 2 -> 2, 3 -> 3.
    out = retrieval_recall(scores, ["a", "b", "c", "d"], ks=(1, 5))
    assert out["i2t_r1"] == 75.0 and out["t2i_r1"] == 75.0
    assert out["i2t_r5"] == 100.0 and out["t2i_r5"] == 100.0
    assert out["chance_r1"] == 25.0 and out["retrieval_pairs"] == 4
    dup = retrieval_recall(scores, ["a", "b", "b", "d"], ks=(1,))  # image 1's top caption 2 has the same text
    assert dup["i2t_r1"] == 100.0
