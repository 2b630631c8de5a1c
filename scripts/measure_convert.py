"""Measure checkpoint loading and conversion at full SD 1.x size: wall time and peak RSS, each in a fresh process.

    python scripts/measure_convert.py [--workdir /tmp/ldm-measure] [--keep] [--skip-ckpt]

Builds random-weight CompVis checkpoints of the real SD 1.x architecture without torch (shapes from
`abstract_params(sd1())` and the key table; one random tensor at a time, streamed to `write_safetensors`):
fp32 .safetensors (~4.3 GB) and fp16 .safetensors (~2.1 GB), plus, if torch is installed and the disk has room,
a ~4.3 GB torch-zip .ckpt of the fp32 tensors. Then runs each case in a fresh Python process (peak RSS of the whole
process, as `getrusage` reports it at the end; the child also times the operation itself) and prints a table:

    load fp16 .safetensors / load fp32 .safetensors / convert fp32 .safetensors / load converted dir /
    convert .ckpt / load .ckpt

The files live in page cache after being written, so these are warm-cache numbers. Files are deleted at the end
unless --keep. The acceptance limit checked here: peak RSS of `convert` <= 1.5 x the source file size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1e9


class LazyTensor:
    """A random tensor generated only when written (write_safetensors needs .shape/.dtype first, data later)."""

    def __init__(self, shape, dtype, seed: int, scale: float):
        self.shape, self.dtype, self.seed, self.scale = tuple(shape), np.dtype(dtype), seed, scale

    def __array__(self, dtype=None, copy=None):
        rng = np.random.default_rng(self.seed)
        a = (rng.standard_normal(self.shape, dtype=np.float32) * self.scale).astype(self.dtype)
        return a if dtype is None else a.astype(dtype)


def random_sd1_tensors(dtype) -> dict[str, LazyTensor]:
    """CompVis-layout state dict of the SD 1.x architecture (plus schedule buffers and position ids), lazily."""
    sys.path.insert(0, REPO)
    from convert.keys import key_table
    from ldm_jax.cli.cmd_convert import compvis_schedule_buffers
    from ldm_jax.configs import sd1
    from ldm_jax.models.build import abstract_params

    config = sd1()
    shapes = abstract_params(config)
    out: dict[str, object] = {}
    for i, entry in enumerate(e for c in shapes for e in key_table(c, shapes[c])):
        scale = 1.0 if entry.key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight")) else 0.02
        out[entry.key] = LazyTensor(entry.compvis_shape, dtype, seed=i, scale=scale)
    for name, value in compvis_schedule_buffers(config.schedule).items():
        out[name] = value.astype(np.float32)
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    return out


def write_ckpt(src_safetensors: str, path: str) -> None:
    """torch.save({"state_dict": ...}) of the tensors of a .safetensors file (torch needed; runs in a child)."""
    code = f"""
        import warnings, numpy as np, torch
        from convert.safetensors_io import read_safetensors
        warnings.simplefilter("ignore")
        t, _ = read_safetensors({src_safetensors!r})
        sd = {{k: torch.from_numpy(np.asarray(v)) for k, v in t.items()}}
        torch.save({{"state_dict": sd, "global_step": 470000, "epoch": 6}}, {path!r})
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, check=True)


CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
import jax, ldm_jax
from ldm_jax.cli.main import main
op, args = sys.argv[1], sys.argv[2:]
t1 = time.perf_counter()
if op == "load":
    jax.block_until_ready(ldm_jax.load(args[0]).params)
else:
    assert main(["convert", *args]) == 0
t2 = time.perf_counter()
r = resource.getrusage(resource.RUSAGE_SELF)  # ru_maxrss: peak resident set size in KiB (Linux)
print("RESULT " + json.dumps({"op_s": t2 - t1, "import_s": t1 - t0, "cpu_s": r.ru_utime + r.ru_stime,
                              "maxrss_kb": r.ru_maxrss}))
