"""The offline byte-level BPE tokenizer (service.text): layout, round trip, determinism, JSON."""

from __future__ import annotations

import random

import pytest
import torch

from service.config import BUNDLED_DATA_DIR, load_config
from service.data.captions import CAPTION_TEMPLATES, fill_template
from service.text import Tokenizer, fit_tokenizer

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CAPTIONS = [fill_template(t, n) for t in CAPTION_TEMPLATES for n in NAMES]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.fit(CAPTIONS, vocab_size=400)


def test_special_ids_and_vocab_size(tok: Tokenizer) -> None:
    assert (tok.pad_id, tok.eot_id) == (0, 1)
    assert 258 < tok.vocab_size <= 400


def test_round_trip_lowercases_and_covers_unseen_text(tok: Tokenizer) -> None:
    ids = tok.encode(["A Photo of a CAT.", "zebra crossing ünïcode ✓"], context_length=64)
    assert tok.decode(ids[0].tolist()) == "a photo of a cat."
    assert tok.decode(ids[1].tolist()) == "zebra crossing ünïcode ✓"  # byte level: no <unk>


def test_layout_eot_then_padding(tok: Tokenizer) -> None:
    ids = tok.encode(["a photo of a cat.", ""], context_length=16)
    assert ids.dtype == torch.long and ids.shape == (2, 16)
    n = len(tok._backend.encode("a photo of a cat.", add_special_tokens=False).ids)
    assert ids[0, n] == tok.eot_id and (ids[0, :n] > 1).all() and (ids[0, n + 1 :] == 0).all()
    assert ids[1, 0] == tok.eot_id and (ids[1, 1:] == tok.pad_id).all()


def test_truncation_keeps_eot_last(tok: Tokenizer) -> None:
    long = " ".join(CAPTIONS[:20])
    ids = tok.encode([long], context_length=8)
    full = tok.encode([long], context_length=512)
    assert ids[0, -1] == tok.eot_id
    assert torch.equal(ids[0, :7], full[0, :7])
    assert tok.eot_id not in ids[0, :7].tolist()


def test_fit_is_deterministic_and_order_independent() -> None:
    shuffled = CAPTIONS[:]
    random.Random(3).shuffle(shuffled)
    first = Tokenizer.fit(CAPTIONS, vocab_size=400).to_json()
    assert Tokenizer.fit(CAPTIONS, vocab_size=400).to_json() == first
    assert Tokenizer.fit(shuffled, vocab_size=400).to_json() == first
    assert Tokenizer.fit(CAPTIONS[:30], vocab_size=400).to_json() != first


def test_json_and_file_round_trip(tok: Tokenizer, tmp_path) -> None:
    batch = ["a blurry picture of the horse.", "there is a ship in this image."]
    again = Tokenizer.from_json(tok.to_json())
    loaded = Tokenizer.load(tok.save(tmp_path / "tokenizer.json"))
    for other in (again, loaded):
        assert other.vocab_size == tok.vocab_size
        assert torch.equal(other.encode(batch, 12), tok.encode(batch, 12))


def test_rejects_a_vocabulary_smaller_than_the_byte_alphabet() -> None:
    with pytest.raises(ValueError, match="vocab_size must be >= 258"):
        Tokenizer.fit(CAPTIONS, vocab_size=100)


def test_fit_tokenizer_uses_only_training_rows(monkeypatch) -> None:
    """Captions of the held-out validation rows never reach the fit."""
    from service.data.captions import training_captions
    from service.data.sources import inspect_source
    from service.data.splits import train_val_rows

    config = load_config(
        overrides={
            "text.column": "text",
            "data.train": str(BUNDLED_DATA_DIR / "cifar10-train-captions.parquet"),
            "data.val_fraction": 0.5,
        }
    )
    split = train_val_rows(config)
    table = inspect_source(config.data.train).read(["text"])
    texts = table.column("text").to_pylist()
    expected = sorted(texts[i] for i in split.train)
    assert sorted(training_captions(config)) == expected
    seen: list[str] = []
    real_fit = Tokenizer.fit.__func__

    def spy(cls, captions, vocab_size):
        seen.extend(captions)
        return real_fit(cls, seen, vocab_size)

    monkeypatch.setattr(Tokenizer, "fit", classmethod(spy))
    fitted = fit_tokenizer(config)
    assert sorted(seen) == expected and fitted.vocab_size <= config.text.vocab_size
