"""LyCORIS modules in kohya-format LoRA files (LoHa, LoKr, LoCon with a Tucker core, full diff): their weight updates
in numpy, for `convert.lora`, which names, checks and merges them.

Source of the formulas and tensor layouts: LyCORIS (github.com/KohakuBlueleaf/LyCORIS), PyPI `lycoris-lora` 4.1.3:
lycoris/functional/{loha,lokr,locon,general}.py (the updates) and lycoris/modules/{loha,lokr,locon,full}.py (the
saved tensors, the rank and alpha rules). tests/test_lycoris.py checks every kind against LyCORIS' own functions.

Notation: the adapted weight W is [out, in] (Linear) or [out, in, kh, kw] (Conv2d); K = kh*kw (1 for a Linear);
r is the rank. Each update dW is computed in float32 in W's CompVis shape, with its alpha factor:

* alpha factor (LyCORIS modules' `scale`): alpha / r, where a missing alpha or alpha 0 means alpha = r. LyCORIS
  applies it once in the forward pass its files are trained with, as here. (Its 4.1.3 merge path, `get_diff_weight`
  of LoHa and LoKr, multiplies by it a second time; that is not followed.)
* LoHa: dW = (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b), an elementwise product of two rank-r products,
  hada_w?_a [out, r], hada_w?_b [r, in*K]; r = hada_w1_b.shape[0].
* LoKr: dW = kron(w1, w2), w1 [a, c] = lokr_w1 or lokr_w1_a [a, r] @ lokr_w1_b [r, c], w2 [b, d(, kh, kw)] =
  lokr_w2 or lokr_w2_a [b, r] @ lokr_w2_b [r, d*K]; out = a*b, in = c*d. The alpha factor applies only when a half
  is factorised: r = lokr_w1_b.shape[0], else lokr_w2_b.shape[0]; with both halves full it is 1 whatever the alpha.
  (LyCORIS' functional `rank_scale` takes r from lokr_w2_a.shape[1], which for a Tucker w2 is b, not r; its modules,
  which the file was trained with, use r.)
* Tucker cores (convs, LyCORIS `use_tucker`): hada_t1/hada_t2 [r, r, kh, kw] rebuild each LoHa half from
  hada_w?_a [r, out], hada_w?_b [r, in]; lokr_t2 the LoKr w2 from lokr_w2_a [r, b], lokr_w2_b [r, d]; LoCon's
  lora_mid its update from lora_up [out, r, 1, 1] and lora_down [r, in, 1, 1] (r = lora_down.shape[0]). Each is
  LyCORIS' `rebuild_tucker`: x[p, q, :, :] = sum_ij t[i, j, :, :] a[i, p] b[j, q], for t [r, r, kh, kw], a [r, p],
  b [r, q].
* full: dW = diff [out, in(, kh, kw)], no alpha (diff_b [out], the bias update, is merged by `convert.lora`).
No torch here; arrays are numpy (memory-mapped file views until `delta` reads them).
"""

from __future__ import annotations

import math

import numpy as np

