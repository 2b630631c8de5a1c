"""CLIP tokenizer: known ids, and agreement with two independent implementations on a varied corpus.

References: (1) a plain-Python transcription of OpenAI CLIP's `simple_tokenizer.SimpleTokenizer` BPE loop, reading
the same shipped .gz; (2) `transformers.CLIPTokenizer` built from a vocab.json/merges.txt written here.
"""

from __future__ import annotations

import gzip
import json
import random
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import numpy as np
import pytest

from ldm_jax.tokenizer import ClipTokenizer

BOS, EOS = 49406, 49407

# Ids published elsewhere (OpenAI CLIP / HF docs, apple/ml-stable-diffusion's BPETokenizer tests, ...).
KNOWN = {
    "a photo of a cat": [320, 1125, 539, 320, 2368],
    "a photo of a dog": [320, 1125, 539, 320, 1929],
    "a diagram": [320, 22697],
    "a photo of an astronaut riding a horse on mars": [320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496],
    "Apple CoreML developer tools on a Macbook Air are fast":
        [3055, 19622, 5780, 10929, 5771, 525, 320, 20617, 1922, 631, 1953],
    "A Photo of a TREE!": [320, 1125, 539, 320, 2677, 256],
    "it's a cat's toy, running   fast": [585, 568, 320, 2368, 568, 5988, 267, 2761, 1953],
    "2 dogs and 3 cats": [273, 3255, 537, 274, 3989],
    "hello world": [3306, 1002],
    "": [],
}

CORPUS = [
    "a photo of a cat", "", " ", "   \t\n  ", "A  PHOTO\tOF\n\nA   CAT  ", "Hello, World!!! ... ?!?",
    "it's they're we've I'm you'll he'd IT'S", "'''quoted''' \"double\" (parens) [brackets] {braces}",
    "2024-11-26 12:34:56, 3.14159, 1e-5, 100% $42.00 #1 @user", "1234567890 x9y8z7",
    "café naïve résumé crème brûlée Ångström ÉCOLE", "cafe\u0301 (NFD accent)", "Straße ǅemal İstanbul ΣΊΣΥΦΟΣ",
    "东京 夜景, 中文提示词", "日本語のテキスト", "한국어 텍스트", "русский текст", "العربية", "हिन्दी",
    "emoji 🎂🐱‍👤 👍🏽 🇫🇷 ❤️", "math ∑∫√∞ ≈ ≠ ± × ÷", "tabs\tand\nnewlines\r\nand\u00a0nbsp\u2003em-space",
    "masterpiece, best quality, (ultra-detailed:1.2), [[sharp focus]], 8k, trending on artstation",
    "a <|startoftext|> b <|endoftext|> c", "snake_case camelCase kebab-case dot.case", "zero\u200bwidth",
    "odd\x0b\x0c\x85\u2028\u3000spaces \u200b\u00ad\ufeff\x00\u2060 ligature ﬁ fullwidth Ａ１",
    "a" * 300, "supercalifragilisticexpialidocious antidisestablishmentarianism",
    " ".join(["a highly detailed photograph of a red fox in a snowy forest"] * 12),
]


# --- reference 1: OpenAI CLIP's SimpleTokenizer, transcribed -------------------------------------------------

class SimpleTokenizerRef:
    """`clip/simple_tokenizer.py` with `ftfy.fix_text` replaced by its NFC step and without `html.unescape`
    (transformers, and so SD pipelines, apply neither; the corpus avoids mojibake and HTML entities)."""

    def __init__(self):
        regex = pytest.importorskip("regex")
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(2**8):
            if b not in bs:
                bs.append(b)
                cs.append(2**8 + n)
                n += 1
        self.byte_encoder = dict(zip(bs, [chr(c) for c in cs]))
        data = resources.files("ldm_jax").joinpath("assets/clip/bpe_simple_vocab_16e6.txt.gz").read_bytes()
        merges = gzip.decompress(data).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.re = regex
        self.pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE)

    @staticmethod
    def get_pairs(word):
        return {(a, b) for a, b in zip(word[:-1], word[1:])}

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = self.get_pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = self.get_pairs(word)
        word = " ".join(word)
        self.cache[token] = word
        return word

    def encode(self, text):
        text = unicodedata.normalize("NFC", text).strip()  # ftfy.fix_text's NFC step; basic_clean's strip
        text = self.re.sub(r"\s+", " ", text).strip().lower()  # whitespace_clean, lower
        ids = []
        for token in self.re.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids

    def tokenize(self, text, context_length=77, pad=EOS):
        """`clip.tokenize(text, truncate=True)`, padded with `pad` instead of 0."""
        ids = [BOS] + self.encode(text) + [EOS]
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = EOS
        return ids + [pad] * (context_length - len(ids))


@pytest.fixture(scope="module")
def tok():
    return ClipTokenizer()


@pytest.fixture(scope="module")
def ref():
    return SimpleTokenizerRef()


def random_corpus(n=300, seed=0):
    """Random strings over a mixed alphabet: ASCII, Latin-1, combining marks, CJK, emoji, odd whitespace."""
    rng = random.Random(seed)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", " .,;:!?'\"-_()[]{}<>/\\|@#$%^*+=~`",
        "  \t\n\r\u00a0\u2003\u3000", "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿßÀÉÎÕÜ", "\u0301\u0308\u0327\u0303",
        "αβγδΣΩжщЯ日本語中文한국어ไทย", "🎂🐱👍🏽🇫🇷❤️✨🔥\u200d\ufe0f",
    ]
    out = []
    for _ in range(n):
        words = []
        for _ in range(rng.randint(0, 12)):
            pool = rng.choice(pools)
            words.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 8))))
        out.append(rng.choice(["", " ", "  "]).join(words))
    return out


