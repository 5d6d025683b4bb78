"""The augment section's rules and SimCLR's colour-jitter formula have one home
(``service.data.augment``): preflight, the per-image transforms and the batched pipeline all use
it, so they cannot drift apart."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from service.config import AugmentConfig
from service.data import checks
from service.data.augment import (
    MAX_STRENGTH,
    augment_config_problems,
    color_jitter,
    eval_transform,
    jitter_strengths,
    simclr_transform,
)
from service.data.batch_augment import BatchSimCLRAugment
from service.data.errors import DataError


def test_preflight_gathers_the_same_rules() -> None:
    assert checks.augment_config_problems is augment_config_problems
    assert augment_config_problems(AugmentConfig()) == []


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0, MAX_STRENGTH])
def test_the_range_rule_allows_exactly_what_torchvision_accepts(strength: float) -> None:
    *factors, hue = jitter_strengths(strength)
    assert factors == [0.8 * strength] * 3 and hue == 0.2 * strength
    assert augment_config_problems(AugmentConfig(strength=strength)) == []
    v2.ColorJitter(*factors, hue=hue)  # torchvision's own check: hue <= 0.5


def test_above_the_range_torchvision_would_refuse_the_hue_too() -> None:
    above = MAX_STRENGTH + 0.01
    with pytest.raises(ValueError):
        v2.ColorJitter(hue=jitter_strengths(above)[3])
    [problem] = augment_config_problems(AugmentConfig(strength=above))
    with pytest.raises(DataError) as raised:
        color_jitter(above)
    assert str(raised.value) == problem
    assert problem.startswith("augment.strength must be in [0, 2.5] (hue jitter 0.2*s <= 0.5)")


def test_per_image_and_batched_jitter_use_the_formula() -> None:
    s = 0.7
    b, c, sat, h = jitter_strengths(s)
    jitter = color_jitter(s)
    assert jitter.brightness == pytest.approx((1 - b, 1 + b))
    assert jitter.contrast == pytest.approx((1 - c, 1 + c))
    assert jitter.saturation == pytest.approx((1 - sat, 1 + sat))
    assert jitter.hue == pytest.approx((-h, h))
    params = BatchSimCLRAugment(AugmentConfig(strength=s), 32, seed=0).sample(2000, 32, 32)
    low, high = params.factors.min(0).values, params.factors.max(0).values
    bounds = torch.tensor([1 + b, 1 + c, 1 + sat, h])
    assert (high <= bounds).all() and (high > bounds - 0.01).all()
    assert (low >= torch.tensor([1 - b, 1 - c, 1 - sat, -h])).all()


@pytest.mark.parametrize(
    ("cfg", "build"),
    [
        (AugmentConfig(min_scale=0.0), lambda cfg: simclr_transform(cfg, 32)),
        (AugmentConfig(std=[0.2, 0.0, 0.2]), lambda cfg: eval_transform(32, cfg.mean, cfg.std)),
        (AugmentConfig(mean=[0.5]), lambda cfg: simclr_transform(cfg, 32)),
    ],
)
def test_the_transforms_raise_the_preflight_message(cfg: AugmentConfig, build) -> None:
    [problem] = augment_config_problems(cfg)
    with pytest.raises(DataError) as raised:
        build(cfg)
    assert str(raised.value) == problem
