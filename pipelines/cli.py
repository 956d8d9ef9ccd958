"""The ``reprflow`` command line. Every user mistake exits with code 2 and one clear line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from components.errors import ReprflowError

EXAMPLES = {
    "run": "example:\n  reprflow run pipelines/quickstart.yaml --output out/quickstart\n  reprflow run pipelines/quickstart.yaml --set train.epochs=2 --force",
    "ingest": "example:\n  reprflow ingest ~/photos/ --output data/photos --val-frac 0.1 --test-frac 0.1\n  (class per sub-folder = labelled; a flat folder = unlabelled)",
    "validate": "example:\n  reprflow validate pipelines/quickstart.yaml",
}


def _cmd_run(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.report import to_markdown
    from pipelines.run import run_pipeline

    cfg = load_config(args.pipeline, args.set)
    table = run_pipeline(cfg, Path(args.output) if args.output else None, force=args.force, config_text=Path(args.pipeline).read_text())
    print()
    print(to_markdown(table))
    print(f"Results: {table['output']}/results.md and results.json ({table['wall_seconds']:.0f}s)")
    print(f"MLflow:  {cfg.tracking_uri()}  experiment '{cfg.mlflow.experiment or cfg.name}'")
    print(f"         browse: mlflow ui --backend-store-uri {cfg.tracking_uri()} --host 127.0.0.1, then {table['mlflow_url']}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.run import build_dag

    cfg = load_config(args.pipeline, args.set)
    dag, _ = build_dag(cfg)
    print(f"{args.pipeline}: valid; {len(dag.steps)} steps:")
    for step in dag.steps.values():
        deps = f" <- {', '.join(step.inputs)}" if step.inputs else ""
        print(f"  {step.name} [{step.key}]{deps}")
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from components.data.ingest import ingest_folder

    report = ingest_folder(args.src, args.output, args.val_frac, args.test_frac, name=args.name)
    print(json.dumps({"rows": report.rows, "classes": report.classes, "skipped": len(report.skipped)}, indent=2))
    if report.skipped:
        path = Path(args.output) / "ingest_report.json" if "://" not in args.output else None
        if path:
            path.write_text(json.dumps(report.skipped, indent=2))
        print(f"{len(report.skipped)} files skipped; first: {report.skipped[0]}" + (f"; all listed in {path}" if path else ""), file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    p = argparse.ArgumentParser(prog="reprflow", description="Train, evaluate and ship visual representations on Ray, recorded in MLflow.",
                                epilog="example:\n  reprflow run pipelines/quickstart.yaml", formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    r = sub.add_parser("run", help="run a pipeline file locally or on the cluster at $RAY_ADDRESS", epilog=EXAMPLES["run"], formatter_class=fmt)
    r.add_argument("pipeline", help="pipeline YAML file")
    r.add_argument("--output", help="folder for results.md/results.json (default: <storage>/runs/<time>)")
    r.add_argument("--force", action="store_true", help="redo every step instead of reusing cached outputs")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. train.epochs=2 (repeatable)")
    r.set_defaults(fn=_cmd_run)

    v = sub.add_parser("validate", help="check a pipeline file and print its steps without running anything", epilog=EXAMPLES["validate"], formatter_class=fmt)
    v.add_argument("pipeline")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(fn=_cmd_validate)

    i = sub.add_parser("ingest", help="turn an image folder into Parquet shards with train/val/test splits", epilog=EXAMPLES["ingest"], formatter_class=fmt)
    i.add_argument("src", help="image folder (class per sub-folder, or flat)")
    i.add_argument("--output", required=True, help="dataset root to write (local path, s3://, gs://)")
    i.add_argument("--val-frac", type=float, default=0.1)
    i.add_argument("--test-frac", type=float, default=0.1)
    i.add_argument("--name", help="dataset name (default: the folder's name)")
    i.set_defaults(fn=_cmd_ingest)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``reprflow`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ReprflowError as exc:
        print(f"reprflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reprflow: interrupted; finished steps are cached, rerun the same command to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
