"""References between steps: a method naming another method, a tokenizer, or a models:/ URI.

Toy methods (SimCLR subclasses registered for the test) stand in for BEiT v2 / VQ-KD /
VisualBERT, so the config checks and the DAG's order are tested without those methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest

from components.errors import ReprflowError
from components.methods import registry
from components.methods.simclr import SimCLR, SimCLRConfig
from pipelines.config import parse_config
from pipelines.run import build_dag
from tests.conftest import TINY_METHODS, tiny_config


class StudentConfig(SimCLRConfig):
    teacher: str | None = None
    tokenizer: str | None = None


class Student(SimCLR):
    """Refers to a teacher method and a tokenizer."""

    Config = StudentConfig
    references: ClassVar[tuple[str, ...]] = ("teacher", "tokenizer")


class TokConfig(SimCLRConfig):
    teacher: str | None = None


class Tok(SimCLR):
    """An image tokenizer that distils a teacher (like VQ-KD)."""

    Config = TokConfig
    references: ClassVar[tuple[str, ...]] = ("teacher",)
    is_tokenizer: ClassVar[bool] = True


@pytest.fixture
def toys(monkeypatch):
    monkeypatch.setitem(registry.METHODS, "student", f"{__name__}:Student")
    monkeypatch.setitem(registry.METHODS, "tok", f"{__name__}:Tok")


def _cfg(tmp_path: Path, student: dict, tokenizers: dict | None = None, extra: dict | None = None):
    methods = {"student": {**TINY_METHODS["simclr"], **student}, "simclr": TINY_METHODS["simclr"], **(extra or {})}
    data = tiny_config(tmp_path, methods=methods)
    data["tokenizers"] = tokenizers or {}
    return parse_config(data)


def test_steps_follow_references_whatever_the_file_order(toys, tmp_path):
    cfg = _cfg(tmp_path, {"teacher": "simclr", "tokenizer": "vq"}, {"vq": {"kind": "tok", "settings": {**TINY_METHODS["simclr"], "teacher": "simclr"}, "train": {"epochs": 1}}})
    dag, rows = build_dag(cfg)
    names = list(dag.steps)
    assert names.index("train[simclr]") < names.index("tokenizer[vq]") < names.index("train[student]")
    assert set(dag.steps["tokenizer[vq]"].inputs) == {"dataset[scenes]", "train[simclr]"}
    assert set(dag.steps["train[student]"].inputs) == {"dataset[scenes]", "train[simclr]", "tokenizer[vq]"}
    assert dag.steps["train[student]"].settings["references"] == {"teacher": "train[simclr]", "tokenizer": "tokenizer[vq]"}
    assert dag.steps["tokenizer[vq]"].settings["train"]["epochs"] == 1  # the tokenizer's own train overrides
    assert "register[tokenizer-vq]" in dag.steps
    assert "evaluate[vq]" not in dag.steps and "evaluate[student]" in rows  # a tokenizer is not a table row


def test_changing_the_teacher_changes_every_key_below_it(toys, tmp_path):
    tok = {"vq": {"kind": "tok", "settings": {**TINY_METHODS["simclr"], "teacher": "simclr"}}}
    a = build_dag(_cfg(tmp_path, {"tokenizer": "vq"}, tok))[0]
    b = build_dag(_cfg(tmp_path, {"tokenizer": "vq"}, tok, extra={"simclr": {**TINY_METHODS["simclr"], "temperature": 0.3}}))[0]
    assert a.steps["tokenizer[vq]"].key != b.steps["tokenizer[vq]"].key
    assert a.steps["train[student]"].key != b.steps["train[student]"].key


def test_models_uri_is_pinned_to_a_version_in_the_key(toys, tmp_path):
    cfg = _cfg(tmp_path, {"teacher": "models:/other-dino@champion"})
    v1 = build_dag(cfg, resolve_model=lambda uri: "other-dino/1")[0].steps["train[student]"]
    v2 = build_dag(cfg, resolve_model=lambda uri: "other-dino/2")[0].steps["train[student]"]
    assert v1.inputs == ["dataset[scenes]"] and v1.settings["references"] == {"teacher": "models:/other-dino@champion#other-dino/1"}
    assert v1.key != v2.key


def test_bad_references_name_the_field(toys, tmp_path):
    with pytest.raises(ReprflowError, match=r"methods\[0\]\.settings\.teacher: 'dinoo' is neither a method \(student, simclr\) nor a tokenizer \(none\)"):
        _cfg(tmp_path, {"teacher": "dinoo"})
    with pytest.raises(ReprflowError, match=r"methods\[0\]\.settings\.teacher: 'student' refers to itself"):
        _cfg(tmp_path, {"teacher": "student"})
    cyc = {"vq": {"kind": "tok", "settings": {**TINY_METHODS["simclr"], "teacher": "student"}}}
    with pytest.raises(ReprflowError, match=r"references form a cycle: .*tokenizer\[vq\].*method\[student\]|references form a cycle: .*method\[student\].*tokenizer\[vq\]"):
        _cfg(tmp_path, {"tokenizer": "vq"}, cyc)
    with pytest.raises(ReprflowError, match=r"tokenizers\.vq\.kind: unknown tokenizer kind 'nope'"):
        _cfg(tmp_path, {}, {"vq": {"kind": "nope"}})
    with pytest.raises(ReprflowError, match=r"methods\[2\]\.name: 'tok' is a tokenizer; declare it under 'tokenizers:'"):
        _cfg(tmp_path, {}, extra={"tok": TINY_METHODS["simclr"]})
    with pytest.raises(ReprflowError, match=r"tokenizers\.simclr: 'simclr' is also a method name"):
        _cfg(tmp_path, {}, {"simclr": {"kind": "tok"}})
    with pytest.raises(ReprflowError, match=r"tokenizers\.vq\.settings\.temperature"):
        _cfg(tmp_path, {}, {"vq": {"kind": "tok", "settings": {"temperature": -1}}})
