"""The smoke run as a person sees it: its MLflow pages loaded in a real headless Chromium.

The session's `mlflow server` (tests/conftest.py) serves the run that the smoke `ray job submit`
pretraining logged; Chromium (Debian's package) renders the single-page app and dumps the DOM,
which must show the run's name, its logged and registered model, its representation-health
metrics, and every plot rendered as an image; a second real run whose projection cannot hold a
representation (``model.proj_out_dim=1``: effective rank 1) must show the collapse warning (its
``health`` tags) on its page. Screenshots of the run page and of a plot are taken too; set
``CONTRASTIVE_SCREENSHOTS=<dir>`` to keep copies (docs/images/ holds the published ones).

Without Chromium the module skips, unless ``CONTRASTIVE_REQUIRE_BROWSER=1`` (CI sets it), where a
missing browser fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.cluster import last_json_line

pytestmark = pytest.mark.slow

WINDOW = (1400, 1000)


@pytest.fixture(scope="session")  # session: set up before (and so skips before) the smoke run
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    message = "headless Chromium not found (Debian: apt-get install chromium)"
    if os.environ.get("CONTRASTIVE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{message}; CONTRASTIVE_REQUIRE_BROWSER=1 requires it")
    pytest.skip(message)


@pytest.fixture(scope="module")
def run_pages(smoke_run, mlflow_server) -> dict:
    """The smoke run's facts from the tracking server and the URLs of its pages in the UI."""
    from mlflow import MlflowClient

    client = MlflowClient(smoke_run.tracking_uri)
    run = client.get_run(smoke_run.summary["run_id"])
    base = f"{mlflow_server.url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    plots = sorted(a.path for a in client.list_artifacts(run.info.run_id, "plots"))
    return {"run": run, "url": base, "plots": plots}


def test_run_page_shows_the_run_and_its_models(chromium, run_pages, smoke_run, tmp_path):
    run = run_pages["run"]
    model_name = smoke_run.summary["model_uri"].split("/")[1]  # models:/NAME/VERSION
    version = smoke_run.summary["version"]
    expected = [
        run.info.run_name,
        run.info.run_id,
        "Logged models (1)",
        ">encoder<",  # the logged model's name, in its table cell / link
        model_name,
        f"v{version}",
    ]
    dom = _dump_dom(chromium, run_pages["url"], tmp_path, expected)
    missing = [text for text in expected if text not in dom]
    assert not missing, f"run page lacks {missing}; DOM text: {_text(dom)[:3000]}"


HEALTH_METRICS = ("health_effective_rank", "health_backbone_effective_rank", "health_alignment",
                  "health_uniformity", "health_embedding_std", "health_positive_gap")  # fmt: skip


def test_run_page_shows_representation_health(chromium, run_pages, tmp_path):
    run = run_pages["run"]
    assert set(HEALTH_METRICS) <= set(run.data.metrics), sorted(run.data.metrics)
    assert "health" not in run.data.tags  # a healthy run carries no warning
    dom = _dump_dom(chromium, run_pages["url"], tmp_path, list(HEALTH_METRICS))
    missing = [name for name in HEALTH_METRICS if name not in dom]
    assert not missing, f"run page lacks {missing}; DOM text: {_text(dom)[:3000]}"


@pytest.fixture(scope="module")
def collapsed_run(ray_cluster, mlflow_server, tmp_path_factory) -> dict:
    """A real pretraining (``ray job submit``, 1 epoch) whose projection is one-dimensional, so
    its embeddings have effective rank 1 < 2: the monitor must call it collapsed."""
    from mlflow import MlflowClient

    storage = tmp_path_factory.mktemp("collapsed")
    overrides = [
        "model.proj_out_dim=1", "train.epochs=1", "train.global_batch_size=128",
        "data.limit=512", "data.test=null", "mlflow.registered_model_name=null",
        f"mlflow.tracking_uri={mlflow_server.url}", f"train.storage_path={storage}",
    ]  # fmt: skip
    job_id = f"collapsed-{uuid.uuid4().hex[:8]}"
    entry = ["python", "jobs/pretrain.py", "--config", "jobs/configs/smoke-cpu.yaml"]
    ray_cluster.submit([*entry, *[a for o in overrides for a in ("--set", o)]], job_id)
    status, logs = ray_cluster.wait(job_id)
    assert status == "SUCCEEDED", logs[-5000:]
    run = MlflowClient(mlflow_server.url).get_run(last_json_line(logs)["run_id"])
    url = f"{mlflow_server.url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    return {"run": run, "logs": logs, "url": url}


def test_collapsed_run_warns_in_its_log_and_on_its_page(chromium, collapsed_run, tmp_path):
    run, logs = collapsed_run["run"], collapsed_run["logs"]
    assert "WARNING: the representation collapsed (epoch 1): effective rank 1.00 < 2" in logs
    reason = run.data.tags["health_reason"]
    assert run.data.tags["health"] == "collapsed" and reason.startswith("epoch 1: effective rank")
    expected = ["health_reason", reason.split("<")[0].strip(), "collapsed"]  # "<" is "&lt;"
    dom = _dump_dom(chromium, collapsed_run["url"], tmp_path, expected)
    missing = [text for text in expected if text not in dom]
    assert not missing, f"run page lacks {missing}; DOM text: {_text(dom)[:3000]}"


def test_every_plot_renders_as_an_image(chromium, run_pages, tmp_path):
    plots = run_pages["plots"]
    assert "plots/training_curves.png" in plots, plots
    for path in plots:
        rendered = f'<img alt="{path}" src="blob:'  # fetched from the server, decoded, shown
        dom = _dump_dom(chromium, f"{run_pages['url']}/artifacts/{path}", tmp_path, [rendered])
        assert rendered in dom, f"{path} is not shown as an image; DOM text: {_text(dom)[:2000]}"


def test_screenshots_of_the_run_page_and_a_plot(chromium, run_pages, tmp_path):
    from PIL import Image

    shots = {
        "mlflow_run.png": run_pages["url"],
        "mlflow_training_curves.png": f"{run_pages['url']}/artifacts/plots/training_curves.png",
    }
    keep = os.environ.get("CONTRASTIVE_SCREENSHOTS")
    for name, url in shots.items():
        out = tmp_path / name
        _chromium(chromium, tmp_path, "--virtual-time-budget=30000",
                  f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--screenshot={out}", url)  # fmt: skip
        with Image.open(out) as image:
            assert image.size == WINDOW
            # A page that rendered has text and a chart: many colours, not a blank/error page.
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 200, name
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(out, Path(keep) / name)


def _dump_dom(chromium: str, url: str, tmp_path: Path, expected: list[str]) -> str:
    """The rendered DOM; rendered again with a longer budget while an expected text is missing
    (the app fetches the run through several API calls; a loaded host answers slowly)."""
    dom = ""
    for budget_ms in (15_000, 30_000, 60_000):
        dom = _chromium(chromium, tmp_path, f"--virtual-time-budget={budget_ms}", "--dump-dom", url)
        if all(text in dom for text in expected):
            break
    return dom


def _chromium(chromium: str, tmp_path: Path, *args: str) -> str:
    profile = tmp_path / "chromium-profile"  # its own profile: no clash with a running browser
    cmd = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def _text(dom: str) -> str:
    import re

    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))
