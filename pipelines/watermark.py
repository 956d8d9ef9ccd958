"""The data watermark: which training shards a registered version has seen.

Every registered version records the train shards it was trained on (``watermark.json``, an
artifact of its register run) and a summary as model-version tags. ``reprflow retrain`` reads
the champion's watermark and treats every shard not in it - a new file, or a file whose Parquet
footer changed - as new. Shards are identified by their path relative to the dataset root
(``train/part-00012.parquet``), so a dataset moved to another bucket keeps its watermark.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from components.data import shards as sh

TAG_SUMMARY = "reprflow.watermark"
TAG_URI = "reprflow.watermark_artifact"
ARTIFACT_DIR = "watermark"
ARTIFACT = f"{ARTIFACT_DIR}/watermark.json"


def relative_name(root: str, file_uri: str) -> str:
    """``train/part-00000.parquet`` for a file under ``root`` (the last two parts otherwise)."""
    prefix = root.rstrip("/") + "/"
    if file_uri.startswith(prefix):
        return file_uri[len(prefix):]
    return "/".join(file_uri.rstrip("/").split("/")[-2:])


def compute(root: str, files: list[str]) -> dict:
    """The watermark of ``files`` under dataset ``root``: per-file footer signature + overall fingerprint."""
    per_file = {relative_name(root, f): sh.fingerprint_files([f]) for f in sorted(files)}
    return {"dataset": root, "files": per_file, "fingerprint": _fingerprint_of(per_file)}


def new_files(watermark: dict | None, root: str, files: list[str]) -> list[str]:
    """Files not covered by ``watermark`` (unseen names, or seen names whose content changed)."""
    seen = (watermark or {}).get("files", {})
    out = []
    for f in sorted(files):
        rel = relative_name(root, f)
        if rel not in seen or seen[rel] != sh.fingerprint_files([f]):
            out.append(f)
    return out


def _fingerprint_of(files: dict[str, str]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def summary(watermark: dict) -> str:
    """One line for the model-version tag (the full list is the artifact)."""
    names = sorted(watermark["files"])
    last = names[-1] if names else "-"
    return f"{len(names)} train shards, last {last}, fingerprint {watermark['fingerprint']}"


def log(client, run_id: str, watermark: dict) -> None:
    """Write ``watermark.json`` as an artifact of ``run_id``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "watermark.json"
        path.write_text(json.dumps(watermark, indent=2, sort_keys=True))
        client.log_artifact(run_id, str(path), ARTIFACT_DIR)


def tag_version(client, name: str, version: str, watermark: dict) -> None:
    """Point the model version at its watermark (summary + artifact path)."""
    client.set_model_version_tag(name, version, TAG_SUMMARY, summary(watermark))
    client.set_model_version_tag(name, version, TAG_URI, ARTIFACT)


def read(client, version) -> dict | None:
    """The watermark a model version recorded, or None (a version registered before watermarks)."""
    if TAG_URI not in (version.tags or {}) or not version.run_id:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(version.run_id, version.tags[TAG_URI], tmp)
        return json.loads(Path(local).read_text())
