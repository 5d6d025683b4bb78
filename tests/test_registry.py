"""Encoder registry against a real `mlflow server`: register, aliases, pull, load, embed.

Registration is the slow part (log_model + register), so one module-scoped fixture registers two
versions (a better, then a worse metric) and every test reads from them.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from service.config import BUNDLED_DATA_DIR, Config
from service.data.augment import eval_transform
from service.data.decode import decode_image
from service.models import build_model
from service.registry import (
    CHAMPION_ALIAS,
    DECISION_ARTIFACT,
    LATEST_ALIAS,
    EncoderSpec,
    EncoderSpecError,
    ModelRef,
    RegistryError,
    RegistryLookupError,
    apply_alias_policy,
    decide_champion,
    embed_parquet,
    judge,
    load_encoder,
    parse_model_ref,
    promote,
    pull,
    register_encoder,
    version_tags,
)
from service.registry.aliases import metric_tag
from service.registry.spec import WEIGHTS_FILE
from service.registry.validation import ValidationData
from service.tracking.runs import start_pretrain_run

pytestmark = pytest.mark.usefixtures("one_thread")

TEST_PARQUET = BUNDLED_DATA_DIR / "cifar10-test-subset.parquet"


def _image_batch(config: Config, rows: int) -> tuple[torch.Tensor, pa.Table]:
    table = pq.read_table(TEST_PARQUET).slice(0, rows)
    transform = eval_transform(config.data.image_size, config.augment.mean, config.augment.std)
    images = [transform(decode_image(data)) for data in table.column("image").to_pylist()]
    return torch.stack(images), table


@pytest.fixture(scope="module")
def registry(mlflow_server):
    """Two versions of one registered model: v1 (knn 0.60, champion) then v2 (knn 0.40)."""
    config = Config()
    config.mlflow.experiment = "test-registry"
    name = f"test-encoder-{uuid.uuid4().hex[:8]}"
    images, _ = _image_batch(config, 16)
    example = images[:2].numpy()

    encoders, results, run_ids = [], [], []
    for seed, knn in ((0, 0.60), (1, 0.40)):
        torch.manual_seed(seed)
        backbone = build_model(config.model).backbone.eval()
        run_id = start_pretrain_run(config, mlflow_server.url, run_name=f"registry-{seed}")
        results.append(
            register_encoder(
                backbone,
                config,
                tracking_uri=mlflow_server.url,
                run_id=run_id,
                metric_name=config.mlflow.champion_metric,
                metric_value=knn,
                knn=knn,
                name=name,
                input_example=example,
            )
        )
        encoders.append(backbone)
        run_ids.append(run_id)
    return SimpleNamespace(
        url=mlflow_server.url,
        name=name,
        config=config,
        images=images,
        good=encoders[0],
        worse=encoders[1],
        first=results[0],
        second=results[1],
        run_ids=run_ids,
        client=MlflowClient(mlflow_server.url),
    )


@pytest.fixture(scope="module")
def pulled(registry, tmp_path_factory) -> Path:
    return pull(
        f"{registry.name}@champion", tmp_path_factory.mktemp("pulled") / "enc", registry.url
    )


def _max_diff(module: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (module(x) - reference(x)).abs().max().item()


# ----------------------------------------------------------------------------- aliases


def test_champion_stays_on_better_version_and_latest_moves(registry):
    first, second = registry.first, registry.second
    assert first["model_uri"] == f"models:/{registry.name}/1" and first["version"] == "1"
    assert first["champion"] is True and first["previous_champion"] is None
    assert second["version"] == "2" and second["champion"] is False
    assert second["previous_champion"] == "1"
    model = registry.client.get_registered_model(registry.name)
    assert model.aliases == {CHAMPION_ALIAS: "1", LATEST_ALIAS: "2"}

    # the decision is recorded in the run that produced the loser, with the comparison
    run = registry.client.get_run(registry.run_ids[1])
    assert run.data.tags["registry.model_uri"] == f"models:/{registry.name}/2"
    assert run.data.tags["registry.champion_decision"].startswith("kept-previous")
    path = registry.client.download_artifacts(registry.run_ids[1], DECISION_ARTIFACT)
    decision = json.loads(Path(path).read_text())
    assert decision["previous_champion"] == "1" and decision["previous_champion_value"] == 0.6
    assert decision["metric_value"] == 0.4 and decision["champion"] is False
    assert "does not beat" in decision["reason"]


def test_version_tags_describe_the_encoder(registry):
    version = registry.client.get_model_version(registry.name, "1")
    tags = version.tags
    config = registry.config
    assert version.run_id == registry.run_ids[0]
    assert tags["dataset"] == config.data.train and tags["method"] == "ntxent"
    assert tags["temperature"] == "0.5" and tags["augment_strength"] == "1.0"
    assert tags["metric.knn_top1"] == "0.6" and tags["champion_metric"] == "knn_top1"
    assert tags["embedding_dim"] == str(registry.good.out_dim) and tags["input_size"] == "32"
    assert tags["normalize_mean"] == ",".join(map(str, config.augment.mean))
    assert tags["weights_rebuildable"] == "true"
    assert tags["champion_decision"].startswith("promoted")
    assert version_tags(config, 0.6, registry.good).items() <= tags.items()


def test_decide_champion_rules():
    assert decide_champion(0.5, None) == (True, "no champion yet")
    assert decide_champion(0.5, 0.4)[0] is True
    assert decide_champion(0.5, 0.5)[0] is False  # must strictly beat
    assert decide_champion(0.3, 0.4, higher_is_better=False)[0] is True
    assert decide_champion(0.4, 0.4, higher_is_better=False)[0] is False
    assert decide_champion(math.nan, 0.4)[0] is False
    assert decide_champion(math.nan, None)[0] is False
    assert decide_champion(0.1, math.nan)[0] is True


class _NoAlias(Exception):
    error_code = "RESOURCE_DOES_NOT_EXIST"


class FakeRegistryClient:
    """In memory: the MlflowClient calls the alias policy makes, for one registered model."""

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}
        self.version_tags: dict[str, dict[str, str]] = {}
        self.run_tags: dict[str, dict[str, str]] = {}
        self.records: dict[str, dict] = {}

    def add_version(self, metric_name: str, value: float | None) -> str:
        version = str(len(self.version_tags) + 1)
        tags = {} if value is None else {metric_tag(metric_name): repr(value)}
        self.version_tags[version] = {**tags, **VALIDATION.tags()}
        return version

    def get_model_version_by_alias(self, name, alias):
        if alias not in self.aliases:
            raise _NoAlias(f"alias {alias} not found")
        version = self.aliases[alias]
        return SimpleNamespace(version=version, tags=self.version_tags[version])

    def set_registered_model_alias(self, name, alias, version):
        self.aliases[alias] = version

    def set_model_version_tag(self, name, version, key, value):
        self.version_tags[version][key] = value

    def set_tag(self, run_id, key, value):
        self.run_tags.setdefault(run_id, {})[key] = value

    def log_text(self, run_id, text, artifact_file):
        assert artifact_file == DECISION_ARTIFACT
        self.records[run_id] = json.loads(text)


# every version of these fake-client tests measured on the same, large enough validation set
VALIDATION = ValidationData("f" * 16, rows=500, classes=10, description="500 rows of v.parquet")


def _register(client: FakeRegistryClient, value: float | None, metric="knn_top1", **kwargs):
    version = client.add_version(metric, value)
    decision = apply_alias_policy(
        client,
        "enc",
        version,
        run_id=f"run{version}",
        metric_name=metric,
        metric_value=math.nan if value is None else value,
        validation=VALIDATION,
        **kwargs,
    )
    return version, decision


def test_alias_policy_champion_moves_only_on_strict_improvement():
    client = FakeRegistryClient()
    # first, worse, barely better, equal: champion after each registration
    for value, champion in [(0.5, "1"), (0.4, "1"), (0.5000001, "3"), (0.5000001, "3")]:
        version, decision = _register(client, value)
        assert client.aliases == {LATEST_ALIAS: version, CHAMPION_ALIAS: champion}, value
        assert decision.champion is (champion == version)
    equal = client.records["run4"]
    assert equal["champion"] is False and equal["previous_champion"] == "3"
    assert equal["previous_champion_value"] == 0.5000001 and "does not beat" in equal["reason"]
    assert client.run_tags["run4"]["registry.champion_decision"].startswith("kept-previous")
    assert client.version_tags["3"]["champion_decision"].startswith("promoted")

    version, decision = _register(client, None)  # NaN metric: latest moves, champion never
    assert decision.champion is False and client.aliases == {
        LATEST_ALIAS: version,
        CHAMPION_ALIAS: "3",
    }


def test_alias_policy_lower_is_better_and_first_version():
    client = FakeRegistryClient()
    for value, champion in [(2.0, "1"), (1.5, "2"), (1.5, "2"), (3.0, "2")]:
        version, _ = _register(client, value, metric="loss", higher_is_better=False)
        assert client.aliases == {LATEST_ALIAS: version, CHAMPION_ALIAS: champion}, value
    assert client.records["run1"]["reason"] == "no champion yet"
    assert client.records["run1"]["previous_champion"] is None


def test_alias_policy_keeps_a_champion_without_the_metric():
    """A champion that never recorded the metric is not replaced: that call is a person's."""
    client = FakeRegistryClient()
    _register(client, 0.2, metric="knn_top1")
    version, decision = _register(client, 0.99, metric="linear_top1")
    assert decision.champion is False and decision.previous_champion == "1"
    assert decision.previous_value is None and "has no 'linear_top1'" in decision.reason
    assert client.aliases == {LATEST_ALIAS: version, CHAMPION_ALIAS: "1"}
    assert judge("x", 0.1, None, validation=VALIDATION).champion is True


