"""The BRIEF baseline: a bag of binary words per image, judged like every learnt representation.

``embed[brief]`` writes exactly what :func:`pipelines.steps.embed_step` writes
(``embeddings-{split}.npz`` with ``ids``, ``labels``, ``feats``; ``outputs = {split: path}``),
so ``evaluate[brief]`` is the ordinary :func:`pipelines.steps.evaluate_step` and BRIEF gets a
row in the comparison table beside the trained methods and their random-init floors:

1. Ray Data ``map_batches`` over the eval dataset's **train** split: decode, Harris keypoints,
   BRIEF descriptors (Calonder et al., ECCV 2010; :mod:`components.brief`).
2. A seeded sample of those descriptors -> a codebook by k-majority (a Ray task).
3. Ray Data batch inference over every split with the codebook as a frozen "encoder"
   (:class:`components.brief.bow.BagOfBinaryWords`): one normalised word histogram per image.
4. A plot of BRIEF matches on a sample pair (a val image and a rotated, brighter copy with a
   known mapping) logged to the step's MLflow run.

The paper's S = 48 does not fit 64-px scenes once a keypoint must keep S/2 px from every edge;
``evaluate.brief.patch_size`` defaults to 24 (see :class:`pipelines.config.BriefSpec`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import ray
import torch

from components.brief.bow import BagOfBinaryWords, BriefKeypointDescriber, k_majority
from components.brief.descriptor import BriefConfig
from components.brief.matching import match_descriptors
from components.data.decode import decode_batch
from components.errors import ReprflowError
from pipelines.dag import DAG, Step, StepContext, StepResult

LABEL = "brief"
PAIR_ANGLE, PAIR_BRIGHTNESS = 8.0, 20.0  # the sample pair's known change
PAIR_TOLERANCE = 2.0  # px: a match is drawn green when it lands this close to the truth


def add_brief_steps(dag: DAG, cfg, eval_ds: str, ev_settings: dict) -> list[str]:
    """Add ``embed[brief]`` -> ``evaluate[brief]`` when ``evaluate.brief.enabled``; returns the table row's step."""
    from pipelines.steps import evaluate_step

    spec = cfg.evaluate.brief
    if not spec.enabled:
        return []
    settings = {"label": LABEL, "brief": spec.model_dump(), "seed": cfg.seed, "dataset_step": eval_ds,
                "decode_size": cfg.train.decode_size, "batch_size": cfg.evaluate.batch_size}
    e = dag.add(Step(f"embed[{LABEL}]", "embed", brief_embed_step, settings, [eval_ds]))
    v = dag.add(Step(f"evaluate[{LABEL}]", "evaluate", evaluate_step, {**ev_settings, "label": LABEL, "embed_step": e.name}, [eval_ds, e.name]))
    return [v.name]


def brief_config(brief: dict) -> BriefConfig:
    """The descriptor settings of an ``evaluate.brief`` section (as a dict)."""
    return BriefConfig(bits=brief["bits"], patch_size=brief["patch_size"], sigma=brief["sigma"], pattern=brief["pattern"])


def _describer(brief: dict) -> BriefKeypointDescriber:
    return BriefKeypointDescriber(brief_config(brief), brief["keypoints_per_image"], brief["detector"])


def _describe_batch(batch: dict, brief: dict, decode_size: int) -> dict:
    # Ray Data tasks share the node's cores: one intra-op thread each.
    torch.set_num_threads(1)
    imgs, keep, _ = decode_batch(batch["image"], batch["id"], decode_size)
    k, nbytes = brief["keypoints_per_image"], brief["bits"] // 8
    if not len(imgs):
        return {"id": np.zeros(0, dtype=object), "desc": np.zeros((0, k, nbytes), np.uint8), "valid": np.zeros((0, k), bool), "dropped": np.zeros(0, np.int64)}
    desc, valid, kp = _describer(brief)(torch.from_numpy(imgs))
    return {"id": np.asarray(batch["id"])[keep], "desc": desc.numpy(), "valid": valid.numpy(), "dropped": kp.dropped_border.numpy()}


