"""What the flow-matching transformer families (SD3, Flux) share: latents with the VAE's
shift, the flow-matching objective over the scheduler's sigmas (shifted by resolution
when the scheduler asks), CLIP encoders that train and a T5 encoder that does not, LoRA
on both streams' attention, peft-keyed LoRA files, and the settings of noise prediction
they refuse. A base class, not a family: it registers nothing."""

import logging
from typing import ClassVar

import torch

from difftrain.api.methods import DEFAULT_LORA_TARGETS
from difftrain.errors import InvalidSpec
from difftrain.trainer import loss
from difftrain.trainer.families import Family, kohya_encoder
from difftrain.trainer.families.unet import CLIP_LORA_TARGETS
from difftrain.trainer.presets import VAE

log = logging.getLogger(__name__)

# The projections of the text stream's attention, beside the image stream's (which the
# API's default targets name).
CONTEXT_LORA_TARGETS = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]

# The presets' VAE of the SD3/Flux kind: 16 latent channels, no quant convs; each family
# gives its shift and scale.
TINY_VAE = {**VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
# A tiny T5 v1.1 encoder (gated GELU), as SD3 and Flux use.
TINY_T5 = {
    "d_model": 80,
    "d_kv": 16,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 2,
    "relative_attention_num_buckets": 8,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
}


def tiny_t5():
    """The tiny T5 encoder and its offline tokenizer."""
    from transformers import T5Config, T5EncoderModel

    from difftrain.trainer.tokenizer import build_t5_tokenizer

    tokenizer = build_t5_tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        **TINY_T5,
    )
    return T5EncoderModel(config), tokenizer


def resolution_shift(config) -> "loss.Shift | None":
    """The resolution-dependent shift of sigmas that a scheduler config asks for
    (``use_dynamic_shifting``, as Flux's does); None for a fixed shift."""
    if not config.get("use_dynamic_shifting"):
        return None
    return loss.Shift(
        base_length=config.get("base_image_seq_len", 256),
        max_length=config.get("max_image_seq_len", 4096),
        base_shift=config.get("base_shift", 0.5),
        max_shift=config.get("max_shift", 1.15),
    )


def require_equal(*pairs) -> None:
    """Refuse inline configs whose parts do not fit: each of ``pairs`` is (the
    transformer's field, its value, what it must equal, that value[, the value as told])."""
    for field, value, what, wanted, *shown in pairs:
        if value != wanted:
            told = shown[0] if shown else value
            raise InvalidSpec(
                f"spec.model.components.transformer: {field} ({told}) must equal {what} ({wanted})"
            )


def kohya_targets(layers: dict) -> set[str]:
    """The layer names lora.targetModules may give for a kohya export from a family's
    table of kohya's names (see :func:`kohya_transformer`)."""
    return {
        name.removeprefix("attn.")
        for _, table in layers.values()
        for names in table.values()
        for name in names
    }


def kohya_transformer(state: dict, transformer, layers: dict, alpha: float, dtype) -> dict:
    """The transformer's LoRA (peft's keys) in kohya's layout, by the family's table
    ``layers``: for each kind of block kohya names, the diffusers kind and, by kohya's
    suffix, the diffusers layers it stands for (several for a fused projection, in their
    order in it). A fused projection gets one LoRA of the parts' ranks together: their
    down matrices stacked, their up matrices block-diagonal (a part without a LoRA a
    zero block), its alpha the parts' alpha times their count, so that each part keeps
    its scale (alpha / rank)."""
    kohya = {}
    for kohya_kind, (kind, table) in layers.items():
        for index, block in enumerate(getattr(transformer, kind, [])):
            for suffix, names in table.items():
                parts = [_lora_pair(state, f"{kind}.{index}.{name}") for name in names]
                if all(pair is None for pair in parts):
                    continue
                rank = next(pair for pair in parts if pair is not None)[0].shape[0]
                downs, ups = [], []
                for name, pair in zip(names, parts, strict=True):
                    layer = block.get_submodule(name)
                    layer = getattr(layer, "base_layer", layer)  # peft's wrapper, or none
                    down, up = pair or (
                        torch.zeros(rank, layer.in_features, dtype=dtype),
                        torch.zeros(layer.out_features, rank, dtype=dtype),
                    )
                    downs.append(down)
                    ups.append(up)
                key = f"lora_unet_{kohya_kind}_{index}_{suffix}"
                kohya[f"{key}.lora_down.weight"] = torch.cat(downs)
                kohya[f"{key}.lora_up.weight"] = torch.block_diag(*ups)
                kohya[f"{key}.alpha"] = torch.tensor(alpha * len(names), dtype=dtype)
    return kohya


