"""The cluster manifests cannot rot silently: structure, images, Ray versions and entrypoints.

Docker and Kubernetes are not available here, so these tests check what can be checked
offline: the cluster-launcher YAML against Ray's own schema, the KubeRay resources against the
fields KubeRay 1.6 requires, every image against the Dockerfile's tag, and every entrypoint
against reprflow's real CLI parser and pipeline files.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import ray
import yaml

from pipelines.cli import build_parser
from pipelines.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
IMAGE_DIR = "/home/ray/reprflow"  # WORKDIR of the image (where the project is copied)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _dockerfile() -> dict:
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)$", text, re.M).group(1)
    tag = re.search(r'org\.opencontainers\.image\.ref\.name="([^"]+)"', text).group(1)
    workdir = re.search(r"^WORKDIR (\S+)$", text, re.M).group(1)
    return {"text": text, "ray": base.split("-")[0], "base": base, "image": tag, "workdir": workdir}


def _version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _kuberay() -> dict[str, dict]:
    out = {}
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for doc in _docs(path):
            out[doc["kind"]] = doc
    return out


def _cluster_specs() -> list[tuple[str, dict]]:
    k = _kuberay()
    return [("RayCluster", k["RayCluster"]["spec"]), ("RayJob", k["RayJob"]["spec"]["rayClusterSpec"]),
            ("RayCronJob", k["RayCronJob"]["spec"]["jobTemplate"]["rayClusterSpec"])]


def _containers(spec: dict) -> list[dict]:
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [c for p in pods for c in p["spec"]["containers"]]


def _check_entrypoint(entrypoint: str, expected_command: str) -> None:
    """A real `reprflow` subcommand whose pipeline file exists in the image and validates."""
    argv = shlex.split(entrypoint)
    assert argv[0] == "reprflow", entrypoint
    args = build_parser().parse_args(argv[1:])  # SystemExit (test failure) if not a valid command line
    assert args.command == expected_command
    pipeline = Path(args.pipeline)
    assert pipeline.is_absolute() and str(pipeline).startswith(IMAGE_DIR + "/"), "jobs run the image's copy of the project"
    local = ROOT / pipeline.relative_to(IMAGE_DIR)
    assert local.is_file(), f"{local} is not in the project, so not in the image"
    cfg = load_config(local, args.set)
    assert cfg.train.use_gpu and Path(cfg.storage).is_absolute()
    if expected_command == "retrain":
        assert cfg.datasets[cfg.train.dataset].kind == "shards"  # retraining picks up new shards


def test_dockerfile_matches_the_project():
    d = _dockerfile()
    assert d["image"] == f"ghcr.io/your-org/reprflow:{_version()}"
    assert d["base"].endswith("-gpu") and "-py311" in d["base"]
    # A job submitted from this machine must talk to the same Ray version.
    assert d["ray"].split(".")[:2] == ray.__version__.split(".")[:2]
    assert d["workdir"] == IMAGE_DIR
    for folder in ("components", "pipelines", "cluster"):
        assert re.search(rf"^COPY .*\b{folder} \./{folder}$", d["text"], re.M), folder
    assert re.search(r"^RUN pip install --no-cache-dir \. ", d["text"], re.M)  # puts `reprflow` on PATH


def test_kuberay_resources_have_their_required_structure():
    k = _kuberay()
    assert set(k) == {"PersistentVolumeClaim", "RayCluster", "RayJob", "RayCronJob"}
    for kind in ("RayCluster", "RayJob", "RayCronJob"):
        assert k[kind]["apiVersion"] == "ray.io/v1" and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", k[kind]["metadata"]["name"])
    assert k["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert k["RayCluster"]["spec"]["authOptions"] == {"mode": "token"}
    job = k["RayJob"]["spec"]
    assert job["shutdownAfterJobFinishes"] is True and "rayClusterSpec" in job
    cron = k["RayCronJob"]["spec"]
    fields = cron["schedule"].split()
    assert len(fields) == 5 and all(re.fullmatch(r"[\d*/,\-]+", f) for f in fields)
    assert cron["jobTemplate"]["shutdownAfterJobFinishes"] is True


def test_every_ray_cluster_uses_the_image_gpus_and_the_shared_volume():
    d = _dockerfile()
    pvc = _kuberay()["PersistentVolumeClaim"]["metadata"]["name"]
    for kind, spec in _cluster_specs():
        assert spec["rayVersion"] == d["ray"], kind
        assert {c["image"] for c in _containers(spec)} == {d["image"]}, kind
        head = spec["headGroupSpec"]
        assert head["template"]["spec"]["containers"][0]["name"] == "ray-head" and "rayStartParams" in head
        workers = spec["workerGroupSpecs"]
        assert workers and all(g["groupName"] and "rayStartParams" in g and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in workers)
        for g in workers:
            for c in g["template"]["spec"]["containers"]:
                assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == "1", kind
        for c in _containers(spec):
            env = {e["name"]: e["value"] for e in c["env"]}
            assert env["REPRFLOW_STORAGE"].startswith("/mnt/reprflow/") and env["MLFLOW_TRACKING_URI"].startswith("http"), kind
            assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/mnt/reprflow"}
        pods = [head["template"]] + [g["template"] for g in workers]
        for pod in pods:
            claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
            assert claims == [pvc], kind


def test_job_entrypoints_are_real_reprflow_commands_on_real_pipeline_files():
    k = _kuberay()
    _check_entrypoint(k["RayJob"]["spec"]["entrypoint"], "run")
    _check_entrypoint(k["RayCronJob"]["spec"]["jobTemplate"]["entrypoint"], "retrain")
    # The GPU workers a job asks for exist in its cluster.
    args = build_parser().parse_args(shlex.split(k["RayJob"]["spec"]["entrypoint"])[1:])
    cfg = load_config(ROOT / Path(args.pipeline).relative_to(IMAGE_DIR), args.set)
    assert cfg.train.num_workers <= sum(g["maxReplicas"] for g in k["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"])


def test_cluster_launcher_config_passes_rays_own_validation():
    import json

    import jsonschema

    cfg = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)  # the schema `ray up` validates cluster launcher files with
    d = _dockerfile()
    assert cfg["provider"]["type"] == "aws" and cfg["docker"]["image"] == d["image"]
    assert cfg["head_node_type"] in cfg["available_node_types"]
    gpu = [t for t in cfg["available_node_types"].values() if re.match(r"(g|p)\d", t["node_config"]["InstanceType"])]
    assert gpu and all(t["max_workers"] >= 1 for t in gpu)
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head_start and "--dashboard-host=127.0.0.1" in head_start  # reached through `ray dashboard` (SSH)
    assert any("RAY_AUTH_MODE=token" in o for o in cfg["docker"]["run_options"])
    assert any(o.startswith("-v /mnt/reprflow:") for o in cfg["docker"]["run_options"])


def _documented_commands() -> list[str]:
    """`reprflow ...` command lines in the READMEs' shell and cron blocks (also after `ray job submit ... --`)."""
    out = []
    for path in (ROOT / "README.md", CLUSTER / "README.md"):
        for block in re.findall(r"```(?:bash|cron)\n(.*?)```", path.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s&$", "", line.split(" #", 1)[0].split(">>", 1)[0].strip())
                for part in re.split(r"\s--\s|&&", line):
                    m = re.match(r"(?:\S*/bin/)?(reprflow\s+[a-z].*)$", part.strip())
                    if m:
                        out.append(m.group(1).strip())
    return out


def test_documented_cli_examples_are_valid_command_lines():
    """Every `reprflow ...` command in the READMEs parses with the real parser (they were also run by hand)."""
    parser = build_parser()
    lines = _documented_commands()
    assert len(lines) >= 12
    commands = set()
    for line in lines:
        argv = shlex.split(line)
        if any(a.startswith("<") for a in argv):
            continue
        commands.add(parser.parse_args(argv[1:]).command)
    assert {"submit", "jobs", "logs", "stop", "retrain", "promote", "rollback", "embed", "gc", "ui"} <= commands


def test_working_dir_package_keeps_the_venv_and_caches_out():
    """What `reprflow submit` uploads: the code, not .venv/.reprflow/out (Ray's own packager)."""
    import tempfile
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "pkg.zip"
        create_package(str(ROOT), pkg, include_gitignore=True)
        names = zipfile.ZipFile(pkg).namelist()
        size = pkg.stat().st_size
    tops = {n.split("/")[0] for n in names}
    assert {"components", "pipelines", "cluster", "pyproject.toml"} <= tops
    assert not tops & {".venv", ".reprflow", "out", ".git", "mlruns", "mlartifacts"}
    assert "components/data/shards.py" in names  # '/data/' in .rayignore is anchored at the root
    assert size < 20 * 2**20


@pytest.mark.parametrize("path", ["cluster/photos.yaml"])
def test_cluster_pipeline_file_is_valid(path):
    cfg = load_config(ROOT / path)
    assert cfg.retrain.data == "new" and cfg.storage.startswith("/mnt/reprflow/")
