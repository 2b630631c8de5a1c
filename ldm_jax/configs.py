"""Model configurations as frozen dataclasses, with named presets.

Mirrors the hyper-parameters of CompVis/stable-diffusion `configs/stable-diffusion/v1-inference.yaml`
(and labml's `UNetModel`, `Encoder`/`Decoder`, `CLIPTextModel`), as code rather than YAML.
Every config round-trips through JSON (`to_dict` / `from_dict`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ldm_jax.config_json import from_fields as _from_fields


@dataclass(frozen=True)
class UNetConfig:
    """eps_theta(x_t, t, c): the latent U-Net (CompVis `openaimodel.UNetModel`, labml `UNetModel`)."""

    in_channels: int = 4  # 9 for the inpainting U-Net (x_t, mask, masked-image latents)
    out_channels: int = 4
    channels: int = 320  # model_channels
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 4)
    n_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)
    n_heads: int | None = 8  # either a fixed number of heads (SD 1.x) ...
    d_head: int | None = None  # ... or a fixed head size (SD 2.x: 64)
    tf_layers: int = 1  # transformer depth
    # transformer depth at each level, where it differs between levels (SDXL: (0, 2, 10)); empty: tf_layers at
    # every level. The middle block takes the last level's depth (sgm's transformer_depth_middle default).
    tf_layers_by_level: tuple[int, ...] = ()
    d_cond: int = 768  # context dim
    use_linear_proj: bool = False  # SD 1.x: 1x1-conv proj_in/proj_out; SD 2.x: Linear
    norm_groups: int = 32
    # width of the vector conditioning y added to the time embedding through `label_emb` (sgm's adm_in_channels;
    # SDXL: 2816 = pooled text 1280 + 6 x 256 size/crop embeddings); 0: none (SD 1.x / 2.x)
    adm_in_channels: int = 0

    def __post_init__(self):
        if (self.n_heads is None) == (self.d_head is None):
            raise ValueError("UNetConfig needs exactly one of n_heads or d_head")
        levels = len(self.channel_multipliers)
        if self.tf_layers_by_level and len(self.tf_layers_by_level) != levels:
            raise ValueError(f"UNetConfig.tf_layers_by_level needs one depth per level ({levels}), "
                             f"got {self.tf_layers_by_level}")
        if any(self.tf_layers_at(level) < 1 for level in self.attention_levels):
            raise ValueError(f"UNetConfig: a transformer depth of 0 at an attention level {self.attention_levels}")

    def tf_layers_at(self, level: int) -> int:
        """The transformer depth of the SpatialTransformers at `level` (level -1: the middle block's)."""
        return self.tf_layers_by_level[level] if self.tf_layers_by_level else self.tf_layers

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(n_heads, d_head) of a SpatialTransformer with `channels` channels."""
        if self.n_heads is not None:
            return self.n_heads, channels // self.n_heads
        return channels // self.d_head, self.d_head


@dataclass(frozen=True)
class AutoencoderConfig:
    """The KL-f8 autoencoder (CompVis `AutoencoderKL`, labml `Autoencoder`)."""

    channels: int = 128
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 4)
    n_resnet_blocks: int = 2
    in_channels: int = 3
    out_channels: int = 3
    z_channels: int = 4
    emb_channels: int = 4
    norm_groups: int = 32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)


TEXT_KEY_LAYOUTS = ("transformers", "open_clip")  # TextEncoderConfig.key_layout (`convert.keys.key_table`)


@dataclass(frozen=True)
class TextEncoderConfig:
    """The CLIP text tower (transformers `CLIPTextModel`; ViT-L/14 for SD 1.x)."""

    vocab_size: int = 49408
    max_length: int = 77
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # 0: last layer's hidden state (SD 1.x). k > 0: the output of layer L-k, then the final LayerNorm
    # ("clip skip"; SD 2.x uses the penultimate layer, k=1).
    skip_last_layers: int = 0
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 49407
    # below the last layer (skip_last_layers > 0), whether the output goes through the final LayerNorm (SD 2.x's
    # penultimate layer: yes; SDXL's two encoders: no, sgm's `layer="hidden"` / `"penultimate"`)
    norm_skipped_output: bool = True
    # width of the pooled text embedding: the final-LayerNorm'd last-layer state at the (first) EOS token through
    # `text_projection` (OpenCLIP's, no bias); SDXL's second encoder: 1280; 0: no pooled output (SD 1.x / 2.x)
    projection_dim: int = 0
    # where a CompVis checkpoint keeps it: "transformers" (SD 1.x: cond_stage_model.transformer.text_model.*,
    # transformers CLIPTextModel names) or "open_clip" (SD 2.x: cond_stage_model.model.*, OpenCLIP names with
    # q, k and v packed in one in_proj); the Flax tree is the same either way
    key_layout: str = "transformers"

    def __post_init__(self):
        if self.key_layout not in TEXT_KEY_LAYOUTS:
            raise ValueError(f"text.key_layout must be one of {', '.join(map(repr, TEXT_KEY_LAYOUTS))} (the text "
                             f"tower's names in CompVis checkpoints: SD 1.x / SD 2.x), got {self.key_layout!r}")


SIZE_EMBED_DIM = 256  # SDXL: each of the six size/crop numbers -> a 256-wide sinusoidal embedding
# the numbers embedded into y (`ldm_jax.conditioning`), in sgm's conditioner order: SDXL base and the refiner
BASE_NUMBERS = ("original height", "original width", "crop top", "crop left", "target height", "target width")
REFINER_NUMBERS = ("original height", "original width", "crop top", "crop left", "aesthetic score")

PREDICTIONS = ("eps", "v")  # ScheduleConfig.prediction: what the U-Net is trained to output


@dataclass(frozen=True)
class ScheduleConfig:
    """The forward-process noise schedule beta_1..beta_T (DDPM), as CompVis `make_beta_schedule`."""

    kind: str = "scaled_linear"  # or "linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    n_steps: int = 1000
    # what the U-Net outputs: "eps" (the noise; SD 1.x, SD 2.x 512) or "v" (v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0,
    # Salimans & Ho 2022; SD 2.x 768-v). Samplers always get eps (`pipelines.program.eps_from_output`).
    prediction: str = "eps"

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"schedule.prediction must be one of {', '.join(map(repr, PREDICTIONS))} (diffusers' "
                             f"prediction_type 'epsilon' / 'v_prediction'), got {self.prediction!r}")


@dataclass(frozen=True)
class ModelConfig:
    """A whole latent diffusion model: U-Net, autoencoder, text encoder, latent scale, schedule."""

    name: str = "sd1"
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    latent_scale: float = 0.18215
    image_size: int = 512  # the resolution the model was trained at (the default height and width)
    # SDXL's second text encoder (OpenCLIP bigG): the context is [text(ids), text_2(ids)] along the width, and its
    # pooled output starts the U-Net's vector conditioning y (`ldm_jax.conditioning`); None: one text encoder
    text_2: TextEncoderConfig | None = None

    def __post_init__(self):
        u = self.unet
        if self.text_2 is None:
            y = self.text.projection_dim + len(REFINER_NUMBERS) * SIZE_EMBED_DIM
            if u.adm_in_channels and (not self.text.projection_dim or u.adm_in_channels != y):
                raise ValueError(f"model config: unet.adm_in_channels {u.adm_in_channels} with one text encoder is "
                                 f"the SDXL refiner's y: text.projection_dim {self.text.projection_dim} + "
                                 f"{len(REFINER_NUMBERS)} x {SIZE_EMBED_DIM} (pooled text, size, crop and aesthetic "
                                 f"score embeddings; projection_dim must be > 0); SDXL base needs text_2")
            return
        width = self.text.hidden_size + self.text_2.hidden_size
        if u.d_cond != width:
            raise ValueError(f"model config: unet.d_cond {u.d_cond} != text + text_2 widths {width} (SDXL's "
                             f"context is both encoders' states side by side)")
        y = self.text_2.projection_dim + 6 * SIZE_EMBED_DIM
        if not self.text_2.projection_dim or u.adm_in_channels != y:
            raise ValueError(f"model config: unet.adm_in_channels {u.adm_in_channels} != text_2.projection_dim "
                             f"{self.text_2.projection_dim} + 6 x {SIZE_EMBED_DIM} (pooled text, size and crop "
                             f"embeddings; projection_dim must be > 0)")

    @property
    def is_inpainting(self) -> bool:
        return self.unet.in_channels == 9

    @property
    def is_sdxl(self) -> bool:
        """Two text encoders and a vector conditioning (pooled text, image size and crop): SDXL's conditioner."""
        return self.text_2 is not None

    @property
    def is_sdxl_refiner(self) -> bool:
        """One (projected) text encoder and a vector conditioning (pooled text, size, crop, aesthetic score): the
        SDXL refiner's conditioner (sgm `sd_xl_refiner.yaml`)."""
        return self.text_2 is None and self.unet.adm_in_channels > 0

    @property
    def pooled_text(self) -> TextEncoderConfig | None:
        """The projected text encoder whose pooled output starts y: SDXL base's second, the refiner's only one."""
        return self.text_2 if self.is_sdxl else self.text if self.is_sdxl_refiner else None

    @property
    def y_numbers(self) -> tuple[str, ...]:
        """The numbers embedded into the U-Net's vector conditioning y after the pooled text; () without y."""
        return BASE_NUMBERS if self.is_sdxl else REFINER_NUMBERS if self.is_sdxl_refiner else ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """The inverse of `to_dict`; a ValueError naming the field for anything else (a missing sub-config, an
        unknown field, a value of the wrong type)."""
        if not isinstance(d, dict):
            raise ValueError(f"model config: expected a JSON object, got {type(d).__name__}")
        missing = [k for k in ("unet", "vae", "text") if k not in d]
        if missing:
            raise ValueError(f"model config: missing {', '.join(missing)}")
        sub = {"unet": UNetConfig, "vae": AutoencoderConfig, "text": TextEncoderConfig, "schedule": ScheduleConfig,
               "text_2": TextEncoderConfig}
        nested = {k: (lambda v, where, c=c, k=k: None if v is None and k == "text_2" else _from_fields(c, v, where))
                  for k, c in sub.items()}
        return _from_fields(cls, {"name": "custom", **d}, "model config", nested)

    @classmethod
    def from_json(cls, s: str) -> "ModelConfig":
        return cls.from_dict(json.loads(s))


def sd1() -> ModelConfig:
    """Stable Diffusion v1.4 / v1.5 (860M U-Net, KL-f8 VAE, CLIP ViT-L/14 text tower)."""
    return ModelConfig(name="sd1")


def sd1_inpaint() -> ModelConfig:
    """SD 1.5 inpainting: the U-Net takes 9 channels (x_t, mask, masked-image latents)."""
    return ModelConfig(name="sd1-inpaint", unet=UNetConfig(in_channels=9))


def _sd2_unet(**kw) -> UNetConfig:
    """SD 2.x U-Net: SD 1.x's layout with 64-wide heads, Linear proj_in/out and a 1024-wide context."""
    return UNetConfig(n_heads=None, d_head=64, d_cond=1024, use_linear_proj=True, **kw)


def _open_clip_h() -> TextEncoderConfig:
    """SD 2.x's text tower: OpenCLIP ViT-H/14's (24 layers, exact GELU), read at the penultimate layer, padded
    with 0 (OpenCLIP's tokenizer)."""
    return TextEncoderConfig(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, hidden_act="gelu",
                             skip_last_layers=1, pad_token_id=0, key_layout="open_clip")


def sd2() -> ModelConfig:
    """Stable Diffusion 2.0 / 2.1 base (512x512, eps-prediction; `512-base-ema.ckpt`, `v2-1_512-ema-pruned`)."""
    return ModelConfig(name="sd2", unet=_sd2_unet(), text=_open_clip_h())


def sd2_v() -> ModelConfig:
    """Stable Diffusion 2.0 / 2.1 at 768x768, v-prediction (`768-v-ema.ckpt`, `v2-1_768-ema-pruned`)."""
    return ModelConfig(name="sd2-v", unet=_sd2_unet(), text=_open_clip_h(),
                       schedule=ScheduleConfig(prediction="v"), image_size=768)


def sd2_inpaint() -> ModelConfig:
    """SD 2.0 inpainting (`512-inpainting-ema`): the SD 2.x base U-Net taking 9 channels."""
    return ModelConfig(name="sd2-inpaint", unet=_sd2_unet(in_channels=9), text=_open_clip_h())


def sdxl() -> ModelConfig:
    """Stable Diffusion XL 1.0 base (`sd_xl_base_1.0`, sgm layout, 1024x1024, eps): a 3-level U-Net (no attention at
    the first level, depth 2 and 10 at the others, heads of width 64, a 2048-wide context) taking a 2816-wide vector
    (pooled bigG text, original size, crop, target size); text encoders CLIP ViT-L/14 and OpenCLIP ViT-bigG/14, both
    read at their penultimate layer without the final LayerNorm; the VAE of SD 1.x with latent scale 0.13025."""
    clip_l = TextEncoderConfig(skip_last_layers=1, norm_skipped_output=False)
    big_g = _big_g()
    unet = UNetConfig(channel_multipliers=(1, 2, 4), attention_levels=(1, 2), n_heads=None, d_head=64,
                      tf_layers_by_level=(0, 2, 10), d_cond=2048, use_linear_proj=True,
                      adm_in_channels=1280 + 6 * SIZE_EMBED_DIM)
    return ModelConfig(name="sdxl", unet=unet, text=clip_l, text_2=big_g, latent_scale=0.13025, image_size=1024)


def _big_g(**kw) -> TextEncoderConfig:
    """OpenCLIP ViT-bigG/14's text tower as SDXL reads it: the penultimate layer without the final LayerNorm,
    padded with 0, pooled through its projection."""
    return TextEncoderConfig(hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=20,
                             hidden_act="gelu", skip_last_layers=1, norm_skipped_output=False, pad_token_id=0,
                             projection_dim=1280, key_layout="open_clip", **kw)


def sdxl_refiner() -> ModelConfig:
    """SDXL 1.0 refiner (`sd_xl_refiner_1.0`, sgm `sd_xl_refiner.yaml`): a 4-level U-Net of 384 channels with 4-deep
    transformers at the middle two levels and in the middle block (heads of width 64, a 1280-wide context), one
    text encoder (OpenCLIP bigG, as SDXL's second) and a 2560-wide y: pooled text, original size, crop and an
    aesthetic score (`ldm_jax.conditioning`). Made for the last part of SDXL base's sampling
    (`ldm_jax.base_and_refiner`) or img2img at low strength on its outputs."""
    unet = UNetConfig(channels=384, channel_multipliers=(1, 2, 4, 4), attention_levels=(1, 2), n_heads=None,
                      d_head=64, tf_layers=4, d_cond=1280, use_linear_proj=True,
                      adm_in_channels=1280 + len(REFINER_NUMBERS) * SIZE_EMBED_DIM)
    return ModelConfig(name="sdxl-refiner", unet=unet, text=_big_g(), latent_scale=0.13025, image_size=1024)


def sdxl_inpaint() -> ModelConfig:
    """SDXL 1.0 inpainting (`sd_xl_base_1.0_inpainting_0.1`, diffusers' `stable-diffusion-xl-1.0-inpainting-0.1`):
    the SDXL base U-Net taking 9 channels (x_t, mask, masked-image latents)."""
    base = sdxl()
    return dataclasses.replace(base, name="sdxl-inpaint", unet=dataclasses.replace(base.unet, in_channels=9))


def tiny() -> ModelConfig:
    """A tiny model with every kind of block, for tests (channels must stay multiples of 32 for GroupNorm)."""
    return ModelConfig(
        name="tiny",
        unet=UNetConfig(channels=32, channel_multipliers=(1, 2), n_res_blocks=1, attention_levels=(0, 1),
                        n_heads=2, d_cond=64),
        vae=AutoencoderConfig(channels=32, channel_multipliers=(1, 2), n_resnet_blocks=1),
        text=TextEncoderConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2),
    )


