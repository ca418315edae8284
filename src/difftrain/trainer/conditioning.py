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


def encode_text(components, captions: list[str], device) -> dict:
    """UNet keyword arguments for ``captions``.

    SD: the text encoder's last hidden state ``(B, L, D)``. SDXL: both encoders'
    penultimate hidden states concatenated ``(B, L, D1 + D2)``, plus the second encoder's
    pooled projection ``(B, P)`` as ``text_embeds`` (time ids are added by
    :func:`sdxl_time_ids`).
    """
    if components.architecture == "sd":
        ids = tokenize(components.tokenizers[0], captions).to(device)
        return {"encoder_hidden_states": components.text_encoders[0](ids)[0]}
    states, pooled = [], None
    for tokenizer, encoder in zip(components.tokenizers, components.text_encoders, strict=True):
        output = encoder(tokenize(tokenizer, captions).to(device), output_hidden_states=True)
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
