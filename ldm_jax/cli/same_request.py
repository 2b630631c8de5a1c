"""Multi-host sampling: every host must be given the same request, or each would make and save its share of a
different one (images missing or twice). Paths may differ between hosts; what they name must not."""

from __future__ import annotations

import hashlib
import json
import os

# the flags every host must be given alike
REQUEST_ARGS = ("mode", "prompt", "negative_prompt", "n", "seed", "steps", "sampler", "scale", "eta", "height",
                "width", "strength", "dtype", "prediction", "aesthetic_score", "negative_aesthetic_score")


def check_same_request(args, prompts: list[str]) -> None:
    """Refuse, on every host alike, a run whose hosts were given different settings. --from-file: the prompts
    read are compared, not the path; --checkpoint, --vae, --lora, --embedding: what `file_identity` says of each
    file (and each embedding's prompt word)."""
    from ldm_jax import parallel

    flags = ", --".join(k.replace("_", "-") for k in REQUEST_ARGS[1:])
    settings = {k: getattr(args, k, None) for k in REQUEST_ARGS}
    loras, embeddings = args.lora or [], getattr(args, "embedding", None) or []
    files = {"checkpoint": file_identity(args.checkpoint), "vae": file_identity(args.vae),
             "loras": [(file_identity(path), scale) for path, scale in loras],
             "embeddings": [(file_identity(path), _token(path, token)) for path, token in embeddings]}
    parallel.check_same_everywhere(dict(settings, prompts=prompts, from_file=args.from_file is not None, files=files),
                                   f"the flags among --{flags}, the prompts of --from-file, the --lora scales, the "
                                   "--embedding tokens and the checkpoint, --vae, --lora and --embedding files "
                                   "(compared by size) must be the same on every host")


def _token(path: str, token: str | None) -> str:
    """The prompt word an --embedding FILE[:TOKEN] gives (default: the file's base name, which may differ between
    hosts' copies)."""
    from convert.embeddings import default_token

    return default_token(path) if token is None else token


def file_identity(path: str | None):
    """What tells two hosts' copies of a model file apart without reading its tensors: a file's size; a converted
    directory's metadata.json less its source path (it records the source's sha256, dtype, EMA choice and every
    params file's size); None for no path or a missing one (that host's own check names it)."""
    if path is None or not os.path.exists(path):
        return None
    if not os.path.isdir(path):
        return os.path.getsize(path)
    try:
        with open(os.path.join(path, "metadata.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        return "directory"  # not a converted directory: loading names the problem
    meta.pop("source", None)  # where it was converted from: a path, may differ between hosts
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