def test_promote_moves_an_alias_by_hand(registry):
    result = promote(registry.name, 2, "staging", registry.url)
    assert result == {"alias": "staging", "version": "2", "previous": None}
    assert registry.client.get_registered_model(registry.name).aliases["staging"] == "2"
    assert "promoted.staging" in registry.client.get_model_version(registry.name, "2").tags
    with pytest.raises(RegistryError, match="reserved"):
        promote(registry.name, 2, "latest", registry.url)
    with pytest.raises(RegistryLookupError, match="versions: 1, 2"):
        promote(registry.name, 9, "staging", registry.url)


# ----------------------------------------------------------------------------- pull / load


def test_pull_writes_offline_bundle(registry, pulled):
    names = {p.name for p in pulled.iterdir()}
    assert {"model", "encoder.safetensors", "encoder.json", "loader.py", "README.md"} <= names
    assert (pulled / "model" / "MLmodel").exists()
    info = json.loads((pulled / "registry.json").read_text())
    assert info["version"] == "1" and info["aliases"] == [CHAMPION_ALIAS]
    spec = EncoderSpec.load(pulled)
    config = registry.config
    assert spec.image_size == 32 and spec.mean == config.augment.mean
    assert spec.std == config.augment.std and spec.embedding_dim == registry.good.out_dim
    assert spec.model_config == vars(config.model) and spec.input_shape == [3, 32, 32]
    weights = load_file(pulled / WEIGHTS_FILE)
    for key, tensor in registry.good.state_dict().items():
        assert torch.equal(weights[key], tensor), key


