"""Exit codes of user mistakes (issue 27 item 9): bad class names, an unknown model, an image-only
model for zero-shot and an unreachable tracking server are bad input (exit 2, one line naming
what to fix, no class name, no temporary folder), against a real SQLite registry (no mocks)."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.cli import main
from tests import registry_store
from tests.cluster import free_port
from tests.helpers import solid_png

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sqlite_registry(tmp_path_factory):
    return registry_store.two_versions(tmp_path_factory.mktemp("exit-codes-registry"))


@pytest.fixture
def images(tmp_path):
    path = tmp_path / "images.parquet"
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (90, 90, 90)]
    table = pa.table({"image": [solid_png(c) for c in colours], "label": [0, 1, 0, 1]})
    pq.write_table(table, path)
    return path


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def test_zero_shot_with_empty_classes_is_bad_input(sqlite_registry, images, tmp_path, capsys):
    code, err = _run(
        ["zero-shot", "--model", f"models:/{sqlite_registry.name}@champion",
         "--input", str(images), "--output", str(tmp_path / "p.parquet"), "--classes", "",
         "--tracking-uri", sqlite_registry.uri],
        capsys,
    )  # fmt: skip
    assert code == 2, err
    assert "class names" in err and "--classes cat,dog" in err
    assert "RegistryError" not in err and "Traceback" not in err


def test_embed_with_an_unknown_model_is_bad_input(sqlite_registry, images, tmp_path, capsys):
    code, err = _run(
        ["embed", "--model", "models:/does-not-exist@champion", "--input", str(images),
         "--output", str(tmp_path / "e.parquet"), "--tracking-uri", sqlite_registry.uri],
        capsys,
    )  # fmt: skip
    assert code == 2, err
    assert "no registered model named 'does-not-exist'" in err
    assert sqlite_registry.name in err  # what does exist
    assert "RegistryLookupError" not in err


def test_zero_shot_on_an_image_only_model_names_the_model(
    sqlite_registry, images, tmp_path, capsys
):
    model = f"models:/{sqlite_registry.name}@champion"
    code, err = _run(
        ["zero-shot", "--model", model, "--input", str(images),
         "--output", str(tmp_path / "p.parquet"), "--classes", "cat,dog",
         "--tracking-uri", sqlite_registry.uri],
        capsys,
    )  # fmt: skip
    assert code == 2, err
    assert model in err and "image-only" in err and "text tower" in err
    assert "encoder-" not in err, "names a temporary download folder"


def test_registry_list_of_an_unknown_model_is_bad_input(sqlite_registry, capsys):
    code, err = _run(["registry", "list", "nope", "--tracking-uri", sqlite_registry.uri], capsys)
    assert code == 2 and "no registered model named 'nope'" in err


def test_pull_into_a_non_empty_folder_is_bad_input(sqlite_registry, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, err = _run(
        ["pull", f"{sqlite_registry.name}@champion", "--out", str(tmp_path / "out"),
         "--tracking-uri", sqlite_registry.uri],
        capsys,
    )  # fmt: skip
    assert code == 2 and "is not empty" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["registry", "list"],
        ["registry", "promote", "enc", "1", "--alias", "champion"],
        ["pull", "enc@champion", "--out", "{tmp}/pulled"],
        ["embed", "--model", "models:/enc@champion", "--input", "{images}",
         "--output", "{tmp}/e.parquet"],
        ["zero-shot", "--model", "models:/enc@champion", "--input", "{images}",
         "--output", "{tmp}/p.parquet", "--classes", "cat,dog"],
    ],
    ids=["registry-list", "promote", "pull", "embed", "zero-shot"],
)  # fmt: skip
def test_an_unreachable_tracking_server_is_bad_input_and_fails_fast(
    argv, images, tmp_path, capsys, monkeypatch
):
    # Without our check MLflow would retry for minutes: keep a failure of today's code short.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    uri = f"http://127.0.0.1:{free_port()}"
    argv = [a.format(tmp=tmp_path, images=images) for a in argv] + ["--tracking-uri", uri]
    started = time.monotonic()
    code, err = _run(argv, capsys)
    assert code == 2, err
    assert uri in err and "unreachable" in err and "TrackingUnavailableError" not in err
    assert time.monotonic() - started < 30


def test_a_pulled_folder_needs_no_tracking_server(sqlite_registry, images, tmp_path, capsys):
    pulled = tmp_path / "pulled"
    assert main(["pull", f"{sqlite_registry.name}@champion", "--out", str(pulled),
                 "--tracking-uri", sqlite_registry.uri]) == 0  # fmt: skip
    capsys.readouterr()
    dead = f"http://127.0.0.1:{free_port()}"
    code, err = _run(
        ["embed", "--model", str(pulled), "--input", str(images),
         "--output", str(tmp_path / "e.parquet"), "--tracking-uri", dead],
        capsys,
    )  # fmt: skip
    assert code == 0, err
