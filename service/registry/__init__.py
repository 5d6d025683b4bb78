"""Encoder registry: log and register backbones (``register``), alias rules (``aliases``), version
tags (``tags``), the weights-only copy (``spec``), lookup, listing, pull/load, batch embedding
(local, or on a Ray actor pool: ``embed_ray``), and for image–text runs both towers + tokenizer
(``text``) and zero-shot classification."""

from service.registry.aliases import (
    CHAMPION_ALIAS,
    DECISION_ARTIFACT,
    LATEST_ALIAS,
    ChampionDecision,
    apply_alias_policy,
    current_champion,
    decide_champion,
    judge,
    metric_tag,
    promote,
)
from service.registry.embed import embed_parquet
from service.registry.embed_ray import EmbedPlan, Manifest, plan_embedding, run_embedding
from service.registry.errors import (
    EncoderSpecError,
    RegistryError,
    RegistryInputError,
    RegistryLookupError,
)
from service.registry.listing import VersionRow, format_table, list_versions
from service.registry.load import (
    LoadedEncoder,
    load_encoder,
    load_from_directory,
    load_registered,
    pull,
    version_aliases,
)
from service.registry.lookup import (
    ModelRef,
    download_version,
    model_directory,
    parse_model_ref,
    resolve_version,
)
from service.registry.register import LoggedEncoder, log_encoder, register_encoder
from service.registry.spec import (
    EncoderSpec,
    backbone_from_spec,
    find_weights_copy,
    rebuild_from_weights,
    save_weights,
)
from service.registry.tags import version_tags
from service.registry.text import (
    ImageTextSpec,
    LoadedImageText,
    TextEncoder,
    load_image_text,
    load_image_text_model,
    load_text_encoder,
)
from service.registry.validation import ValidationData, validation_data
from service.registry.zeroshot import read_templates, zero_shot_parquet

__all__ = [
    "CHAMPION_ALIAS",
    "DECISION_ARTIFACT",
    "LATEST_ALIAS",
    "LoadedEncoder",
    "ChampionDecision",
    "EncoderSpec",
    "EncoderSpecError",
    "LoggedEncoder",
    "ModelRef",
    "RegistryError",
    "RegistryInputError",
    "RegistryLookupError",
    "apply_alias_policy",
    "backbone_from_spec",
    "decide_champion",
    "embed_parquet",
    "EmbedPlan",
    "Manifest",
    "plan_embedding",
    "run_embedding",
    "judge",
    "load_encoder",
    "load_registered",
    "log_encoder",
    "parse_model_ref",
    "promote",
    "pull",
    "register_encoder",
    "version_aliases",
    "version_tags",
    "current_champion",
    "metric_tag",
    "load_from_directory",
    "download_version",
    "resolve_version",
    "find_weights_copy",
    "rebuild_from_weights",
    "save_weights",
    "ImageTextSpec",
    "LoadedImageText",
    "TextEncoder",
    "VersionRow",
    "format_table",
    "list_versions",
    "load_image_text",
    "load_image_text_model",
    "load_text_encoder",
    "model_directory",
    "read_templates",
    "zero_shot_parquet",
    "ValidationData",
    "validation_data",
]
