"""The whole model in one ``.safetensors`` file, in the layout of the original Stable
Diffusion checkpoints: the layout ComfyUI, A1111/Forge and diffusers' ``from_single_file``
load.

diffusers names a UNet's parts by block and layer (``down_blocks.1.resnets.0``); the
original code numbers them in one sequence (``input_blocks.4.0``), with the VAE, the text
encoders and the UNet side by side under one prefix each:

- UNet: ``model.diffusion_model.``;
- VAE: ``first_stage_model.`` (attention projections as 1x1 convolutions);
- SD 1.x: ``cond_stage_model.transformer.`` (the Hugging Face CLIP keys);
- SD 2.x: ``cond_stage_model.model.`` (OpenCLIP keys: fused q/k/v, ``resblocks``);
- SDXL: ``conditioner.embedders.0.transformer.`` (CLIP-L) and
  ``conditioner.embedders.1.model.`` (OpenCLIP bigG, with its ``text_projection``).

Only what the model's weights are is written: no EMA copy, no noise schedule buffers (the
loaders rebuild the schedule from their config).
"""

import re

import torch

from difftrain.errors import InvalidSpec

UNET = "model.diffusion_model."
VAE = "first_stage_model."

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


CLIP, OPEN_CLIP = "clip", "openclip"  # the two layouts of text encoders


def check(family, unet) -> None:
    """Refuse, before training, a model the original layout cannot hold (its family
    places no text encoders there)."""
    if not family.single_file:
        raise InvalidSpec(
            "spec.output.formats: singleFile is written for SD 1.x/2.x and SDXL models (the "
            f"layout ComfyUI and A1111 load); this is a {family.name} model: use diffusers"
        )
    if not isinstance(unet.config.layers_per_block, int):
        raise InvalidSpec(
            "spec.output.formats: singleFile needs one layers_per_block for every UNet "
            "block (the original layout numbers blocks by it); this UNet has "
            f"{unet.config.layers_per_block}: use diffusers"
        )


def _renamed(rest: str, names: dict) -> str:
    """``rest`` with its leading part (one of ``names``) renamed."""
    for old, new in names.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def unet_state(unet) -> dict:
    """The UNet's weights under their original names (``model.diffusion_model.``)."""
    config = unet.config
    per = config.layers_per_block
    step = per + 1
    attended = {index for index, kind in enumerate(config.up_block_types) if "CrossAttn" in kind}
    rules = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda i, j, r: f"input_blocks.{i * step + j + 1}.0.{_renamed(r, _RESNET)}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda i, j, r: f"input_blocks.{i * step + j + 1}.1.{r}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
         lambda i, r: f"input_blocks.{(i + 1) * step}.0.op.{r}"),
        (r"mid_block\.resnets\.(\d+)\.(.+)",
         lambda j, r: f"middle_block.{2 * j}.{_renamed(r, _RESNET)}"),
        (r"mid_block\.attentions\.0\.(.+)", lambda r: f"middle_block.1.{r}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda i, j, r: f"output_blocks.{i * step + j}.0.{_renamed(r, _RESNET)}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
         lambda i, j, r: f"output_blocks.{i * step + j}.1.{r}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda i, r: f"output_blocks.{i * step + per}.{2 if i in attended else 1}.conv.{r}"),
    ]  # fmt: skip
    return {UNET + _apply(key, rules, _UNET_FIXED, "UNet"): value
            for key, value in unet.state_dict().items()}  # fmt: skip


def _apply(key: str, rules: list, fixed: dict, what: str) -> str:
    for pattern, name in rules:
        found = re.fullmatch(pattern, key)
        if found:
            groups = [int(g) if g.isdigit() else g for g in found.groups()]
            return name(*groups)
    for old, new in fixed.items():
        if key.startswith(old + "."):
            return new + key[len(old) :]
    if key.startswith(("conv_in.", "conv_out.", "quant_conv.", "post_quant_conv.")):
        return key
    raise InvalidSpec(
        f"spec.output.formats: singleFile cannot place the {what} weight {key} in the "
        "original Stable Diffusion layout; export diffusers instead"
    )


