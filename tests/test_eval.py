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


def test_majority_knn_is_sklearns_cosine_classifier() -> None:
    """dkobak/simclr-cifar10's protocol: ``KNeighborsClassifier(n_neighbors=10,
    metric="cosine")``, one vote per neighbour; with 10 neighbours and 5 classes vote ties are
    common, and both give them to the lowest label."""
    from sklearn.neighbors import KNeighborsClassifier

    g = torch.Generator().manual_seed(2)
    train, test = torch.randn(400, 16, generator=g), torch.randn(300, 16, generator=g)
    train_y, test_y = torch.randint(0, 5, (400,), generator=g), torch.randint(0, 5, (300,))
    expected = KNeighborsClassifier(n_neighbors=10, metric="cosine").fit(train, train_y)
    got = knn_predict(train, train_y, test, k=10, chunk_size=64, vote="majority")
    assert got.tolist() == expected.predict(test.numpy()).tolist()
    # ties happen here, and the weighted vote decides some of them differently
    assert not torch.equal(got, knn_predict(train, train_y, test, k=10))
    accuracy = knn_top1(train, train_y, test, test_y, k=10, vote="majority")
    assert accuracy == pytest.approx(expected.score(test.numpy(), test_y.numpy()))
    with pytest.raises(ValueError, match="vote must be"):
        knn_predict(train, train_y, test, vote="uniform")  # type: ignore[arg-type]


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
    packages = ("eval", "data", "models", "losses", "tracking", "registry", "search")
    for package in packages:
        above = upward if package == "search" else (*upward, "service.search")
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else []
                )
                offenders += [f"{path.name}: {n}" for n in names if n.startswith(above)]
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


# --- issue 12: random baseline of a registered encoder, seeded probe, kNN without self ------


def _reference_knn_without_self(features, labels, k, t):
    """Loop reference: each row's k nearest *other* rows vote."""
    features = F.normalize(features, dim=1)
    out = []
    for i, row in enumerate(features):
        sims = features @ row
        sims[i] = float("-inf")
        votes = {}
        for j in sims.argsort(descending=True)[:k].tolist():
            votes[int(labels[j])] = votes.get(int(labels[j]), 0.0) + float((sims[j] / t).exp())
        out.append(max(votes, key=votes.get))
    return torch.tensor(out)


def test_knn_exclude_self_matches_loop_reference() -> None:
    g = torch.Generator().manual_seed(2)
    bank, labels = torch.randn(90, 8, generator=g), torch.randint(0, 4, (90,), generator=g)
    expected = _reference_knn_without_self(bank, labels, k=7, t=0.1)
    got = knn_predict(bank, labels, bank, k=7, temperature=0.1, chunk_size=16, exclude_self=True)
    assert torch.equal(got, expected)
    # With itself in the bank every query finds its own label at similarity 1: top-1 is 1.0.
    assert knn_top1(bank, labels, bank, labels, k=1) == 1.0
    assert knn_top1(bank, labels, bank, labels, k=1, exclude_self=True) < 0.6
    # A bank that is a prefix of the queries (a row limit on the same data).
    prefix = knn_predict(bank[:50], labels[:50], bank, k=5, exclude_self=True)
    assert prefix.shape == (90,)
    with pytest.raises(ValueError, match="prefix"):
        knn_predict(bank, labels, bank[:10], exclude_self=True)


def test_evaluate_on_the_same_split_keeps_queries_out_of_their_bank(tmp_path) -> None:
    from service.data.augment import eval_transform
    from service.eval import evaluate_encoder, extract_features
    from service.models import build_model

    data = _labelled_parquet(tmp_path / "d.parquet", n_per_class=8)
    table = pq.read_table(data)  # labels unrelated to the images: only "itself" predicts them
    labels = torch.randperm(16, generator=torch.Generator().manual_seed(0)) % 2
    pq.write_table(table.set_column(1, "label", pa.array(labels.tolist())), data)
    torch.manual_seed(0)
    encoder = build_model(_fast_config().model).backbone.eval()
    transform = eval_transform(32, [0.5] * 3, [0.25] * 3)
    result = evaluate_encoder(encoder, transform, data, data, knn_k=1, linear_epochs=1)
    x, y = extract_features(encoder, data, transform)
    expected = float((_reference_knn_without_self(x, y, 1, 0.1) == y).float().mean())
    assert result["knn_top1"] == pytest.approx(expected) and expected < 1.0