@pytest.mark.parametrize("source", ["weights", "pickle"])
def test_pulled_encoder_reproduces_original_embeddings(registry, pulled, source):
    encoder, preprocess = load_encoder(str(pulled), source=source)
    assert not encoder.training and type(encoder) is type(registry.good)
    assert _max_diff(encoder, registry.good, registry.images) < 1e-5
    image = decode_image(pq.read_table(TEST_PARQUET).slice(0, 1).column("image")[0].as_py())
    assert torch.equal(preprocess(image), registry.images[0])


def test_load_by_alias_and_version_uris(registry):
    latest, _ = load_encoder(f"models:/{registry.name}@{LATEST_ALIAS}", registry.url)
    assert _max_diff(latest, registry.worse, registry.images) < 1e-5
    first, _ = load_encoder(f"models:/{registry.name}/1", registry.url)
    assert _max_diff(first, registry.good, registry.images) < 1e-5


def test_unknown_alias_version_and_model_errors_list_what_exists(registry, tmp_path):
    with pytest.raises(RegistryLookupError) as info:
        load_encoder(f"models:/{registry.name}@best", registry.url)
    message = str(info.value)
    assert "'best'" in message and "champion → v1" in message and "latest-trained → v2" in message
    assert "versions: 1, 2" in message
    with pytest.raises(RegistryLookupError, match="version '7'"):
        pull(f"{registry.name}/7", tmp_path / "never", registry.url)
    assert not (tmp_path / "never").exists()
    with pytest.raises(RegistryLookupError, match=registry.name):
        load_encoder("models:/no-such-encoder@champion", registry.url)
    with pytest.raises(RegistryLookupError, match="NAME@ALIAS"):
        parse_model_ref("just-a-name")


