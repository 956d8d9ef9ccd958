"""Cheap checks of the operations layer: the retrain section, storage overrides, the data
watermark, job entrypoints and token lookup, model URIs (no Ray cluster, no MLflow server)."""

from __future__ import annotations

import shlex

import pytest

from components.data import shards as sh
from components.errors import ReprflowError
from pipelines import jobs, watermark
from pipelines.cli import build_parser, main
from pipelines.config import parse_config
from pipelines.models import parse_model_uri
from tests.conftest import tiny_config


def test_retrain_section_is_validated_with_dotted_paths(tmp_path):
    cfg = parse_config({**tiny_config(tmp_path), "retrain": {"data": "all", "epochs": 3, "margin": -1.5}})
    assert (cfg.retrain.data, cfg.retrain.epochs, cfg.retrain.margin) == ("all", 3, -1.5)
    assert parse_config(tiny_config(tmp_path)).retrain.data == "new"  # optional section
    with pytest.raises(ReprflowError, match=r"retrain\.dat: unknown key"):
        parse_config({**tiny_config(tmp_path), "retrain": {"dat": "new"}})
    with pytest.raises(ReprflowError, match=r"retrain\.data: Input should be 'new' or 'all'"):
        parse_config(tiny_config(tmp_path), overrides=["retrain.data=some"])
    with pytest.raises(ReprflowError, match=r"retrain\.margin: Input should be less than or equal to 100"):
        parse_config(tiny_config(tmp_path), overrides=["retrain.margin=101"])


def test_storage_override_and_object_store_storage_is_refused(tmp_path, monkeypatch):
    cfg = parse_config(tiny_config(tmp_path / "a"))
    monkeypatch.setenv("REPRFLOW_STORAGE", str(tmp_path / "shared"))
    assert cfg.storage_path() == tmp_path / "shared"
    assert cfg.tracking_uri() == f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    monkeypatch.setenv("REPRFLOW_STORAGE", "s3://bucket/store")
    with pytest.raises(ReprflowError, match="REPRFLOW_STORAGE=s3://bucket/store: storage must be a local or mounted path"):
        cfg.storage_path()
    with pytest.raises(ReprflowError, match=r"storage: 's3://b/x': storage must be a local or mounted path"):
        parse_config({**tiny_config(tmp_path), "storage": "s3://b/x"})


def _shard(path: str, ids: list[str]) -> str:
    return sh.write_shards([{"id": i, "image": b"x"} for i in ids], path)[0]


def test_watermark_sees_new_and_changed_shards(tmp_path):
    root = str(tmp_path / "ds")
    a = _shard(f"{root}/train/a", ["1", "2"])
    b = _shard(f"{root}/train/b", ["3"])
    mark = watermark.compute(root, [a, b])
    assert set(mark["files"]) == {"train/a/part-00000.parquet", "train/b/part-00000.parquet"}
    assert watermark.new_files(mark, root, [a, b]) == []
    c = _shard(f"{root}/train/c", ["4"])
    assert watermark.new_files(mark, root, [a, b, c]) == [c]
    _shard(f"{root}/train/b", ["3", "5", "6"])  # rewritten in place: same name, other content
    assert watermark.new_files(mark, root, [a, b, c]) == [b, c]
    assert watermark.new_files(None, root, [a]) == [a]  # a champion without a watermark: all new
    assert watermark.summary(mark).startswith("2 train shards, last train/b/part-00000.parquet, fingerprint ")
    # Moving the dataset keeps the watermark: names are relative to the root.
    assert watermark.relative_name("s3://other/ds", "s3://other/ds/train/a/part-00000.parquet") == "train/a/part-00000.parquet"


def test_job_entrypoint_quotes_overrides_and_parses_as_the_cli():
    ep = jobs.entrypoint("retrain", "pipelines/x y.yaml", ["train.epochs=2", "methods.0.settings.optim={lr: 0.1}"])
    argv = shlex.split(ep)
    assert argv[:3] == ["python", "-m", "pipelines.cli"]
    args = build_parser().parse_args(argv[3:])
    assert args.command == "retrain" and args.pipeline == "pipelines/x y.yaml" and args.set[1] == "methods.0.settings.optim={lr: 0.1}"


def test_token_lookup_order_and_headers(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_JOB_HEADERS", raising=False)
    assert jobs.auth_token() is None and jobs.request_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert jobs.auth_token() == "from-home"
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert jobs.auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    monkeypatch.setenv("RAY_JOB_HEADERS", '{"X-Proxy": "1"}')
    assert jobs.request_headers() == {"Authorization": "Bearer from-env", "X-Proxy": "1"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ReprflowError, match="RAY_AUTH_TOKEN_PATH=.*missing: file not found"):
        jobs.auth_token()


def test_submit_needs_an_http_address_and_a_valid_file(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["jobs"]) == 2
    assert "pass --address http://HEAD:8265" in capsys.readouterr().err
    assert main(["jobs", "--address", "ray://head:10001"]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmethods: [{name: nosuch}]\n")
    assert main(["submit", "--address", "http://127.0.0.1:9", str(bad)]) == 2  # validated before contacting anyone
    assert "unknown method 'nosuch'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["submit", "p.yaml", "--id", "bad id!"])


def test_unreachable_cluster_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "x")
    assert main(["jobs", "--address", "http://127.0.0.1:9"]) == 2  # nothing listens on port 9
    assert "cannot reach the Ray Jobs API at http://127.0.0.1:9" in capsys.readouterr().err


def test_staging_a_pipeline_outside_the_project(tmp_path):
    outside = tmp_path / "p.yaml"
    outside.write_text("x: 1\n")
    rel, staged = jobs._stage_pipeline(outside, jobs.ROOT)
    try:
        assert rel.startswith(f"{jobs.STAGE_DIR}/p-") and (jobs.ROOT / rel).read_text() == "x: 1\n"
    finally:
        staged.unlink()
        staged.parent.rmdir()
    inside = jobs.ROOT / "pipelines" / "quickstart.yaml"
    assert jobs._stage_pipeline(inside, jobs.ROOT) == ("pipelines/quickstart.yaml", None)


def test_model_uris():
    assert parse_model_uri("models:/quickstart-simclr@champion") == ("quickstart-simclr", None, "champion")
    assert parse_model_uri("models:/quickstart-simclr/3") == ("quickstart-simclr", "3", None)
    with pytest.raises(ReprflowError, match="expected models:/NAME@ALIAS"):
        parse_model_uri("runs:/abc/model")


def test_opening_a_tracker_does_not_export_its_store_to_the_environment(tmp_path, monkeypatch):
    """MLflow's set_tracking_uri exports MLFLOW_TRACKING_URI; a second pipeline in the same
    process would then record into the first one's store."""
    import os

    from pipelines.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    Tracker(f"sqlite:///{tmp_path / 'a.db'}", "exp-a", tmp_path / "art")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    second = parse_config(tiny_config(tmp_path / "b"))
    assert second.tracking_uri() == f"sqlite:///{second.storage_path() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    Tracker(f"sqlite:///{tmp_path / 'a.db'}", "exp-a", tmp_path / "art")
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"
