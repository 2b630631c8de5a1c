"""The OpenCLIP names of the text tower in SD 2.x CompVis checkpoints (`cond_stage_model.model.*`) and of SDXL's
second text encoder (`conditioner.embedders.1.model.*`).

Stability AI's SD 2.x (`ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder`) wraps OpenCLIP's ViT-H/14 `CLIP`
with its vision tower deleted, so the checkpoint holds the text tower under OpenCLIP's module names
(open_clip `model.py` / `transformer.py`; the same names diffusers' `convert_open_clip_checkpoint` and ComfyUI's
`clip_text_transformers_convert` read). Our Flax tree keeps transformers' CLIPTextModel names, so this table
renames them, one fixed rule per row (`i` a layer index, `w` weight or bias):

    embeddings.token_embedding.weight        token_embedding.weight               [vocab, d]
    embeddings.position_embedding.weight     positional_embedding (no .weight)    [context, d]
    encoder.layers.i.layer_norm1.w           transformer.resblocks.i.ln_1.w
    encoder.layers.i.layer_norm2.w           transformer.resblocks.i.ln_2.w
    encoder.layers.i.self_attn.{q,k,v}_proj  transformer.resblocks.i.attn.in_proj_weight [3d, d] / in_proj_bias [3d]:
                                             q, k, v stacked in that order (torch nn.MultiheadAttention)
    encoder.layers.i.self_attn.out_proj.w    transformer.resblocks.i.attn.out_proj.w
    encoder.layers.i.mlp.fc1.w               transformer.resblocks.i.mlp.c_fc.w
    encoder.layers.i.mlp.fc2.w               transformer.resblocks.i.mlp.c_proj.w
    final_layer_norm.w                       ln_final.w
    text_projection.kernel [d, p] (SDXL)     text_projection [d, p] (no .weight; as stored, not transposed)

`text_projection` [d, embed_dim] and `logit_scale` [] (CLIP's contrastive head) are in the files but SD 2.x does not
use them: `convert.mapping` ignores them by name, with that reason. OpenCLIP's causal `attn_mask` is a
non-persistent buffer (not in files). Layouts are transformers' (Linear [out, in]), so the generic rules apply.

SDXL's bigG tower (sgm `FrozenOpenCLIPEmbedder2`, `always_return_pooled`) uses its projection: the pooled output
is `ln_final(x)[eos] @ text_projection` (open_clip `CLIP.encode_text`), so the Flax Dense kernel [d, embed_dim]
of our `text_projection` IS the stored tensor, one more row with layout "same" (no transpose; diffusers'
`convert_open_clip_checkpoint` transposes it into transformers' Linear). Only `logit_scale` is ignored there.
"""

from __future__ import annotations

import re

from convert.keys import SGM_PREFIXES, Entry

PREFIX = "cond_stage_model.model."
SDXL_PREFIX = SGM_PREFIXES["text_encoder_2"]  # sgm's: conditioner.embedders.1.model.
# CompVis keys of the OpenCLIP tower that SD does not use, with the reason they are ignored
IGNORED = {
    "text_projection": "OpenCLIP text projection (contrastive head; SD uses the token states)",
    "logit_scale": "OpenCLIP logit scale (contrastive loss temperature)",
    "attn_mask": "causal attention mask buffer (rebuilt by the model)",
}
SDXL_IGNORED = {k: v for k, v in IGNORED.items() if k != "text_projection"}  # SDXL pools through the projection
PROJECTION = "text_projection"  # stored as used, x @ P: the Flax kernel itself (layout "same")
_QKV = ("q", "k", "v")
_RULES = [  # (transformers name without the text_model prefix, OpenCLIP name); \1 the layer, \2 weight/bias
    (r"embeddings\.token_embedding\.weight", "token_embedding.weight"),
    (r"embeddings\.position_embedding\.weight", "positional_embedding"),
    (r"final_layer_norm\.(weight|bias)", r"ln_final.\1"),
    (r"text_projection\.weight", PROJECTION),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"transformer.resblocks.\1.ln_1.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"transformer.resblocks.\1.ln_2.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"transformer.resblocks.\1.attn.out_proj.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_fc.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_proj.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", r"transformer.resblocks.\1.attn.in_proj_\3"),
]
_COMPILED = [(re.compile(f"^{pattern}$"), template) for pattern, template in _RULES]


def open_clip_name(name: str) -> tuple[str, int, int]:
    """transformers-layout name (no prefix) -> (OpenCLIP name, part, parts); ValueError for a name without a row."""
    for pattern, template in _COMPILED:
        m = pattern.match(name)
        if m:
            if "in_proj_" in template:
                return m.expand(template), _QKV.index(m.group(2)), len(_QKV)
            return m.expand(template), 0, 1
    raise ValueError(f"no OpenCLIP name for text-encoder parameter {name!r}")


def open_clip_table(transformers_entries: list[Entry], prefix: str | None = None) -> list[Entry]:
    """The text tower's key table under OpenCLIP names, from its transformers-layout table made with prefix ""."""
    prefix = PREFIX if prefix is None else prefix
    out = []
    for e in transformers_entries:
        name, part, parts = open_clip_name(e.key)
        layout = "same" if name == PROJECTION else e.layout
        out.append(Entry(e.component, e.flax_path, prefix + name, e.flax_shape, layout, part, parts))
    slots = [(e.key, e.part) for e in out]
    if len(set(slots)) != len(slots):
        raise AssertionError("OpenCLIP key table for the text encoder is not one-to-one")
    packed: dict[str, list[Entry]] = {}
    for e in out:
        if e.parts > 1:
            packed.setdefault(e.key, []).append(e)
    for key, group in packed.items():  # q, k, v: all three present, of one shape
        if sorted(e.part for e in group) != list(range(group[0].parts)) or len({e.compvis_shape for e in group}) != 1:
            raise AssertionError(f"{key}: its {group[0].parts} stacked parts do not match")
    return out
