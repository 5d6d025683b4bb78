"""Image data: one owner for the training-data path, data sources and augmentation backends
registered by name, decoding, SimCLR augmentations, two readers.

- Training data (:mod:`service.data.pipeline`): :func:`prepare` on the driver decides the path
  once (rows, their key, decode once / shared copy / stream / Ray Data); :func:`open_batches` on
  each worker returns the epoch's batches, the same step count on every rank.
- Sources (:mod:`service.data.sources`): :func:`inspect_source` resolves any ``data.*`` path with
  the format that owns it: Parquet (:mod:`service.data.parquet`) or WebDataset tar shards
  (:mod:`service.data.shards`, :mod:`service.data.webdataset`). Readers, checks, evaluation,
  ``embed`` and ``zero-shot`` all read rows through it.
- Augmentation backends (:mod:`service.data.augmenters`): ``batched`` (uint8 batches augmented on
  the training device, :class:`BatchSimCLRAugment`) and ``torchvision`` (per image, the
  reference).
- Readers (:mod:`service.data.readers`): PyTorch (decoded rows + ``DistributedSampler``, or a
  stream) and Ray Data shards (:mod:`service.data.ray_dataset`).

Image–text data (``text.column`` set): the readers carry the caption with its image
(:mod:`service.data.captions`).

Ray is imported lazily, so importing this package is cheap.
"""

from service.data.augment import (
    MultiViewTransform,
    augment_config_problems,
    color_jitter,
    denormalize,
    eval_transform,
    jitter_strengths,
    simclr_transform,
    view_size,
)
from service.data.augmenters import AUGMENTERS, Augmenter, augment_seed
from service.data.batch_augment import BatchSimCLRAugment, Pixels, ViewParams
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
    fit_item,
    fit_uint8,
    load_shared,
    share_training_rows,
    training_key,
)
from service.data.errors import CorruptImageError, DataError, TooManyBadImagesError
from service.data.pack import pack_image_folder, pack_shards
from service.data.parquet import (
    ParquetSource,
    inspect_parquet,
    read_image_table,
    resolve_parquet_files,
)
from service.data.pipeline import TrainData, open_batches, prepare
from service.data.plan import MODES, PreparedData, steps_per_epoch, training_rows
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
from service.data.shards import ShardSource, inspect_shard_source, is_shard_pattern
from service.data.sources import (
    SOURCE_FORMATS,
    DataSource,
    inspect_source,
    local_location,
    register_source,
    source_format,
)
from service.data.torch_dataset import (
    ParquetImageDataset,
    build_eval_dataset,
    build_train_dataset,
    collate_views,
    make_dataloader,
)

__all__ = [
    "augment_config_problems",
    "jitter_strengths",
    "AUGMENTERS",
    "Augmenter",
    "DataSource",
    "MODES",
    "PreparedData",
    "SOURCE_FORMATS",
    "ShardSource",
    "TrainData",
    "augment_seed",
    "inspect_shard_source",
    "inspect_source",
    "is_shard_pattern",
    "local_location",
    "open_batches",
    "pack_shards",
    "prepare",
    "register_source",
    "source_format",
    "steps_per_epoch",
    "training_rows",
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
    "Pixels",
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
    "fit_item",
    "fit_uint8",
    "training_captions",
    "view_size",
]