def _lora_pair(state: dict, layer: str):
    down = state.get(f"{layer}.lora_A.weight")
    return None if down is None else (down, state[f"{layer}.lora_B.weight"])


class FlowFamily(Family):
    denoiser = "transformer"
    denoiser_title = "transformer"
    title: str  # the family as messages call it
    transformer_class: str  # the denoiser's class, as its config names it
    pipeline_name: str  # the pipeline's class, as model_index.json names it
    t5: int  # the T5 encoder's place among the text encoders
    kohya_layers: ClassVar[dict]  # kohya's names of its layers (see kohya_transformer)
    # Target names of spec.lora.targetModules that reach layers the layout does not name.
    kohya_unnamed: ClassVar[frozenset] = frozenset()
    # LyCORIS files of a transformer use its diffusers names under ``lycoris_``, which
    # ComfyUI maps onto its own (fused) layers for SD3 and Flux.
    lycoris_prefix = "lycoris"
    t5_tokens: int  # T5 tokens per caption at most, in training and samples alike
    refused_methods: ClassVar[dict[str, str]] = {
        "textualInversion": "its T5 encoder reads every prompt beside the CLIP encoders, so "
        "a new CLIP token alone teaches little; use lora or dreambooth",
    }

    def fit_pairs(self, components) -> list:
        """The family's own (field, value, what, wanted) pairs for :func:`require_equal`."""
        return []

    def check_fit(self, components) -> None:
        transformer = components.denoiser.config
        t5 = components.text_encoders[self.t5].config
        joint = (
            "joint_attention_dim",
            transformer.joint_attention_dim,
            "the T5 encoder's d_model",
            t5.d_model,
        )
        require_equal(*self.fit_pairs(components), joint)

    def matches(self, index: dict, configs: dict[str, dict]) -> bool:
        transformer = configs.get("transformer") or {}
        return (
            transformer.get("_class_name") == self.transformer_class
            or index.get("_class_name") == self.pipeline_name
        )

    def check(self, spec, components) -> None:
        training = spec.training
        for field, value in (
            ("snrGamma", training.snr_gamma),
            ("noiseOffset", training.noise_offset),
        ):
            if value:
                raise InvalidSpec(
                    f"spec.training.{field}: applies to noise-prediction models; {self.name} "
                    "models learn by flow matching (see spec.training.flowMatching); remove it"
                )
        if spec.model.prediction_type != "auto":
            raise InvalidSpec(
                f"spec.model.predictionType: {self.name} models predict the flow's velocity; "
                "leave predictionType at auto"
            )
        from difftrain.trainer import adapters

        kohya = "kohya" in (spec.output.formats or [])
        if kohya and adapters.settings_of(spec).type == "lora":  # LyCORIS names any layer
            self._check_kohya(spec)

    def _check_kohya(self, spec) -> None:
        from difftrain.trainer import adapters

        named = kohya_targets(self.kohya_layers) - self.kohya_unnamed
        targets = self.lora_targets(adapters.settings_of(spec).target_modules)
        unnamed = sorted(set(targets) - named)
        if unnamed:
            raise InvalidSpec(
                f"spec.lora.targetModules: the kohya layout has no name for "
                f"{', '.join(unnamed)} in {self.title}; target only "
                f"{', '.join(sorted(named))}, or leave kohya out of spec.output.formats"
            )

    def pixel_multiple(self, components) -> int:
        return super().pixel_multiple(components) * self.patch(components)

    def blocks(self, denoiser) -> list:
        singles = getattr(denoiser, "single_transformer_blocks", [])  # Flux's
        return [*denoiser.transformer_blocks, *singles]

    def patch(self, components) -> int:
        """The side of the latent patches the model reads as one token."""
        return components.denoiser.config.patch_size

    # Training.

    def prediction_type(self, scheduler) -> str:
        return "flow"  # the velocity from the image to the noise

    def scale_latents(self, components, sampled):
        config = components.vae.config
        return (sampled.float() - (config.shift_factor or 0.0)) * config.scaling_factor

    def set_schedule(self, training, components) -> None:
        shift = training.flow_matching.shift
        if shift is None:
            return
        scheduler = components.noise_scheduler
        # A fixed shift, in place of one that grows with the image's size (Flux's).
        components.noise_scheduler = type(scheduler).from_config(
            scheduler.config, shift=shift, use_dynamic_shifting=False
        )
        log.info("the sigma schedule shifted by %g (spec.training.flowMatching.shift)", shift)

    def objective(self, components, training, device):
        scheduler = components.noise_scheduler
        fresh = type(scheduler).from_config(scheduler.config)  # the training schedule, unset
        return loss.FlowMatching(
            sigmas=fresh.sigmas.to(device),
            timesteps=fresh.timesteps.to(device),
            settings=training.flow_matching,
            train_steps=scheduler.config.num_train_timesteps,
            shift=resolution_shift(scheduler.config),
            patch=self.patch(components),
        )

    def token_length(self, index: int, tokenizer) -> int:
        if index == self.t5:
            return min(tokenizer.model_max_length, self.t5_tokens)
        return tokenizer.model_max_length

    def trained_encoders(self) -> list[str]:
        return self.encoder_names()[: self.t5]  # the CLIP encoders; T5 stays as it is

    # Sampling and export.

    def sampler(self, config: dict):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def sampling_options(self, components) -> dict:
        tokenizer = components.tokenizers[self.t5]
        return {"max_sequence_length": self.token_length(self.t5, tokenizer)}

    def export_formats(self, lora: bool) -> list[str]:
        return ["diffusers"]

    def pipeline(self, parts: dict):
        return self.pipeline_class()(**parts)

    def pipeline_class(self):
        raise NotImplementedError

    def lora_targets(self, requested: list[str]) -> list[str]:
        if list(requested) == DEFAULT_LORA_TARGETS:  # both streams' attention
            return [*requested, *CONTEXT_LORA_TARGETS]
        return list(requested)

    def text_encoder_lora_targets(self) -> list[str]:
        return list(CLIP_LORA_TARGETS)

    def kohya_state(self, states: dict, trainable, dtype) -> dict:
        from difftrain.trainer import adapters

        transformer = trainable.modules[self.denoiser]
        alpha = adapters.peft_config(transformer).lora_alpha
        state = states[self.denoiser]
        kohya = kohya_transformer(state, transformer, self.kohya_layers, alpha, dtype)
        encoders = {name: state for name, state in states.items() if name != self.denoiser}
        if encoders:  # the CLIP encoders' LoRA, as for the UNet families
            kohya.update(adapters.kohya_state(encoders, trainable, self, dtype))
        return kohya

    def kohya_component(self, prefix: str) -> str:
        # lora_te1_, lora_te2_: the CLIP encoders, the only ones that train
        return kohya_encoder(prefix)

    def save_lora(self, folder, states: dict, metadata: dict) -> None:
        layers = {f"{part}_lora_layers": state for part, state in states.items()}  # peft's keys
        self.pipeline_class().save_lora_weights(
            folder, safe_serialization=True, **layers, **metadata
        )
