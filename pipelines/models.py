"""Using registered models: resolve ``models:/NAME@alias``, rebuild the encoder, embed shards.

A registered version carries ``encoder/`` (``model.safetensors`` + ``config.json``): the weights
of the shippable :class:`~components.models.embedding.EmbeddingModel` (resize + standardise +
encoder) and the method name and settings that rebuild its architecture from
``components.methods.registry``. Loading it runs no pickled code. ``reprflow embed`` runs it as a
Ray Data batch-inference pass over shards and writes Parquet (``id``, ``embedding``).
"""

from __future__ import annotations

import json
import re
import tempfile
import types
from pathlib import Path

import numpy as np

from components.data import shards as sh
from components.errors import ReprflowError
from pipelines.dag import StepContext, StepResult

ENCODER_DIR = "encoder"


class RegisteredEncoder:
    """Picklable builder of a registered version's ``EmbeddingModel`` (config + safetensors bytes).

    The bytes travel with the builder, so Ray Data actors on any node can build the model
    without access to the MLflow artifact store.
    """

    def __init__(self, config: dict, weights: bytes):
        self.config, self.weights = config, weights

    @classmethod
    def from_dir(cls, path: str | Path) -> "RegisteredEncoder":
        """Read an ``encoder/`` folder (``config.json`` + ``model.safetensors``)."""
        path = Path(path)
        return cls(json.loads((path / "config.json").read_text()), (path / "model.safetensors").read_bytes())

    @classmethod
    def from_run(cls, client, run_id: str) -> "RegisteredEncoder":
        """Download ``encoder/`` from the run that registered a version."""
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = client.download_artifacts(run_id, ENCODER_DIR, tmp)
            except Exception as exc:  # noqa: BLE001 - any store error means the version is unusable
                raise ReprflowError(f"run {run_id} has no readable '{ENCODER_DIR}/' artifact ({exc}); was it registered by reprflow?") from None
            return cls.from_dir(local)

    @property
    def decode_size(self) -> int:
        """Side the images are decoded to before the model (its input size)."""
        if "decode_size" in self.config:
            return int(self.config["decode_size"])
        m = re.search(r"\(N, 3, (\d+), (\d+)\)", self.config.get("input", ""))
        return int(m.group(1)) if m else int(self.config["image_size"])

    def __call__(self):
        from safetensors.torch import load as load_safetensors

        from components.methods.registry import build_method
        from components.models.embedding import EmbeddingModel

        method = build_method(self.config["method"], self.config["settings"])
        model = EmbeddingModel(method.encoder, self.config["image_size"])
        model.load_state_dict(load_safetensors(self.weights), strict=True)
        return model.eval()


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, None, ALIAS); ``models:/NAME/VERSION`` -> (NAME, VERSION, None)."""
    m = re.fullmatch(r"models:/([^/@]+)(?:@([A-Za-z0-9_\-]+)|/(\d+))", uri.strip())
    if not m:
        raise ReprflowError(f"--model {uri!r}: expected models:/NAME@ALIAS (e.g. models:/quickstart-simclr@champion) or models:/NAME/VERSION")
    return m.group(1), m.group(3), m.group(2)


def resolve_version(client, uri: str):
    """The model version a ``models:/`` URI names (a clear error when it does not exist)."""
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_model_uri(uri)
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException:
        known = ", ".join(sorted(m.name for m in client.search_registered_models() if not m.name.endswith(".alias-lock"))) or "none"
        raise ReprflowError(f"{uri}: no such registered model version at {client.tracking_uri} (registered models: {known})") from None


def expand_shards(uris: list[str]) -> list[str]:
    """Shard files from files, shard folders, or dataset roots (all splits)."""
    files: list[str] = []
    for uri in uris:
        fs, path = sh.resolve(uri)
        import pyarrow.fs as pafs

        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            files.append(uri)
            continue
        if info.type == pafs.FileType.NotFound:
            raise ReprflowError(f"shards not found: {uri}")
        try:
            files += sh.list_shards(uri)
        except ReprflowError:
            splits = [f for s in sh.SPLITS for f in _list_or_empty(sh.join(uri, s))]
            if not splits:
                raise ReprflowError(f"no .parquet shards in {uri} (nor in its {'/'.join(sh.SPLITS)} sub-folders)") from None
            files += splits
    return files


def _list_or_empty(uri: str) -> list[str]:
    try:
        return sh.list_shards(uri)
    except ReprflowError:
        return []


def _to_output_rows(batch: dict) -> "object":
    import pyarrow as pa

    emb = np.asarray(batch["embedding"], dtype=np.float32)
    if emb.ndim == 1:  # a batch of object arrays
        emb = np.stack(list(emb)).astype(np.float32) if len(emb) else np.zeros((0, 0), np.float32)
    dim = emb.shape[1] if emb.ndim == 2 else 0
    values = pa.array(emb.reshape(-1), type=pa.float32())
    return pa.table({"id": pa.array([str(i) for i in batch["id"]], type=pa.string()),
                     "embedding": pa.FixedSizeListArray.from_arrays(values, dim)})


def embed_shards(client, model_uri: str, shard_uris: list[str], output: str, batch_size: int = 256, actors: int = 1) -> dict:
    """Batch inference of a registered version over shards; writes Parquet (``id``, ``embedding``).

    Returns a summary (model name/version, rows in/out, output files). Undecodable images are
    skipped and counted.
    """
    import ray

    from pipelines.config import RaySpec
    from pipelines.ray_data import _Embedder
    from pipelines.run import init_ray

    mv = resolve_version(client, model_uri)
    builder = RegisteredEncoder.from_run(client, mv.run_id)
    files = expand_shards(shard_uris)
    out_fs, out_path = sh.resolve(output)
    import pyarrow.fs as pafs

    existing = out_fs.get_file_info(out_path)
    if existing.type == pafs.FileType.File or (existing.type == pafs.FileType.Directory and out_fs.get_file_info(pafs.FileSelector(out_path))):
        raise ReprflowError(f"--output {output} exists and is not empty; choose a new folder")
    if "://" not in output:
        output = str(Path(output).resolve())
    init_ray(types.SimpleNamespace(ray=RaySpec()))
    ds = ray.data.read_parquet(files, columns=["id", "image", "label"], include_paths=True)
    out = ds.map_batches(_Embedder, fn_constructor_kwargs={"build": builder, "decode_size": builder.decode_size}, batch_size=batch_size,
                         batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors))
    out.map_batches(_to_output_rows, batch_format="numpy", batch_size=None).write_parquet(output)
    written = sorted(i.path for i in out_fs.get_file_info(pafs.FileSelector(out_path)) if i.path.endswith(".parquet"))
    rows_in = sh.count_rows(files)
    rows_out = sh.count_rows([f"{output.rstrip('/')}/{Path(p).name}" for p in written]) if written else 0
    return {"model": mv.name, "version": str(mv.version), "rows_in": rows_in, "rows_out": rows_out, "skipped": rows_in - rows_out,
            "files": len(written), "output": output}


def read_embeddings(output: str) -> tuple[np.ndarray, np.ndarray]:
    """Read what :func:`embed_shards` wrote: ``(ids, embeddings (N, D) float32)``."""
    import pyarrow.dataset as pds

    table = pds.dataset(output, format="parquet").to_table()
    ids = np.asarray(table.column("id").to_pylist())
    col = table.column("embedding").combine_chunks()
    dim = col.type.list_size
    return ids, col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)


def embed_registered_step(ctx: StepContext) -> StepResult:
    """Embed the eval dataset's splits with a registered version's ``encoder/`` (as the embed step does
    with a training state), so a champion is re-measured on exactly the challenger's data."""
    from pipelines.ray_data import embed_splits

    s = ctx.step.settings
    data = ctx.inputs[s["dataset_step"]].outputs
    build = RegisteredEncoder.from_run(ctx.run.tracker.client, s["run_id"])
    outputs = embed_splits(data["files"], build, s["decode_size"], s["batch_size"], ctx.out_dir)
    return StepResult(outputs=outputs, params={"representation": s["label"], "model_uri": s["model_uri"]})