"""


def measure(label: str, op: str, args: list[str], ref_bytes: int) -> dict:
    """Run one case in a fresh interpreter; the child reports its own peak RSS and CPU time."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, op, *args], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{label} failed:\n{p.stdout}\n{p.stderr}")
    result = json.loads(re.search(r"^RESULT (.*)$", p.stdout, re.M).group(1))
    rss = result["maxrss_kb"] * 1024
    row = {"case": label, "file_gb": ref_bytes / GB, "op_s": result["op_s"], "process_s": wall,
           "cpu_s": result["cpu_s"], "peak_rss_gb": rss / GB, "rss_over_file": rss / ref_bytes}
    print(f"  {label}: {row['op_s']:.1f} s (process {wall:.1f} s, CPU {row['cpu_s']:.1f} s), peak RSS "
          f"{row['peak_rss_gb']:.2f} GB = {row['rss_over_file']:.2f} x file", flush=True)
    return row


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/ldm-measure")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--skip-ckpt", action="store_true", help="skip the torch .ckpt cases")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    print(f"free disk in {args.workdir}: {free / GB:.1f} GB")
    if free < 12 * GB:
        raise SystemExit("need at least 12 GB free (fp32 + fp16 files + converted directory)")
    sys.path.insert(0, REPO)
    from convert.safetensors_io import write_safetensors

    f32, f16 = os.path.join(args.workdir, "sd1-fp32.safetensors"), os.path.join(args.workdir, "sd1-fp16.safetensors")
    out_dir, ckpt = os.path.join(args.workdir, "sd1-converted"), os.path.join(args.workdir, "sd1-fp32.ckpt")
    rows = []
    try:
        for path, dtype in ((f32, np.float32), (f16, np.float16)):
            t = time.perf_counter()
            write_safetensors(path, random_sd1_tensors(dtype))
            print(f"wrote {path}: {os.path.getsize(path) / GB:.2f} GB in {time.perf_counter() - t:.0f} s", flush=True)
        s32, s16 = os.path.getsize(f32), os.path.getsize(f16)
        rows.append(measure("load fp16 .safetensors", "load", [f16], s16))
        rows.append(measure("load fp32 .safetensors", "load", [f32], s32))
        rows.append(measure("convert fp32 .safetensors", "convert", [f32, out_dir, "--overwrite"], s32))
        print(f"converted directory: {dir_bytes(out_dir) / GB:.2f} GB")
        rows.append(measure("load converted dir (fp32)", "load", [out_dir], dir_bytes(out_dir)))
        want_ckpt = not args.skip_ckpt and shutil.disk_usage(args.workdir).free > s32 + 4 * GB
        try:
            import torch  # noqa: F401
        except ImportError:
            want_ckpt = False
        if want_ckpt:
            write_ckpt(f32, ckpt)
            sc = os.path.getsize(ckpt)
            print(f"wrote {ckpt}: {sc / GB:.2f} GB", flush=True)
            rows.append(measure("convert fp32 .ckpt", "convert", [ckpt, out_dir, "--overwrite"], sc))
            rows.append(measure("load fp32 .ckpt", "load", [ckpt], sc))
        else:
            print("skipping the .ckpt cases (no torch, --skip-ckpt, or not enough disk)")
    finally:
        if not args.keep:
            for p in (f32, f16, ckpt):
                if os.path.exists(p):
                    os.remove(p)
            shutil.rmtree(out_dir, ignore_errors=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (wall times are noisy when shared)")
    print("| case | file GB | time s (operation) | process wall s | process CPU s | peak RSS GB | RSS / file |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['file_gb']:.2f} | {r['op_s']:.1f} | {r['process_s']:.1f} | {r['cpu_s']:.1f} "
              f"| {r['peak_rss_gb']:.2f} | {r['rss_over_file']:.2f} |")
    bad = [r for r in rows if r["case"].startswith("convert") and r["rss_over_file"] > 1.5]
    if bad:
        raise SystemExit(f"peak RSS over 1.5 x the file size: {[r['case'] for r in bad]}")


if __name__ == "__main__":
    main()
