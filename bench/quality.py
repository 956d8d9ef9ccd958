"""Quality benchmark: our methods vs the same methods from the ``lightly`` library.

Both sides train on the same scenes shards (written and read back through
``components.data``), with the same views (our batched recipe of the method), backbone
(``components.models.backbones``), initialisation seed, optimisation recipe, budget and plain
PyTorch loop (``components.training.TrainStep``); only the method (heads, loss, memory bank)
differs. Each trained encoder is judged by weighted kNN top-1 on the val split, beside a
random-init encoder as is ("floor") and with BatchNorm statistics estimated on the train images
("floor+BN": same weights; a trained encoder's BN statistics alone lift kNN by ~11 points here); each
trained encoder is also judged with BN statistics re-estimated the same way (``bn_stats`` in the JSON).
Prints a table and JSON (also written with ``--out``).

    python bench/quality.py --pipeline pipelines/contrastive.yaml --test      # a pipeline's methods, data, budget
    python bench/quality.py --pipeline pipelines/contrastive.yaml --methods scl --sides ours --log-every 2 --curve   # val kNN every 2 epochs
    python bench/quality.py --pipeline pipelines/distillation.yaml --epochs 5 --sides both
    python bench/quality.py --pipeline pipelines/contrastive.yaml --methods nnclr --set methods.1.settings.temperature=0.2
    python bench/quality.py --methods simclr,nnclr,meanshift,scl --epochs 10   # the built-in small settings
    python bench/quality.py --pipeline pipelines/contrastive.yaml --methods simclr --supervised   # + the same backbone trained with labels
    python bench/quality.py --quick                                             # smoke test, a few minutes

lightly's side is bench/lightly_methods.py. lightly 1.6 has SimCLR, NNCLR, BYOL and DINO, MoCo v3's
heads but not its loss (written out beside them), and not MSF or SCL: those rows say so. Without ``pip install lightly`` (the ``bench`` extra) the lightly column says how to get it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from components.data import shards as sh  # noqa: E402
from components.data.decode import decode_batch  # noqa: E402
from components.data.scenes import scene_rows  # noqa: E402
from components.data.views import ViewRecipe, ViewSpec, make_views  # noqa: E402
from components.evaluation.knn import knn_top1  # noqa: E402
from components.methods.base import Method  # noqa: E402
from components.methods.registry import build_method, method_class, method_config  # noqa: E402
from components.models.backbones import build_backbone  # noqa: E402
from components.models.embedding import EmbeddingModel, estimate_bn_stats  # noqa: E402
from components.training import TrainStep, prepare_batch  # noqa: E402
from lightly_methods import LIGHTLY, lightly_version  # noqa: E402  (bench/, beside this file)

# CPU-sized heads and banks, the same for both sides; the papers' optimisers (LARS/SGD).
SETTINGS = {
    "simclr": {"proj_hidden_dim": 512, "proj_dim": 128, "temperature": 0.2, "optim": {"lr": 0.6, "warmup_epochs": 1}},
    "nnclr": {"proj_hidden_dim": 512, "proj_dim": 128, "pred_hidden_dim": 512, "support_set_size": 4096, "temperature": 0.1, "optim": {"lr": 0.6, "warmup_epochs": 1}},
    "meanshift": {"proj_hidden_dim": 512, "proj_dim": 128, "pred_hidden_dim": 512, "bank_size": 4096, "optim": {"lr": 0.5}},
    "scl": {"proj_hidden_dim": 512, "proj_dim": 256, "mu": 1.0, "optim": {"lr": 0.5}},
    # Self-distillation family (ResNet-18 like the rest; short runs: lower base momenta than the
    # papers' 0.996, MoCo v3 at its ViT temperature 0.2, which learns faster than its ResNet 1.0).
    "byol": {"proj_hidden_dim": 512, "proj_dim": 128, "pred_hidden_dim": 512, "momentum": 0.99, "optim": {"lr": 1.0, "warmup_epochs": 1}},
    "mocov3": {"proj_hidden_dim": 512, "proj_dim": 128, "pred_hidden_dim": 512, "temperature": 0.2, "optim": {"lr": 0.6, "warmup_epochs": 1}},
    "dino": {"hidden_dim": 512, "bottleneck_dim": 128, "out_dim": 4096, "n_local": 4, "momentum": 0.99, "warmup_teacher_temp_epochs": 2,
             "optim": {"lr": 0.005, "warmup_epochs": 1}},
}
QUICK_HEADS = {"proj_hidden_dim": 64, "proj_dim": 32, "pred_hidden_dim": 64, "support_set_size": 256, "bank_size": 256,
               "hidden_dim": 64, "bottleneck_dim": 32, "out_dim": 256}


# ---------------------------------------------------------------- data, training, evaluation


def scenes_images(root: Path, train: int, val: int, size: int, decode_size: int, seed: int = 0, test: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Write the scenes splits as shards under ``root`` (once), read them back, decode them."""
    out = {}
    for split, count in (("train", train), ("val", val), ("test", test)):
        if not count:
            continue
        uri = str(root / f"scenes-{size}-{count}-seed{seed}" / split)
        if not Path(uri).is_dir():
            sh.write_shards(scene_rows(seed, split, count, size), uri)
        rows = list(sh.read_rows(uri, columns=["id", "image", "label", "captions"]))
        imgs, keep, _ = decode_batch([r["image"] for r in rows], [r["id"] for r in rows], decode_size)
        labels = torch.tensor([r["label"] for r, k in zip(rows, keep) if k])
        out[split] = (torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), labels)
        out.setdefault("attributes", {})[split] = scene_attributes([r["captions"][0] for r, k in zip(rows, keep) if k])
    return out