def upstream_from_registry(client, uri: str, dest: Path):
    """A ``models:/`` reference as an :class:`~components.methods.base.Upstream`: downloads the
    version's training state (an encoder registered by a pipeline) or its ``tokenizer/`` folder
    into ``dest``; nothing is unpickled (states load with ``weights_only``)."""
    from components.methods.base import Upstream

    mv = resolve_version(client, uri)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    artifacts = {a.path for a in client.list_artifacts(mv.run_id)}
    if "tokenizer" in artifacts:
        local = Path(client.download_artifacts(mv.run_id, "tokenizer", str(dest)))
        from pipelines.register_step import TOKENIZER_META

        meta = json.loads((local / TOKENIZER_META).read_text())
        return Upstream(kind="tokenizer", name=meta["kind"], settings=meta["settings"],
                        state_path=str(local / meta["state"]) if meta.get("state") else None,
                        files={k: str(local / v) for k, v in meta["files"].items()})
    if ENCODER_DIR not in artifacts or "training_state" not in artifacts:
        raise ReprflowError(f"{uri}: version {mv.version} has neither 'tokenizer/' nor 'encoder/' + 'training_state/' artifacts; was it registered by reprflow?")
    config = json.loads(Path(client.download_artifacts(mv.run_id, f"{ENCODER_DIR}/config.json", str(dest))).read_text())
    state_dir = Path(client.download_artifacts(mv.run_id, "training_state", str(dest)))
    state = next(state_dir.glob("*.pt"), None)
    return Upstream(kind="method", name=config["method"], settings=config["settings"], state_path=str(state) if state else None)