# file suffix -> module kind ("alpha" is shared by LoRA, LoHa and LoKr)
KIND_OF_SUFFIX = {
    **dict.fromkeys(("lora_down.weight", "lora_up.weight", "lora_mid.weight"), "LoRA"),
    **dict.fromkeys(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"), "LoHa"),
    **dict.fromkeys(("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"), "LoKr"),
    **dict.fromkeys(("diff", "diff_b"), "full"),
}
EXPECTED = ("lora_down.weight/.lora_up.weight/.lora_mid.weight (LoRA, LoCon), .hada_* (LoHa), .lokr_* (LoKr), "
            ".diff/.diff_b (full) or .alpha")
# DoRA (LyCORIS `weight_decompose`): W' = (W + dW) * (scale * (m / |W + dW| - 1) + 1), the norm per output row: not
# an added update (it depends on W), and at scale 0 it is W + dW, not W. Left out rather than guessed at.
_DORA = ("a DoRA magnitude (dora_scale): DoRA rescales the merged weight by its norm instead of adding an update; "
         "not supported")
# suffixes of LyCORIS algorithms (or extras) that are not merged: why, in one line
REFUSED = {
    "dora_scale": _DORA,
    **dict.fromkeys(("weight", "on_input"), "a LyCORIS (IA)^3 tensor; not supported"),
    **dict.fromkeys(("oft_blocks", "rescale"), "a LyCORIS OFT/BOFT tensor; not supported"),
    **dict.fromkeys(("w_norm", "b_norm"), "a LyCORIS norm-layer tensor (w_norm/b_norm); not supported"),
    **dict.fromkeys(("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"), "a GLoRA tensor; not supported"),
    **dict.fromkeys(("lambda_layer", "q_layer.weight", "p_layer.weight"), "a T-LoRA tensor; not supported"),
    **dict.fromkeys(("bias_indices", "bias_values", "bias_size"),
                    "a sparse bias update of a LyCORIS extraction; not supported"),
}
TUCKER_LOCON = "LoCon (Tucker)"


def module_kind(parts) -> str:
    """The kind of one module's {suffix: tensor}: "LoRA" (kohya LoRA/LoCon), TUCKER_LOCON, "LoHa", "LoKr" or "full";
    ValueError (why, naming the suffixes) for a mix of kinds or missing or contradicting tensors."""
    kinds = {KIND_OF_SUFFIX[s] for s in parts if s != "alpha"}
    if len(kinds) > 1:
        mixed = ", ".join(f"{KIND_OF_SUFFIX[s]} .{s}" for s in sorted(parts) if s != "alpha")
        raise ValueError(f"mixes tensors of different kinds in one module ({mixed})")
    if not kinds:
        raise ValueError("has an .alpha but no weights")
    kind = kinds.pop()

    def need(*suffixes):
        for s in suffixes:
            if s not in parts:
                raise ValueError(f"has no .{s}")

    def pair(a, b):  # both or neither
        if (a in parts) != (b in parts):
            raise ValueError(f"has .{a if a in parts else b} without .{b if a in parts else a}")

    if kind == "LoRA":
        need("lora_down.weight", "lora_up.weight")
        return TUCKER_LOCON if "lora_mid.weight" in parts else kind
    if kind == "LoHa":
        need("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        pair("hada_t1", "hada_t2")
    elif kind == "LoKr":
        for h in "12":
            full, a, b = f"lokr_w{h}", f"lokr_w{h}_a", f"lokr_w{h}_b"
            pair(a, b)
            if (full in parts) == (a in parts):
                raise ValueError(f"has both .{full} and .{a}/.{b}" if full in parts else
                                 f"has no .{full} (or .{a} and .{b})")
        if "lokr_t2" in parts and "lokr_w2" in parts:
            raise ValueError("has .lokr_t2 with a full .lokr_w2 (a Tucker core needs .lokr_w2_a/.lokr_w2_b)")
    else:
        need("diff")
        if "alpha" in parts:
            raise ValueError("has an .alpha in a full (diff) module, which has none")
    return kind


def _dims(*dims) -> str:
    return "[" + ", ".join(map(str, dims)) + "]"


def _trails(target) -> set[tuple[int, ...]]:
    """Accepted spatial tails of a factor stored with W's kernel: W's own, or none for a 1x1 conv or a Linear."""
    trail = tuple(target[2:])
    return {trail, ()} if trail in ((), (1, 1)) else {trail}


def rank_of(kind: str, parts, target) -> int | None:
    """The rank r of the module's alpha factor (None: no alpha factor), once the tensors' shapes (only the shapes
    are read) are checked to make an update of W's CompVis shape `target`; ValueError (the expected layout) if not."""
    s = {k: tuple(v.shape) for k, v in parts.items()}
    out, inn, trail = target[0], target[1], tuple(target[2:])
    k = math.prod(trail)
    if kind == TUCKER_LOCON:
        # lora_down [r, in(, 1, 1)], lora_mid [r, r, kh, kw], lora_up [out, r(, 1, 1)]
        r = s["lora_down.weight"][0] if s["lora_down.weight"] else 0
        if not (len(trail) == 2 and r > 0 and s["lora_down.weight"] in ((r, inn), (r, inn, 1, 1))
                and s["lora_mid.weight"] == (r, r, *trail) and s["lora_up.weight"] in ((out, r), (out, r, 1, 1))):
            raise ValueError(f"expected lora_down [r, {inn}, 1, 1], lora_mid {_dims('r', 'r', *trail)}, "
                             f"lora_up [{out}, r, 1, 1], one rank r")
        return r
    if kind == "LoHa":
        r = s["hada_w1_b"][0] if s["hada_w1_b"] else 0
        if "hada_t1" in s:  # hada_w?_a [r, out], hada_w?_b [r, in], hada_t? [r, r, kh, kw]
            ok = len(trail) == 2 and all(s[f"hada_t{h}"] == (r, r, *trail) and s[f"hada_w{h}_a"] == (r, out)
                                         and s[f"hada_w{h}_b"] == (r, inn) for h in "12")
            expect = f"hada_w?_a [r, {out}], hada_w?_b [r, {inn}], hada_t? {_dims('r', 'r', *trail)}"
        else:  # hada_w?_a [out, r], hada_w?_b [r, in*K] (or [r, in, kh, kw])
            ok = all(s[f"hada_w{h}_a"] == (out, r) and s[f"hada_w{h}_b"] in ((r, inn * k), (r, inn, *trail))
                     for h in "12")
            expect = f"hada_w?_a [{out}, r], hada_w?_b [r, {inn * k}]"
        if not (ok and r > 0):
            raise ValueError(f"expected {expect}, one rank r")
        return r
    if kind == "LoKr":
        return _lokr_rank(s, out, inn, trail)
    if s["diff"] not in {(out, inn, *t) for t in _trails(target)}:
        raise ValueError(f"expected diff {tuple(target)}")
    return None


def _lokr_rank(s, out, inn, trail) -> int | None:
    """rank_of for LoKr: kron(w1 [a, c], w2 [b, d(, kh, kw)]) must be [out = a*b, in = c*d(, kh, kw)]."""
    k = math.prod(trail)
    target = (out, inn, *trail)
    bad = ValueError(f"expected kron(w1 [a, c], w2 {_dims('b', 'd', *trail)}) with a*b = {out}, c*d = {inn}: w1 = "
                     "lokr_w1 or lokr_w1_a [a, r] @ lokr_w1_b [r, c]; w2 = lokr_w2, lokr_w2_a [b, r] @ lokr_w2_b "
                     "[r, d*K] or Tucker lokr_t2 [r, r, kh, kw], lokr_w2_a [r, b], lokr_w2_b [r, d]")
    r1 = r2 = None
    if "lokr_w1" in s:
        if len(s["lokr_w1"]) != 2:
            raise bad
        a, c = s["lokr_w1"]
    else:
        if len(s["lokr_w1_a"]) != 2 or len(s["lokr_w1_b"]) != 2 or s["lokr_w1_a"][1] != s["lokr_w1_b"][0]:
            raise bad
        (a, r1), c = s["lokr_w1_a"], s["lokr_w1_b"][1]
    if "lokr_w2" in s:  # [b, d, kh, kw]
        w2 = s["lokr_w2"]
        if len(w2) < 2 or w2[2:] not in _trails(target):
            raise bad
        b, d = w2[:2]
    elif "lokr_t2" in s:  # lokr_w2_a [r, b], lokr_w2_b [r, d], lokr_t2 [r, r, kh, kw]
        if not (len(trail) == 2 and len(s["lokr_w2_a"]) == 2 and len(s["lokr_w2_b"]) == 2
                and s["lokr_t2"] == (s["lokr_w2_a"][0], s["lokr_w2_b"][0], *trail)):
            raise bad
        r2, b, d = s["lokr_w2_b"][0], s["lokr_w2_a"][1], s["lokr_w2_b"][1]
    else:  # lokr_w2_a [b, r], lokr_w2_b [r, d*K] (or [r, d, kh, kw])
        w2a, w2b = s["lokr_w2_a"], s["lokr_w2_b"]
        if not (len(w2a) == 2 and len(w2b) in (2, 2 + len(trail)) and w2a[1] == w2b[0]
                and (len(w2b) == 2 or w2b[2:] == trail) and math.prod(w2b[1:]) % k == 0):
            raise bad
        (b, r2), d = w2a, math.prod(w2b[1:]) // k
    if a * b != out or c * d != inn or 0 in (a, b, c, d) or 0 in (r1, r2):
        raise bad
    return r1 if r1 is not None else r2


def alpha_factor(alpha: float | None, rank: int | None) -> float:
    """LyCORIS' scale: alpha / rank; alpha missing or 0 -> alpha = rank; no rank (no factorised part) -> 1."""
    if rank is None or alpha is None or alpha == 0:
        return 1.0
    return alpha / rank


def _tucker(t, a, b):
    """rebuild_tucker: t [r1, r2, kh, kw], a [r1, p], b [r2, q] -> [p, q, kh, kw], sum_ij t[i, j] a[i, p] b[j, q]."""
    r1, r2, *k = t.shape
    x = a.T @ t.reshape(r1, -1)  # [p, r2*K]
    x = x.reshape(x.shape[0], r2, -1).transpose(0, 2, 1) @ b  # [p, K, q]
    return x.transpose(0, 2, 1).reshape(x.shape[0], b.shape[1], *k)


def delta(kind: str, parts, target) -> np.ndarray:
    """The module's update dW (float32, W's CompVis shape `target`) without its alpha factor or the user's scale;
    `parts` already passed `rank_of`."""
    p = {s: np.asarray(v, np.float32) for s, v in parts.items() if s not in ("alpha", "diff_b")}
    out = target[0]
    if kind == TUCKER_LOCON:
        up, down = p["lora_up.weight"], p["lora_down.weight"]
        r = down.shape[0]
        dw = _tucker(p["lora_mid.weight"], up.reshape(out, r).T, down.reshape(r, -1))
    elif kind == "LoHa":
        if "hada_t1" in p:
            w1 = _tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])  # [out, in, kh, kw]
            w2 = _tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
        else:
            r = p["hada_w1_b"].shape[0]
            w1 = p["hada_w1_a"] @ p["hada_w1_b"].reshape(r, -1)  # [out, r] @ [r, in*K]
            w2 = p["hada_w2_a"] @ p["hada_w2_b"].reshape(r, -1)
        dw = w1.reshape(out, -1) * w2.reshape(out, -1)
    elif kind == "LoKr":
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]  # [a, c]
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]  # [b, d(, kh, kw)]
        elif "lokr_t2" in p:
            w2 = _tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])  # [b, d, kh, kw]
        else:
            w2 = p["lokr_w2_a"] @ p["lokr_w2_b"].reshape(p["lokr_w2_b"].shape[0], -1)  # [b, r] @ [r, d*K]
        # kron(w1, w2 [b, d*K]) is [a*b, c*d*K]; its column j*d*K + q*K + s is W's (in j*d + q, kernel s): the same
        # as LyCORIS' kron of w1 [a, c, 1, 1] with w2 [b, d, kh, kw]
        dw = np.kron(w1, w2.reshape(w2.shape[0], -1))
    else:
        dw = p["diff"]
    return dw.reshape(target)
