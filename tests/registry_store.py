"""A real MLflow registry in a SQLite file (no server): two registered versions of a small
encoder, for the registry list / embed tests (each wraps it in a module-scoped fixture)."""

from __future__ import annotations

import uuid
from pathlib import Path
from types import SimpleNamespace

import torch

from service.config import Config
from service.models import build_model
from service.registry import register_encoder
from service.tracking.runs import start_pretrain_run


def two_versions(directory: Path) -> SimpleNamespace:
    """v1 (knn_top1 0.6, champion) and v2 (0.4, latest-trained) of one model, registered in
    ``<directory>/mlruns.db``: ``uri``, ``name``, ``config``, ``backbones``, ``run_ids``."""
    uri = f"sqlite:///{directory.resolve() / 'mlruns.db'}"
    config = Config()
    config.mlflow.experiment = "test-sqlite-registry"
    name = f"enc-{uuid.uuid4().hex[:6]}"
    backbones, run_ids, results = [], [], []
    for seed, knn in ((0, 0.6), (1, 0.4)):
        torch.manual_seed(seed)
        backbone = build_model(config.model).backbone.eval()
        run_id = start_pretrain_run(config, uri, run_name=f"list-{seed}")
        results.append(
            register_encoder(
                backbone,
                config,
                tracking_uri=uri,
                run_id=run_id,
                metric_name="knn_top1",
                metric_value=knn,
                knn=knn,
                name=name,
            )
        )
        backbones.append(backbone)
        run_ids.append(run_id)
    return SimpleNamespace(
        uri=uri, dir=directory, name=name, config=config, backbones=backbones, run_ids=run_ids
    )