def test_parse_model_ref():
    assert parse_model_ref("enc@champion") == ModelRef("enc", alias="champion")
    assert parse_model_ref("models:/team/enc/12") == ModelRef("team/enc", version="12")
    assert parse_model_ref("models:/enc@latest-trained").uri == "models:/enc@latest-trained"


def test_bad_registration_inputs_fail_before_logging(registry):
    run = registry.client.create_run(
        registry.client.get_run(registry.run_ids[0]).info.experiment_id
    )

    def versions() -> int:
        return len(registry.client.search_model_versions(f"name = '{registry.name}'"))

    before = versions()
    kwargs = dict(tracking_uri=registry.url, run_id=run.info.run_id, metric_name="knn_top1")
    with pytest.raises(EncoderSpecError, match=r"does not match the recorded input size"):
        small = registry.images[:1, :, :16, :16].numpy()
        register_encoder(
            registry.good,
            registry.config,
            name=registry.name,
            input_example=small,
            metric_value=0.99,
            **kwargs,
        )
    with pytest.raises(RegistryError, match="non-empty"):
        register_encoder(registry.good, registry.config, name="", metric_value=0.99, **kwargs)
    assert versions() == before


# ----------------------------------------------------------------------------- embed


def test_embed_parquet_keeps_columns_and_skips_corrupt_images(registry, tmp_path):
    images, table = _image_batch(registry.config, 64)
    corrupt = pa.table(
        {
            "image": pa.array([b"definitely not an image"], pa.binary()),
            "label": pa.array([-1], pa.int64()),
            "label_name": ["corrupt"],
        }
    )
    source = tmp_path / "in.parquet"
    pq.write_table(pa.concat_tables([table.slice(0, 30), corrupt, table.slice(30)]), source)

    out = tmp_path / "out" / "embeddings.parquet"
    summary = embed_parquet(f"models:/{registry.name}@champion", str(source), out, 16, registry.url)
    assert summary["rows_in"] == 65 and summary["rows_out"] == 64
    assert summary["skipped_corrupt"] == 1 and summary["first_corrupt_rows"] == [30]
    result = pq.read_table(out)
    assert result.column_names == ["row_id", "label", "label_name", "embedding"]
    assert result.column("row_id").to_pylist() == [*range(30), *range(31, 65)]
    assert result.column("label").to_pylist() == table.column("label").to_pylist()
    assert result.column("label_name").to_pylist() == table.column("label_name").to_pylist()
    embeddings = np.stack(result.column("embedding").to_numpy(zero_copy_only=False))
    assert embeddings.shape == (64, registry.good.out_dim) and np.isfinite(embeddings).all()
    with torch.no_grad():
        expected = registry.good(images).numpy()
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)


# ----------------------------------------------------------------------------- issue 12


