"""The ``reprflow`` command line. Every user mistake exits with code 2 and one clear line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from components.errors import ReprflowError

EXAMPLES = {
    "run": "example:\n  reprflow run pipelines/quickstart.yaml --output out/quickstart\n  reprflow run pipelines/quickstart.yaml --set train.epochs=2 --force",
    "ingest": "example:\n  reprflow ingest ~/photos/ --output data/photos --val-frac 0.1 --test-frac 0.1\n  (class per sub-folder = labelled; a flat folder = unlabelled)\n"
              "  reprflow ingest ~/coco/train2017 --coco-captions captions_train2017.json --coco-instances instances_train2017.json --output data/coco",
    "validate": "example:\n  reprflow validate pipelines/quickstart.yaml",
    "submit": "example:\n  export MLFLOW_TRACKING_URI=http://mlflow.internal:5000 RAY_AUTH_TOKEN=$(ssh head ray get-auth-token)\n"
              "  reprflow submit --address http://head:8265 cluster/photos.yaml --set train.epochs=50 --follow\n"
              "  (same as: ray job submit --address http://head:8265 --working-dir . -- reprflow run cluster/photos.yaml)",
    "jobs": "example:\n  reprflow jobs --address http://head:8265",
    "logs": "example:\n  reprflow logs reprflow-run-photos-20250101-120000-ab12 --address http://head:8265 --follow",
    "stop": "example:\n  reprflow stop reprflow-run-photos-20250101-120000-ab12 --address http://head:8265",
    "retrain": "example:\n  reprflow retrain cluster/photos.yaml                 # no new shards: says so, exit 0\n"
               "  reprflow retrain cluster/photos.yaml --set retrain.margin=1.0 --set retrain.epochs=5",
    "promote": "example:\n  reprflow promote quickstart-simclr 3 --pipeline pipelines/quickstart.yaml --reason 'A/B test won'",
    "rollback": "example:\n  reprflow rollback quickstart-simclr --pipeline pipelines/quickstart.yaml",
    "embed": "example:\n  reprflow embed --model models:/quickstart-simclr@champion data/photos/val --output out/photos-emb --pipeline pipelines/quickstart.yaml\n"
             "  (writes Parquet files with columns id, embedding)",
    "gc": "example:\n  reprflow gc pipelines/quickstart.yaml            # dry run: lists what would go\n  reprflow gc pipelines/quickstart.yaml --yes",
    "ui": "example:\n  reprflow ui pipelines/quickstart.yaml          # http://127.0.0.1:5000, opened on the runs table\n  reprflow ui --port 5001",
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
    print(f"         browse: reprflow ui {args.pipeline}   (this run: {table['mlflow_url']})")
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
    from components.data.ingest import ingest

    report = ingest(args.src, args.output, args.val_frac, args.test_frac, name=args.name, coco_captions=args.coco_captions, coco_instances=args.coco_instances)
    print(json.dumps({"rows": report.rows, "classes": report.classes, "skipped": len(report.skipped)}, indent=2))
    if report.skipped:
        path = Path(args.output) / "ingest_report.json" if "://" not in args.output else None
        if path:
            path.write_text(json.dumps(report.skipped, indent=2))
        print(f"{len(report.skipped)} files skipped; first: {report.skipped[0]}" + (f"; all listed in {path}" if path else ""), file=sys.stderr)
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from pipelines import jobs

    sid = jobs.submit(args.address, args.pipeline, args.set, command="retrain" if args.retrain else "run", working_dir=args.working_dir,
                      env=args.env, submission_id=args.id, entrypoint_num_gpus=args.entrypoint_gpus)
    print(sid, flush=True)
    address = jobs.dashboard_address(args.address)
    if not args.follow:
        print(f"follow it: reprflow logs {sid} --address {address} --follow   (stop: reprflow stop {sid} --address {address})", file=sys.stderr)
        return 0
    status = jobs.logs(args.address, sid, follow=True)
    print(f"job {sid}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _cmd_jobs(args: argparse.Namespace) -> int:
    import datetime as dt

    from pipelines import jobs

    rows = jobs.list_jobs(args.address)
    for r in rows:
        start = dt.datetime.fromtimestamp(r["start"] / 1000).strftime("%Y-%m-%d %H:%M:%S") if r["start"] else "-"
        print(f"{r['id']:<52} {r['status']:<10} {start}  {r['entrypoint']}")
    if not rows:
        print("no jobs")
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    from pipelines import jobs

    status = jobs.logs(args.address, args.id, follow=args.follow)
    if args.follow:
        print(f"job {args.id}: {status}", file=sys.stderr)
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    from pipelines import jobs

    was_running = jobs.stop(args.address, args.id)
    print(f"{args.id}: {'stop requested' if was_running else 'not running (already finished)'}")
    return 0


def _cmd_retrain(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.retrain import retrain

    cfg = load_config(args.pipeline, args.set)
    out = retrain(cfg, Path(args.output) if args.output else None, wait_seconds=args.wait, config_text=Path(args.pipeline).read_text())
    if out["status"] == "no-op":
        print(f"retrain: no new shards for {', '.join(out['methods'])}; nothing to do")
        return 0
    for method, d in out["methods"].items():
        print(f"{method}: {d['decision']} (challenger v{d['challenger']} {d['challenger_score']:.2f} vs champion v{d['champion']} {d['champion_score']:.2f}; {d['reason']})")
    print(f"MLflow: {out['mlflow_url']}")
    return 0


def _client(args: argparse.Namespace):
    from mlflow.tracking import MlflowClient

    from pipelines.ui import tracking_uri

    return MlflowClient(tracking_uri(getattr(args, "pipeline", None), args.tracking_uri))


def _cmd_promote(args: argparse.Namespace) -> int:
    from pipelines.alias import promote

    promote(_client(args), args.name, args.version, args.alias, reason=args.reason)
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    from pipelines.alias import rollback

    rollback(_client(args), args.name, args.alias)
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from pipelines.models import embed_shards

    out = embed_shards(_client(args), args.model, args.shards, args.output, batch_size=args.batch_size, actors=args.actors)
    skipped = f"; {out['skipped']} undecodable, skipped" if out["skipped"] else ""
    print(f"embedded {out['rows_out']} of {out['rows_in']} images with {out['model']} v{out['version']} -> {out['output']} "
          f"({out['files']} Parquet files: id, embedding){skipped}")
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from pipelines.config import load_config
    from pipelines.gc import run_gc

    cfg = load_config(args.pipeline, args.set)
    run_gc(cfg.storage_path(), MlflowClient(cfg.tracking_uri()), yes=args.yes, min_age_hours=args.min_age_hours)
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    from pipelines.ui import serve, tracking_uri

    experiment = None
    if args.pipeline:
        from pipelines.config import load_config

        cfg = load_config(args.pipeline)
        experiment = cfg.mlflow.experiment or cfg.name
    try:
        serve(tracking_uri(args.pipeline, args.tracking_uri), args.host, args.port, experiment)
    except KeyboardInterrupt:
        print("MLflow UI stopped", file=sys.stderr)
    return 0


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="the cluster's Jobs API, http://HEAD:8265 (default: $RAY_ADDRESS if it is an http URL); "
                                     "token from $RAY_AUTH_TOKEN / $RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token")


def _add_store(p: argparse.ArgumentParser, pipeline_flag: bool = True) -> None:
    if pipeline_flag:
        p.add_argument("--pipeline", help="pipeline file whose MLflow store to use (default: $MLFLOW_TRACKING_URI, else ./.reprflow)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (overrides --pipeline and $MLFLOW_TRACKING_URI)")


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
    i.add_argument("--coco-captions", metavar="JSON", help="COCO-style captions file: SRC is then the image folder its file_names are relative to")
    i.add_argument("--coco-instances", metavar="JSON", help="COCO-style instances file (boxes), with or without --coco-captions")
    i.set_defaults(fn=_cmd_ingest)

    sb = sub.add_parser("submit", help="run a pipeline file on a Ray cluster as a Ray Job (the project is its working dir)", epilog=EXAMPLES["submit"], formatter_class=fmt)
    sb.add_argument("pipeline", help="pipeline YAML file (validated here before submitting)")
    _add_address(sb)
    sb.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field (passed on to the job)")
    sb.add_argument("--retrain", action="store_true", help="submit 'reprflow retrain' instead of 'reprflow run'")
    sb.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment variable for the job (repeatable); "
                    "MLFLOW_TRACKING_URI and REPRFLOW_STORAGE are passed through when set")
    sb.add_argument("--working-dir", help="project folder to upload (default: this reprflow checkout)")
    sb.add_argument("--id", type=valid_id, help="submission id (default: reprflow-<command>-<pipeline>-<time>-<random>)")
    sb.add_argument("--entrypoint-gpus", type=float, default=0, help="GPUs reserved for the driver process (default 0; workers get theirs from train.use_gpu)")
    sb.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 0 only if it SUCCEEDED")
    sb.set_defaults(fn=_cmd_submit)

    j = sub.add_parser("jobs", help="list the Ray Jobs on a cluster", epilog=EXAMPLES["jobs"], formatter_class=fmt)
    _add_address(j)
    j.set_defaults(fn=_cmd_jobs)

    lg = sub.add_parser("logs", help="print (or --follow) a Ray Job's logs", epilog=EXAMPLES["logs"], formatter_class=fmt)
    lg.add_argument("id", help="submission id printed by 'reprflow submit'")
    _add_address(lg)
    lg.add_argument("--follow", action="store_true", help="stream until the job ends")
    lg.set_defaults(fn=_cmd_logs)

    st = sub.add_parser("stop", help="stop a running Ray Job", epilog=EXAMPLES["stop"], formatter_class=fmt)
    st.add_argument("id", help="submission id")
    _add_address(st)
    st.set_defaults(fn=_cmd_stop)

    rt = sub.add_parser("retrain", help="retrain from the champion on shards that arrived since its watermark; promote only on a win",
                        epilog=EXAMPLES["retrain"], formatter_class=fmt)
    rt.add_argument("pipeline", help="pipeline YAML file (train dataset of kind: shards; see its 'retrain' section)")
    rt.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. retrain.margin=0.5")
    rt.add_argument("--output", help="folder for results.md/retrain.json (default: <storage>/runs/retrain-<time>)")
    rt.add_argument("--wait", type=float, default=6 * 3600, metavar="SECONDS", help="how long to wait for another retrain of this pipeline (default 6 h)")
    rt.set_defaults(fn=_cmd_retrain)

    pr = sub.add_parser("promote", help="move the alias (@champion) to a version by hand, recorded in MLflow", epilog=EXAMPLES["promote"], formatter_class=fmt)
    pr.add_argument("name", help="registered model, <pipeline>-<method>")
    pr.add_argument("version")
    pr.add_argument("--alias", default="champion")
    pr.add_argument("--reason", default="manual promotion", help="recorded on the version")
    _add_store(pr)
    pr.set_defaults(fn=_cmd_promote)

    rb = sub.add_parser("rollback", help="move the alias back to the version the current champion replaced", epilog=EXAMPLES["rollback"], formatter_class=fmt)
    rb.add_argument("name", help="registered model, <pipeline>-<method>")
    rb.add_argument("--alias", default="champion")
    _add_store(rb)
    rb.set_defaults(fn=_cmd_rollback)

    em = sub.add_parser("embed", help="embed shards with a registered model (Ray Data batch inference) into Parquet", epilog=EXAMPLES["embed"], formatter_class=fmt)
    em.add_argument("shards", nargs="+", help="shard files, shard folders or dataset roots (local, s3://, gs://)")
    em.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    em.add_argument("--output", required=True, help="new folder for the Parquet files (id, embedding)")
    em.add_argument("--batch-size", type=int, default=256)
    em.add_argument("--actors", type=int, default=1, help="inference actors (one model copy each)")
    _add_store(em)
    em.set_defaults(fn=_cmd_embed)

    g = sub.add_parser("gc", help="delete cached steps and Ray Train checkpoints no registered version needs (dry run unless --yes)", epilog=EXAMPLES["gc"], formatter_class=fmt)
    g.add_argument("pipeline", help="pipeline file (its storage folder and MLflow store)")
    g.add_argument("--yes", action="store_true", help="really delete")
    g.add_argument("--min-age-hours", type=float, default=24.0, help="leave anything modified more recently alone (default 24)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    g.set_defaults(fn=_cmd_gc)

    u = sub.add_parser("ui", help="start the MLflow UI on the project's store (127.0.0.1) and print the runs-table URL", epilog=EXAMPLES["ui"], formatter_class=fmt)
    u.add_argument("pipeline", nargs="?", help="pipeline file (its store and experiment); default: $MLFLOW_TRACKING_URI or ./.reprflow")
    u.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    u.add_argument("--port", type=int, default=5000)
    _add_store(u, pipeline_flag=False)
    u.set_defaults(fn=_cmd_ui)
    return p


def valid_id(text: str) -> str:
    """argparse type for a Ray submission id."""
    from pipelines.jobs import valid_submission_id

    try:
        return valid_submission_id(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use letters, digits, '.', '_' and '-'") from None


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
        _stop_after_interrupt()
        return 130


def _stop_after_interrupt() -> None:
    """After Ctrl-C: shut down the Ray this process started (ending its fits), and leave without
    joining step threads still inside a fit (the interpreter would otherwise wait for them)."""
    import os
    import threading

    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


if __name__ == "__main__":
    sys.exit(main())
