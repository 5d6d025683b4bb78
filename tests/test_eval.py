"""kNN and linear probe against straightforward references; the offline evaluation protocol,
the `contrastive evaluate` command and the CLI's error contract."""

import ast
import doctest
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from service.eval.knn import knn_predict, knn_top1
from service.eval.linear import linear_probe_top1


def _reference_knn(train, train_y, test, k, t):
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    out = []
    for row in test:
        sims = train @ row
        idx = sims.argsort(descending=True)[:k]
        votes = {}
        for i in idx.tolist():
            votes[int(train_y[i])] = votes.get(int(train_y[i]), 0.0) + float((sims[i] / t).exp())
        out.append(max(votes, key=votes.get))
    return torch.tensor(out)


def test_knn_matches_loop_reference() -> None:
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(300, 16, generator=g), torch.randn(70, 16, generator=g)
    train_y = torch.randint(0, 5, (300,), generator=g)
    expected = _reference_knn(train, train_y, test, k=20, t=0.1)
    assert torch.equal(
        knn_predict(train, train_y, test, k=20, temperature=0.1, chunk_size=16), expected
    )


def test_knn_and_linear_separate_clusters_but_not_noise() -> None:
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(4, 32, generator=g) * 4
    y_train, y_test = (
        torch.randint(0, 4, (400,), generator=g),
        torch.randint(0, 4, (200,), generator=g),
    )
    x_train = centers[y_train] + torch.randn(400, 32, generator=g)
    x_test = centers[y_test] + torch.randn(200, 32, generator=g)
    assert knn_top1(x_train, y_train, x_test, y_test, k=50) > 0.95
    assert linear_probe_top1(x_train, y_train, x_test, y_test, epochs=20) > 0.95
    noise = torch.randn(400, 32, generator=g)
    assert knn_top1(noise, y_train, torch.randn(200, 32, generator=g), y_test, k=50) < 0.5


# --- offline protocol, `contrastive evaluate` command and CLI errors ---------------------------


def _labelled_parquet(path, n_per_class: int = 12):
    """Two colour classes (dark red / light blue) of 32 px PNGs with a little noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images, labels = [], []
    for label, colour in enumerate([(120, 20, 20), (120, 180, 240)]):
        for _ in range(n_per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 10, (32, 32, 3)), 0, 255)
            buf = io.BytesIO()
            Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
            images.append(buf.getvalue())
            labels.append(label)
    pq.write_table(pa.table({"image": images, "label": labels}), path)
    return str(path)


def _fast_config(*extra: str):
    from service.config import load_config

    return load_config(None, ["eval.linear_epochs=5", "eval.knn_k=5", *extra])


def test_evaluate_beside_random_reports_both(tmp_path) -> None:
    from service.data.augment import eval_transform
    from service.eval import evaluate_beside_random, evaluation_metrics
    from service.models import build_model

    data = _labelled_parquet(tmp_path / "d.parquet")
    config = _fast_config()
    encoder = build_model(config.model).backbone.eval()
    transform = eval_transform(32, config.augment.mean, config.augment.std)
    result = evaluate_beside_random(encoder, transform, data, data, config, random_baseline=True)
    assert result["n_train"] == result["n_test"] == 24
    assert result["knn_top1"] > 0.9  # colours separate even at random init
    assert set(result["baseline_random"]) == {"linear_top1", "knn_top1"}
    assert set(evaluation_metrics(result)) == {
        "eval_linear_top1",
        "eval_knn_top1",
        "eval_random_linear_top1",
        "eval_random_knn_top1",
    }
    no_baseline = evaluate_beside_random(encoder, transform, data, data, config)
    assert "baseline_random" not in no_baseline


def test_offline_doctests() -> None:
    import service.eval.offline

    outcome = doctest.testmod(service.eval.offline)
    assert outcome.attempted > 0 and outcome.failed == 0


def test_evaluate_command_rebuilds_the_checkpoint_encoder(tmp_path) -> None:
    from service.commands import evaluate_command
    from service.models import build_model
    from service.train.checkpoint import save_state

    data = _labelled_parquet(tmp_path / "d.parquet")
    config = _fast_config("model.proj_hidden_dim=64")
    model = build_model(config.model)
    save_state(tmp_path / "ckpt", {"config": config.to_dict(), "model": model.state_dict()})
    result = evaluate_command(data, data, checkpoint=str(tmp_path / "ckpt"))
    assert result["source"] == str(tmp_path / "ckpt") and result["n_test"] == 24
    assert "baseline_random" not in result


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys) -> None:
    from service.cli import main

    argv = ["evaluate", "--checkpoint", str(tmp_path / "nope"), "--train", "a", "--test", "b"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("contrastive: no checkpoint at ")
    assert len(captured.err.strip().splitlines()) == 1
    with pytest.raises(FileNotFoundError):  # --debug: the real exception, traceback and all
        main(["--debug", *argv])
    assert main(["data", "preview", "x", "y", "--set", "loss.temperature=-1"]) == 2
    assert capsys.readouterr().err.startswith("contrastive: config error: ")


def test_library_packages_do_not_import_upwards() -> None:
    """Imports point one way: commands → train/tune → the library packages → config."""
    root = Path(__file__).resolve().parent.parent / "service"
    upward = ("service.train", "service.tune", "service.commands", "service.cli")
    offenders = []
    for package in ("eval", "data", "models", "losses", "tracking", "registry"):
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else []
                )
                offenders += [f"{path.name}: {n}" for n in names if n.startswith(upward)]
    assert offenders == []


def test_demo_command_evaluates_the_pretrained_checkpoint(tmp_path, monkeypatch) -> None:
    """`contrastive demo` wiring: pretrain (stubbed) → evaluate its checkpoint beside random."""
    import service.train.driver
    from service.commands import demo_command
    from service.models import build_model
    from service.train.checkpoint import save_state

    data = _labelled_parquet(tmp_path / "d.parquet")
    overrides = [f"data.train={data}", f"data.test={data}", "eval.linear_epochs=5"]

    def fake_pretraining(config, address=None):
        directory = tmp_path / "ckpt"
        state = {"config": config.to_dict(), "model": build_model(config.model).state_dict()}
        save_state(directory, state)
        return {"checkpoint": str(directory), "run_id": None, "tracking_uri": None}

    monkeypatch.setattr(service.train.driver, "run_pretraining", fake_pretraining)
    summary = demo_command("jobs/configs/smoke-cpu.yaml", overrides)
    evaluation = summary["evaluation"]
    assert evaluation["source"] == str(tmp_path / "ckpt") and evaluation["n_train"] == 24
    assert set(evaluation["baseline_random"]) == {"linear_top1", "knn_top1"}
