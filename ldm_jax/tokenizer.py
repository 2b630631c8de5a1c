"""CLIP byte-level BPE tokenizer, offline, backed by HuggingFace `tokenizers` (Rust).

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision") tokenises
text with a lower-cased byte-level BPE of 49,408 tokens. This module mirrors OpenAI CLIP's
`clip/simple_tokenizer.py` (`SimpleTokenizer`) and `clip.tokenize`, and produces exactly the ids of
`transformers.CLIPTokenizer` (openai/clip-vit-large-patch14, the SD 1.x text encoder's tokenizer) with
`padding="max_length", max_length=77, truncation=True`.

The vocabulary is built from `assets/clip/bpe_simple_vocab_16e6.txt.gz` shipped with the package (MIT, OpenAI;
see `assets/clip/LICENSE`), so nothing is downloaded. Construction follows `SimpleTokenizer.__init__`:

    vocab  = 256 byte symbols, the same 256 symbols + "</w>", one token per merge, <|startoftext|>, <|endoftext|>
    merges = lines 1 .. 48894 of the file (line 0 is a version header)

Text handling (as transformers' CLIPTokenizer): NFC, runs of whitespace -> one space, lower-case; split with
CLIP's regex; map UTF-8 bytes to the printable byte alphabet; BPE with "</w>" marking the end of a word.
OpenAI's original additionally runs `ftfy.fix_text` and `html.unescape`; transformers' CLIPTokenizer (v5, and
the fast one of v4) does not, and neither do we: e.g. "&amp;" stays 3 tokens "&", "amp", ";", curly quotes stay curly. Two more
small differences from the original, again as transformers: a word-final Greek "Σ" lower-cases to "σ" (Python's
str.lower gives "ς"), and U+001C..U+001F at the ends of a prompt are kept (Python's str.strip drops them).

Added words (textual inversion, `StableDiffusion.add_tokens`): `ClipTokenizer(added_tokens=((word, ids), ...))`
makes each whole word `word` stand for its token ids (new ids past CLIP's 49,408). The words are `tokenizers`
added tokens, matched in the normalised (lower-cased) prompt before the CLIP split and BPE, only where no letter,
digit or "_" touches them (`single_word`); the rest of the prompt is tokenised as without them. A word with n ids
becomes all n, as diffusers expands a multi-vector token in the prompt, and the 77-token truncation comes after.
"""

from __future__ import annotations

import functools
import gzip
import threading
from collections.abc import Sequence
from importlib import resources

import numpy as np

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # 48894: CLIP's `merges[1 : 49152 - 256 - 2 + 1]`
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenisation regex (simple_tokenizer.py); applied after lower-casing.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def load_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges in rank order) exactly as CLIP's `SimpleTokenizer.__init__` builds them."""
    ref = resources.files("ldm_jax").joinpath("assets", "clip", BPE_FILE)
    lines = gzip.decompress(ref.read_bytes()).decode("utf-8").split("\n")[1 : N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if not len(vocab) == len(tokens) == 49408:
        raise RuntimeError(f"corrupt CLIP BPE file {ref}: {len(vocab)} distinct tokens, expected 49408")
    return vocab, merges  # type: ignore[return-value]


def _build_backend():
    """The `tokenizers.Tokenizer` for CLIP (as transformers' CLIPTokenizer, minus its post-processor: BOS, EOS,
    truncation and padding are placed by `ClipTokenizer.__call__`)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab, merges = load_vocab_and_merges()
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                        fuse_unk=False, unk_token=EOS))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # Keep the regex matches, drop the rest (whitespace): CLIP's `re.findall(pat, text)`.
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        # UTF-8 bytes -> printable alphabet, no prefix space. Its GPT-2 regex (kept, as in transformers) cannot
        # split CLIP's pieces any further, so only CLIP's split matters.
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    # Literal "<|startoftext|>" / "<|endoftext|>" in a prompt map to the special ids, as in CLIP and transformers.
    tok.add_special_tokens([BOS, EOS])
    return tok


_backend = None
_backend_lock = threading.Lock()


def _get_backend():
    """Build the backend once per process (lazily, thread-safe); `tokenizers.Tokenizer.encode` is re-entrant."""
    global _backend
    if _backend is None:
        with _backend_lock:
            if _backend is None:
                _backend = _build_backend()
    return _backend


CLIP_VOCAB_SIZE = 49408


def added_word(word: str) -> str:
    """`word` as the tokenizer matches it (NFC, lower-case); a ValueError saying why it cannot be an added word:
    empty, not one word (white space), or already a token of CLIP's vocabulary (a word such as "cat", a piece of
    one such as "ing", a special token), which it would take over in every prompt (diffusers refuses those too)."""
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"token {word!r} is empty")
    normal = _get_backend().normalizer.normalize_str(word)
    if normal.split() != [normal]:
        raise ValueError(f"token {word!r} is not one word (it has spaces)")
    vocab = _get_backend().get_vocab()
    if normal in vocab or normal + "</w>" in vocab:
        raise ValueError(f"token {word!r} is already a token of CLIP's vocabulary (it would take its place in "
                         "prompts)")
    return normal


def added_token_ids(words_and_counts, first_id: int = CLIP_VOCAB_SIZE) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """((word, ids), ...) for [(word, n), ...]: consecutive new ids from `first_id`, n for each word in order."""
    out, next_id = [], first_id
    for word, n in words_and_counts:
        out.append((word, tuple(range(next_id, next_id + int(n)))))
        next_id += int(n)
    return tuple(out)


@functools.lru_cache(maxsize=8)
def _added_backend(words: tuple[str, ...]):
    """A copy of the CLIP backend with `words` (normalised) as whole-word added tokens."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_str(_get_backend().to_str())
    tok.add_tokens([AddedToken(w, single_word=True, normalized=True) for w in words])
    return tok


