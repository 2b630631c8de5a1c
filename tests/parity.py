"""Helpers for the parity tests: perturbed torch weights -> Flax params through the real mapping code."""

from __future__ import annotations

import jax
import numpy as np
import torch

from convert.mapping import state_dict_to_params
from convert.verify import rel_err  # noqa: F401 - the parity measure, shared with `ldm-jax verify`


def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every tensor so norm scales, biases and zero-inits all take part."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.state_dict().items()):
            if p.is_floating_point():
                p.add_(scale * max(float(p.abs().mean()), 0.02) * torch.randn(p.shape, generator=g))
    return module.eval()


def flax_params_for(torch_module: torch.nn.Module, flax_module, *example_inputs):
    """The Flax params of `flax_module` from `torch_module`'s own state dict (no prefix), strictly:
    every torch tensor must map to exactly one Flax parameter of the right shape."""
    abstract = jax.eval_shape(flax_module.init, jax.random.key(0), *example_inputs)["params"]
    sd = {k: v.detach().numpy() for k, v in torch_module.state_dict().items() if "position_ids" not in k}
    params, report = state_dict_to_params(sd, {"block": abstract}, prefixes={"block": ""})
    assert not report.unexpected and len(report.mapped) == len(sd)
    return params["block"]


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def torch_q_sample(z0: np.ndarray, noise: np.ndarray, t: np.ndarray):
    """(x_t, eps, t) as NCHW / int64 torch tensors: z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps with
    labml's alpha_bar (SD's scaled-linear betas in float64, cumprod in float64, then float32)."""
    beta = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1.0 - beta, dim=0).to(torch.float32)
    t = torch.from_numpy(np.asarray(t, np.int64))
    x0, eps = (torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy()) for a in (z0, noise))
    ab = alpha_bar[t].view(-1, 1, 1, 1)
    return ab**0.5 * x0 + (1 - ab) ** 0.5 * eps, eps, t


def original_config(config) -> dict:
    """`config`'s architecture as a CompVis / Stability inference YAML spells it (v1-inference.yaml: num_heads,
    1x1-conv proj; v2-inference.yaml: num_head_channels, use_linear_in_transformer), the form diffusers' single-file
    conversion (`create_unet_diffusers_config_from_ldm`) reads: the tests' independent route to diffusers' U-Net."""
    u = config.unet
    heads = {"num_heads": u.n_heads} if u.n_heads is not None else {"num_head_channels": u.d_head}
    return {"model": {"params": {
        "unet_config": {"params": {
            "in_channels": u.in_channels, "out_channels": u.out_channels, "model_channels": u.channels,
            "channel_mult": list(u.channel_multipliers), "num_res_blocks": u.n_res_blocks,
            "attention_resolutions": [2**level for level in u.attention_levels], **heads,
            "transformer_depth": u.tf_layers, "context_dim": u.d_cond, "use_linear_in_transformer": u.use_linear_proj}},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": list(config.vae.channel_multipliers)}}}}}}


def sgm_original_config(config) -> dict:
    """An SDXL `config` as Stability-AI/generative-models' `configs/inference/sd_xl_base.yaml` spells it (sgm's
    `network_config`: num_head_channels, a transformer depth per level, `num_classes: sequential` with
    adm_in_channels), the form diffusers' `create_unet_diffusers_config_from_ldm` reads."""
    u = config.unet
    return {"model": {"params": {
        "network_config": {"params": {
            "adm_in_channels": u.adm_in_channels, "num_classes": "sequential", "in_channels": u.in_channels,
            "out_channels": u.out_channels, "model_channels": u.channels, "num_res_blocks": u.n_res_blocks,
            "attention_resolutions": [2**level for level in u.attention_levels],
            "channel_mult": list(u.channel_multipliers), "num_head_channels": u.d_head,
            "use_linear_in_transformer": u.use_linear_proj,
            "transformer_depth": [max(u.tf_layers_at(i), 1) for i in range(len(u.channel_multipliers))],
            "context_dim": u.d_cond}},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": list(config.vae.channel_multipliers)}}}}}}


def saved_with_config(directory, name: str, state_dict: dict, config):
    """(state dict, path of `name` written in `directory` with the config in its header, the loaded model): the
    module-scoped file the SD 2.x / SDXL checkpoint tests share."""
    import ldm_jax
    from convert.safetensors_io import write_safetensors
    from ldm_jax.loading import CONFIG_METADATA_KEY

    path = directory / name
    write_safetensors(path, state_dict, {CONFIG_METADATA_KEY: config.to_json()})
    return state_dict, path, ldm_jax.load(path)


def assert_merged(got: dict, base: dict, changed: dict) -> None:
    """A merge's result: every tensor of `got` is `base` + `changed[key]` (float64 updates) within 1e-6 of the
    update's size plus the rounding of the stored float32 sum, and bit-identical to `base` where nothing changed."""
    for key in got:
        if key not in changed:
            np.testing.assert_array_equal(got[key], base[key], err_msg=key)  # bit-identical
            continue
        want = base[key].astype(np.float64) + changed[key]
        tol = 1e-6 * np.abs(changed[key]).max() + np.finfo(np.float32).eps * np.abs(want)
        assert np.all(np.abs(got[key] - want) <= tol), (key, np.abs(got[key] - want).max())


def write_clip_vocab(directory) -> None:
    """vocab.json and merges.txt of the bundled CLIP BPE in `directory`, for transformers' CLIPTokenizer."""
    import json

    from ldm_jax.tokenizer import load_vocab_and_merges

    vocab, merges = load_vocab_and_merges()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                          encoding="utf-8")
