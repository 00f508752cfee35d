"""The demo model's word-level tokenizer: one token per word, no sub-words, no start/end tokens.

It is a plain ``transformers.PreTrainedTokenizerFast`` over a ``tokenizers`` WordLevel model
(lower-casing, whitespace and punctuation split), so diffusers saves and loads it like any other
tokenizer and attncap.prompts aligns words with offsets. The vocabulary is the JSON file
``tokenizer/tokenizer.json`` of the shipped model; ``VOCAB`` below is what it was built from.

    >>> tok = build_tokenizer()
    >>> encode(tok, ["a red circle"])            # input_ids [1, MAX_LENGTH], attention_mask
    >>> decode(tok, ids[0])                      # 'a red circle'

Padding is "<pad>" (id 0) up to MAX_LENGTH keys; unknown words map to "<unk>".
"""
from __future__ import annotations

from typing import Sequence

import torch

from .scenes import COLOURS, SHAPES

PAD, UNK = "<pad>", "<unk>"
MAX_LENGTH = 16
VOCAB: list[str] = [PAD, UNK, "a", "an", "and", *COLOURS, *SHAPES]


def build_tokenizer(vocab: Sequence[str] = VOCAB, max_length: int = MAX_LENGTH):
    """A fresh word-level PreTrainedTokenizerFast over ``vocab`` (ids in list order)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if len(set(vocab)) != len(vocab) or vocab[0] != PAD or UNK not in vocab:
        raise ValueError(f"vocab must hold distinct words starting with {PAD!r} and holding {UNK!r}")
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, unk_token=UNK, model_max_length=max_length,
                                  padding_side="right", truncation_side="right")
    return tok


def encode(tokenizer, prompts: str | Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask, int64 [B, max_length] (padded right, truncated)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = max_length or tokenizer.model_max_length
    enc = tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def decode(tokenizer, ids: Sequence[int] | torch.Tensor) -> str:
    """The words of ``ids`` without padding."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return tokenizer.decode(ids, skip_special_tokens=True)
