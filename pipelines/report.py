"""The comparison table: every representation of a pipeline run, on the same splits."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

COLUMNS = ("val_knn_top1", "test_knn_top1", "val_linear_top1", "test_linear_top1")
# Vision-language rows (VisualBERT: pipelines/vl_steps.py): ITM accuracy (half of the negatives
# hard), retrieval Recall@K, grounding probe with the image's own vs another image's regions.
VL_COLUMNS = ("val_itm_acc", "test_itm_acc", "test_itm_acc_hard", "test_i2t_r1", "test_i2t_r5", "test_t2i_r1", "test_t2i_r5", "test_chance_r5",
              "test_ground_colour_image", "test_ground_colour_swapped", "test_ground_shape_image", "test_ground_shape_swapped",
              "test_ground_position_image", "test_ground_position_swapped")


def arch_label(settings: dict) -> str:
    """The random-init floor's label: one floor per distinct backbone (ViT dims included)."""
    b = settings.get("backbone", {})
    parts = [b.get("name", "?"), b.get("stem", "") if not str(b.get("name", "")).startswith("vit") else "", settings.get("image_size", "")]
    if str(b.get("name", "")).startswith("vit"):
        parts += [f"p{b.get('patch_size')}", f"d{b.get('embed_dim')}x{b.get('depth')}"] if b.get("embed_dim") else [f"p{b.get('patch_size')}"]
    return "-".join(str(x) for x in parts if x not in ("", None, "pNone"))


MARGIN = "val_knn_top1_vs_floor"  # the column floor_margins adds (val kNN minus the stronger floor)


def floor_label(arch: str, bn_stats: bool = False) -> str:
    """A floor row's representation: ``random-init[arch]``, or ``random-init-bn[arch]`` with the
    train images' BN statistics."""
    return f"random-init{'-bn' if bn_stats else ''}[{arch}]"


def floor_margins(rows: list[dict[str, Any]], arch_of: dict[str, str]) -> None:
    """Set :data:`MARGIN` on every trained row: its val kNN minus the *stronger* of its
    backbone's random-init floors (bare, and with the train images' BN statistics), in points.

    ``arch_of`` maps a row's representation to its backbone label (:func:`arch_label`); rows
    without one, or whose floors are not in ``rows``, get None. This is the number the issues'
    "beats the random-init encoder by N points" reads, printed beside the floors it came from."""
    value = {r["representation"]: r.get("val_knn_top1") for r in rows}
    for row in rows:
        arch = arch_of.get(row["representation"])
        floors = [value.get(floor_label(arch, bn)) for bn in (False, True)] if arch else []
        floors = [f for f in floors if isinstance(f, (int, float))]
        mine = row.get("val_knn_top1")
        row[MARGIN] = mine - max(floors) if floors and isinstance(mine, (int, float)) else None


def comparison_table(cfg, dag, results, tracker, table_steps: list[str]) -> dict[str, Any]:
    """``{"pipeline", "selection_metric", "rows": [{representation, metrics..., run ids, registry}]}``.

    Each trained representation's row also carries :data:`MARGIN` (:func:`floor_margins`)."""
    rows, arch_of = [], {}
    for name in table_steps:
        res = results[name]
        label = res.outputs["label"]
        embed = dag.steps.get(dag.steps[name].settings.get("embed_step", ""))
        if embed is not None and embed.settings.get("train_step") and isinstance(embed.settings.get("settings"), dict):
            arch_of[label] = arch_label(embed.settings["settings"])
        row: dict[str, Any] = {"representation": label, **{c: res.outputs["metrics"].get(c) for c in COLUMNS}}
        row.update({c: res.outputs["metrics"][c] for c in VL_COLUMNS if c in res.outputs["metrics"]})
        row["evaluate_run_id"] = tracker.child_ids.get(name)
        train = f"train[{label}]"
        if train in results:
            row["train_run_id"] = tracker.child_ids.get(train)
            hist = results[train].history
            row["final_loss"] = hist[-1].get("loss") if hist else None
        reg = results.get(f"register[{label}]")
        if reg is not None:
            row["registered"] = f"{reg.outputs['name']}/{reg.outputs['version']}"
            row["promoted"] = reg.outputs["promoted"]
        rows.append(row)
    floor_margins(rows, arch_of)
    return {"pipeline": cfg.name, "selection_metric": cfg.evaluate.selection_metric, "eval_dataset": cfg.evaluate.dataset, "rows": rows}


def _fmt(v: Any, signed: bool = False) -> str:
    if signed and isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
        return f"{v:+.1f}"
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def to_markdown(table: dict[str, Any]) -> str:
    """The table as Markdown (also what the CLI prints)."""
    margin = MARGIN
    cols = ["representation", *COLUMNS, *([margin] if any(r.get(margin) is not None for r in table["rows"]) else []), "registered", "promoted"]
    lines = [
        f"# {table['pipeline']}: comparison (eval dataset '{table['eval_dataset']}', top-1 %, selection on val {table['selection_metric']})",
        "",
        *([f"{margin}: val kNN minus the stronger random-init floor of the same backbone (bare, or with the train images' BN statistics), points.", ""]
          if margin in cols else []),
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for row in table["rows"]:
        lines.append("| " + " | ".join(_fmt(row.get(c), signed=c == margin) for c in cols) + " |")
    vl_rows = [row for row in table["rows"] if any(c in row for c in VL_COLUMNS)]
    if vl_rows:
        lines += ["", "Vision-language (held-out image-caption pairs, %): ITM accuracy (half of the negatives hard), retrieval Recall@K "
                  "(chance_r5 = 5/N), grounding probe = masked-word accuracy with the image vs another image's regions", "",
                  "| representation | " + " | ".join(VL_COLUMNS) + " |", "|" + "|".join("---" for _ in range(len(VL_COLUMNS) + 1)) + "|"]
        lines += ["| " + " | ".join(_fmt(row.get(c)) for c in ("representation", *VL_COLUMNS)) + " |" for row in vl_rows]
    return "\n".join(lines) + "\n"


def write_report(table: dict[str, Any], output: Path, tracker, parent_run_id: str) -> None:
    """Write ``results.md``/``results.json`` to ``output`` and log them (and metrics) to the parent run."""
    md = to_markdown(table)
    (output / "results.md").write_text(md)
    (output / "results.json").write_text(json.dumps(table, indent=2, default=str))
    tracker.log_artifact(parent_run_id, output / "results.md")
    tracker.log_artifact(parent_run_id, output / "results.json")
    metrics = {}
    for row in table["rows"]:
        key = "".join(c if c.isalnum() or c in "-_." else "_" for c in row["representation"])
        for c in (*COLUMNS, MARGIN, *VL_COLUMNS):
            if isinstance(row.get(c), (int, float)) and not isinstance(row.get(c), bool):
                metrics[f"{key}.{c}"] = row[c]
    tracker.log_metrics(parent_run_id, metrics)
