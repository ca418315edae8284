"""Captions as token ids, for each of a model's tokenizers (the family turns them into
its denoiser's conditioning)."""

import torch


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids ``(B, max_length)``, padded and truncated to the tokenizer's length."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def token_ids(components, captions: list[str]) -> list[torch.Tensor]:
    """The captions' token ids for each of the model's tokenizers, on the CPU."""
    return [tokenize(tokenizer, captions) for tokenizer in components.tokenizers]
