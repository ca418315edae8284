"""Text (and, for SDXL, size) conditioning of the UNet."""

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


def encode_text(components, ids: list[torch.Tensor]) -> dict:
    """UNet keyword arguments for the token ids ``ids`` (from :func:`token_ids`, on the
    text encoders' device).

    SD: the text encoder's last hidden state ``(B, L, D)``. SDXL: both encoders'
    penultimate hidden states concatenated ``(B, L, D1 + D2)``, plus the second encoder's
    pooled projection ``(B, P)`` as ``text_embeds`` (time ids are added by
    :func:`sdxl_time_ids`).
    """
    if components.architecture == "sd":
        return {"encoder_hidden_states": components.text_encoders[0](ids[0])[0]}
    states, pooled = [], None
    for tokens, encoder in zip(ids, components.text_encoders, strict=True):
        output = encoder(tokens, output_hidden_states=True)
        states.append(output.hidden_states[-2])
        pooled = output[0]  # the last encoder's (projected) pooled embedding
    return {
        "encoder_hidden_states": torch.cat(states, dim=-1),
        "added_cond_kwargs": {"text_embeds": pooled},
    }


def sdxl_time_ids(original_sizes, crops_top_left, target_sizes) -> torch.Tensor:
    """SDXL's micro-conditioning ``(B, 6)``: original (h, w), crop (top, left), target (h, w).

    Each argument is ``(B, 2)``; the crop is measured in the resized image, as in SDXL's
    training.
    """
    return torch.cat([original_sizes, crops_top_left, target_sizes], dim=1).float()
