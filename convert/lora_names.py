"""The module names of kohya-ss LoRA files, per model: which weight (a key-table Entry) each `lora_unet_*`,
`lora_te_*` (SD 1.x / 2.x) or `lora_te1_*` / `lora_te2_*` (SDXL) module adapts (`convert.lora` merges them).

kohya names SD 1.x / 2.x U-Net modules by diffusers' UNet2DConditionModel paths (its trainer runs diffusers' U-Net),
generated here from the model's config and sent to CompVis paths; SDXL ones by the CompVis/sgm paths of its own sgm
U-Net (sd-scripts `library/sdxl_original_unet.py`), diffusers-style names accepted too; text encoders by
transformers' CLIPTextModel paths. tests/test_lora.py and tests/test_lora_sdxl.py prove the names against
diffusers' own conversions.
"""

from __future__ import annotations

from convert.keys import SGM, compvis_name, key_table


def diffusers_unet_modules(unet) -> dict[str, str]:
    """{diffusers UNet2DConditionModel module path: CompVis U-Net module path} for every module a kohya LoRA
    (LoCon included) can adapt, from the UNetConfig `unet`. conv_shortcut is listed for every resnet (filtered by
    `module_table` where the model has no skip connection). The transformer depth is the level's (SDXL: 2 and 10;
    the middle block takes the last level's), and a U-Net with a vector conditioning (SDXL) has diffusers'
    `add_embedding` (CompVis `label_emb.0`)."""
    n, levels = unet.n_res_blocks, len(unet.channel_multipliers)
    out = {"conv_in": "input_blocks.0.0", "conv_out": "out.2",
           "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}
    if unet.adm_in_channels:
        out.update({"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"})

    def resnet(d, c):
        out.update({f"{d}.conv1": f"{c}.in_layers.2", f"{d}.conv2": f"{c}.out_layers.3",
                    f"{d}.time_emb_proj": f"{c}.emb_layers.1", f"{d}.conv_shortcut": f"{c}.skip_connection"})

    def attention(d, c, level):
        for m in ("proj_in", "proj_out"):
            out[f"{d}.{m}"] = f"{c}.{m}"
        for t in range(unet.tf_layers_at(level)):
            for m in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                      "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"):
                out[f"{d}.transformer_blocks.{t}.{m}"] = f"{c}.transformer_blocks.{t}.{m}"

    for i in range(levels):
        for j in range(n):
            k = i * (n + 1) + j + 1
            resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0")
            if i in unet.attention_levels:
                attention(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1", i)
        if i < levels - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (n + 1)}.0.op"
    resnet("mid_block.resnets.0", "middle_block.0")
    attention("mid_block.attentions.0", "middle_block.1", -1)
    resnet("mid_block.resnets.1", "middle_block.2")
    for u in range(levels):  # up_blocks.u is level levels-1-u, n+1 resnets each
        level = levels - 1 - u
        attn = level in unet.attention_levels
        for j in range(n + 1):
            k = u * (n + 1) + j
            resnet(f"up_blocks.{u}.resnets.{j}", f"output_blocks.{k}.0")
            if attn:
                attention(f"up_blocks.{u}.attentions.{j}", f"output_blocks.{k}.1", level)
        if u < levels - 1:
            out[f"up_blocks.{u}.upsamplers.0.conv"] = f"output_blocks.{u * (n + 1) + n}.{2 if attn else 1}.conv"
    return out


def sgm_unet_modules(unet_shapes) -> dict[str, str]:
    """{CompVis/sgm U-Net module path: the same} for every Linear and conv of the U-Net whose (abstract) Flax tree
    is `unet_shapes`. kohya-ss builds SDXL LoRAs on its sgm-named U-Net (sd-scripts library/sdxl_original_unet.py),
    so their names are these paths: `input_blocks.4.1.transformer_blocks.0.attn1.to_q`, `input_blocks.1.0.in_layers.2`,
    `input_blocks.3.0.op`, `output_blocks.2.2.conv`. A superset of what kohya's LoRA/LoCon adapt (LyCORIS' full
    presets also take conv_in = input_blocks.0.0, out.2, time_embed.N and label_emb.0.N)."""
    return {e.key[:-len(".weight")]: e.key[:-len(".weight")] for e in key_table("unet", unet_shapes, prefix="")
            if e.flax_path[-1] == "kernel"}


def clip_modules(text) -> dict[str, str]:
    """{transformers CLIPTextModel module path: CompVis path under cond_stage_model.transformer.} (the same)."""
    names = [f"text_model.encoder.layers.{i}.{m}" for i in range(text.num_layers)
             for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                       "mlp.fc1", "mlp.fc2")]
    return {name: name for name in names}


def _lora_components(config, shapes) -> list[tuple[str, str, dict[str, str]]]:
    """[(kohya prefix, component, {module path in the LoRA's names: its CompVis path in the component's own tree})]
    of the model `config` (`shapes`: its abstract parameters)."""
    def text(t):
        return {name: own[len("text_model."):] for name, own in clip_modules(t).items()}

    if not config.is_sdxl:
        return [("lora_unet_", "unet", diffusers_unet_modules(config.unet)),
                ("lora_te_", "text_encoder", text(config.text))]
    unet = {**sgm_unet_modules(shapes["unet"]), **diffusers_unet_modules(config.unet)}
    return [("lora_unet_", "unet", unet), ("lora_te1_", "text_encoder", text(config.text)),
            ("lora_te2_", "text_encoder_2", text(config.text_2))]


def module_tables(config) -> tuple[dict[str, object], dict[str, object]]:
    """({kohya module name (lora_unet_..., lora_te_..., lora_te1_/lora_te2_...): the key-table Entry of the weight
    it adapts}, {kohya module name: the Entry of that module's bias, where it has one}). SDXL's entries are those
    of its sgm checkpoints (the second text encoder's q, k, v: parts of in_proj_weight)."""
    from ldm_jax.models.build import abstract_params

    shapes = abstract_params(config)
    layout = SGM if config.is_sdxl else "transformers"
    weights, biases = {}, {}
    for prefix, component, modules in _lora_components(config, shapes):
        entries = {compvis_name(e.flax_path): e for e in key_table(component, shapes[component], text_layout=layout)}
        for path, own in modules.items():
            name = prefix + path.replace(".", "_")
            if f"{own}.weight" in entries:
                weights[name] = entries[f"{own}.weight"]
                if f"{own}.bias" in entries:
                    biases[name] = entries[f"{own}.bias"]
    return weights, biases


def module_table(config) -> dict[str, object]:
    """{kohya module name (lora_unet_..., lora_te_..., lora_te1_/lora_te2_...): the key-table Entry of the weight it
    adapts}."""
    return module_tables(config)[0]
