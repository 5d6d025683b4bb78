"""Image data: Parquet discovery and validation, decoding, SimCLR augmentations, two readers.

- PyTorch path (single process, tests, data that fits in memory): :class:`ParquetImageDataset`
  + :func:`make_dataloader`.
- Ray Data path (streaming, any size): :func:`read_ray_dataset` → :func:`augment_ray_dataset`
  → :func:`iter_view_batches` on each Ray Train worker's shard.

Both yield ``(list of n_views tensors [b, 3, H, W], labels [b])`` batches.

Batched augmentation (:mod:`service.data.batch_augment`): the same SimCLR pipeline on a whole
uint8 batch ``[B, 3, H, W]`` on its device (CPU or CUDA), seeded per instance::

    augment = BatchSimCLRAugment(config.augment, image_size=32, seed=rank_seed)
    views = augment(uint8_batch)  # n_views float32 tensors [B, 3, 32, 32], normalised

With ``augment.backend=batched`` the readers deliver decoded uint8 batches instead of views:
the PyTorch reader decodes the training rows once into shared memory
(:mod:`service.data.decoded`), the Ray reader decodes in its map tasks (:class:`DecodeBatchFn`,
:func:`iter_image_batches`), and the trainer augments on its device
(``service.train.batches.TrainBatches``).

Image–text data (``text.column`` set): both readers carry the caption column with its image
(:mod:`service.data.captions`: valid captions, templated captions from class names, captions
files for ``data pack --captions``); :func:`iter_captioned_batches` on the Ray path.

Ray is imported lazily (inside :func:`read_ray_dataset`), so importing this package is cheap.
"""

from service.data.augment import (
    MultiViewTransform,
    color_jitter,
    denormalize,
    eval_transform,
    simclr_transform,
    view_size,
)
from service.data.batch_augment import BatchSimCLRAugment, ViewParams
from service.data.captions import (
    CAPTION_TEMPLATES,
    TEXT_COLUMN,
    caption_parquet,
    caption_table,
    fill_template,
    is_caption,
    read_captions_file,
    read_templates,
    training_captions,
)
from service.data.decode import DecodeStats, decode_image, to_rgb
from service.data.decoded import (
    DecodedImages,
    DecodedKey,
    IndexBatchDataset,
    SharedDecoded,
    SharedDecodedMismatchError,
    decode_once_plan,
    decode_rows,
    decoded_key,
    load_shared,
    share_training_rows,
    to_uint8_square,
    training_key,
)
from service.data.errors import CorruptImageError, DataError, TooManyBadImagesError
from service.data.pack import pack_image_folder
from service.data.parquet import (
    ParquetSource,
    inspect_parquet,
    read_image_table,
    resolve_parquet_files,
)
from service.data.preview import save_augmentation_preview
from service.data.ray_dataset import (
    DecodeBatchFn,
    MultiViewBatchFn,
    augment_ray_dataset,
    build_ray_train_dataset,
    iter_captioned_batches,
    iter_image_batches,
    iter_view_batches,
    make_multiview_batch_fn,
    read_ray_dataset,
)
from service.data.torch_dataset import (
    ParquetImageDataset,
    build_eval_dataset,
    build_train_dataset,
    collate_views,
    make_dataloader,
)

__all__ = [
    "DecodedKey",
    "SharedDecoded",
    "SharedDecodedMismatchError",
    "decoded_key",
    "load_shared",
    "share_training_rows",
    "training_key",
    "CAPTION_TEMPLATES",
    "TEXT_COLUMN",
    "BatchSimCLRAugment",
    "CorruptImageError",
    "DataError",
    "DecodeBatchFn",
    "DecodeStats",
    "DecodedImages",
    "IndexBatchDataset",
    "MultiViewBatchFn",
    "MultiViewTransform",
    "ParquetImageDataset",
    "ParquetSource",
    "TooManyBadImagesError",
    "ViewParams",
    "augment_ray_dataset",
    "build_eval_dataset",
    "build_ray_train_dataset",
    "build_train_dataset",
    "caption_parquet",
    "caption_table",
    "collate_views",
    "color_jitter",
    "decode_image",
    "decode_once_plan",
    "decode_rows",
    "denormalize",
    "eval_transform",
    "fill_template",
    "inspect_parquet",
    "is_caption",
    "iter_captioned_batches",
    "iter_image_batches",
    "iter_view_batches",
    "make_dataloader",
    "make_multiview_batch_fn",
    "pack_image_folder",
    "read_captions_file",
    "read_image_table",
    "read_ray_dataset",
    "read_templates",
    "resolve_parquet_files",
    "save_augmentation_preview",
    "simclr_transform",
    "to_rgb",
    "to_uint8_square",
    "training_captions",
    "view_size",
]