# --- tests ------------------------------------------------------------------------------------------------

def test_a_photo_of_a_cat(tok):
    ids = tok("a photo of a cat")
    assert ids.shape == (1, 77) and ids.dtype == np.int32
    assert ids[0].tolist() == [49406, 320, 1125, 539, 320, 2368] + [49407] * 71


@pytest.mark.parametrize("text", list(KNOWN))
def test_known_ids(tok, ref, text):
    expected = [BOS] + KNOWN[text] + [EOS]
    assert tok(text)[0, : len(expected)].tolist() == expected
    assert (tok(text)[0, len(expected):] == EOS).all()
    assert ref.encode(text) == KNOWN[text]  # the reference is itself right


def test_properties(tok):
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.max_length, tok.pad_token_id) == (
        49408, 49406, 49407, 77, 49407)


def per_char_lower(text):
    return "".join(c.lower() for c in text)


def test_matches_simple_tokenizer(tok, ref):
    corpus = CORPUS + random_corpus()
    got = tok(corpus)
    checked = 0
    for text, row in zip(corpus, got):
        if text.lower() != per_char_lower(text) or any(c in text for c in INFO_SEPARATORS):
            continue  # see test_final_sigma, test_info_separators
        assert row.tolist() == ref.tokenize(text), repr(text)
        checked += 1
    assert checked > 0.9 * len(corpus)


INFO_SEPARATORS = "\x1c\x1d\x1e\x1f"


def test_info_separators(tok, ref):
    # U+001C..U+001F count as whitespace for Python's str.strip() (OpenAI's original strips them at the ends) but
    # not for `tokenizers` (transformers and we keep each as one byte-level token, e.g. 472 for U+001C).
    for i, c in enumerate(INFO_SEPARATORS):
        assert tok.encode(f"a{c}b{c}") == [320, 472 + i, 321, 472 + i]
        assert ref.encode(f"a{c}b{c}") == [320, 472 + i, 321]


def test_final_sigma(tok, ref):
    # Python's str.lower() (OpenAI's original) turns a word-final "Σ" into "ς"; transformers' Rust normaliser,
    # and so we, lower-case character by character ("σ"). SD pipelines use transformers: we follow it.
    text = "ΣΊΣΥΦΟΣ"
    assert text.lower() == "σίσυφος" and per_char_lower(text) == "σίσυφοσ"
    assert tok.encode(text) == ref.encode(per_char_lower(text)) != ref.encode(text)


def test_matches_transformers(tok, ref, tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = {t: i for t, i in ref.encoder.items()}
    merges = sorted(ref.bpe_ranks, key=ref.bpe_ranks.get)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                         encoding="utf-8")
    hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    corpus = CORPUS + random_corpus(seed=1)
    want = hf(corpus, padding="max_length", max_length=77, truncation=True, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(tok(corpus), want)


def test_truncation_keeps_eos(tok, ref):
    text = " ".join(f"word{i}" for i in range(100))
    assert len(ref.encode(text)) > 75
    ids = tok(text)[0]
    assert ids[0] == BOS and ids[-1] == EOS
    assert ids[1:-1].tolist() == ref.encode(text)[:75]
    short = ClipTokenizer(max_length=8)("a photo of a cat with a hat on")[0].tolist()
    assert short == [BOS, 320, 1125, 539, 320, 2368, 593, EOS]


def test_batch_and_single(tok):
    prompts = ["a photo of a cat", "", "a" * 500]
    ids = tok(prompts)
    assert ids.shape == (3, 77) and ids.dtype == np.int32
    np.testing.assert_array_equal(tok(prompts[0]), ids[:1])
    np.testing.assert_array_equal(tok(tuple(prompts)), ids)
    assert ids[1].tolist() == [BOS] + [EOS] * 76
    assert tok([]).shape == (0, 77)


def test_pad_token_id(ref):
    ids = ClipTokenizer(max_length=10, pad_token_id=0)("a photo of a cat")[0].tolist()
    assert ids == [BOS, 320, 1125, 539, 320, 2368, EOS, 0, 0, 0]
    assert ids == ref.tokenize("a photo of a cat", context_length=10, pad=0)


def test_bad_arguments(tok):
    with pytest.raises(ValueError):
        ClipTokenizer(max_length=1)
    with pytest.raises(ValueError):
        ClipTokenizer(pad_token_id=49408)
    with pytest.raises(TypeError):
        tok(["ok", 3])


def test_no_html_unescape(tok):
    # Deliberate difference from OpenAI's original (which html-unescapes): same as transformers/SD pipelines.
    assert tok.encode("&amp;") == tok.encode("& amp ;") and len(tok.encode("&amp;")) == 3


def test_threads(tok):
    corpus = random_corpus(64, seed=2)
    want = tok(corpus)
    with ThreadPoolExecutor(8) as pool:
        rows = list(pool.map(lambda t: tok(t)[0], corpus))
    np.testing.assert_array_equal(np.stack(rows), want)
