"""The pipeline file: typed, validated once at load, every mistake named by its dotted path.

A pipeline file says which data, which methods, how to judge them and when a new model may
replace the old one. See ``pipelines/quickstart.yaml`` for an annotated example.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from components.errors import ReprflowError
from components.methods.registry import method_class, method_config
from components.tokenizers.registry import TEXT_TOKENIZERS, tokenizer_kind

METRICS = ("knn_top1", "linear_top1")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class DatasetSpec(_Strict):
    """A dataset: generated synthetic scenes, or existing shards (``reprflow ingest`` output)."""

    kind: Literal["scenes", "shards"] = "scenes"
    uri: str | None = Field(None, description="shards: the dataset root (local path, s3://, gs://)")
    train: int = Field(4000, ge=0, description="scenes: number of training images")
    val: int = Field(1000, ge=0)
    test: int = Field(1000, ge=0)
    image_size: int = Field(64, ge=8, le=1024, description="scenes: rendered side in pixels")
    seed: int = 0

    @model_validator(mode="after")
    def _uri_for_shards(self):
        if self.kind == "shards" and not self.uri:
            raise ValueError("kind 'shards' needs 'uri'")
        return self


class TrainSpec(_Strict):
    """How training runs: Ray Train scaling, budget and fault tolerance."""

    dataset: str = Field("scenes", description="name under 'datasets' whose train split is used (labels ignored)")
    num_workers: int = Field(1, ge=0, description="Ray Train workers; 0 = local mode (in-process)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    threads_per_worker: int | None = Field(None, ge=1, description="torch threads per worker; default: cores / workers")
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(256, ge=2, description="global batch size (split across workers)")
    decode_size: int = Field(64, ge=8, le=1024, description="images are decoded once to this square size")
    data_batch_size: int = Field(128, ge=1, description="rows per Ray Data map_batches call")
    shuffle_buffer_batches: int = Field(4, ge=0, description="each epoch reads the row slices in a new random order and mixes "
                                        "the rows of this many per-worker batches before batching (0 = stream order, the "
                                        "same images share a batch every epoch)")
    max_failures: int = Field(2, ge=0, description="worker-group restarts before the step fails")
    controller_retries: int = Field(1, ge=0, description="new fits (from the newest checkpoint) after Ray Train's controller "
                                    "fails or dies, which Ray Train itself does not retry")
    checkpoint_every_epochs: int = Field(1, ge=1)


class BriefSpec(_Strict):
    """The BRIEF baseline row (Calonder et al., ECCV 2010): a bag of binary words per image.

    Off unless enabled. The paper's patch (S = 48) does not fit a 64-px image once a keypoint
    must keep S/2 px from every edge; S = 24 leaves a 40x40 region for keypoints there, and the
    paper's smoothing (Gaussian sigma 2, 9x9) is kept. See ``pipelines/brief_step.py``.
    """

    enabled: bool = Field(False, description="add embed[brief] -> evaluate[brief] (a row of the comparison table)")
    bits: Literal[128, 256, 512] = Field(256, description="n_d, binary tests per descriptor")
    patch_size: int = Field(24, ge=5, le=512, description="S: side of the test patch in pixels; keypoints keep S//2 px from the edges")
    sigma: float = Field(2.0, gt=0, le=10, description="Gaussian pre-smoothing (9x9 window)")
    pattern: Literal["GI", "GII", "GIII", "GIV", "GV"] = Field("GII", description="sampling pattern of the test pairs (the paper's G I..G V)")
    detector: Literal["harris", "fast"] = "harris"
    keypoints_per_image: int = Field(32, ge=1, le=4096, description="top-k keypoints per image")
    codebook_size: int = Field(256, ge=2, le=65536, description="binary words (the vector length)")
    codebook_iterations: int = Field(20, ge=1, le=1000, description="k-majority iterations at most")
    codebook_sample: int = Field(20000, ge=2, description="train-split descriptors the codebook is learnt from (a seeded sample)")


class EvaluateSpec(_Strict):
    """How representations are judged (on the labelled eval dataset's splits)."""

    dataset: str = Field("scenes", description="labelled dataset with train/val/test splits")
    knn_k: int = Field(20, ge=1)
    knn_temperature: float = Field(0.07, gt=0)
    linear_probe: bool = True
    selection_metric: Literal["knn_top1", "linear_top1"] = "knn_top1"
    batch_size: int = Field(256, ge=1)
    brief: BriefSpec = Field(default_factory=BriefSpec, description="the BRIEF bag-of-binary-words baseline row")


class MethodSpec(_Strict):
    """One method to train: its registry name, settings and optional training overrides."""

    name: str
    settings: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict, description="overrides of the top-level 'train' section")


