"""Training's side of the data path: the worker's :class:`~service.data.pipeline.TrainData`
(opened from what the driver prepared, on this worker's augment device) plus the captions
tokenised with the run's tokenizer in image–text mode.

An epoch yields ``(views, labels)``: ``augment.n_views`` float views ``[b, 3, H, W]`` on the
augment device; image–text mode (``text.column`` set): ``([image view, tokens], labels)`` with
the tokens int64 ``[b, text.context_length]`` on the CPU (``train_step`` moves them).
Tokenising is per batch, so nothing is cached across epochs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from service.config import Config
from service.data.errors import DataError
from service.data.pipeline import TrainData, open_batches, prepare
from service.train.inputs import WorkerInputs

ViewBatch = tuple[list[torch.Tensor], torch.Tensor]  # (n_views tensors [b,3,H,W], labels [b])


def _worker_cuda_device() -> torch.device:
    """This Ray Train worker's GPU (outside Ray Train: the current CUDA device)."""
    try:
        import ray.train.torch

        device = ray.train.torch.get_device()
        if device.type == "cuda":
            return device
    except Exception:  # noqa: BLE001 - not inside a Train worker (tests, benches)
        pass
    return torch.device("cuda", torch.cuda.current_device())


def augment_device(config: Config) -> torch.device:
    """Where ``augment.backend=batched`` augments: ``data.augment_device``, ``auto`` = the GPU
    when the worker trains on one (``train.use_gpu`` and a visible GPU), else the CPU."""
    setting = config.data.augment_device
    if setting == "cpu":
        return torch.device("cpu")
    gpu = torch.cuda.is_available()
    if setting == "cuda" and not gpu:
        raise DataError("data.augment_device=cuda but this worker sees no GPU; use auto or cpu")
    if setting == "cuda" or (gpu and config.train.use_gpu):
        return _worker_cuda_device()
    return torch.device("cpu")


class TrainBatches:
    """This rank's training batches: what the driver prepared (``inputs.data``; prepared here
    when absent, e.g. in tests), opened on the augment device, captions tokenised."""

    def __init__(self, inputs: WorkerInputs, rank: int, world: int) -> None:
        config = inputs.config
        prepared = inputs.data or prepare(config, world=world, share=False)
        self.data: TrainData = open_batches(prepared, config, rank, world, augment_device(config))
        self.steps_per_epoch = self.data.steps_per_epoch
        self.context_length = config.text.context_length
        self.tokenizer: Any = _tokenizer(inputs) if config.text.column else None

    def epoch(self, epoch: int) -> Iterator[ViewBatch]:
        """Exactly ``steps_per_epoch`` batches; image–text mode: ``([view, tokens], labels)``."""
        for views, labels, captions in self.data.epoch(epoch):
            if captions is None:
                yield views, labels
            else:
                yield [views[0], self.tokenizer.encode(captions, self.context_length)], labels


def _tokenizer(inputs: WorkerInputs) -> Any:
    from service.text import Tokenizer

    if not inputs.tokenizer_json:
        raise ValueError(
            f"text.column={inputs.config.text.column!r} (image–text mode) but the driver "
            f"passed no tokenizer (WorkerInputs.tokenizer_json)"
        )
    return Tokenizer.from_json(inputs.tokenizer_json)