def tiny_xl() -> ModelConfig:
    """SDXL's architecture at test size: two text encoders (the second pooled and projected), vector conditioning,
    no attention at the first level and two transformer layers at the second."""
    t = tiny()
    return ModelConfig(
        name="tiny-xl",
        unet=UNetConfig(channels=32, channel_multipliers=(1, 2), n_res_blocks=1, attention_levels=(1,), n_heads=None,
                        d_head=32, tf_layers_by_level=(0, 2), d_cond=96, use_linear_proj=True,
                        adm_in_channels=32 + 6 * SIZE_EMBED_DIM),
        vae=t.vae,
        text=TextEncoderConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, skip_last_layers=1,
                               norm_skipped_output=False),
        text_2=TextEncoderConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2, hidden_act="gelu",
                                 skip_last_layers=1, norm_skipped_output=False, pad_token_id=0, projection_dim=32,
                                 key_layout="open_clip"),
        latent_scale=0.13025,
        image_size=64,
    )


def tiny_xl_refiner() -> ModelConfig:
    """The SDXL refiner's architecture at test size: one projected OpenCLIP-layout text encoder, y with an aesthetic
    score, attention only at a middle level, and a middle block whose transformer the last level does not have."""
    t = tiny()
    return ModelConfig(
        name="tiny-xl-refiner",
        unet=UNetConfig(channels=32, channel_multipliers=(1, 2, 2), n_res_blocks=1, attention_levels=(1,),
                        n_heads=None, d_head=32, tf_layers=2, d_cond=32, use_linear_proj=True,
                        adm_in_channels=32 + len(REFINER_NUMBERS) * SIZE_EMBED_DIM),
        vae=t.vae,
        text=TextEncoderConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2, hidden_act="gelu",
                               skip_last_layers=1, norm_skipped_output=False, pad_token_id=0, projection_dim=32,
                               key_layout="open_clip"),
        latent_scale=0.13025,
        image_size=64,
    )


