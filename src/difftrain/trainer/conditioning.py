"""Captions as token ids, for each of a model's tokenizers (the family turns them into
its denoiser's conditioning)."""

import torch


def tokenize(tokenizer, captions: list[str], length: int | None = None) -> torch.Tensor:
    """Token ids ``(B, length)`` (the tokenizer's own maximum by default), padded and
    truncated."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def token_ids(components, captions: list[str]) -> list[torch.Tensor]:
    """The captions' token ids for each of the model's tokenizers, on the CPU, as many
    per caption as the family reads."""
    family = components.family
    return [
        tokenize(tokenizer, captions, family.token_length(index, tokenizer))
        for index, tokenizer in enumerate(components.tokenizers)
    ]