class TokenizerSpec(_Strict):
    """A tokenizer trained as a DAG step (``tokenizer[<name>]``) and registered like a model.

    ``kind`` is an image tokenizer method (e.g. ``dvae``, ``vqkd``: trained by the generic Ray
    Train loop, ``train`` overriding the train section) or a text tokenizer (e.g. ``wordpiece``:
    fitted on the captions of ``dataset``'s train split).
    """

    kind: str
    settings: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict, description="image tokenizers: overrides of the top-level 'train' section")
    dataset: str | None = Field(None, description="dataset whose train split it is fitted on; default: train.dataset")


class RegisterSpec(_Strict):
    """Registration policy: model ``<pipeline>-<method>``, alias moved only on a win (val split)."""

    enabled: bool = True
    alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_\-]*$")
    min_improvement: float = Field(0.0, ge=0, description="points the challenger must win by")


class RetrainSpec(_Strict):
    """Periodic retraining (``reprflow retrain``): which shards, how long, how much better."""

    data: Literal["new", "all"] = Field("new", description="train on the shards that arrived since the champion's watermark, or on all shards")
    epochs: int | None = Field(None, ge=1, description="epochs of a retrain (the schedule restarts); default: the train section's epochs")
    margin: float = Field(0.0, ge=-100, le=100, description="points of the selection metric (val split) the challenger must win by; "
                          "negative lets a slightly worse challenger trained on fresher data replace the champion")


class MlflowSpec(_Strict):
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite in the storage folder")
    experiment: str | None = Field(None, description="default: the pipeline name")


class RaySpec(_Strict):
    address: str | None = Field(None, description="existing cluster ('auto', 'ray://...'); default: start a local one")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local cluster; default max(4, cores)")


