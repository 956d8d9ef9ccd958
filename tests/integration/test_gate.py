"""The promotion gate against a real MLflow registry (SQLite): it moves the alias both ways honestly."""

import pytest
from mlflow.tracking import MlflowClient

from pipelines.registry import gate

pytestmark = pytest.mark.integration


def _version(client, name, run_id):
    return client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id).version


def test_gate_keeps_a_better_champion_and_promotes_a_better_challenger(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("gate", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(exp).info.run_id
    client.create_registered_model("p-simclr")
    v1 = _version(client, "p-simclr", run_id)
    d1 = gate(client, "p-simclr", v1, 50.0, "knn_top1", "fp")
    assert d1.promoted and d1.reason == "no champion yet"
    v2 = _version(client, "p-simclr", run_id)
    d2 = gate(client, "p-simclr", v2, 40.0, "knn_top1", "fp")
    assert not d2.promoted and str(client.get_model_version_by_alias("p-simclr", "champion").version) == str(v1)
    assert client.get_model_version("p-simclr", v2).tags["reprflow.decision"] == "kept_champion"
    v3 = _version(client, "p-simclr", run_id)
    d3 = gate(client, "p-simclr", v3, 50.5, "knn_top1", "fp", min_improvement=1.0)
    assert not d3.promoted  # wins, but not by the required margin
    v4 = _version(client, "p-simclr", run_id)
    d4 = gate(client, "p-simclr", v4, 60.0, "knn_top1", "fp")
    assert d4.promoted and d4.champion == 50.0 and d4.champion_version == str(v1)
    assert str(client.get_model_version_by_alias("p-simclr", "champion").version) == str(v4)
    # A champion measured on other eval data is re-measured (rescore) before comparing.
    v5 = _version(client, "p-simclr", run_id)
    d5 = gate(client, "p-simclr", v5, 61.0, "knn_top1", "other-fp", rescore=lambda champ: 70.0)
    assert not d5.promoted and d5.champion == 70.0
