"""The registered version loads and serves with plain MLflow, without this project.

"Without this project": the children run in a fresh venv (``python -m venv --without-pip``)
that sees the installed packages (MLflow, torch, torchvision) as a plain path entry, so the
``.pth`` of the editable install is never run and ``service`` cannot be imported (each child
checks). (``--system-site-packages`` would run that ``.pth``; a bare venv would download
several GB of torch.) Embeddings are compared with ``contrastive embed``
(``service.registry.embed_parquet``) and the weights-only loaders. Real SQLite registry, real
``mlflow models serve``; no mocks.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from service.config import BUNDLED_DATA_DIR, Config
from service.data.decode import decode_image
from service.models import build_image_text_model, build_model
from service.models.backbones import build_backbone
from service.registry import (
    download_version,
    embed_parquet,
    load_encoder,
    load_image_text_model,
    load_text_encoder,
    register_encoder,
)
from service.registry.contrastive_pyfunc import nets
from service.registry.spec import save_weights
from service.text import Tokenizer
from service.tracking.runs import start_pretrain_run

pytestmark = pytest.mark.usefixtures("one_thread")

TEST_IMAGES = BUNDLED_DATA_DIR / "cifar10-test-subset.parquet"
CAPTIONS = BUNDLED_DATA_DIR / "cifar10-test-captions.parquet"
ALIAS = "latest-trained"  # set on every registration
TEXTS = ["a photo of a cat.", "a blurry photo of the ship.", ""]


def fresh_venv(folder: Path) -> Path:
    """A new venv (``python -m venv --without-pip``) that sees this interpreter's installed
    packages (MLflow, torch, torchvision, ...) as a plain path entry, so the ``.pth`` files
    there are not run: the editable install of contrastive-service is absent, as in a user's
    venv without this project. Returns the venv's python."""
    import site
    import sysconfig

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    base = [p for p in {sysconfig.get_paths()["purelib"], *site.getsitepackages()} if p]
    Path(purelib, "base_packages.pth").write_text("\n".join(sorted(base)) + "\n")
    return python


def _register(directory: Path, config: Config, *, text: bool) -> SimpleNamespace:
    uri = f"sqlite:///{directory.resolve() / 'mlruns.db'}"
    torch.manual_seed(0)
    tokenizer = None
    if text:
        captions = pq.read_table(CAPTIONS).slice(0, 24).column("text").to_pylist()
        tokenizer = Tokenizer.fit(captions, config.text.vocab_size)
        model = build_image_text_model(config).eval()
    else:
        model = build_model(config.model).eval()
    run_id = start_pretrain_run(config, uri, run_name="pyfunc")
    registered = register_encoder(
        model.backbone, config, tracking_uri=uri, run_id=run_id, metric_name="knn_top1",
        metric_value=0.5, image_text=model if text else None, tokenizer=tokenizer,
    )  # fmt: skip
    return SimpleNamespace(uri=uri, name=config.mlflow.registered_model_name, **registered)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One image-only and one image–text version in one SQLite registry, a few bundled images
    (as PNG files and a Parquet for ``embed``) and a fresh venv without this project."""
    directory = tmp_path_factory.mktemp("pyfunc")
    image_config = Config()
    image_config.mlflow.experiment = "test-pyfunc"
    image_config.mlflow.registered_model_name = "pyfunc-image"
    text_config = Config()
    text_config.mlflow.experiment = "test-pyfunc"
    text_config.mlflow.registered_model_name = "pyfunc-clip"
    text_config.text.column = "text"
    for key, value in (("vocab_size", 300), ("context_length", 16), ("width", 32),
                       ("layers", 1), ("heads", 2)):  # fmt: skip
        setattr(text_config.text, key, value)
    image = _register(directory, image_config, text=False)
    clip = _register(directory, text_config, text=True)
    table = pq.read_table(TEST_IMAGES).slice(0, 6)
    pq.write_table(table, directory / "images.parquet")
    pngs = []
    for i, value in enumerate(table.column("image").to_pylist()):
        data = value["bytes"] if isinstance(value, dict) else value
        (directory / f"img{i}.png").write_bytes(data)
        pngs.append(directory / f"img{i}.png")
    python = fresh_venv(directory / "venv")
    return SimpleNamespace(dir=directory, uri=image.uri, image=image, clip=clip, pngs=pngs,
                           python=python)  # fmt: skip


def _embed(store, model_name: str, tmp_path: Path, **kwargs) -> np.ndarray:
    """``contrastive embed``'s vectors for the bundled images (all decodable: rows in order)."""
    out = tmp_path / f"{model_name}-{len(kwargs)}.parquet"
    uri = f"models:/{model_name}@{ALIAS}"
    embed_parquet(uri, str(store.dir / "images.parquet"), out, 4, store.uri, **kwargs)
    return np.stack(pq.read_table(out).column("embedding").to_numpy(zero_copy_only=False))