class PipelineConfig(_Strict):
    """The whole pipeline file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
    seed: int = 0
    storage: str = Field(".reprflow", description="step cache, checkpoints and the local MLflow store")
    datasets: dict[str, DatasetSpec] = Field(default_factory=lambda: {"scenes": DatasetSpec()})
    train: TrainSpec = Field(default_factory=TrainSpec)
    methods: list[MethodSpec] = Field(min_length=1)
    tokenizers: dict[str, TokenizerSpec] = Field(default_factory=dict, description="tokenizers trained as steps; methods refer to them by name")
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    registration: RegisterSpec = Field(default_factory=RegisterSpec, alias="register")
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec)
    ray: RaySpec = Field(default_factory=RaySpec)
    retrain: RetrainSpec = Field(default_factory=RetrainSpec)

    @field_validator("storage")
    @classmethod
    def _local_storage(cls, value: str) -> str:
        # The step cache and Ray Train checkpoints are plain files: on a cluster, a shared mount.
        if "://" in value:
            raise ValueError(f"'{value}': storage must be a local or mounted path (e.g. an NFS/EFS mount on every node); "
                             "object stores are supported for shards (datasets.*.uri), not for the step cache")
        return value

    @model_validator(mode="after")
    def _cross_refs(self):
        for section, ds in (("train.dataset", self.train.dataset), ("evaluate.dataset", self.evaluate.dataset)):
            if ds not in self.datasets:
                raise _FieldError(section, f"dataset '{ds}' is not defined under 'datasets' (defined: {', '.join(self.datasets) or 'none'})")
        names = [m.name for m in self.methods]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise _FieldError("methods", f"method(s) listed twice: {', '.join(sorted(dup))}")
        for name, tok in self.tokenizers.items():
            if name in names:
                raise _FieldError(f"tokenizers.{name}", f"'{name}' is also a method name; references would be ambiguous")
            if tok.dataset is not None and tok.dataset not in self.datasets:
                raise _FieldError(f"tokenizers.{name}.dataset", f"dataset '{tok.dataset}' is not defined under 'datasets'")
        return self

    def tokenizer_dataset(self, name: str) -> str:
        """The dataset a tokenizer is fitted on."""
        return self.tokenizers[name].dataset or self.train.dataset

    @model_validator(mode="after")
    def _brief_fits(self):
        # BRIEF keypoints keep S//2 px from every edge of the decoded image: leave them room.
        b, size = self.evaluate.brief, self.train.decode_size
        if b.enabled and size - 2 * (b.patch_size // 2) < 8:
            raise _FieldError("evaluate.brief.patch_size", f"{b.patch_size} leaves no room for keypoints in {size}-px images "
                              f"(train.decode_size); use at most {size - 8}")
        return self

    def method_train(self, spec: "MethodSpec | TokenizerSpec") -> TrainSpec:
        """The train section with the method's (or image tokenizer's) overrides applied (validated)."""
        merged = {**self.train.model_dump(), **spec.train}
        return TrainSpec.model_validate(merged)

    def storage_path(self) -> Path:
        """The storage folder: ``$REPRFLOW_STORAGE`` if set (e.g. a cluster's shared mount), else ``storage``."""
        override = os.environ.get("REPRFLOW_STORAGE")
        if override and "://" in override:
            raise ReprflowError(f"REPRFLOW_STORAGE={override}: storage must be a local or mounted path, not an object store URI")
        return Path(override or self.storage).expanduser().resolve()

    def tracking_uri(self) -> str:
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        if self.mlflow.tracking_uri:
            return self.mlflow.tracking_uri
        return f"sqlite:///{self.storage_path() / 'mlflow.db'}"


class _FieldError(ValueError):
    def __init__(self, path: str, msg: str):
        super().__init__(msg)
        self.path, self.msg = path, msg


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur: Any = data
    for k in keys[:-1]:
        if isinstance(cur, list):
            cur = cur[int(k)]
        else:
            cur = cur.setdefault(k, {})
    if isinstance(cur, list):
        cur[int(keys[-1])] = value
    else:
        cur[keys[-1]] = value


def parse_config(data: Any, source: str = "pipeline", overrides: list[str] | None = None) -> PipelineConfig:
    """Validate a pipeline dict; a :class:`ReprflowError` names the first bad field.

    ``overrides`` are ``dotted.key=value`` strings (values parsed as YAML), e.g.
    ``train.epochs=2`` or ``methods.0.settings.temperature=0.2``.
    """
    if not isinstance(data, dict):
        raise ReprflowError(f"{source}: the pipeline file must be a mapping of sections, got {type(data).__name__}")
    data = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise ReprflowError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=2")
        key, value = item.split("=", 1)
        try:
            _set_dotted(data, key.strip(), yaml.safe_load(value))
        except (IndexError, ValueError, TypeError, AttributeError):
            raise ReprflowError(f"--set {item!r}: '{key}' does not name a field of the pipeline file") from None
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _FieldError):
            raise ReprflowError(f"{source}: {ctx_err.path}: {ctx_err.msg}") from None
        path = _dotted(tuple(err["loc"])) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see pipelines/quickstart.yaml for the known keys)"
        raise ReprflowError(f"{source}: {path}: {msg}") from None
    for i, spec in enumerate(cfg.methods):
        _check_known(spec.name, source, i)
        method_config(spec.name, spec.settings, where=f"{source}: methods[{i}].settings")
        if method_class(spec.name).is_tokenizer:
            raise ReprflowError(f"{source}: methods[{i}].name: '{spec.name}' is a tokenizer; declare it under 'tokenizers:' "
                                f"(e.g. tokenizers: {{my-{spec.name}: {{kind: {spec.name}}}}}) and refer to it by name")
        try:
            cfg.method_train(spec)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ReprflowError(f"{source}: methods[{i}].train.{_dotted(tuple(err['loc']))}: {err['msg']}") from None
    for name, tok in cfg.tokenizers.items():
        try:
            sort = tokenizer_kind(tok.kind)
        except ReprflowError as exc:
            raise ReprflowError(f"{source}: tokenizers.{name}.kind: {exc}") from None
        if sort == "image":
            method_config(tok.kind, tok.settings, where=f"{source}: tokenizers.{name}.settings")
            try:
                cfg.method_train(tok)
            except ValidationError as exc:
                err = exc.errors()[0]
                raise ReprflowError(f"{source}: tokenizers.{name}.train.{_dotted(tuple(err['loc']))}: {err['msg']}") from None
    reference_graph(cfg, source)
    return cfg