def test_linear_probe_is_seeded() -> None:
    """Same features → the same accuracy, whatever the global RNG did before."""
    g = torch.Generator().manual_seed(3)
    x_train, x_test = torch.randn(200, 64, generator=g), torch.randn(100, 64, generator=g)
    y_train, y_test = torch.randint(0, 10, (200,), generator=g), torch.randint(0, 10, (100,))
    results = set()
    for global_seed in range(5):
        torch.manual_seed(global_seed)
        results.add(linear_probe_top1(x_train, y_train, x_test, y_test, epochs=2, lr=0.05))
    assert len(results) == 1
    state = torch.get_rng_state()
    linear_probe_top1(x_train, y_train, x_test, y_test, epochs=1)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone


def test_random_baseline_of_a_registered_encoder_is_its_architecture(tmp_path, monkeypatch):
    """`evaluate --model ... --baseline random`: the baseline is the registered architecture
    (ResNet-18 with the ImageNet stem here), not the command config's default SmallCNN."""
    import service.eval.offline
    from service.commands import evaluate_command
    from service.config import load_config
    from service.models import build_model
    from service.registry.spec import EncoderSpec, save_weights

    registered = load_config(None, ["model.arch=resnet18", "model.cifar_stem=false"])
    torch.manual_seed(0)
    backbone = build_model(registered.model).backbone.eval()
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    save_weights(backbone, pulled)
    with torch.no_grad():
        dim = backbone(torch.zeros(1, 3, 32, 32)).shape[1]
    EncoderSpec.from_config(registered, backbone, dim).save(pulled)

    seen = []
    real = service.eval.offline.evaluate_encoder

    def spy(encoder, *args, **kwargs):
        seen.append({k: tuple(v.shape) for k, v in encoder.state_dict().items()})
        return real(encoder, *args, **kwargs)

    monkeypatch.setattr(service.eval.offline, "evaluate_encoder", spy)
    data = _labelled_parquet(tmp_path / "d.parquet", n_per_class=6)
    result = evaluate_command(
        data,
        data,
        model=str(pulled),
        random_baseline=True,
        overrides=["eval.linear_epochs=1", "eval.knn_k=3"],  # default model: small_cnn
    )
    assert set(result["baseline_random"]) == {"linear_top1", "knn_top1"}
    encoder_shapes, baseline_shapes = seen
    assert baseline_shapes == encoder_shapes  # same arch, same stem (conv1 7x7)


def test_features_of_a_channels_last_encoder_match_the_contiguous_one() -> None:
    # extract_features feeds a channels_last encoder channels_last images (speed), same numbers.
    from service.config import BUNDLED_DATA_DIR
    from service.data.augment import eval_transform
    from service.eval.features import extract_features, input_memory_format
    from service.models import build_backbone

    subset = BUNDLED_DATA_DIR / "cifar10-test-subset.parquet"

    transform = eval_transform(32, [0.5] * 3, [0.25] * 3)
    torch.manual_seed(0)
    encoder = build_backbone("small_cnn", width=8)
    plain, labels = extract_features(encoder, str(subset), transform, limit=64)
    encoder = encoder.to(memory_format=torch.channels_last)
    assert input_memory_format(encoder) == torch.channels_last
    fast, fast_labels = extract_features(encoder, str(subset), transform, limit=64)
    assert torch.equal(labels, fast_labels)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
