"""The torch reference models, built from a ModelConfig and loaded with CompVis-layout weights.

U-Net and autoencoder: `labml_nn.diffusion.stable_diffusion.model` (CompVis names); text encoder:
transformers' `CLIPTextModel` (SDXL's second: `CLIPTextModelWithProjection`). Used by `ldm-jax verify`,
`ldm-jax bench --torch` and the parity tests. This is the only module of the project that imports torch (lazily,
on first use); install the `torch` extra plus `pip install --no-deps labml-nn==0.5.1 labml==0.5.3` to use it.

SD 2.x-style U-Nets (heads of a fixed width, Linear proj_in/out), which labml cannot build, are diffusers'
`UNet2DConditionModel` loaded through diffusers' own CompVis conversion (`convert_ldm_unet_checkpoint`); an
OpenCLIP-layout text tower (SD 2.x) is loaded into `CLIPTextModel` through diffusers' `convert_open_clip_checkpoint`.
Both mappings are diffusers', independent of ours (tests/test_sd2.py checks them against the Flax models). A text
encoder read below its last layer (`skip_last_layers`, SD 2.x's penultimate layer) answers `last_hidden_state` with
that layer's output through the final LayerNorm (unless `norm_skipped_output` is off: SDXL), as the Flax model does.

SDXL (sgm layout, tests/test_sdxl_convert.py): the U-Net is diffusers' with `addition_embed_type="text_time"` (the
`label_emb` MLP as `add_embedding`, the six size/crop numbers embedded by its own `add_time_proj`) and a transformer
depth per block, called with `added_cond_kwargs` {"text_embeds": pooled, "time_ids": six numbers}; text encoder 1 is
`CLIPTextModel` loaded through diffusers' `convert_ldm_clip_checkpoint` (its prefix list has sgm's
`conditioner.embedders.0.transformer.`), text encoder 2 `CLIPTextModelWithProjection` through
`convert_open_clip_checkpoint(prefix="conditioner.embedders.1.model.")`, which transposes OpenCLIP's
`text_projection` into the Linear; its answer also has `text_embeds` (the projected EOS state). diffusers' own
`create_unet_diffusers_config_from_ldm` makes a "text_time" U-Net only for context widths 2048 or 1280 (the real
SDXL models), so the config here is built from ours (tests compare it with diffusers' for the full-size model).
The SDXL refiner: the same U-Net with five numbers (size, crop, aesthetic score) in `time_ids`, its one text
encoder `CLIPTextModelWithProjection` through `convert_open_clip_checkpoint(prefix="conditioner.embedders.0.model.")`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from convert.errors import CheckpointError
from convert.keys import PREFIXES, SGM, SGM_OPEN_CLIP, SGM_OPEN_CLIP_PREFIX, SGM_PREFIXES, layout_of
from ldm_jax.configs import SIZE_EMBED_DIM, ModelConfig

MISSING = ("the torch reference needs the `torch` extra and labml-nn: pip install 'ldm-jax[torch]' && "
           "pip install --no-deps labml-nn==0.5.1 labml==0.5.3")


def import_torch():
    try:
        import torch
        from labml_nn.diffusion.stable_diffusion.model import autoencoder, unet  # noqa: F401
        from transformers import CLIPTextConfig, CLIPTextModel  # noqa: F401
    except ImportError as e:
        raise CheckpointError(f"{MISSING} ({e})") from None
    return torch


def labml_builds(config: ModelConfig) -> bool:
    """Whether labml's U-Net has this architecture (SD 1.x style: a fixed number of heads, 1x1-conv proj_in/out)."""
    u = config.unet
    return u.n_heads is not None and not u.use_linear_proj and u.norm_groups == 32


def build_unet(config: ModelConfig):
    """labml's U-Net, or (SD 2.x / XL style) diffusers' behind the same call: model(x NCHW, t, context) -> output
    (SDXL: model(x, t, context, text_embeds, time_ids))."""
    if not labml_builds(config):
        return _diffusers_unet(config)
    from labml_nn.diffusion.stable_diffusion.model.unet import UNetModel

    u = config.unet
    return UNetModel(in_channels=u.in_channels, out_channels=u.out_channels, channels=u.channels,
                     n_res_blocks=u.n_res_blocks, attention_levels=list(u.attention_levels),
                     channel_multipliers=list(u.channel_multipliers), n_heads=u.n_heads, tf_layers=u.tf_layers,
                     d_cond=u.d_cond)


