"""Per-worker training batches from either reader, with the same step count on every rank."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from service.config import Config
from service.train.inputs import WorkerInputs, steps_per_epoch

ViewBatch = tuple[list[torch.Tensor], torch.Tensor]  # (n_views tensors [b,3,H,W], labels [b])


class TrainBatches:
    """``data.reader=torch``: DataLoader + DistributedSampler (reshuffled every epoch);
    ``data.reader=ray``: this worker's Ray Data shard. The per-worker batch is global / workers."""

    def __init__(self, inputs: WorkerInputs, rank: int, world: int) -> None:
        self.config: Config = inputs.config
        self.batch_size = self.config.per_worker_batch_size
        if self.config.data.reader == "ray":
            import ray.train

            self.shard = ray.train.get_dataset_shard("train")
            rows = inputs.rows or 0
        else:
            rows = self._build_loader(rank, world)
        self.steps_per_epoch = steps_per_epoch(rows, self.config.train.global_batch_size)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the training data ({rows} usable rows) yields no full global batch of "
                f"{self.config.train.global_batch_size} per epoch; lower "
                f"train.global_batch_size or add data"
            )

    def _build_loader(self, rank: int, world: int) -> int:
        from torch.utils.data import DistributedSampler

        from service.data import make_dataloader
        from service.data.torch_dataset import build_train_dataset

        dataset = build_train_dataset(self.config)
        self.sampler = DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True,
            seed=self.config.train.seed, drop_last=True,
        )  # fmt: skip
        self.loader = make_dataloader(
            dataset, batch_size=self.batch_size, shuffle=False, drop_last=True,
            num_workers=self.config.data.loader_workers, sampler=self.sampler,
        )  # fmt: skip
        return len(dataset)

    def epoch(self, epoch: int) -> Iterator[ViewBatch]:
        """The batches of one epoch: exactly ``steps_per_epoch`` of them."""
        if self.config.data.reader == "ray":
            from service.data.ray_dataset import iter_view_batches

            batches = iter_view_batches(
                self.shard, self.batch_size, self.config.augment.n_views, drop_last=True
            )
        else:
            self.sampler.set_epoch(epoch)
            batches = iter(self.loader)
        # Ray Data shards may differ by a batch; every rank must run the same step count.
        for _, batch in zip(range(self.steps_per_epoch), batches, strict=False):
            yield batch