def scene_attributes(captions: list[str]) -> dict[str, torch.Tensor]:
    """What else a scene's caption says besides its class, as integer labels per image: the class
    shape's colour and position (3x3 grid), the background colour and whether there is a
    distractor. kNN on these tells which cue a representation tracks (``--attributes``)."""
    from components.data.scenes import BACKGROUNDS, COLOURS

    cols, bgs = list(COLOURS), list(BACKGROUNDS)
    found: dict[str, list[int]] = {"colour": [], "position": [], "background": [], "distractor": []}
    positions: dict[str, int] = {}
    for text in captions:
        main, *rest = text.split(" and ")
        words = main.split()  # "a large <colour> <shape> <position words...>" (+ " on a <bg> background")
        where = " ".join(words[4:]).split(" on a ")[0]
        found["colour"].append(cols.index(words[2]))
        found["position"].append(positions.setdefault(where, len(positions)))
        found["background"].append(bgs.index(text.rsplit(" on a ", 1)[1].split()[0]))
        found["distractor"].append(int(bool(rest)))
    return {k: torch.tensor(v) for k, v in found.items()}


def train(method: Method, images: torch.Tensor, epochs: int, batch_size: int, seed: int, log_every: int = 0,
          probe=None) -> tuple[float, float, list]:
    """Train in a plain loop; returns (first-epoch loss, last-epoch loss, learning curve).

    ``probe(epoch)``, when given, is called after every ``log_every``-th epoch and returns a
    dict of figures (e.g. val kNN) that goes into the curve and the progress line.
    """
    steps = len(images) // batch_size
    step = TrainStep(method, batch_size, steps, epochs)
    g = torch.Generator().manual_seed(seed)  # same batches and views for both sides
    method.train()
    losses, curve = [], []
    for epoch in range(epochs):
        perm, totals, t0 = torch.randperm(len(images), generator=g), {}, time.monotonic()
        for i in range(steps):
            views = make_views(images[perm[i * batch_size : (i + 1) * batch_size]], method.views, g)
            for k, v in step(prepare_batch(views), epoch * steps + i).items():
                totals[k] = totals.get(k, 0.0) + float(v)
        losses.append(totals["loss"] / steps)
        if log_every and ((epoch + 1) % log_every == 0 or epoch + 1 == epochs):
            point = {"epoch": epoch + 1, "loss": losses[-1], "seconds": time.monotonic() - t0}
            # The method's own training metrics (e.g. DINO's teacher entropy), epoch means.
            point.update({f"train_{k}": v / steps for k, v in totals.items() if k not in ("loss", "lr")})
            if probe is not None:
                point.update(probe(epoch + 1))
                method.train()
            curve.append(point)
            extra = "".join(f", {k} {v:.3g}" if k.startswith("train_") else f", {k} {v:.1f}"
                            for k, v in point.items() if k not in ("epoch", "loss", "seconds"))
            print(f"  epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f} ({point['seconds']:.1f} s){extra}", flush=True)
    return losses[0], losses[-1], curve


