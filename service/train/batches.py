"""Per-worker training batches from either reader and either augmentation backend, with the same
step count on every rank.

``augment.backend=torchvision``: the loader yields finished float views (per-image PIL pipeline).
``augment.backend=batched``: the loader yields decoded uint8 batches; they move to the augment
device (``data.augment_device``: the worker's GPU when it has one) and
:class:`~service.data.batch_augment.BatchSimCLRAugment` turns them into views there. Either way
an epoch yields ``(views, labels)``, so ``train_step`` is the same for both.

Image–text mode (``text.column`` set): either reader carries each row's caption with its image
(a row whose image does not decode, or whose caption is null/empty, is dropped whole and counted),
and an epoch yields ``([image, tokens], labels)``: ONE augmented view float ``[b, 3, H, W]``
(either backend) and the captions tokenised here, in the worker, with the run's tokenizer
(``WorkerInputs.tokenizer_json``) into int64 ``[b, text.context_length]`` on the CPU
(``train_step`` moves them). Tokenising is per batch, so nothing is cached across epochs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np
import torch

from service.config import Config
from service.data.errors import DataError
from service.train.inputs import WorkerInputs, steps_per_epoch

ViewBatch = tuple[list[torch.Tensor], torch.Tensor]  # (n_views tensors [b,3,H,W], labels [b])

log = logging.getLogger("service.train")


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


def augment_seed(config: Config, rank: int) -> int:
    """One augmentation seed per rank (ranks must not draw the same views), from train.seed."""
    return int(np.random.SeedSequence([config.train.seed, rank]).generate_state(1)[0])


class TrainBatches:
    """``data.reader=torch``: DataLoader + DistributedSampler (reshuffled every epoch);
    ``data.reader=ray``: this worker's Ray Data shard (block order and a local buffer shuffled
    every epoch). The per-worker batch is global / workers."""

    def __init__(self, inputs: WorkerInputs, rank: int, world: int) -> None:
        self.config: Config = inputs.config
        self.batch_size = self.config.per_worker_batch_size
        self.batched = self.config.augment.backend == "batched"
        self.text_column = self.config.text.column
        self.tokenizer: Any = self._tokenizer(inputs) if self.text_column else None
        self.augment: Any = None
        if self.batched:
            from service.data.batch_augment import BatchSimCLRAugment

            self.device = augment_device(self.config)
            self.augment = BatchSimCLRAugment(
                self.config.augment,
                self.config.data.image_size,
                seed=augment_seed(self.config, rank),
                n_views=1 if self.text_column else None,  # image–text: one view per image
            )
        if self.config.data.reader == "ray":
            import ray.train

            self.shard = ray.train.get_dataset_shard("train")
            rows = inputs.rows or 0
        else:
            rows = self._build_loader(rank, world, inputs.decoded_ref)
        self.steps_per_epoch = steps_per_epoch(rows, self.config.train.global_batch_size)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the training data ({rows} usable rows) yields no full global batch of "
                f"{self.config.train.global_batch_size} per epoch; lower "
                f"train.global_batch_size or add data"
            )

    @staticmethod
    def _tokenizer(inputs: WorkerInputs) -> Any:
        from service.text import Tokenizer

        if not inputs.tokenizer_json:
            raise ValueError(
                f"text.column={inputs.config.text.column!r} (image–text mode) but the driver "
                f"passed no tokenizer (WorkerInputs.tokenizer_json)"
            )
        return Tokenizer.from_json(inputs.tokenizer_json)

    def _build_loader(self, rank: int, world: int, shared: Any = None) -> int:
        from service.data import make_dataloader
        from service.data.splits import train_val_rows

        rows = train_val_rows(self.config).train_rows(self.config.data.limit)
        dataset = None
        if self.batched:
            dataset = (
                self._shared_dataset(shared, rows, rank)
                if shared is not None
                else self._decoded_dataset(rows, world)
            )
        if dataset is not None:  # decode once: one gather per index batch, no per-item work
            from torch.utils.data import BatchSampler, DataLoader

            self.sampler = self._sampler(dataset, rank, world)
            workers = self.config.data.loader_workers
            self.loader = DataLoader(
                dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                sampler=BatchSampler(self.sampler, self.batch_size, drop_last=True),
                pin_memory=self.device.type == "cuda",
            )  # fmt: skip
            return len(dataset)
        dataset = self._streaming_dataset(rows)
        self.sampler = self._sampler(dataset, rank, world)
        self.loader = make_dataloader(
            dataset, batch_size=self.batch_size, shuffle=False, drop_last=True,
            num_workers=self.config.data.loader_workers, sampler=self.sampler,
        )  # fmt: skip
        return len(dataset)

    def _sampler(self, dataset: Any, rank: int, world: int) -> Any:
        from torch.utils.data import DistributedSampler

        return DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True,
            seed=self.config.train.seed, drop_last=True,
        )  # fmt: skip

    def _decoded_dataset(self, rows: np.ndarray, world: int) -> Any:
        """The decoded training rows when they fit in memory (else None: stream), logged."""
        from service.data.decoded import IndexBatchDataset, decode_once_plan, decode_rows

        d = self.config.data
        plan = decode_once_plan(len(rows), d.image_size, copies=world)
        if not plan.decode_once:
            log.warning("data: streaming (decode per item, batched augment), %s", plan.reason())
            return None
        log.info("data: decode once into memory, %s (one copy per rank: %d)", plan.reason(), world)
        decoded = decode_rows(d.train, rows, d.image_size, d.max_bad_fraction, self.text_column)
        return IndexBatchDataset(decoded)

    def _shared_dataset(self, shared: Any, rows: np.ndarray, rank: int) -> Any:
        """The driver's decoded copy (``WorkerInputs.decoded_ref``), mapped read-only from the
        object store; refused unless it holds exactly this config's training rows."""
        from service.console import say
        from service.data.decoded import IndexBatchDataset, decoded_key, load_shared

        d = self.config.data
        decoded = load_shared(shared, decoded_key(d.train, rows, d.image_size, self.text_column))
        if rank == 0:  # the e2e sweep test looks for this line in the job's logs
            say("data", f"shared decoded copy from the driver: {shared.key.describe()}")
        return IndexBatchDataset(decoded)

    def _streaming_dataset(self, rows: np.ndarray) -> Any:
        """Per-item decode: float views (torchvision), or uint8 squares (batched backend)."""
        from service.data.decoded import to_uint8_square
        from service.data.torch_dataset import build_train_dataset

        if not self.batched:
            return build_train_dataset(self.config, rows)
        square = partial(to_uint8_square, size=self.config.data.image_size)
        return build_train_dataset(self.config, rows, item_transform=square)

    def _source(self, epoch: int) -> Iterator[Any]:
        """This epoch's loader batches: views (torchvision) or uint8 images (batched)."""
        if self.config.data.reader != "ray":
            self.sampler.set_epoch(epoch)
            return iter(self.loader)
        from service.data import ray_dataset

        if self.text_column:
            return ray_dataset.iter_captioned_batches(
                self.shard, self.batch_size, self.text_column, drop_last=True,
                device=self.device if self.batched else "cpu",
            )  # fmt: skip
        if self.batched:
            return ray_dataset.iter_image_batches(
                self.shard, self.batch_size, drop_last=True, device=self.device
            )
        return ray_dataset.iter_view_batches(
            self.shard, self.batch_size, self.config.augment.n_views, drop_last=True
        )

    def epoch(self, epoch: int) -> Iterator[ViewBatch]:
        """The batches of one epoch: exactly ``steps_per_epoch`` of them; image–text mode:
        ``([image view, tokens], labels)``."""
        batches = self._source(epoch)
        if self.text_column:
            yield from self._text_epoch(batches)
            return
        # Ray Data shards may differ by a batch; every rank must run the same step count.
        for _, (data, labels) in zip(range(self.steps_per_epoch), batches, strict=False):
            if self.batched:
                data = self.augment(data.to(self.device, non_blocking=True))
            yield data, labels

    def _text_epoch(self, batches: Iterator[Any]) -> Iterator[ViewBatch]:
        """Loader ``(images or [view], labels, captions)`` → ``([view, tokens], labels)``."""
        length = self.config.text.context_length
        for _, (data, labels, texts) in zip(range(self.steps_per_epoch), batches, strict=False):
            if self.batched:
                (view,) = self.augment(data.to(self.device, non_blocking=True))
            else:  # torchvision: the DataLoader gives [view], the Ray reader the view itself
                view = data[0] if isinstance(data, list) else data
            yield [view, self.tokenizer.encode(texts, length)], labels
