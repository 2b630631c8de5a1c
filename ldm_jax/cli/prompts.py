"""The prompts of `ldm-jax txt2img | img2img | inpaint`: --prompt or the lines of --from-file, and the warning for a
prompt longer than the text encoder reads."""

from __future__ import annotations

import os
import re
import sys

from ldm_jax.errors import UserError

PROMPT_FILE_MAX_BYTES = 16 * 2**20  # far beyond any batch that fits in memory; refuses a wrong (binary) file fast


def read_prompt_file(path: str) -> list[tuple[int, str]]:
    """--from-file: (line number, prompt) for every non-blank line, stripped. UTF-8 with or without a BOM; \\n, \\r\\n
    or \\r line ends. A missing, unreadable, non-UTF-8 or prompt-less file is a UserError naming the file."""
    if not os.path.exists(path):
        raise UserError(f"--from-file {path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"--from-file {path}: is a directory, not a text file of prompts")
    with open(path, "rb") as f:
        data = f.read(PROMPT_FILE_MAX_BYTES + 1)
    if len(data) > PROMPT_FILE_MAX_BYTES:
        raise UserError(f"--from-file {path}: over {PROMPT_FILE_MAX_BYTES // 2**20} MiB; expected a text file of "
                        "prompts, one a line")
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data  # the UTF-8 byte order mark
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = len(re.findall(rb"\r\n|\r|\n", data[:e.start])) + 1
        raise UserError(f"--from-file {path}: not UTF-8 text (line {line}: byte 0x{data[e.start]:02x}); save it as "
                        "UTF-8") from None
    lines = [(no, line.strip()) for no, line in enumerate(re.split(r"\r\n|\r|\n", text), 1)]
    prompts = [(no, line) for no, line in lines if line]
    if not prompts:
        raise UserError(f"--from-file {path}: no prompt in it (one prompt a line; blank lines are skipped)")
    return prompts


def prompt_lines(args) -> list[tuple[str, str]]:
    """(what to call it in messages, prompt) for --prompt, or for each line of --from-file."""
    if args.from_file is None:
        return [("--prompt", args.prompt)]
    return [(f"{args.from_file} line {no}", text) for no, text in read_prompt_file(args.from_file)]


def warn_if_truncated(args, labelled: list[tuple[str, str]], max_length: int, embeddings=()) -> None:
    """CLIP reads max_length - 2 tokens of a prompt (between BOS and EOS); say what a longer one loses, as
    diffusers does, instead of dropping it silently. An embedding's word counts as its vectors."""
    from ldm_jax.tokenizer import ClipTokenizer, added_token_ids

    tokenizer = ClipTokenizer(max_length, added_tokens=added_token_ids([(e.token, len(e.vectors)) for e in embeddings]))
    for flag, text in [*labelled, ("--negative-prompt", args.negative_prompt)]:
        n = len(tokenizer.encode(text or ""))
        if n > max_length - 2:
            print(f"warning: {flag} is {n} tokens; the text encoder reads the first {max_length - 2}, the rest is "
                  "ignored", file=sys.stderr, flush=True)
