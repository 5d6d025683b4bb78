"""An image–text run in the registry: both towers + tokenizer logged beside the image encoder,
loaded back exactly (weights only), pulled offline, used by ``embed --text-column`` and
``zero-shot``. Real MLflow registry in SQLite (no server, no mocks); references are the
registered model run by hand."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient

from service.cli import main
from service.config import BUNDLED_DATA_DIR, Config
from service.data.augment import eval_transform
from service.data.decode import decode_image
from service.models import build_image_text_model, build_model
from service.registry import (
    RegistryError,
    list_versions,
    load_encoder,
    load_image_text_model,
    load_text_encoder,
    pull,
    register_encoder,
    zero_shot_parquet,
)
from service.registry.spec import EncoderSpec, save_weights
from service.registry.text import TEXT_FILES
from service.text import Tokenizer
from service.tracking.runs import start_pretrain_run

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = BUNDLED_DATA_DIR / "cifar10-test-captions.parquet"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _text_config() -> Config:
    config = Config()
    config.mlflow.experiment = "test-registry-text"
    config.mlflow.registered_model_name = "clip-test"
    config.text.column = "text"
    config.text.vocab_size = 300
    config.text.context_length = 16
    config.text.width = 32
    config.text.layers = 1
    config.text.heads = 2
    config.text.templates = ["a photo of a {}.", "a blurry photo of the {}."]
    return config


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """One registered image–text version (random init, seeded) and the objects it came from."""
    directory = tmp_path_factory.mktemp("registry-text")
    uri = f"sqlite:///{directory.resolve() / 'mlruns.db'}"
    config = _text_config()
    table = pq.read_table(CAPTIONS).slice(0, 24)
    tokenizer = Tokenizer.fit(table.column("text").to_pylist(), config.text.vocab_size)
    torch.manual_seed(0)
    model = build_image_text_model(config).eval()
    run_id = start_pretrain_run(config, uri, run_name="clip")
    registered = register_encoder(
        model.backbone,
        config,
        tracking_uri=uri,
        run_id=run_id,
        metric_name="knn_top1",
        metric_value=0.5,
        image_text=model,
        tokenizer=tokenizer,
    )
    transform = eval_transform(config.data.image_size, config.augment.mean, config.augment.std)
    images = torch.stack([transform(decode_image(b)) for b in table.column("image").to_pylist()])
    return SimpleNamespace(
        uri=uri,
        dir=directory,
        config=config,
        model=model,
        tokenizer=tokenizer,
        table=table,
        images=images,
        registered=registered,
        model_uri=f"models:/{config.mlflow.registered_model_name}@champion",
    )


def test_both_towers_load_back_exactly_and_the_image_encoder_as_before(clip):
    tokens = clip.tokenizer.encode(clip.table.column("text").to_pylist(), 16)
    model, tokenizer = load_image_text_model(clip.model_uri, clip.uri)
    assert type(model) is type(clip.model) and not model.training
    assert tokenizer.to_json() == clip.tokenizer.to_json()
    with torch.no_grad():
        for mine, theirs in zip(
            model(clip.images, tokens), clip.model(clip.images, tokens), strict=True
        ):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
        encoder, _ = load_encoder(clip.model_uri, clip.uri)  # unchanged: the image backbone
        torch.testing.assert_close(encoder(clip.images), clip.model.backbone(clip.images))
    text = load_text_encoder(clip.model_uri, clip.uri)
    captions = clip.table.column("text").to_pylist()[:5]
    expected = clip.model.encode_text(clip.tokenizer.encode(captions, 16)).detach()
    torch.testing.assert_close(text.encode(captions), expected, rtol=0, atol=1e-6)
    assert torch.allclose(text.encode(captions).norm(dim=1), torch.ones(5))


def test_version_is_tagged_image_text_and_listed(clip):
    client = MlflowClient(clip.uri)
    (row,) = list_versions(client, clip.config.mlflow.registered_model_name)
    assert row.towers == "image+text" and row.aliases == ["champion", "latest-trained"]


def test_pulled_directory_holds_the_text_files_and_loads_offline(clip, tmp_path):
    out = pull(clip.model_uri, tmp_path / "pulled", clip.uri)
    assert all((out / name).is_file() for name in TEXT_FILES)
    assert "load_text_encoder" in (out / "README.md").read_text()
    text = load_text_encoder(str(out))
    expected = clip.model.encode_text(clip.tokenizer.encode(["a cat."], 16)).detach()
    torch.testing.assert_close(text.encode(["a cat."]), expected, rtol=0, atol=1e-6)


def test_text_mode_registration_needs_the_model_and_logs_nothing_without_it(clip):
    client = MlflowClient(clip.uri)
    name = clip.config.mlflow.registered_model_name
    before = len(client.search_model_versions(f"name = '{name}'"))
    run_id = start_pretrain_run(clip.config, clip.uri, run_name="no-model")
    kwargs = dict(tracking_uri=clip.uri, run_id=run_id, metric_name="knn_top1", metric_value=1)
    with pytest.raises(RegistryError, match="needs image_text="):
        register_encoder(clip.model.backbone, clip.config, **kwargs)
    other = build_model(clip.config.model).backbone  # not the image-text model's backbone
    with pytest.raises(RegistryError, match="not the image-text model's backbone"):
        register_encoder(
            other, clip.config, image_text=clip.model, tokenizer=clip.tokenizer, **kwargs
        )
    assert len(client.search_model_versions(f"name = '{name}'")) == before


def test_an_image_only_encoder_has_no_text_tower(tmp_path):
    config = Config()
    backbone = build_model(config.model).backbone
    save_weights(backbone, tmp_path)
    EncoderSpec.from_config(config, backbone, backbone.out_dim).save(tmp_path)
    with pytest.raises(RegistryError, match="no text tower"):
        load_text_encoder(str(tmp_path))


def test_embed_text_column_gives_the_text_towers_unit_embeddings(clip, tmp_path):
    texts = clip.table.column("text").to_pylist()[:6]
    source = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"text": texts[:2] + [None] + texts[2:], "id": list(range(7))}), source)
    out = tmp_path / "text-emb.parquet"
    argv = ["embed", "--model", clip.model_uri, "--input", str(source), "--output", str(out)]
    assert main([*argv, "--text-column", "text", "--tracking-uri", clip.uri]) == 0
    result = pq.read_table(out)
    assert result.column("row_id").to_pylist() == [0, 1, 3, 4, 5, 6]  # the null text skipped
    assert result.column("text").to_pylist() == texts
    embeddings = np.stack(result.column("embedding").to_numpy(zero_copy_only=False))
    expected = clip.model.encode_text(clip.tokenizer.encode(texts, 16)).detach().numpy()
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)


def _reference_zero_shot(clip, names: list[str], templates: list[str]) -> torch.Tensor:
    """Cosine scores [n, C] by hand: class = normalised mean of normalised prompt embeddings."""
    with torch.no_grad():
        rows = []
        for name in names:
            prompts = [t.format(name) for t in templates]
            z = clip.model.project_text(clip.tokenizer.encode(prompts, 16))
            rows.append(F.normalize(F.normalize(z, dim=1).mean(0), dim=0))
        image = F.normalize(clip.model.project_image(clip.images), dim=1)
        return image @ torch.stack(rows).T


def test_zero_shot_predictions_scores_and_accuracy_match_a_plain_reference(clip, tmp_path):
    corrupt = pa.table({"image": [b"nope"], "label": [3], "label_name": ["cat"], "text": ["x"]})
    source = tmp_path / "images.parquet"
    pq.write_table(
        pa.concat_tables([clip.table.slice(0, 10), corrupt, clip.table.slice(10)]), source
    )
    out = tmp_path / "preds.parquet"
    summary = zero_shot_parquet(
        clip.model_uri, str(source), out, classes=CLASSES, tracking_uri=clip.uri, batch_size=7
    )
    reference = _reference_zero_shot(clip, CLASSES, clip.config.text.templates)  # run's templates
    result = pq.read_table(out)
    assert result.column("row_id").to_pylist() == [i for i in range(25) if i != 10]
    scores = np.stack(result.column("scores").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(scores, reference.numpy(), atol=1e-5)
    predicted = reference.argmax(1).tolist()
    assert result.column("predicted").to_pylist() == [CLASSES[i] for i in predicted]
    truth = clip.table.column("label_name").to_pylist()
    expected_top1 = np.mean([CLASSES[p] == t for p, t in zip(predicted, truth, strict=True)])
    assert summary["labelled_rows"] == 24 and summary["skipped_corrupt"] == 1
    assert summary["top1"] == pytest.approx(expected_top1)
    assert summary["templates"] == clip.config.text.templates


def test_zero_shot_cli_with_classes_from_a_column_and_a_templates_file(clip, tmp_path, capsys):
    source = tmp_path / "images.parquet"
    pq.write_table(clip.table, source)
    templates = tmp_path / "templates.txt"
    templates.write_text("# prompts\nitap of a {}.\n\na {} in the picture.\n")
    out = tmp_path / "preds.parquet"
    argv = ["zero-shot", "--model", clip.model_uri, "--input", str(source), "--output", str(out)]
    argv += ["--classes-from-column", "label_name", "--templates", str(templates)]
    assert main([*argv, "--tracking-uri", clip.uri]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    names = sorted(set(clip.table.column("label_name").to_pylist()))
    assert summary["classes"] == names
    assert summary["templates"] == ["itap of a {}.", "a {} in the picture."]
    reference = _reference_zero_shot(clip, names, summary["templates"])
    truth = clip.table.column("label_name").to_pylist()
    expected = np.mean(
        [names[p] == t for p, t in zip(reference.argmax(1).tolist(), truth, strict=True)]
    )
    assert summary["top1"] == pytest.approx(expected)
    assert f"top-1 accuracy {expected:.4f} on 24 labelled rows" in captured.err
    bad = tmp_path / "bad.txt"
    bad.write_text("no placeholder\n")
    assert main([*argv[:-1], str(bad), "--tracking-uri", clip.uri]) == 2  # bad input
    assert "needs '{}'" in capsys.readouterr().err