def _venv_env(store) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "MLFLOW_TRACKING_URI": store.uri}


CHILD = """
import json, sys
import numpy as np, pandas as pd
from PIL import Image
try:
    import service  # noqa: F401
    sys.exit("service is importable: this venv has the project")
except ImportError:
    pass
import mlflow

texts, paths = json.loads(sys.argv[3]), sys.argv[4:]
images = [open(p, "rb").read() for p in paths]
out = {}
model = mlflow.pyfunc.load_model(f"models:/{sys.argv[1]}@latest-trained")
out["image"] = model.predict(pd.DataFrame({"image": images})).tolist()
normalized = model.predict(pd.DataFrame({"image": images}), params={"normalize": True})
out["normalized"] = normalized.tolist()
arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
out["arrays"] = model.unwrap_python_model().predict(None, arrays).tolist()
clip = mlflow.pyfunc.load_model(f"models:/{sys.argv[2]}@latest-trained")
out["text"] = clip.predict(pd.DataFrame({"text": texts})).tolist()
mixed = pd.DataFrame({"image": images[:2] + [None] * len(texts), "text": [None] * 2 + texts})
out["joint"] = clip.predict(mixed, params={"space": "joint"}).tolist()
out["clip_image"] = clip.predict(pd.DataFrame({"image": images})).tolist()
assert "service" not in sys.modules
print("RESULT " + json.dumps(out))
"""


