"""Pipeline-file validation (exit code 2, field named) and the DAG's cache keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.errors import ReprflowError
from pipelines.cli import main
from pipelines.config import load_config, parse_config
from pipelines.dag import DAG, Runner, Step, StepResult
from pipelines.report import comparison_table, floor_margins
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path, data) -> str:
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["methods"][0].update(name="nosuch"), r"methods\[0\]\.name: unknown method 'nosuch'; known methods: .*simclr"),
    (lambda d: d["train"].update(dataset="missing"), r"train\.dataset: dataset 'missing' is not defined under 'datasets'"),
    (lambda d: d["evaluate"].update(dataset="missing"), r"evaluate\.dataset: dataset 'missing' is not defined"),
    (lambda d: d["train"].update(batch_size=-4), r"train\.batch_size: Input should be greater than or equal to 2"),
    (lambda d: d.update(trian={}), r"trian: unknown key"),
    (lambda d: d["methods"][0]["settings"].update(temprature=0.1), r"methods\[0\]\.settings\.temprature: Extra inputs are not permitted"),
    (lambda d: d["methods"][0]["settings"].update(temperature=-1), r"methods\[0\]\.settings\.temperature: Input should be greater than 0"),
    (lambda d: d["methods"][0].update(train={"epochs": 0}), r"methods\[0\]\.train\.epochs: Input should be greater than or equal to 1"),
    (lambda d: d.pop("methods"), r"methods: Field required"),
    (lambda d: d["datasets"].update(mine={"kind": "shards"}), r"datasets\.mine: kind 'shards' needs 'uri'"),
])
def test_bad_pipeline_files_fail_before_running(tmp_path, capsys, mutate, message):
    data = tiny_config(tmp_path / "store")
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ReprflowError, match=message):
        load_config(path)
    assert main(["run", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reprflow: error: ") and err.count("\n") == 1
    assert not (tmp_path / "store").exists()  # nothing ran, nothing was written


def test_cli_missing_file_and_bad_override(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "pipeline file not found" in capsys.readouterr().err
    with pytest.raises(ReprflowError, match="--set 'train.epochs': expected KEY=VALUE"):
        parse_config(tiny_config(tmp_path), overrides=["train.epochs"])
    cfg = parse_config(tiny_config(tmp_path), overrides=["train.epochs=5", "methods.0.settings.temperature=0.3"])
    assert cfg.train.epochs == 5 and cfg.methods[0].settings["temperature"] == 0.3


def test_shipped_pipeline_files_are_valid(capsys):
    for path in sorted((ROOT / "pipelines").glob("*.yaml")):
        assert main(["validate", str(path)]) == 0, path
    assert "train[simclr]" in capsys.readouterr().out


def test_every_cli_command_has_an_example_in_help(capsys):
    from pipelines.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, sp in sub.choices.items():
        assert "example:" in sp.format_help(), name


def _step(name, settings, inputs=(), calls=None):
    def fn(ctx):
        calls.append(name)
        (ctx.out_dir / "out.txt").write_text(name)
        return StepResult(outputs={"file": str(ctx.out_dir / "out.txt"), "inputs": sorted(ctx.inputs)})

    return Step(name, "t", fn, settings, list(inputs))


def test_dag_caches_by_key_and_reruns_downstream_of_a_change(tmp_path):
    def build(a_setting, calls):
        dag = DAG()
        dag.add(_step("a", {"x": a_setting}, calls=calls))
        dag.add(_step("b", {"y": 1}, ["a"], calls))
        dag.add(_step("c", {"z": 1}, calls=calls))
        return dag

    calls: list[str] = []
    res = Runner(build(1, calls), tmp_path, None).run_all()
    assert sorted(calls) == ["a", "b", "c"]
    assert Path(res["b"].outputs["file"]).read_text() == "b" and res["b"].outputs["inputs"] == ["a"]
    calls.clear()
    runner = Runner(build(1, calls), tmp_path, None)
    runner.run_all()
    assert calls == [] and runner.cached == {"a", "b", "c"}
    calls.clear()
    Runner(build(2, calls), tmp_path, None).run_all()
    assert sorted(calls) == ["a", "b"]  # c's key does not depend on a
    calls.clear()
    Runner(build(2, calls), tmp_path, None, force=True).run_all()
    assert sorted(calls) == ["a", "b", "c"]


def test_ctrl_c_does_not_wait_for_running_steps(tmp_path):
    """A KeyboardInterrupt (Ctrl-C) while a long step runs propagates at once; the step is
    reported stopped, and the finished step stays cached."""
    import os
    import signal
    import threading
    import time

    calls: list[str] = []
    release = threading.Event()

    def long_fit(ctx):
        release.wait(30)
        return StepResult(outputs={})

    dag = DAG()
    dag.add(_step("ok", {}, calls=calls))
    dag.add(Step("fit", "t", long_fit, {}, ["ok"]))
    events: list[tuple[str, str]] = []
    runner = Runner(dag, tmp_path, None, on_event=lambda event, step, info: events.append((event, step.name)))
    # Python's own handler: a Ray Train fit run earlier in this process's main thread replaces it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()  # a real signal, as Ctrl-C sends
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.run_all()
        assert time.monotonic() - t0 < 5
    finally:
        release.set()
        signal.signal(signal.SIGINT, previous)
    assert ("stopped", "fit") in events and ("done", "ok") in events
    assert Runner(dag, tmp_path, None).run_all() and calls == ["ok"]  # cached: not run again


def test_failed_step_leaves_no_cache_and_keeps_finished_work(tmp_path):
    calls: list[str] = []
    dag = DAG()
    dag.add(_step("ok", {}, calls=calls))

    def boom(ctx):
        raise RuntimeError("boom")

    dag.add(Step("bad", "t", boom, {}, ["ok"]))
    with pytest.raises(RuntimeError, match="boom"):
        Runner(dag, tmp_path, None).run_all()
    dirs = sorted(p.name.split("-")[0] for p in (tmp_path / "steps").iterdir())
    assert dirs == ["ok"]  # the failed step left neither its folder nor a temp folder


def test_unreadable_cached_result_reruns_the_step(tmp_path):
    """A step folder whose result.json is empty or torn (a disk full, a kill mid-write on an
    older version) is not a cache hit: the step runs again instead of the run crashing."""
    calls: list[str] = []
    dag = DAG()
    dag.add(_step("a", {}, calls=calls))
    Runner(dag, tmp_path, None).run_all()
    (marker,) = (tmp_path / "steps").glob("a-*/result.json")
    marker.write_text("")
    res = Runner(dag, tmp_path, None).run_all()
    assert calls == ["a", "a"] and Path(res["a"].outputs["file"]).read_text() == "a"
    marker.write_text('{"outputs": {"fi')
    Runner(dag, tmp_path, None).run_all()
    assert calls == ["a", "a", "a"]


def test_comparison_table_gives_each_method_its_margin_over_its_own_backbones_stronger_floor():
    """distillation.yaml: BYOL and MoCo v3 share a ResNet-18 (two floors: bare and with BN
    statistics), DINO has a ViT (one floor); each margin reads the stronger floor of its backbone."""
    from types import SimpleNamespace

    from pipelines.report import to_markdown
    from pipelines.run import build_dag

    cfg = load_config("pipelines/distillation.yaml")
    dag, table_steps = build_dag(cfg)
    val = {"byol": 60.5, "mocov3": 83.5, "dino": 22.0, "random-init[resnet18-small-16]": 50.0,
           "random-init-bn[resnet18-small-16]": 61.2, "random-init[vit_tiny-16-p4-d128x4]": 26.2}
    results = {}
    for name in table_steps:
        label = name[len("evaluate["):-1]
        results[name] = StepResult(outputs={"label": label, "metrics": {"val_knn_top1": val[label], "test_knn_top1": 1.0}})
    table = comparison_table(cfg, dag, results, SimpleNamespace(child_ids={}), table_steps)
    margin = {r["representation"]: r["val_knn_top1_vs_floor"] for r in table["rows"]}
    assert margin["byol"] == pytest.approx(60.5 - 61.2) and margin["mocov3"] == pytest.approx(83.5 - 61.2)
    assert margin["dino"] == pytest.approx(22.0 - 26.2)
    assert all(margin[k] is None for k in val if k.startswith("random-init"))
    md = to_markdown(table)
    assert "val_knn_top1_vs_floor" in md and "| mocov3 | 83.5 | 1.0 | - | - | +22.3 |" in md and "| dino | 22.0 | 1.0 | - | - | -4.2 |" in md


def test_floor_margins_without_floors_or_values_are_none():
    rows = [{"representation": "a", "val_knn_top1": 70.0}, {"representation": "b", "val_knn_top1": None},
            {"representation": "random-init[x]", "val_knn_top1": 50.0}]
    floor_margins(rows, {"a": "y", "b": "x"})  # a's backbone has no floor row; b has no value
    assert [r["val_knn_top1_vs_floor"] for r in rows] == [None, None, None]
    floor_margins(rows, {"a": "x"})
    assert rows[0]["val_knn_top1_vs_floor"] == pytest.approx(20.0)