def references_of(cfg: PipelineConfig) -> dict[tuple[str, str], dict[str, str]]:
    """``{(sort, name): {field: value}}`` for every method ("method") and image tokenizer
    ("tokenizer") with references set (``Method.references``); values as written."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    nodes = [("method", m.name, m.name, m.settings) for m in cfg.methods]
    nodes += [("tokenizer", n, t.kind, t.settings) for n, t in cfg.tokenizers.items() if t.kind not in _text_kinds()]
    for sort, name, kind, settings in nodes:
        cls = method_class(kind)
        if not cls.references:
            continue
        validated = method_config(kind, settings)
        refs = {f: getattr(validated, f) for f in cls.references if getattr(validated, f, None)}
        if refs:
            out[(sort, name)] = refs
    return out


def reference_target(cfg: PipelineConfig, value: str) -> tuple[str, str] | None:
    """What a reference points at: ("method", name), ("tokenizer", name), or None for a models:/ URI."""
    if value.startswith("models:/"):
        return None
    if value in {m.name for m in cfg.methods}:
        return ("method", value)
    if value in cfg.tokenizers:
        return ("tokenizer", value)
    raise KeyError(value)


def reference_graph(cfg: PipelineConfig, source: str = "pipeline") -> dict[tuple[str, str], dict[str, tuple[str, str] | None]]:
    """Resolve every reference; a ReprflowError names the field of an unknown target or a cycle."""
    where = {("method", m.name): f"methods[{i}].settings" for i, m in enumerate(cfg.methods)}
    where.update({("tokenizer", n): f"tokenizers.{n}.settings" for n in cfg.tokenizers})
    graph: dict[tuple[str, str], dict[str, tuple[str, str] | None]] = {}
    for node, refs in references_of(cfg).items():
        graph[node] = {}
        for fld, value in refs.items():
            try:
                graph[node][fld] = reference_target(cfg, value)
            except KeyError:
                raise ReprflowError(
                    f"{source}: {where[node]}.{fld}: '{value}' is neither a method ({', '.join(m.name for m in cfg.methods)}) "
                    f"nor a tokenizer ({', '.join(cfg.tokenizers) or 'none'}) of this pipeline, nor a models:/NAME@ALIAS URI") from None
            if graph[node][fld] == node:
                raise ReprflowError(f"{source}: {where[node]}.{fld}: '{value}' refers to itself")
    state: dict[tuple[str, str], int] = {}

    def visit(node, path):
        if state.get(node) == 2:
            return
        if state.get(node) == 1:
            cycle = " -> ".join(f"{s}[{n}]" for s, n in [*path, node])
            raise ReprflowError(f"{source}: {where[path[0]]}: references form a cycle: {cycle}")
        state[node] = 1
        for target in graph.get(node, {}).values():
            if target is not None:
                visit(target, [*path, node])
        state[node] = 2

    for node in graph:
        visit(node, [])
    return graph


def _text_kinds() -> set[str]:
    return set(TEXT_TOKENIZERS)


def _check_known(name: str, source: str, i: int) -> None:
    from components.methods.registry import METHODS

    if name not in METHODS:
        raise ReprflowError(f"{source}: methods[{i}].name: unknown method '{name}'; known methods: {', '.join(sorted(METHODS))}")


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read and validate a pipeline YAML file."""
    p = Path(path)
    if not p.is_file():
        raise ReprflowError(f"pipeline file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ReprflowError(f"{path}: not valid YAML{where}: {problem}") from None  # one line, as every CLI error
    return parse_config(data, source=str(path), overrides=overrides)
