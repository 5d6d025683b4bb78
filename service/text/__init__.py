"""Text for image–text (CLIP-style) training: the offline byte-level BPE tokenizer.

>>> tok = Tokenizer.fit(["a photo of a cat."], vocab_size=260)
>>> tok.encode(["a cat"], context_length=6).tolist()[0][-1] == tok.pad_id
True
"""

from service.text.tokenizer import EOT_TOKEN, PAD_TOKEN, Tokenizer, fit_tokenizer

__all__ = ["EOT_TOKEN", "PAD_TOKEN", "Tokenizer", "fit_tokenizer"]