def train_descriptors(files: list[str], brief: dict, decode_size: int, batch_size: int) -> tuple[np.ndarray, dict[str, float]]:
    """All BRIEF descriptors of the given shards (rows in id order, so runs agree) and keypoint stats."""
    ds = ray.data.read_parquet(files, columns=["id", "image"]).map_batches(
        _describe_batch, fn_kwargs={"brief": brief, "decode_size": decode_size}, batch_size=batch_size, batch_format="numpy",
    )
    ids, desc, valid, dropped = [], [], [], []
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        ids.append(b["id"].astype(str))
        desc.append(b["desc"])
        valid.append(b["valid"])
        dropped.append(b["dropped"])
    if not ids:
        raise ReprflowError("evaluate.brief: the eval dataset's train split has no decodable images to learn a codebook from")
    order = np.argsort(np.concatenate(ids), kind="stable")  # Ray Data may deliver batches in any order
    desc, valid, dropped = np.concatenate(desc)[order], np.concatenate(valid)[order], np.concatenate(dropped)[order]
    counts = valid.sum(1)
    stats = {"images": float(len(counts)), "keypoints_per_image": float(counts.mean()), "images_without_keypoints": float((counts == 0).sum()),
             "border_dropped_per_image": float(dropped.mean())}
    return desc[valid], stats


@ray.remote(num_cpus=1)
def _learn_codebook(desc: np.ndarray, size: int, iterations: int, seed: int) -> np.ndarray:
    torch.set_num_threads(1)
    return k_majority(torch.from_numpy(desc), size, iterations, seed).numpy()


class BagOfWordsBuilder:
    """Picklable recipe for the frozen BRIEF "encoder" (built once per Ray Data actor)."""

    def __init__(self, brief: dict, codebook: np.ndarray):
        self.brief, self.codebook = brief, codebook

    def __call__(self) -> BagOfBinaryWords:
        b = self.brief
        return BagOfBinaryWords(brief_config(b), torch.from_numpy(self.codebook), b["keypoints_per_image"], b["detector"])


def brief_embed_step(ctx: StepContext) -> StepResult:
    """Embed the eval dataset's splits as bags of binary words (codebook learnt on its train split)."""
    from pipelines.plots import pca_scatter
    from pipelines.ray_data import embed_splits

    s = ctx.step.settings
    brief = s["brief"]
    data = ctx.inputs[s["dataset_step"]].outputs
    if not data["files"].get("train"):
        raise ReprflowError("evaluate.brief: the eval dataset has no train split to learn the codebook on")
    desc, stats = train_descriptors(data["files"]["train"], brief, s["decode_size"], s["batch_size"])
    size = brief["codebook_size"]
    if len(desc) < size:
        raise ReprflowError(f"evaluate.brief: the train split gave {len(desc)} descriptors, fewer than codebook_size={size}; "
                            "lower evaluate.brief.codebook_size or raise keypoints_per_image")
    rng = np.random.default_rng(s["seed"])
    sample = desc[np.sort(rng.choice(len(desc), brief["codebook_sample"], replace=False))] if len(desc) > brief["codebook_sample"] else desc
    codebook = ray.get(_learn_codebook.remote(sample, size, brief["codebook_iterations"], s["seed"]))
    np.save(ctx.out_dir / "brief_codebook.npy", codebook)

    outputs = embed_splits(data["files"], BagOfWordsBuilder(brief, codebook), s["decode_size"], s["batch_size"], ctx.out_dir)

    artifacts = ["brief_codebook.npy"]
    metrics = {f"train_{k}": v for k, v in stats.items()} | {"codebook_descriptors": float(len(sample))}
    if "val" in outputs:
        z = np.load(outputs["val"])
        pca_scatter(z["feats"], z["labels"], data["classes"], ctx.out_dir / "embeddings_pca.png", title=f"{ctx.step.name}: val embeddings (PCA)")
        artifacts.append("embeddings_pca.png")
    pair_split = next(split for split in ("val", "train", "test") if data["files"].get(split))
    pair = match_plot(data["files"][pair_split][0], brief, s["decode_size"], ctx.out_dir / "brief_matches.png")
    if pair is not None:
        metrics |= pair
        artifacts.append("brief_matches.png")
    return StepResult(outputs=outputs, metrics=metrics, params={"representation": LABEL, "brief": brief}, artifacts=artifacts)


