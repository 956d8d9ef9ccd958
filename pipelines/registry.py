"""Registry policy: every trained encoder becomes a version; the alias moves only on a win.

The alias (``@champion`` by default) is compared on the pipeline's selection metric measured on
the **val** split; the test split is reported, never used to choose. A champion measured on
other eval data than the challenger is re-measured on the challenger's data first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

TAG_METRIC = "reprflow.val_metric"
TAG_SCORE = "reprflow.val_score"
TAG_EVAL_FP = "reprflow.eval_fingerprint"


@dataclass
class Decision:
    """Outcome of the promotion gate."""

    version: str
    promoted: bool
    challenger: float
    champion: float | None
    champion_version: str | None
    reason: str


def current_alias(client: MlflowClient, name: str, alias: str):
    """The version holding ``alias``, or None."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def gate(
    client: MlflowClient,
    name: str,
    version: str,
    score: float,
    metric: str,
    eval_fingerprint: str,
    alias: str = "champion",
    min_improvement: float = 0.0,
    rescore: Callable[[object], float] | None = None,
) -> Decision:
    """Move ``alias`` to ``version`` only if ``score`` beats the champion's by ``min_improvement``.

    The version is tagged with its score, metric and eval-data fingerprint, and with the
    decision. ``rescore(champion_version)`` re-measures a champion whose recorded score was
    measured on other eval data (or with another metric); without it, such a champion is kept.
    """
    client.set_model_version_tag(name, version, TAG_METRIC, metric)
    client.set_model_version_tag(name, version, TAG_SCORE, f"{score:.6f}")
    client.set_model_version_tag(name, version, TAG_EVAL_FP, eval_fingerprint)
    champ = current_alias(client, name, alias)
    champ_score: float | None = None
    if champ is not None and str(champ.version) == str(version):
        return Decision(str(version), True, score, score, str(champ.version), "already the champion")
    if champ is not None:
        tags = champ.tags or {}
        if tags.get(TAG_EVAL_FP) == eval_fingerprint and tags.get(TAG_METRIC) == metric and TAG_SCORE in tags:
            champ_score = float(tags[TAG_SCORE])
        elif rescore is not None:
            champ_score = rescore(champ)
        else:
            decision = Decision(str(version), False, score, None, str(champ.version), "champion was measured on other eval data and cannot be re-measured")
            _record(client, name, version, decision)
            return decision
    if champ is None:
        decision = Decision(str(version), True, score, None, None, "no champion yet")
    elif score > champ_score + min_improvement:
        decision = Decision(str(version), True, score, champ_score, str(champ.version), f"val {metric} {score:.2f} > champion {champ_score:.2f} + {min_improvement}")
    else:
        decision = Decision(str(version), False, score, champ_score, str(champ.version), f"val {metric} {score:.2f} <= champion {champ_score:.2f} + {min_improvement}")
    if decision.promoted:
        client.set_registered_model_alias(name, alias, str(version))
    _record(client, name, version, decision)
    return decision


def _record(client: MlflowClient, name: str, version: str, d: Decision) -> None:
    client.set_model_version_tag(name, version, "reprflow.decision", "promoted" if d.promoted else "kept_champion")
    client.set_model_version_tag(name, version, "reprflow.decision_reason", d.reason)
    if d.champion_version:
        client.set_model_version_tag(name, version, "reprflow.compared_with_version", d.champion_version)
