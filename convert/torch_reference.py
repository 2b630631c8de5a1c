"""The torch reference models, built from a ModelConfig and loaded with CompVis-layout weights.

U-Net and autoencoder: `labml_nn.diffusion.stable_diffusion.model` (CompVis names); text encoder:
transformers' `CLIPTextModel`. Used by `ldm-jax verify`, `ldm-jax bench --torch` and the parity tests.
This is the only module of the project that imports torch (lazily, on first use); install the `torch`
extra plus `pip install --no-deps labml-nn==0.5.1 labml==0.5.3` to use it.

SD 2.x-style U-Nets (heads of a fixed width, Linear proj_in/out), which labml cannot build, are diffusers'
`UNet2DConditionModel` loaded through diffusers' own CompVis conversion (`convert_ldm_unet_checkpoint`); an
OpenCLIP-layout text tower (SD 2.x) is loaded into `CLIPTextModel` through diffusers' `convert_open_clip_checkpoint`.
Both mappings are diffusers', independent of ours (tests/test_sd2.py checks them against the Flax models). A text
encoder read below its last layer (`skip_last_layers`, SD 2.x's penultimate layer) answers `last_hidden_state` with
that layer's output through the final LayerNorm, as the Flax model does.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from convert.errors import CheckpointError
from convert.keys import PREFIXES
from ldm_jax.configs import ModelConfig

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
    """labml's U-Net, or (SD 2.x style) diffusers' behind the same call: model(x NCHW, t, context) -> output."""
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

    u = config.unet
    levels = range(len(u.channel_multipliers))
    widths = tuple(u.channels * m for m in u.channel_multipliers)
    return UNet2DConditionModel(  # diffusers' attention_head_dim is the number of heads (per level for SD 2.x)
        in_channels=u.in_channels, out_channels=u.out_channels, block_out_channels=widths,
        down_block_types=tuple("CrossAttnDownBlock2D" if i in u.attention_levels else "DownBlock2D" for i in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if i in u.attention_levels else "UpBlock2D"
                             for i in reversed(levels)),
        layers_per_block=u.n_res_blocks, cross_attention_dim=u.d_cond,
        attention_head_dim=tuple(u.heads_for(w)[0] for w in widths), transformer_layers_per_block=u.tf_layers,
        use_linear_projection=u.use_linear_proj, norm_num_groups=u.norm_groups)


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

        def forward(self, x, t, cond):
            return self.unet(x, t, encoder_hidden_states=cond).sample

        def load_compvis(self, state_dict):
            own = _torch_dict(state_dict, PREFIXES["unet"])
            self.unet.load_state_dict(convert_ldm_unet_checkpoint(own, dict(self.unet.config)), strict=True)

    return DiffusersUNet()


def build_text_encoder(config: ModelConfig):
    """transformers' CLIPTextModel; wrapped (`_text_reference`) when read below its last layer or stored in the
    OpenCLIP layout."""
    from transformers import CLIPTextConfig, CLIPTextModel

    t = config.text
    hf = CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                        max_position_embeddings=t.max_length, hidden_act=t.hidden_act, layer_norm_eps=t.layer_norm_eps,
                        bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id,
                        attn_implementation="eager")
    model = CLIPTextModel(hf)
    return model if t.skip_last_layers == 0 and t.key_layout == "transformers" else _text_reference(config, model)


def _text_reference(config: ModelConfig, model):
    """CLIPTextModel answering `last_hidden_state` at layer L - skip_last_layers through the final LayerNorm, loaded
    from OpenCLIP names through diffusers' `convert_open_clip_checkpoint` (key_layout "open_clip")."""
    import types

    import torch

    t = config.text

    class TextReference(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            out = self.model(input_ids=input_ids, output_hidden_states=True)
            if t.skip_last_layers == 0:
                return out
            inner = self.model.text_model if hasattr(self.model, "text_model") else self.model  # transformers v4/v5
            return types.SimpleNamespace(last_hidden_state=inner.final_layer_norm(
                out.hidden_states[-1 - t.skip_last_layers]))

        def inner(self):
            return self.model

        def load_compvis(self, state_dict):
            if t.key_layout != "open_clip":
                return _load_generic("text_encoder", self.model, state_dict)
            try:
                from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
            except ImportError as e:
                raise CheckpointError(f"the torch reference of an OpenCLIP text tower loads it through diffusers: "
                                      f"pip install diffusers ({e})") from None
            prefix = "cond_stage_model.model."
            converted = convert_open_clip_checkpoint(self.model, _torch_dict(state_dict, prefix), prefix=prefix)
            converted.pop("text_projection.weight", None)  # CLIPTextModelWithProjection's; SD does not use it
            level = "" if any(k.startswith("text_model.") for k in self.model.state_dict()) else "text_model."
            missing, unexpected = self.model.load_state_dict(
                {k[len(level):] if k.startswith(level) else k: v for k, v in converted.items()}, strict=False)
            missing = [k for k in missing if not k.endswith("position_ids")]
            if missing or unexpected:
                raise CheckpointError(f"torch reference text_encoder: missing {missing[:3]}, unexpected "
                                      f"{unexpected[:3]}")

    return TextReference()


BUILDERS = {"unet": build_unet, "vae": build_vae, "text_encoder": build_text_encoder}


def _unwrap(module):
    """The transformers CLIPTextModel inside a wrapped text reference (`_text_reference`), else `module`."""
    return module.inner() if hasattr(module, "inner") else module


def _prefix(component: str, module) -> str:
    """Where the module's own state-dict names start inside the CompVis checkpoint. transformers v4's
    CLIPTextModel names its tensors `text_model.*`; v5 drops that level."""
    if component == "text_encoder" and any(k.startswith("text_model.") for k in module.state_dict()):
        return "cond_stage_model.transformer."
    return PREFIXES[component]


def build(config: ModelConfig, state_dict: Mapping[str, np.ndarray] | None = None, components=tuple(BUILDERS)):
    """{component: torch module in eval mode, fp32}, loaded (strictly) from a CompVis state dict if given."""
    import_torch()
    out = {}
    for c in components:
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


def random_state_dict(config: ModelConfig, seed: int = 0, components=tuple(BUILDERS), perturb: float = 0.05):
    """A CompVis-layout state dict from randomly initialised torch modules, every tensor perturbed
    (so that norm scales, biases and zero-initialised layers are all exercised)."""
    torch = import_torch()
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    out = {}
    for c in components:
        own_names = labml_builds(config) if c == "unet" else c == "vae" or config.text.key_layout == "transformers"
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
    return params_to_state_dict(params, text_layout=config.text.key_layout)
