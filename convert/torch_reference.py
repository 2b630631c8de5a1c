"""The torch reference models, built from a ModelConfig and loaded with CompVis-layout weights.

U-Net and autoencoder: `labml_nn.diffusion.stable_diffusion.model` (CompVis names); text encoder:
transformers' `CLIPTextModel`. Used by `ldm-jax verify`, `ldm-jax bench --torch` and the parity tests.
This is the only module of the project that imports torch (lazily, on first use); install the `torch`
extra plus `pip install --no-deps labml-nn==0.5.1 labml==0.5.3` to use it.
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


def build_unet(config: ModelConfig):
    from labml_nn.diffusion.stable_diffusion.model.unet import UNetModel

    u = config.unet
    if u.n_heads is None or u.use_linear_proj or u.norm_groups != 32:
        raise CheckpointError("the labml reference U-Net supports only SD 1.x-style configs (fixed heads, conv proj)")
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


def build_text_encoder(config: ModelConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    t = config.text
    hf = CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                        max_position_embeddings=t.max_length, hidden_act=t.hidden_act, layer_norm_eps=t.layer_norm_eps,
                        bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id,
                        attn_implementation="eager")
    return CLIPTextModel(hf)


BUILDERS = {"unet": build_unet, "vae": build_vae, "text_encoder": build_text_encoder}


def _prefix(component: str, module) -> str:
    """Where the module's own state-dict names start inside the CompVis checkpoint. transformers v4's
    CLIPTextModel names its tensors `text_model.*`; v5 drops that level."""
    if component == "text_encoder" and any(k.startswith("text_model.") for k in module.state_dict()):
        return "cond_stage_model.transformer."
    return PREFIXES[component]


def build(config: ModelConfig, state_dict: Mapping[str, np.ndarray] | None = None, components=tuple(BUILDERS)):
    """{component: torch module in eval mode, fp32}, loaded (strictly) from a CompVis state dict if given."""
    torch = import_torch()
    out = {}
    for c in components:
        m = BUILDERS[c](config).eval()
        if state_dict is not None:
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
        out[c] = m
    return out


def random_state_dict(config: ModelConfig, seed: int = 0, components=tuple(BUILDERS), perturb: float = 0.05):
    """A CompVis-layout state dict from randomly initialised torch modules, every tensor perturbed
    (so that norm scales, biases and zero-initialised layers are all exercised)."""
    torch = import_torch()
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    out = {}
    for c in components:
        m = BUILDERS[c](config)
        for k, v in m.state_dict().items():
            if "position_ids" in k:
                continue
            a = v.detach().float().numpy()
            scale = perturb * max(float(np.abs(a).mean()), 0.02)
            out[_prefix(c, m) + k] = (a + scale * gen.standard_normal(a.shape)).astype(np.float32)
    return out
