"""``TextTransformer``: the text tower of image–text pretraining (a small pre-LN Transformer).

Token ids ``[n, L]`` (pad id 0 after the end-of-text token, see ``service.text.Tokenizer``) →
pooled features ``[n, width]``, taken at the end-of-text position after a final LayerNorm.

Attention is **causal** (each token attends to itself and the tokens before it), as in CLIP:
the end-of-text token is the last real token, so with causal attention it sees the whole caption
and never the padding that follows it. No padding mask is needed, every caption's features are
independent of how much padding its batch has, and the pooled position is a plain summary of
everything before it (full attention would need a key-padding mask to give the same guarantee).
"""

from __future__ import annotations

import torch
from torch import nn


class TextTransformer(nn.Module):
    """Token embedding + learned positional embedding → ``layers`` pre-LN Transformer blocks
    (causal self-attention, GELU MLP of 4x width) → LayerNorm → the features at the end-of-text
    position (the last non-pad token of each row).

    >>> encoder = TextTransformer(vocab_size=100, context_length=8, width=32, layers=2, heads=4)
    >>> tokens = torch.tensor([[5, 6, 7, 99, 0, 0, 0, 0], [8, 99, 0, 0, 0, 0, 0, 0]])
    >>> encoder(tokens).shape, encoder.out_dim
    (torch.Size([2, 32]), 32)
    """

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        width: int,
        layers: int,
        heads: int,
        *,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} must be divisible by text heads {heads}")
        self.context_length, self.pad_id, self.out_dim = context_length, pad_id, width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        block = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )  # fmt: skip
        self.transformer = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(width)
        mask = torch.full((context_length, context_length), float("-inf")).triu(1)
        self.register_buffer("causal_mask", mask, persistent=False)
        # CLIP's initialisation: small embeddings keep the residual stream well scaled at step 0.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(
                f"tokens must be [n, L] with L <= context_length={self.context_length}, "
                f"got {tuple(tokens.shape)}"
            )
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        x = self.transformer(x, mask=self.causal_mask[:length, :length], is_causal=True)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), eot_positions(tokens, self.pad_id)]


def eot_positions(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Index of the last non-pad token of each row (the end-of-text token; 0 for an all-pad row).

    >>> eot_positions(torch.tensor([[4, 5, 9, 0], [9, 0, 0, 0], [1, 2, 3, 9]])).tolist()
    [2, 0, 3]
    """
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return torch.where(tokens != pad_id, positions, -1).amax(dim=1).clamp(min=0)