# ---------------------------------------------------------------- the sample pair


def _rotate(img: torch.Tensor, degrees: float) -> tuple[torch.Tensor, np.ndarray]:
    """Rotate ``(3, H, W)`` float about the centre (bilinear); returns it and the 2x3 map x -> x'."""
    _, h, w = img.shape
    a = math.radians(degrees)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    c = np.array([(w - 1) / 2, (h - 1) / 2])
    fwd = np.c_[rot, c - rot @ c]  # where a pixel of the first image lands in the second
    inv = np.linalg.inv(np.r_[fwd, [[0, 0, 1]]])[:2]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    src = torch.stack([xs, ys, torch.ones_like(xs)], -1) @ torch.from_numpy(inv).T  # (H, W, 2) source pixels
    grid = torch.stack([2 * src[..., 0] / (w - 1) - 1, 2 * src[..., 1] / (h - 1) - 1], -1).float()
    out = torch.nn.functional.grid_sample(img.unsqueeze(0), grid.unsqueeze(0), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0], fwd


def match_plot(shard_file: str, brief: dict, decode_size: int, path: Path) -> dict[str, float] | None:
    """Match the shard's first image against a rotated, brighter copy; draw the matches; return counts."""
    import pyarrow.parquet as pq

    from components.data import shards as sh
    from pipelines.plots import plt

    fs, p = sh.resolve(shard_file)
    with fs.open_input_file(p) as f:
        rows = pq.ParquetFile(f).read_row_group(0, columns=["id", "image"]).slice(0, 8).to_pylist()
    imgs, _, _ = decode_batch([r["image"] for r in rows], [r["id"] for r in rows], decode_size)
    if not len(imgs):
        return None
    first = torch.from_numpy(imgs[0]).permute(2, 0, 1).float()
    second, fwd = _rotate(first, PAIR_ANGLE)
    second = (second + PAIR_BRIGHTNESS).clamp(0, 255).round()
    pair = torch.stack([first, second]).to(torch.uint8)
    desc, valid, pts = _describer(brief)(pair)
    m = match_descriptors(desc[0], desc[1], valid[0], valid[1], cross_check=True)
    xy1, xy2 = pts.xy[0].numpy().astype(float), pts.xy[1].numpy().astype(float)
    truth = xy1 @ fwd[:, :2].T + fwd[:, 2]
    idx = m.index.numpy()
    matched = np.nonzero(idx >= 0)[0]
    correct = np.linalg.norm(xy2[idx[matched]] - truth[matched], axis=1) <= PAIR_TOLERANCE

    w = pair.shape[-1]
    canvas = torch.cat([pair[0], torch.full((3, pair.shape[-2], 4), 255, dtype=torch.uint8), pair[1]], dim=2).permute(1, 2, 0).numpy()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    ax.imshow(canvas, interpolation="nearest")
    for i, ok in zip(matched, correct):
        (x1, y1), (x2, y2) = xy1[i], xy2[idx[i]]
        ax.plot([x1, x2 + w + 4], [y1, y2], color="tab:green" if ok else "tab:red", linewidth=0.9)
        ax.plot([x1, x2 + w + 4], [y1, y2], "o", color="tab:green" if ok else "tab:red", markersize=2)
    ax.set_axis_off()
    ax.set_title(f"BRIEF {brief['bits']} bits, S={brief['patch_size']}: {rows[0]['id']} vs rotated {PAIR_ANGLE:g}° + {PAIR_BRIGHTNESS:g} brighter\n"
                 f"{int(correct.sum())}/{len(matched)} mutual NN matches within {PAIR_TOLERANCE:g} px (green)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {"pair_keypoints": float(valid[0].sum()), "pair_matches": float(len(matched)), "pair_correct": float(correct.sum())}