@torch.no_grad()
def embed(encoder: torch.nn.Module, image_size: int, images: torch.Tensor) -> torch.Tensor:
    """The representation of ``images`` (eval mode, batches of 256)."""
    encoder.eval()
    model = EmbeddingModel(encoder, image_size).eval()
    return torch.cat([model(x) for x in images.split(256)])


def effective_rank(feats: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) of the centred embeddings (Roy & Vetterli
    2007): how many directions the representation really uses; a collapsing method loses them."""
    feats = feats.double()
    s = torch.linalg.svdvals(feats - feats.mean(0))
    p = s / s.sum()
    return float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))


def judge(encoder: torch.nn.Module, image_size: int, data: dict, k: int, splits: tuple[str, ...], rank: bool = False,
          attributes: bool = False) -> dict:
    """Weighted kNN top-1 (%) of each of ``splits`` against the train split (embedded once),
    keyed ``knn_top1`` for val and ``<split>_knn_top1`` otherwise; with ``rank``, also the val
    embeddings' effective rank, and with ``attributes`` also val kNN of each of
    :func:`scene_attributes` (``val_colour``, ...)."""
    train_feats, train_labels = embed(encoder, image_size, data["train"][0]), data["train"][1]
    out = {}
    for split in splits:
        feats = embed(encoder, image_size, data[split][0])
        key = "knn_top1" if split == "val" else f"{split}_knn_top1"
        out[key] = knn_top1(train_feats, train_labels, feats, data[split][1], num_classes=int(train_labels.max()) + 1, k=k)
        if rank and split == "val":
            out["val_rank"] = effective_rank(feats)
            for name, labels in (data["attributes"]["val"].items() if attributes else ()):
                train_attr = data["attributes"]["train"][name]
                out[f"val_{name}"] = knn_top1(train_feats, train_attr, feats, labels, num_classes=int(train_attr.max()) + 1, k=k)
    return out


def scores(encoder: torch.nn.Module, image_size: int, data: dict, k: int) -> dict:
    """kNN top-1 on val (and on test when the data has it)."""
    return judge(encoder, image_size, data, k, ("val", "test") if "test" in data else ("val",))


def run_one(name: str, settings: dict, data: dict, args, side: str, epochs: int, batch_size: int) -> dict:
    """Train and judge one side ('ours' or 'lightly') of one method."""
    cfg = method_config(name, settings)
    torch.manual_seed(args.seed)  # identical backbone initialisation on both sides
    ours = build_method(name, cfg)
    method = ours
    if side == "lightly":
        method = LIGHTLY[name](cfg, ours.views)
        method.encoder.load_state_dict(ours.encoder.state_dict())

    def probe(_epoch: int) -> dict:
        point = judge(method.encoder, cfg.image_size, data, args.knn_k, ("val",), rank=True, attributes=args.attributes)
        return {"val_knn": point.pop("knn_top1"), **point}

    t0 = time.monotonic()
    first, last, curve = train(method, data["train"][0], epochs, batch_size, args.seed, log_every=args.log_every, probe=probe if args.curve else None)
    seconds = time.monotonic() - t0
    result = {**scores(method.encoder, cfg.image_size, data, args.knn_k), "loss_first": first, "loss_last": last, "seconds": seconds, "curve": curve}
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in method.encoder.modules()):
        # The trained weights with BN statistics of the clean train images (as the "floor+BN"
        # row gets), instead of the running statistics of the augmented training views.
        encoder = copy.deepcopy(method.encoder)
        estimate_bn_stats(EmbeddingModel(encoder, cfg.image_size), data["train"][0])
        result["bn_stats"] = scores(encoder, cfg.image_size, data, args.knn_k)
    return result


def floor_knn(name: str, settings: dict, data: dict, args) -> tuple[str, dict]:
    """The random-init encoder of a method's backbone (same seed), judged like a trained one;
    under ``"bn_stats"`` the same encoder with BatchNorm statistics estimated on the train images
    (:func:`~components.models.embedding.estimate_bn_stats`: no weight changes) - the floor that
    says what a method's weights learnt, not what its BN statistics did."""
    cfg = method_config(name, settings)
    torch.manual_seed(args.seed)
    splits = ("val", "test") if "test" in data else ("val",)
    encoder = build_backbone(cfg.backbone)
    floor = judge(encoder, cfg.image_size, data, args.knn_k, splits, rank=args.attributes, attributes=args.attributes)
    estimate_bn_stats(EmbeddingModel(encoder, cfg.image_size), data["train"][0])
    floor["bn_stats"] = judge(encoder, cfg.image_size, data, args.knn_k, splits, rank=args.attributes, attributes=args.attributes)
    return cfg.backbone.name, floor


