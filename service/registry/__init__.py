"""Encoder registry: log and register backbones (``register``), alias rules (``aliases``), version
tags (``tags``), the weights-only copy (``spec``), lookup, pull/load and batch embedding."""

from service.registry.aliases import (
    CHAMPION_ALIAS,
    DECISION_ARTIFACT,
    LATEST_ALIAS,
    ChampionDecision,
    apply_alias_policy,
    decide_champion,
    judge,
    promote,
)
from service.registry.embed import embed_parquet
from service.registry.errors import EncoderSpecError, RegistryError, RegistryLookupError
from service.registry.load import load_encoder, pull
from service.registry.lookup import ModelRef, parse_model_ref
from service.registry.register import LoggedEncoder, log_encoder, register_encoder
from service.registry.spec import EncoderSpec, backbone_from_spec
from service.registry.tags import version_tags

__all__ = [
    "CHAMPION_ALIAS",
    "DECISION_ARTIFACT",
    "LATEST_ALIAS",
    "ChampionDecision",
    "EncoderSpec",
    "EncoderSpecError",
    "LoggedEncoder",
    "ModelRef",
    "RegistryError",
    "RegistryLookupError",
    "apply_alias_policy",
    "backbone_from_spec",
    "decide_champion",
    "embed_parquet",
    "judge",
    "load_encoder",
    "log_encoder",
    "parse_model_ref",
    "promote",
    "pull",
    "register_encoder",
    "version_tags",
]
