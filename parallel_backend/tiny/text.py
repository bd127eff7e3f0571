"""A word-level prompt tokenizer and a small transformer text encoder for the embedded digits model.

The encoder plays the role CLIP's text model plays in Stable Diffusion: it turns a prompt into a sequence of
context vectors `(B, max_length, width)` that the UNet attends to, and the empty prompt "" is the
unconditional branch for classifier-free guidance.
"""

from __future__ import annotations

import re

import torch
from torch import nn

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FILLER_WORDS = ("a", "an", "the", "handwritten", "hand", "written", "drawn", "digit", "number", "numeral",
                "of", "image", "picture", "photo")
DEFAULT_VOCAB = SPECIAL_TOKENS + FILLER_WORDS + NUMBER_WORDS + tuple("0123456789")


class WordTokenizer:
    """Lower-cases, splits into words and single digits, maps unknown words to `<unk>`.

    Every prompt becomes `[<bos>, words..., <eos>, <pad>...]` of exactly `max_length` ids; words past the
    limit are dropped (like CLIP's 77-token truncation).
    """

    def __init__(self, vocab: tuple[str, ...] = DEFAULT_VOCAB, max_length: int = 8):
        if max_length < 3:
            raise ValueError(f"max_length must be >= 3 (bos, one word, eos); got {max_length}")
        self.vocab = tuple(vocab)
        self.max_length = max_length
        self._ids = {word: i for i, word in enumerate(self.vocab)}
        for token in SPECIAL_TOKENS:
            if token not in self._ids:
                raise ValueError(f"vocabulary lacks the special token {token!r}")

    def words(self, prompt: str) -> list[str]:
        # "a handwritten 42" -> ["a", "handwritten", "4", "2"]: digits are tokens of their own.
        return re.findall(r"[a-z]+|[0-9]", prompt.lower())

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """prompts: B strings -> ids: (B, max_length) int64."""
        unk = self._ids["<unk>"]
        rows = []
        for prompt in prompts:
            ids = [self._ids.get(word, unk) for word in self.words(prompt)][: self.max_length - 2]
            ids = [self._ids["<bos>"], *ids, self._ids["<eos>"]]
            rows.append(ids + [self._ids["<pad>"]] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


class TinyTextEncoder(nn.Module):
    """Token + position embeddings, a few pre-norm transformer layers, a final LayerNorm.

    forward(ids: (B, L) int64) -> context: (B, L, width)
    """

    def __init__(self, vocab_size: int, max_length: int = 8, width: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, width))
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(width)
        nn.init.normal_(self.position_embedding, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        return self.final_norm(self.transformer(h))