class ClipTokenizer:
    """Prompts -> int32 ids [B, max_length]: BOS, BPE tokens (truncated), EOS, then padding.

    `pad_token_id` is 49407 (<|endoftext|>) for SD 1.x (openai/clip-vit-large-patch14); SD 2.x's OpenCLIP
    tokenizer pads with 0 instead. Truncation keeps EOS last, like `clip.tokenize(truncate=True)` and
    transformers' `truncation=True`: at most `max_length - 2` text tokens. `added_tokens`: ((word, ids), ...),
    whole words that stand for those ids (see the module's docstring); ids from 49408 up, each used once.
    """

    bos_token_id = 49406
    eos_token_id = 49407

    def __init__(self, max_length: int = 77, pad_token_id: int = 49407, added_tokens=()):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (BOS and EOS), got {max_length}")
        self.added_tokens = tuple((word, tuple(int(i) for i in ids)) for word, ids in added_tokens)
        if not 0 <= pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be in [0, {self.vocab_size}), got {pad_token_id}")
        self.max_length = int(max_length)
        self.pad_token_id = int(pad_token_id)
        words = [added_word(word) for word, _ in self.added_tokens]
        twice = next((w for i, w in enumerate(words) if w in words[:i]), None)
        if twice is not None:
            raise ValueError(f"token {twice!r} is added twice")
        ids = [i for _, group in self.added_tokens for i in group]
        if any(not group for _, group in self.added_tokens) or len(set(ids)) != len(ids) or any(
                i < CLIP_VOCAB_SIZE for i in ids):
            raise ValueError("each added token needs ids of its own, from 49408 up")
        self._words = tuple(words)
        self._expand = {}  # backend id of an added word -> its ids (filled with the backend)

    @property
    def _backend(self):
        if not self._words:
            return _get_backend()
        backend = _added_backend(self._words)
        if not self._expand:
            self._expand = {backend.token_to_id(w): ids for w, (_, ids) in zip(self._words, self.added_tokens)}
        return backend

    @property
    def vocab_size(self) -> int:
        return max([CLIP_VOCAB_SIZE] + [i + 1 for _, ids in self.added_tokens for i in ids])

    def _ids(self, encoding) -> list[int]:
        if not self._words:
            return encoding.ids
        return [j for i in encoding.ids for j in self._expand.get(i, (i,))]

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt (added words expanded) without BOS/EOS, padding or truncation."""
        return self._ids(self._backend.encode(text, add_special_tokens=False))

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a string or a sequence of strings")
        out = np.full((len(prompts), self.max_length), self.pad_token_id, dtype=np.int32)
        if not prompts:
            return out
        n = self.max_length - 2  # room for text tokens between BOS and EOS
        for row, enc in zip(out, self._backend.encode_batch(prompts, add_special_tokens=False)):
            ids = self._ids(enc)[:n]
            row[0] = self.bos_token_id
            row[1 : len(ids) + 1] = ids
            row[len(ids) + 1] = self.eos_token_id
        return out