def build_vae(config: ModelConfig):
    from labml_nn.diffusion.stable_diffusion.model.autoencoder import Autoencoder, Decoder, Encoder

    v = config.vae
    kw = dict(channels=v.channels, channel_multipliers=list(v.channel_multipliers), n_resnet_blocks=v.n_resnet_blocks,
              z_channels=v.z_channels)
    return Autoencoder(Encoder(in_channels=v.in_channels, **kw), Decoder(out_channels=v.out_channels, **kw),
                       emb_channels=v.emb_channels, z_channels=v.z_channels)


def diffusers_unet(config: ModelConfig):
    """diffusers' UNet2DConditionModel with `config`'s U-Net architecture (diffusers' random init): the reference
    of U-Nets labml cannot build, and `bench --torch`'s diffusers peer (`convert.torch_bench`)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**diffusers_unet_config(config))


def diffusers_unet_config(config: ModelConfig) -> dict:
    """The UNet2DConditionModel arguments of `config`'s U-Net (for SD 2.x / XL what diffusers'
    `create_unet_diffusers_config_from_ldm` derives from Stability's YAML; tests compare them)."""
    u = config.unet
    levels = range(len(u.channel_multipliers))
    widths = tuple(u.channels * m for m in u.channel_multipliers)
    return dict(  # diffusers' attention_head_dim is the number of heads (per level for SD 2.x)
        in_channels=u.in_channels, out_channels=u.out_channels, block_out_channels=widths,
        down_block_types=tuple("CrossAttnDownBlock2D" if i in u.attention_levels else "DownBlock2D" for i in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if i in u.attention_levels else "UpBlock2D"
                             for i in reversed(levels)),
        layers_per_block=u.n_res_blocks, cross_attention_dim=u.d_cond,
        attention_head_dim=tuple(u.heads_for(w)[0] for w in widths), transformer_layers_per_block=_depths(config),
        use_linear_projection=u.use_linear_proj, norm_num_groups=u.norm_groups, **_vector_conditioning(config))


def _depths(config: ModelConfig):
    """diffusers' `transformer_layers_per_block`: one depth, or (SDXL) one per down block (blocks without attention
    ignore theirs: 1); its middle block takes the last, as sgm's `transformer_depth_middle` default."""
    u = config.unet
    if not u.tf_layers_by_level:
        return u.tf_layers
    return tuple(max(u.tf_layers_at(i), 1) for i in range(len(u.channel_multipliers)))


def _vector_conditioning(config: ModelConfig) -> dict:
    """diffusers' SDXL U-Net arguments (`create_unet_diffusers_config_from_ldm` for sgm's `num_classes:
    sequential` with a 2048-wide context): `label_emb` is `add_embedding`, fed [text_embeds, emb(time_ids)]."""
    adm = config.unet.adm_in_channels
    if not adm:
        return {}
    return {"addition_embed_type": "text_time", "addition_time_embed_dim": SIZE_EMBED_DIM,
            "projection_class_embeddings_input_dim": adm}