def test_pyfunc_loads_without_the_project_and_matches_embed(store, tmp_path):
    """(a) ``mlflow.pyfunc.load_model`` where ``service`` cannot be imported: image bytes, uint8
    arrays, texts and the joint space, each equal to the project's own embeddings."""
    pngs = [str(p) for p in store.pngs]
    child = subprocess.run(
        [str(store.python), "-c", CHILD, store.image.name, store.clip.name, json.dumps(TEXTS),
         *pngs],
        env=_venv_env(store), cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    got = json.loads(child.stdout.split("RESULT ", 1)[1])
    expected = _embed(store, store.image.name, tmp_path)
    np.testing.assert_allclose(got["image"], expected, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(got["arrays"], expected, atol=1e-5, rtol=1e-4)
    normalized = _embed(store, store.image.name, tmp_path, normalize=True)
    np.testing.assert_allclose(got["normalized"], normalized, atol=1e-5)
    np.testing.assert_allclose(got["clip_image"], _embed(store, store.clip.name, tmp_path),
                               atol=1e-5, rtol=1e-4)  # fmt: skip
    # Texts: ``contrastive embed --text-column``'s tower; joint-space images: encode_image.
    text_encoder = load_text_encoder(f"models:/{store.clip.name}@{ALIAS}", store.uri)
    texts = text_encoder.encode(TEXTS).numpy()
    np.testing.assert_allclose(got["text"], texts, atol=1e-5)
    model, _ = load_image_text_model(f"models:/{store.clip.name}@{ALIAS}", store.uri)
    encoder, preprocess = load_encoder(f"models:/{store.clip.name}@{ALIAS}", store.uri)
    batch = torch.stack([preprocess(decode_image(p.read_bytes())) for p in store.pngs[:2]])
    with torch.no_grad():
        joint = model.encode_image(batch).numpy()
    np.testing.assert_allclose(got["joint"], np.concatenate([joint, texts]), atol=1e-5)


def test_registered_model_files_and_requirements(store, tmp_path):
    """The MLmodel has the portable pyfunc (models-from-code, code/ travels with it) and the
    pickled pytorch flavour; the requirements never name this project; the signature is honest."""
    import mlflow.pytorch
    from mlflow.models import Model

    local = download_version(store.uri, store.clip.name, store.clip.version, tmp_path / "model")
    flavors = Model.load(str(local)).flavors
    assert flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert (local / "code" / "contrastive_pyfunc" / "nets.py").is_file()
    assert "pytorch" in flavors and (local / "data" / "model.pth").is_file()
    requirements = (local / "requirements.txt").read_text().split()
    names = {line.split("==")[0] for line in requirements}
    assert names == {"torch", "torchvision", "mlflow", "pillow", "pandas", "numpy", "tokenizers"}
    for path in (local / "code").rglob("*.py"):
        assert "import service" not in path.read_text() and "from service" not in path.read_text()
    signature = Model.load(str(local)).signature
    assert [(c.name, c.type.name, c.required) for c in signature.inputs.inputs] == [
        ("image", "binary", False), ("text", "string", False)]  # fmt: skip
    # images give backbone features (256), texts the joint space (128): width not fixed
    assert signature.outputs.inputs[0].shape == (-1, -1)
    # with the project installed, the pickled flavour still loads, and gives the same features
    pickled = mlflow.pytorch.load_model(str(local))
    weights, _ = load_encoder(f"models:/{store.clip.name}@{ALIAS}", store.uri, source="weights")
    via_pickle, _ = load_encoder(f"models:/{store.clip.name}@{ALIAS}", store.uri, source="pickle")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(pickled(x), weights(x)) and torch.allclose(via_pickle(x), weights(x))


@pytest.mark.parametrize(
    ("arch", "depth"), [("small_cnn", 1), ("small_cnn", 2), ("resnet18", 1), ("resnet50", 1)]
)
def test_portable_architectures_match_service_models(arch, depth, tmp_path):
    """The copy in ``contrastive_pyfunc.nets`` takes the same weights and gives the same
    features as ``service.models`` (a change there without the copy fails here)."""
    torch.manual_seed(0)
    stem = arch != "resnet50"
    reference = build_backbone(arch, cifar_stem=stem, width=8, depth=depth).eval()
    portable = nets.build_backbone(
        {"arch": arch, "cifar_stem": stem, "width": 8, "depth": depth}
    ).eval()
    portable.load_state_dict(nets.read_safetensors(save_weights(reference, tmp_path)))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(portable(x), reference(x), atol=1e-6)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_embed_vectors(store, tmp_path):
    """(b) ``mlflow models serve -m models:/NAME@ALIAS --env-manager local`` without the
    project: a real HTTP request (image bytes base64 in ``dataframe_split``) gets
    ``contrastive embed``'s vectors."""
    port = _free_port()
    command = [str(store.python), "-m", "mlflow", "models", "serve", "-m",
               f"models:/{store.image.name}@{ALIAS}", "--env-manager", "local",
               "-p", str(port), "-h", "127.0.0.1", "-w", "1"]  # fmt: skip
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(command, env=_venv_env(store), cwd=tmp_path, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 50
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        rows = [[base64.b64encode(p.read_bytes()).decode("ascii")] for p in store.pngs]
        split = {"columns": ["image"], "data": rows}
        predictions = _post(f"{base}/invocations", {"dataframe_split": split})
        normalized = _post(
            f"{base}/invocations", {"dataframe_split": split, "params": {"normalize": True}}
        )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    expected = _embed(store, store.image.name, tmp_path)
    np.testing.assert_allclose(np.asarray(predictions), expected, atol=1e-5, rtol=1e-4)
    expected = _embed(store, store.image.name, tmp_path, normalize=True)
    np.testing.assert_allclose(np.asarray(normalized), expected, atol=1e-5)


def _post(url: str, payload: dict) -> list:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["predictions"]


def test_pulled_directory_loads_every_way(store, tmp_path):
    """``pull`` of a pyfunc version: the weights-only loader, the pickle and the pyfunc in
    ``model/`` give the same features."""
    import mlflow.pyfunc
    import pandas as pd

    from service.registry import pull

    pulled = pull(f"{store.image.name}@{ALIAS}", tmp_path / "pulled", store.uri)
    weights, preprocess = load_encoder(str(pulled), source="weights")
    pickled, _ = load_encoder(str(pulled), source="pickle")
    pyfunc = mlflow.pyfunc.load_model(str(pulled / "model"))
    batch = torch.stack([preprocess(decode_image(p.read_bytes())) for p in store.pngs])
    with torch.no_grad():
        expected = weights(batch).numpy()
        assert np.allclose(pickled(batch).numpy(), expected, atol=1e-6)
    images = pd.DataFrame({"image": [p.read_bytes() for p in store.pngs]})
    np.testing.assert_allclose(pyfunc.predict(images), expected, atol=1e-5, rtol=1e-4)
