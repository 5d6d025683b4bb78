"""Captions → fixed-length token ids: a byte-level BPE fitted on the training captions.

Why fitted, not downloaded: nothing may be fetched at run time, and a vocabulary fitted on the
run's own training captions is small (``text.vocab_size``, default 2,048) and covers exactly the
words the text tower will see. The tokenizer is saved with the run and the registered model as
one JSON string (``to_json``), so an encoder and its tokenizer never drift apart. Byte-level:
every string encodes (no unknown token), whatever its script or spelling.

Layout of every encoded caption (``context_length`` ids): the BPE ids of the lower-cased,
NFKC-normalised text, cut to ``context_length - 1``, then ``eot_id``, then ``pad_id`` (0) up to
``context_length``. The text tower pools at the ``eot_id`` position.

>>> tok = Tokenizer.fit(["a photo of a cat.", "a photo of a dog."] * 10, vocab_size=300)
>>> ids = tok.encode(["a photo of a cat."], context_length=12)
>>> ids.shape, int(ids[0, -1]) == tok.pad_id, tok.decode(ids[0].tolist())
(torch.Size([1, 12]), True, 'a photo of a cat.')
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from service.config import Config

PAD_TOKEN = "<pad>"  # id 0: padding after the end of text
EOT_TOKEN = "<eot>"  # id 1: closes every caption (kept last when a caption is cut)
SPECIAL_TOKENS = (PAD_TOKEN, EOT_TOKEN)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens


class Tokenizer:
    """Byte-level BPE (``tokenizers``) with a pad and an end-of-text token; see the module doc."""

    def __init__(self, backend: object) -> None:
        from tokenizers import Tokenizer as _Backend

        if not isinstance(backend, _Backend):
            raise TypeError(f"expected a tokenizers.Tokenizer, got {type(backend).__name__}")
        self._backend = backend
        self.pad_id = self._special_id(PAD_TOKEN)
        self.eot_id = self._special_id(EOT_TOKEN)

    def _special_id(self, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no {token!r} token: not one of ours")
        return int(token_id)

    @classmethod
    def fit(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Fit the BPE merges on ``texts``; the same texts (in any order) give the same
        tokenizer. ``vocab_size`` is an upper bound: small corpora stop merging earlier."""
        from tokenizers import Tokenizer as _Backend
        from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + special tokens), "
                f"got {vocab_size}"
            )
        backend = _Backend(models.BPE())
        backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),  # ids 0 and 1, in this order
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        # Sorted: the merges depend only on counts, but a fixed order makes that independent of
        # how the trainer's threads happen to split the input.
        backend.train_from_iterator(sorted(t for t in texts if t), trainer=trainer)
        return cls(backend)

    @property
    def vocab_size(self) -> int:
        """The actual vocabulary size (<= the requested one), special tokens included."""
        return int(self._backend.get_vocab_size())

    def encode(self, texts: Sequence[str], context_length: int) -> torch.Tensor:
        """``int64 [len(texts), context_length]``: ids, ``eot_id``, then ``pad_id`` (0)."""
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {context_length}")
        out = np.full((len(texts), context_length), self.pad_id, dtype=np.int64)
        for row, text in enumerate(texts):
            # One caption at a time: no thread pool (DataLoader workers fork after this runs).
            ids = self._backend.encode(text or "", add_special_tokens=False).ids
            ids = ids[: context_length - 1] + [self.eot_id]
            out[row, : len(ids)] = ids
        return torch.from_numpy(out)

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids → text, pad and end-of-text dropped (lower-cased, as encoded)."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_json(self) -> str:
        """The whole tokenizer (normaliser, merges, vocabulary, special tokens) as JSON."""
        return self._backend.to_str()

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        from tokenizers import Tokenizer as _Backend

        return cls(_Backend.from_str(text))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        return cls.from_json(Path(path).read_text())

    def __repr__(self) -> str:
        ids = f"pad_id={self.pad_id}, eot_id={self.eot_id}"
        return f"Tokenizer(vocab_size={self.vocab_size}, {ids})"


def fit_tokenizer(config: Config) -> Tokenizer:
    """The tokenizer a run trains with: fitted on ``text.column`` of the TRAINING rows only
    (``data.train`` minus the held-out validation rows, at most ``data.limit``), never on
    validation or test captions. Null and empty captions are left out.

    >>> from service.config import load_config
    >>> c = load_config(overrides={"text.column": "text", "data.train":
    ...     "service/data/bundled/cifar10-train-captions.parquet", "data.limit": 200})
    >>> fit_tokenizer(c).vocab_size <= c.text.vocab_size
    True
    """
    from service.data.captions import training_captions

    return Tokenizer.fit(training_captions(config), config.text.vocab_size)