def _diffusers_unet(config: ModelConfig):
    import torch

    try:
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    except ImportError as e:
        raise CheckpointError(f"the torch reference of this U-Net ({config.name}: heads of width "
                              f"{config.unet.d_head}, Linear proj_in/out) is diffusers': pip install diffusers ({e})"
                              ) from None
    unet = diffusers_unet(config)

    class DiffusersUNet(torch.nn.Module):
        """labml's call signature; weights from a CompVis state dict through diffusers' own conversion."""

        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, cond, text_embeds=None, time_ids=None):
            added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
            return self.unet(x, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample

        def load_compvis(self, state_dict):
            own = _torch_dict(state_dict, PREFIXES["unet"])
            self.unet.load_state_dict(convert_ldm_unet_checkpoint(own, dict(self.unet.config)), strict=True)

    return DiffusersUNet()


def build_text_encoder(config: ModelConfig, which: str = "text_encoder"):
    """transformers' CLIPTextModel (SDXL's "text_encoder_2": CLIPTextModelWithProjection); wrapped
    (`_text_reference`) when read below its last layer or stored in the OpenCLIP or sgm layout."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    t = config.text if which == "text_encoder" else config.text_2
    projection = {"projection_dim": t.projection_dim} if t.projection_dim else {}
    hf = CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                        max_position_embeddings=t.max_length, hidden_act=t.hidden_act, layer_norm_eps=t.layer_norm_eps,
                        bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id,
                        attn_implementation="eager", **projection)
    model = CLIPTextModelWithProjection(hf) if t.projection_dim else CLIPTextModel(hf)
    if t.skip_last_layers == 0 and layout_of(config) == "transformers":
        return model
    return _text_reference(config, model, which)


def build_text_encoder_2(config: ModelConfig):
    """SDXL's OpenCLIP bigG tower as transformers' CLIPTextModelWithProjection (`build_text_encoder`)."""
    if config.text_2 is None:
        raise ValueError(f"{config.name} has one text encoder (text_encoder_2 is SDXL's)")
    return build_text_encoder(config, "text_encoder_2")


def _text_reference(config: ModelConfig, model, which: str = "text_encoder"):
    """The CLIP model answering `last_hidden_state` at layer L - skip_last_layers (through the final LayerNorm if
    `norm_skipped_output`) and, with a projection, `text_embeds`; loaded from OpenCLIP names through diffusers'
    `convert_open_clip_checkpoint` (SD 2.x, SDXL's second encoder), from sgm's CLIP ViT-L through
    `convert_ldm_clip_checkpoint` (SDXL's first) or, SD 1.x names, directly."""
    import types

    import torch

    t = config.text if which == "text_encoder" else config.text_2

    class TextReference(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            out = self.model(input_ids=input_ids, output_hidden_states=True)
            if t.skip_last_layers == 0:
                return out
            hidden = out.hidden_states[-1 - t.skip_last_layers]
            if t.norm_skipped_output:
                inner = self.model.text_model if hasattr(self.model, "text_model") else self.model  # transformers v4/v5
                hidden = inner.final_layer_norm(hidden)
            return types.SimpleNamespace(last_hidden_state=hidden, text_embeds=getattr(out, "text_embeds", None))

        def inner(self):
            return self.model

        def load_compvis(self, state_dict):
            layout = layout_of(config)
            if which == "text_encoder" and layout == "transformers":
                return _load_generic("text_encoder", self.model, state_dict)
            _load_converted(which, self.model, _diffusers_text(which, layout, self.model, state_dict))

    return TextReference()


def _diffusers_text(which: str, layout: str, model, state_dict) -> dict:
    """The text tower's tensors of a CompVis / sgm state dict in transformers' names, by diffusers' conversions."""
    try:
        from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    except ImportError as e:
        raise CheckpointError(f"the torch reference of an OpenCLIP or sgm-layout text tower loads it through "
                              f"diffusers: pip install diffusers ({e})") from None
    if layout == SGM and which == "text_encoder":  # strips sgm's conditioner.embedders.0.transformer.
        root = SGM_PREFIXES[which][:-len("text_model.")]
        return convert_ldm_clip_checkpoint(_torch_dict(state_dict, root))
    prefix = {SGM: SGM_PREFIXES[which], SGM_OPEN_CLIP: SGM_OPEN_CLIP_PREFIX}.get(layout, "cond_stage_model.model.")
    converted = convert_open_clip_checkpoint(model, _torch_dict(state_dict, prefix), prefix=prefix)
    if layout not in (SGM, SGM_OPEN_CLIP):
        converted.pop("text_projection.weight", None)  # CLIPTextModelWithProjection's; SD 2.x does not use it
    return converted


def _load_converted(which: str, model, converted: dict) -> None:
    """Load diffusers-converted text-tower tensors (transformers v4 names) into `model` strictly (v5's CLIPTextModel
    has no `text_model.` level; position ids are a buffer)."""
    level = "" if any(k.startswith("text_model.") for k in model.state_dict()) else "text_model."
    own = {k[len(level):] if k.startswith(level) else k: v for k, v in converted.items()
           if not k.endswith("position_ids")}
    missing, unexpected = model.load_state_dict(own, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise CheckpointError(f"torch reference {which}: missing {missing[:3]}, unexpected {unexpected[:3]}")


BUILDERS = {"unet": build_unet, "vae": build_vae, "text_encoder": build_text_encoder,
            "text_encoder_2": build_text_encoder_2}


def _unwrap(module):
    """The transformers CLIPTextModel inside a wrapped text reference (`_text_reference`), else `module`."""
    return module.inner() if hasattr(module, "inner") else module


def _prefix(component: str, module) -> str:
    """Where the module's own state-dict names start inside the CompVis checkpoint. transformers v4's
    CLIPTextModel names its tensors `text_model.*`; v5 drops that level."""
    if component == "text_encoder" and any(k.startswith("text_model.") for k in module.state_dict()):
        return "cond_stage_model.transformer."
    return PREFIXES[component]


def build(config: ModelConfig, state_dict: Mapping[str, np.ndarray] | None = None, components=None):
    """{component: torch module in eval mode, fp32}, loaded (strictly) from a CompVis state dict if given;
    components: default all of the model's (`ldm_jax.models.build.components_of`)."""
    import_torch()
    out = {}
    for c in components or _components(config):
        m = BUILDERS[c](config).eval()
        if state_dict is not None:
            if hasattr(m, "load_compvis"):  # diffusers' U-Net, a wrapped text encoder
                m.load_compvis(state_dict)
            else:
                _load_generic(c, m, state_dict)
        out[c] = m
    return out


def _torch_dict(state_dict, prefix: str) -> dict:
    """The fp32 torch tensors of the CompVis state dict's keys under `prefix` (names kept)."""
    import torch

    return {k: torch.from_numpy(np.array(v, dtype=np.float32))
            for k, v in state_dict.items() if k.startswith(prefix)}


def _load_generic(c: str, m, state_dict) -> None:
    """Load `m` (CompVis / transformers names) strictly from the CompVis state dict's tensors under its prefix."""
    import torch

    prefix = _prefix(c, m)
    own = {k[len(prefix):]: torch.from_numpy(np.array(v, dtype=np.float32))
           for k, v in state_dict.items() if k.startswith(prefix)}
    expected = m.state_dict()
    for k in expected:
        if k in own and tuple(own[k].shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{prefix}{k}: shape {tuple(own[k].shape)} != {tuple(expected[k].shape)}")
    missing, unexpected = m.load_state_dict(own, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise CheckpointError(f"torch reference {c}: missing {missing[:3]}, unexpected {unexpected[:3]}")


def _components(config: ModelConfig) -> tuple[str, ...]:
    from ldm_jax.models.build import components_of

    return components_of(config)


def random_state_dict(config: ModelConfig, seed: int = 0, components=None, perturb: float = 0.05):
    """A CompVis-layout state dict from randomly initialised torch modules, every tensor perturbed
    (so that norm scales, biases and zero-initialised layers are all exercised); components: default all of the
    model's."""
    torch = import_torch()
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    out = {}
    for c in components or _components(config):
        own_names = labml_builds(config) if c == "unet" else c == "vae" or (
            c == "text_encoder" and layout_of(config) == "transformers")
        if not own_names:
            out.update(_numpy_random(config, seed, c, perturb))  # no torch module with CompVis / OpenCLIP names
            continue
        m = _unwrap(BUILDERS[c](config))
        for k, v in m.state_dict().items():
            if "position_ids" in k:
                continue
            a = v.detach().float().numpy()
            scale = perturb * max(float(np.abs(a).mean()), 0.02)
            out[_prefix(c, m) + k] = (a + scale * gen.standard_normal(a.shape)).astype(np.float32)
    return out


def _numpy_random(config: ModelConfig, seed: int, component: str, perturb: float):
    """`random_state_dict` of one component from ldm-jax's own random parameters (written by our key table)."""
    from convert.mapping import params_to_state_dict
    from ldm_jax.models.build import random_params

    params = random_params(config, seed, components=(component,), perturb=perturb)
    return params_to_state_dict(params, text_layout=layout_of(config))