def test_logged_model_belongs_to_its_run_and_experiment(registry):
    """MLflow 3 logged model: in the run's experiment, linked to the run (the run page lists it),
    not in experiment "Default"."""
    run = registry.client.get_run(registry.run_ids[0])
    models = registry.client.search_logged_models(experiment_ids=[run.info.experiment_id])
    mine = [m for m in models if m.source_run_id == run.info.run_id]
    assert len(mine) == 1 and mine[0].experiment_id == run.info.experiment_id
    version = registry.client.get_model_version(registry.name, registry.first["version"])
    assert mine[0].model_id in (version.model_id or version.source)  # the registered version
    assert mine[0].tags["run_id"] == run.info.run_id


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory):
    """The embedded default store: version 1 registered into ``<dir>/mlruns.db`` as pretraining
    does when no tracking URI is set (``resolve_tracking_uri`` with ``dir`` as the cwd)."""
    directory = tmp_path_factory.mktemp("default-store")
    config = Config()
    config.mlflow.experiment = "test-default-store"
    uri = f"sqlite:///{directory.resolve() / 'mlruns.db'}"
    torch.manual_seed(0)
    backbone = build_model(config.model).backbone.eval()
    cwd = os.getcwd()
    os.chdir(directory)  # registration must not write under the cwd (./mlruns)
    try:
        run_id = start_pretrain_run(config, uri, run_name="default-store")
        registered = register_encoder(
            backbone,
            config,
            tracking_uri=uri,
            run_id=run_id,
            metric_name="knn_top1",
            metric_value=1,
        )
    finally:
        os.chdir(cwd)
    assert registered["champion"] and registered["version"] == "1"
    return SimpleNamespace(dir=directory, uri=uri, run_id=run_id, config=config)


def test_pulled_registry_json_lists_the_versions_aliases(sqlite_store, tmp_path):
    """A SQLite store hands back versions as ints; the aliases must still be matched."""
    name = sqlite_store.config.mlflow.registered_model_name
    promote(name, 1, "qa", sqlite_store.uri)
    out = pull(f"{name}/1", tmp_path / "pulled", sqlite_store.uri)
    info = json.loads((out / "registry.json").read_text())
    assert set(info["aliases"]) >= {CHAMPION_ALIAS, LATEST_ALIAS, "qa"}
    assert info["aliases"] == sorted(info["aliases"]) and info["version"] == "1"


def test_commands_without_a_uri_use_the_pretraining_store(sqlite_store, tmp_path, monkeypatch):
    """No --tracking-uri, no $MLFLOW_TRACKING_URI: promote, pull, embed and evaluate all find the
    store pretraining used (``mlruns.db`` in the cwd); the logged model sits with its run, and
    nothing lands in ./mlruns or ./mlflow.db."""
    from service.commands import embed_command, evaluate_command, promote_command, pull_command
    from service.tracking.uri import resolve_tracking_uri

    monkeypatch.chdir(sqlite_store.dir)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = sqlite_store.config
    assert resolve_tracking_uri(config.mlflow) == sqlite_store.uri
    model = config.mlflow.registered_model_name
    promoted = promote_command(model, "1", "staging")
    assert promoted["version"] == "1" and promoted["tracking_uri"] == sqlite_store.uri

    pulled = pull_command(f"{model}@staging", str(tmp_path / "pulled"))
    info = json.loads((Path(pulled["out"]) / "registry.json").read_text())
    assert "staging" in info["aliases"] and info["tracking_uri"] == sqlite_store.uri

    _, table = _image_batch(config, 16)
    small = str(tmp_path / "small.parquet")
    pq.write_table(table, small)
    embedded = embed_command(f"models:/{model}@staging", small, str(tmp_path / "emb.parquet"))
    assert embedded["rows_out"] == 16 and embedded["tracking_uri"] == sqlite_store.uri
    evaluated = evaluate_command(
        small, small, model=f"models:/{model}@champion", overrides=["eval.linear_epochs=1"]
    )
    assert evaluated["n_train"] == 16

    client = MlflowClient(sqlite_store.uri)
    experiment_id = client.get_run(sqlite_store.run_id).info.experiment_id
    logged = client.search_logged_models(experiment_ids=[experiment_id])
    assert [m.source_run_id for m in logged] == [sqlite_store.run_id]
    assert not (sqlite_store.dir / "mlruns").exists()
    assert not (sqlite_store.dir / "mlflow.db").exists()
