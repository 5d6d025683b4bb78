"""``registry list`` and ``registry promote`` against a real MLflow registry (SQLite, no mocks)."""

from __future__ import annotations

import json

import pytest

from service.cli import main
from service.registry import RegistryLookupError
from service.registry.listing import format_table, list_versions
from tests import registry_store

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sqlite_registry(tmp_path_factory):
    return registry_store.two_versions(tmp_path_factory.mktemp("sqlite-registry"))


def test_list_versions_shows_aliases_metric_run_and_created(sqlite_registry):
    from mlflow import MlflowClient

    rows = list_versions(MlflowClient(sqlite_registry.uri), sqlite_registry.name)
    assert [r.version for r in rows] == ["2", "1"]  # newest first
    newest, oldest = rows
    assert newest.aliases == ["latest-trained"] and oldest.aliases == ["champion"]
    assert (oldest.metric_name, float(oldest.metric_value)) == ("knn_top1", 0.6)
    assert float(newest.metric_value) == 0.4
    assert [oldest.run_id, newest.run_id] == sqlite_registry.run_ids
    assert oldest.created <= newest.created and oldest.created.endswith("+00:00")
    assert newest.towers == "image"


def test_registry_list_cli_prints_a_table_then_json(sqlite_registry, capsys):
    assert main(["registry", "list", "--tracking-uri", sqlite_registry.uri]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    header, *lines, last = out
    assert header.split() == [
        "model", "version", "aliases", "metric", "value", "run_id", "created", "towers"
    ]  # fmt: skip
    mine = [line.split() for line in lines if line.startswith(sqlite_registry.name)]
    assert [cells[1:5] for cells in mine] == [
        ["2", "latest-trained", "knn_top1", "0.4"],
        ["1", "champion", "knn_top1", "0.6"],
    ]
    summary = json.loads(last)
    versions = [v for v in summary["versions"] if v["name"] == sqlite_registry.name]
    assert [v["version"] for v in versions] == ["2", "1"]
    assert versions[1]["run_id"] == sqlite_registry.run_ids[0]
    assert summary["tracking_uri"] == sqlite_registry.uri


def test_registry_list_unknown_model_lists_what_exists(sqlite_registry, capsys):
    from mlflow import MlflowClient

    with pytest.raises(RegistryLookupError, match=sqlite_registry.name):
        list_versions(MlflowClient(sqlite_registry.uri), "no-such-model")
    assert main(["registry", "list", "nope", "--tracking-uri", sqlite_registry.uri]) == 2
    assert "no registered model named 'nope'" in capsys.readouterr().err


def test_format_table_of_nothing_and_of_a_version_without_metric():
    from service.registry.listing import VersionRow

    row = VersionRow("m", "3", [], "", "", "", "2026-01-01T00:00:00+00:00", "image+text")
    assert format_table([row]).splitlines()[1].split() == [
        "m", "3", "-", "-", "-", "-", "2026-01-01", "00:00:00", "image+text"
    ]  # fmt: skip


def test_promote_prints_and_returns_the_previous_version(sqlite_registry, capsys):
    argv = ["registry", "promote", sqlite_registry.name, "2", "--alias", "champion"]
    assert main([*argv, "--tracking-uri", sqlite_registry.uri]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["previous"] == "1"
    assert f"{sqlite_registry.name}@champion -> v2 (previously v1)" in captured.err
    argv = ["registry", "promote", sqlite_registry.name, "1", "--alias", "champion"]
    assert main([*argv, "--tracking-uri", sqlite_registry.uri]) == 0  # put it back
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["previous"] == "2"
    argv = ["registry", "promote", sqlite_registry.name, "1", "--alias", "fresh"]
    assert main([*argv, "--tracking-uri", sqlite_registry.uri]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["previous"] is None
    assert "(was not set before)" in captured.err