def supervised_ceiling(name: str, settings: dict, data: dict, args, epochs: int, batch_size: int) -> dict:
    """The same backbone trained *with labels* (cross-entropy through a linear head; crops of the
    method's view size and scale + flips, no colour changes; SGD 0.05 one-cycle), judged like the
    self-supervised encoders: how much of the label the views let a backbone see at this budget."""
    import torch.nn.functional as F

    cfg = method_config(name, settings)
    torch.manual_seed(args.seed)
    encoder = build_backbone(cfg.backbone)
    head = torch.nn.Linear(encoder.feature_dim, int(data["train"][1].max()) + 1)
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    images, labels = data["train"]
    steps = len(images) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.05, total_steps=epochs * steps)
    scale = tuple(getattr(cfg, "crop_scale", None) or getattr(cfg, "global_scale", (0.6, 1.0)))
    recipe = ViewRecipe(views=(ViewSpec(size=cfg.image_size, scale=scale, jitter_p=0.0, gray_p=0.0, blur_p=0.0),))
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.monotonic()
    for epoch in range(epochs):
        encoder.train()
        perm = torch.randperm(len(images), generator=g)
        for i in range(steps):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            x = prepare_batch(make_views(images[idx], recipe, g))["view_0"]
            loss = F.cross_entropy(head(encoder(x)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"  supervised epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}", flush=True)
    return {**scores(encoder, cfg.image_size, data, args.knn_k), "seconds": time.monotonic() - t0}


def plan(args) -> tuple[list[tuple[str, dict, int, int]], dict]:
    """(name, settings, epochs, batch size) per method, and the data spec, from the flags or a pipeline file."""
    names = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else []
    if args.pipeline:
        from pipelines.config import load_config  # validates the file and the --set overrides

        cfg = load_config(args.pipeline, args.set)
        ds = cfg.datasets[cfg.train.dataset]
        if ds.kind != "scenes":
            raise SystemExit(f"quality.py: {args.pipeline} trains on '{ds.kind}' data; only scenes pipelines are supported")
        specs = [s for s in cfg.methods if not names or s.name in names]
        rows = []
        for s in specs:
            t = cfg.method_train(s)
            rows.append((s.name, dict(s.settings), args.epochs or t.epochs, args.batch_size or t.batch_size))
        data = {"train": args.train_images or ds.train, "val": args.val_images or ds.val, "test": ds.test if args.test else 0,
                "size": ds.image_size, "decode": cfg.train.decode_size, "seed": ds.seed}
        return rows, data
    names = names or ["simclr", "nnclr", "meanshift", "scl"]
    unknown = [m for m in names if m not in SETTINGS]
    if unknown:
        raise SystemExit(f"quality.py: no benchmark settings for {', '.join(unknown)} (known: {', '.join(SETTINGS)}); or use --pipeline")
    rows = []
    for name in names:
        settings = {**SETTINGS[name], "image_size": args.image_size}
        if args.quick:
            settings.update({k: v for k, v in QUICK_HEADS.items() if k in method_class(name).Config.model_fields})
        rows.append((name, settings, args.epochs or 10, args.batch_size or 128))
    data = {"train": args.train_images or 2000, "val": args.val_images or 500, "test": 0, "size": 64,
            "decode": max(args.image_size, 32), "seed": 0}
    return rows, data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default=None, help="take methods, settings, data and budget from this pipeline file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="with --pipeline: override a field, e.g. methods.1.settings.temperature=0.2")
    ap.add_argument("--methods", default=None, help="comma-separated registry names (with --pipeline: a subset of its methods)")
    ap.add_argument("--sides", default="both", choices=["both", "ours", "lightly"], help="which implementations to train")
    ap.add_argument("--epochs", type=int, default=None, help="default: the pipeline's, else 10")
    ap.add_argument("--train-images", type=int, default=None)
    ap.add_argument("--val-images", type=int, default=None)
    ap.add_argument("--test", action="store_true", help="with --pipeline: also report kNN on the test split")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=32, help="without --pipeline: side of the training views")
    ap.add_argument("--knn-k", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    ap.add_argument("--log-every", type=int, default=0, help="print the mean loss every N epochs (and the last)")
    ap.add_argument("--curve", action="store_true", help="with --log-every: also judge val kNN and the embeddings' effective rank at those epochs (a learning curve in the JSON)")
    ap.add_argument("--attributes", action="store_true", help="with --curve: also val kNN of the scenes' nuisance attributes (class shape's colour and position, background, distractor): which cue is learnt")
    ap.add_argument("--data-dir", default=None, help="where the scenes shards are cached (default: a temp folder)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--supervised", action="store_true", help="also train each backbone with labels (same views' size and crop, same budget): the ceiling column")
    ap.add_argument("--quick", action="store_true", help="smoke test: 256 images, 16 px, 1 epoch, tiny heads")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.train_images, args.val_images, args.batch_size, args.image_size = 1, 256, 128, 64, 16
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    rows, spec = plan(args)
    version = lightly_version()
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        data = scenes_images(Path(args.data_dir or tmp), spec["train"], spec["val"], spec["size"], spec["decode"], spec["seed"], spec["test"])
        results: dict = {"config": {k: v for k, v in vars(args).items()}, "data": spec, "lightly": version, "floors": {}, "methods": {}}
        for name, settings, epochs, batch_size in rows:
            backbone, floor = floor_knn(name, settings, data, args)
            results["floors"].setdefault(backbone, floor)
            row: dict = {"backbone": backbone, "epochs": epochs, "batch_size": batch_size, "settings": settings}
            if args.supervised:  # once per backbone (like the floors)
                ceiling = results["floors"][backbone]
                if "supervised" not in ceiling:
                    ceiling["supervised"] = supervised_ceiling(name, settings, data, args, epochs, batch_size)
                row["supervised"] = ceiling["supervised"]
            if args.sides in ("both", "ours"):
                row["ours"] = run_one(name, settings, data, args, "ours", epochs, batch_size)
            if args.sides in ("both", "lightly"):
                if version is None:
                    row["lightly"] = "lightly is not installed: pip install lightly (the 'bench' extra)"
                elif name not in LIGHTLY:
                    row["lightly"] = f"not in lightly {version}"
                else:
                    row["lightly"] = run_one(name, settings, data, args, "lightly", epochs, batch_size)
            results["methods"][name] = row
            parts = [f"{side} {row[side]['knn_top1']:.1f}%" + (f" (BN statistics re-estimated: {row[side]['bn_stats']['knn_top1']:.1f}%)" if "bn_stats" in row[side] else "")
                     for side in ("ours", "lightly") if isinstance(row.get(side), dict)]
            print(f"[quality] {name} ({backbone}, floor {floor['knn_top1']:.1f}%, with BN statistics {floor['bn_stats']['knn_top1']:.1f}%): {', '.join(parts)}", flush=True)

    test = spec["test"] > 0
    print(f"\nkNN top-1 (%) on scenes val{' (test)' if test else ''}, {spec['train']} training images of {spec['size']} px "
          f"decoded at {spec['decode']}; {time.monotonic() - t_start:.0f} s")
    print(f"{'method':<10} {'backbone':<9} {'epochs':>6} {'floor':>13} {'floor+BN':>13} {'reprflow':>13} {'lightly':>13} {'supervised':>13}   notes")

    def cell(d) -> str:
        if not isinstance(d, dict):
            return f"{'-':>13}"
        return f"{d['knn_top1']:6.1f} ({d['test_knn_top1']:4.1f})" if test else f"{d['knn_top1']:13.1f}"

    for name, row in results["methods"].items():
        note = next((row[s] for s in ("lightly", "ours") if isinstance(row.get(s), str)), "")
        floor = results["floors"][row["backbone"]]
        print(f"{name:<10} {row['backbone']:<9} {row['epochs']:>6} {cell(floor)} {cell(floor.get('bn_stats'))} {cell(row.get('ours'))} {cell(row.get('lightly'))} {cell(row.get('supervised'))}   {note}")
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