def shapes() -> ModelConfig:
    """The small text-to-image model ldm-jax trains itself and ships (64x64 images of coloured shapes, see
    `scripts/train_shapes_model.py`): a KL-f4 autoencoder, a 3-level U-Net and a 2-layer CLIP-architecture text
    encoder with the real CLIP tokenizer (trained jointly in the later phases). latent_scale is set by training; the
    last phase moves the schedule's beta_end to 0.02 (the shipped model's config says so), see the script."""
    return ModelConfig(
        name="shapes",
        unet=UNetConfig(channels=64, channel_multipliers=(1, 1, 2), n_res_blocks=1, attention_levels=(1, 2),
                        n_heads=4, d_cond=64),
        vae=AutoencoderConfig(channels=32, channel_multipliers=(1, 2, 2), n_resnet_blocks=1),
        text=TextEncoderConfig(hidden_size=64, intermediate_size=256, num_layers=2, num_heads=1),
        image_size=64,
    )


PRESETS = {"sd1": sd1, "sd1-inpaint": sd1_inpaint, "sd2": sd2, "sd2-v": sd2_v, "sd2-inpaint": sd2_inpaint,
           "sdxl": sdxl, "sdxl-inpaint": sdxl_inpaint,
           "sdxl-refiner": sdxl_refiner, "tiny": tiny, "tiny-xl": tiny_xl,
           "tiny-xl-refiner": tiny_xl_refiner, "shapes": shapes}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None