def vae_state(vae) -> dict:
    """The VAE's weights under their original names (``first_stage_model.``)."""
    ups = len(vae.config.up_block_types)
    rules = [
        (r"(encoder|decoder)\.conv_norm_out\.(.+)", lambda side, r: f"{side}.norm_out.{r}"),
        (r"(encoder|decoder)\.(conv_in|conv_out)\.(.+)", lambda side, c, r: f"{side}.{c}.{r}"),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda i, j, r: f"encoder.down.{i}.block.{j}.{_vae_resnet(r)}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
         lambda i, r: f"encoder.down.{i}.downsample.conv.{r}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda i, j, r: f"decoder.up.{ups - 1 - i}.block.{j}.{_vae_resnet(r)}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda i, r: f"decoder.up.{ups - 1 - i}.upsample.conv.{r}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)",
         lambda side, j, r: f"{side}.mid.block_{j + 1}.{_vae_resnet(r)}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)",
         lambda side, r: f"{side}.mid.attn_1.{_renamed(r, _VAE_ATTENTION)}"),
    ]  # fmt: skip
    state = {}
    for key, value in vae.state_dict().items():
        name = _apply(key, rules, {}, "VAE")
        if ".mid.attn_1." in name and name.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]  # a linear layer as the 1x1 convolution it was
        state[VAE + name] = value
    return state


def _vae_resnet(rest: str) -> str:
    return _renamed(rest, {"conv_shortcut": "nin_shortcut"})


def _text_keys(encoder) -> dict:
    """The encoder's weights under the Hugging Face names with ``text_model.`` (newer
    transformers leave it out of CLIPTextModel's own keys)."""
    state = {}
    for key, value in encoder.state_dict().items():
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        state[key] = value
    return state


def clip_state(encoder, prefix: str) -> dict:
    """A CLIP text encoder in the Hugging Face layout under ``prefix``."""
    state = _text_keys(encoder)
    state.pop("text_model.embeddings.position_ids", None)
    return {prefix + key: value for key, value in state.items()}


_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def open_clip_state(encoder, prefix: str) -> dict:
    """A CLIP text encoder in OpenCLIP's layout under ``prefix``: q, k and v fused into
    ``in_proj``, ``text_projection`` as the matrix prompts are multiplied by."""
    state = _text_keys(encoder)
    out = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        layer = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key)
        if layer:
            index, rest = layer.groups()
            projection = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if projection:
                which, kind = projection.groups()
                fused.setdefault(f"transformer.resblocks.{index}.attn.in_proj_{kind}", {})[
                    which
                ] = value
                continue
            out[f"transformer.resblocks.{index}.{_renamed(rest, _OPEN_CLIP_LAYER)}"] = value
        elif key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
    for name, parts in fused.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return {prefix + key: value for key, value in out.items()}


def open_clip(encoder) -> bool:
    """Whether the encoder came from OpenCLIP (SD 2.x's and SDXL's second; they use gelu,
    OpenAI's CLIP quick_gelu)."""
    return getattr(encoder.config, "hidden_act", "") == "gelu"


def state(pipeline, family) -> dict:
    """The whole pipeline (UNet, VAE, text encoders) in the original layout; the family
    says where its text encoders go (``single_file_encoders``)."""
    out = {**unet_state(pipeline.unet), **vae_state(pipeline.vae)}
    for encoder, prefix, layout in family.single_file_encoders(pipeline):
        write = open_clip_state if layout == OPEN_CLIP else clip_state
        out.update(write(encoder, prefix))
    return out


def save(pipeline, family, path, dtype) -> None:
    """Write the pipeline's single file at ``path`` in ``dtype``."""
    from safetensors.torch import save_file

    weights = state(pipeline, family)
    cast = {key: value.detach().to("cpu", dtype).contiguous() for key, value in weights.items()}
    save_file(cast, path, metadata={"format": "pt"})
