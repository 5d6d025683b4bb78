"""The image–text model: text Transformer (causal, pooled at end-of-text), the two-tower model,
``build_training_model`` and the text tower's config rules."""

from __future__ import annotations

import pytest
import torch

from service.config import Config
from service.models import (
    ContrastiveModel,
    ImageTextModel,
    ProjectionHead,
    SmallCNN,
    TextTransformer,
    build_training_model,
    eot_positions,
    text_model_problems,
)

pytestmark = pytest.mark.usefixtures("one_thread")

EOT = 49


def _encoder(**kw) -> TextTransformer:
    torch.manual_seed(0)
    return TextTransformer(vocab_size=50, context_length=8, width=32, layers=2, heads=4, **kw)


def _model() -> ImageTextModel:
    torch.manual_seed(0)
    return ImageTextModel(
        SmallCNN(widths=(8, 16)), ProjectionHead(16, 16, 12, num_layers=1),
        _encoder(), ProjectionHead(32, 16, 12, num_layers=1),
    )  # fmt: skip


def test_eot_positions_match_a_loop() -> None:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 50, (20, 8), generator=g)
    lengths = torch.randint(1, 9, (20,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        tokens[i, n:] = 0
    expected = [max(j for j in range(8) if tokens[i, j] != 0) for i in range(20)]
    assert eot_positions(tokens).tolist() == expected


def test_text_features_ignore_padding_and_see_every_caption_token() -> None:
    encoder = _encoder().eval()
    caption = torch.tensor([[5, 6, 7, EOT, 0, 0, 0, 0]])
    shorter_batch = caption[:, :5]  # same caption, less padding
    long_neighbour = torch.tensor([[1, 2, 3, 4, 5, 6, 7, EOT]])
    first_changed = torch.tensor([[9, 6, 7, EOT, 0, 0, 0, 0]])
    with torch.no_grad():
        z = encoder(caption)
        # causal attention: the padding after end-of-text never reaches the pooled position,
        # so a caption's features do not depend on its batch's padded length or neighbours
        torch.testing.assert_close(encoder(shorter_batch), z)
        torch.testing.assert_close(encoder(torch.cat([caption, long_neighbour]))[:1], z)
        # ... and the pooled position sees the first token
        assert not torch.allclose(encoder(first_changed), z)
    assert z.shape == (1, 32)


def test_text_encoder_rejects_too_long_input_and_bad_heads() -> None:
    with pytest.raises(ValueError, match="context_length=8"):
        _encoder()(torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        TextTransformer(50, 8, 30, 1, 4)


def test_image_text_model_forward_encode_and_gradients() -> None:
    model = _model()
    assert model.paired_views is True
    images = torch.randn(4, 3, 16, 16)
    tokens = torch.tensor([[3, 4, EOT, 0, 0, 0, 0, 0]] * 2 + [[7, EOT] + [0] * 6] * 2)
    z_image, z_text = model(images, tokens)
    assert z_image.shape == z_text.shape == (4, 12)
    (z_image.sum() + z_text.sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reaches {name}"
    model.eval()
    with torch.no_grad():
        for e in (model.encode_image(images), model.encode_text(tokens)):
            torch.testing.assert_close(e.norm(dim=1), torch.ones(4))
        torch.testing.assert_close(
            model.encode_text(tokens), torch.nn.functional.normalize(model(images, tokens)[1])
        )
        assert model.embed(images).shape == (4, 16)


def _text_config(**text) -> Config:
    config = Config()
    config.text.column = "text"
    config.text.vocab_size, config.text.width, config.text.layers = 64, 32, 1
    for key, value in text.items():
        setattr(config.text, key, value)
    return config


def test_build_training_model_picks_the_model_by_mode() -> None:
    assert type(build_training_model(Config())) is ContrastiveModel
    config = _text_config()
    model = build_training_model(config)
    assert isinstance(model, ImageTextModel)
    assert model.text_encoder.token_embedding.num_embeddings == 64
    assert model.text_encoder.context_length == config.text.context_length
    # the image tower keeps ContrastiveModel's parameter names (backbone.*, head.*)
    image_keys = {k for k in model.state_dict() if not k.startswith("text_")}
    assert image_keys == set(build_training_model(Config()).state_dict())


def test_text_model_problems() -> None:
    assert text_model_problems(Config()) == []
    assert text_model_problems(_text_config()) == []
    problems = text_model_problems(_text_config(width=30, heads=4, layers=0))
    assert problems == [
        "text.layers must be >= 1, got 0",
        "text.width (30) must be divisible by text.heads (4)",
    ]
