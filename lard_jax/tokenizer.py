"""Tokenizers behind one small interface: a built-in byte tokenizer and a Hugging Face adapter.

Every tokenizer the project uses exposes

    encode(text, add_bos=False) -> list[int]
    decode(ids) -> str                  # special tokens skipped, bad UTF-8 replaced
    vocab_size, bos_id, eos_id, pad_id  # ints
    fingerprint                         # str naming the exact vocabulary (token caches key on it)

`ByteTokenizer` needs no files, so tests and toy runs work offline. It can save itself as a
Hugging Face tokenizer directory that `transformers.AutoTokenizer` loads to the same ids, so a
checkpoint exported with it is usable outside this project.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from lard_jax import gguf as gguf_lib
from lard_jax.errors import UserError

__all__ = ["ByteTokenizer", "HFTokenizer", "load_tokenizer"]

# Key written into tokenizer_config.json so `load_tokenizer` can recognise a saved ByteTokenizer
# and skip the (slower) transformers path. Unknown keys are kept as init kwargs by transformers.
_BYTE_MARKER_KEY = "lard_jax_tokenizer"
_BYTE_MARKER_VALUE = "byte-v1"


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of GPT-2's byte-level BPE (what `ByteLevel` uses)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


class ByteTokenizer:
    """UTF-8 bytes as tokens: 0 = pad, 1 = bos, 2 = eos, byte b -> b + 3."""

    pad_id = 0
    bos_id = 1
    eos_id = 2
    byte_offset = 3
    vocab_size = 256 + byte_offset
    fingerprint = f"lard_jax.ByteTokenizer/{_BYTE_MARKER_VALUE}"
    special_tokens = ("<pad>", "<s>", "</s>")  # in id order

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return self.encode_array(text, add_bos=add_bos).tolist()

    def encode_array(self, text: str, add_bos: bool = False) -> np.ndarray:
        """Same ids as `encode`, as a uint16 array (fast path for tokenising whole books)."""
        body = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16) + self.byte_offset
        if add_bos:
            return np.concatenate([np.array([self.bos_id], np.uint16), body])
        return body

    def decode(self, ids: Sequence[int]) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        byte_ids = ids[ids >= self.byte_offset] - self.byte_offset
        if np.any(byte_ids > 255):
            raise ValueError(f"token id {int(byte_ids.max()) + self.byte_offset} is outside the byte vocabulary")
        return byte_ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json under `path`."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

        vocab = {token: i for i, token in enumerate(self.special_tokens)}
        for byte, char in _gpt2_bytes_to_unicode().items():
            vocab[char] = byte + self.byte_offset
        # BPE without merges on ByteLevel characters is exactly one token per UTF-8 byte;
        # use_regex=False keeps spaces attached as plain bytes (no GPT-2 word splitting).
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(t, special=True) for t in self.special_tokens])
        bos = self.special_tokens[self.bos_id]
        # Like LLaMA: a bos when add_special_tokens=True (the transformers default), none otherwise.
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_id)]
        )

        os.makedirs(path, exist_ok=True)
        backend.save(os.path.join(path, "tokenizer.json"))
        special_map = {
            "pad_token": self.special_tokens[self.pad_id],
            "bos_token": bos,
            "eos_token": self.special_tokens[self.eos_id],
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special_map,
            "add_bos_token": True,
            "add_eos_token": False,
            # Text that happens to contain "<s>" must still encode byte by byte, as here.
            "split_special_tokens": True,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
            _BYTE_MARKER_KEY: _BYTE_MARKER_VALUE,
        }
        _write_json(os.path.join(path, "tokenizer_config.json"), config)
        _write_json(os.path.join(path, "special_tokens_map.json"), special_map)


class HFTokenizer:
    """A `transformers` tokenizer behind the project interface (bos handled here, not by the template)."""

    def __init__(self, hf_tokenizer: Any, fingerprint: str):
        self.hf_tokenizer = hf_tokenizer
        self.fingerprint = fingerprint
        self.vocab_size = len(hf_tokenizer)  # counts added tokens, unlike .vocab_size
        self.bos_id = hf_tokenizer.bos_token_id
        self.eos_id = hf_tokenizer.eos_token_id
        pad = hf_tokenizer.pad_token_id
        # LLaMA ships without a pad token; padded positions are masked anyway, so eos is harmless.
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        # verbose=False: whole books exceed model_max_length, which is fine for a token cache.
        ids = list(self.hf_tokenizer.encode(text, add_special_tokens=False, verbose=False))
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this tokenizer has no bos token")
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf_tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(spec: str | os.PathLike) -> ByteTokenizer | HFTokenizer:
    """ "byte" -> ByteTokenizer; a local directory -> its tokenizer (never downloads); a GGUF
    checkpoint spec (see lard_jax.hf.resolve_checkpoint) -> the tokenizer in its metadata."""
    if str(spec) == "byte":
        return ByteTokenizer()
    # a .gguf, a folder with one, or pkg:DIST: the GGUF's own tokenizer
    if gguf_lib.is_gguf_path(resolved := gguf_lib.resolve_checkpoint(spec)):
        return load_gguf_tokenizer(resolved)
    path = os.fspath(spec)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"tokenizer directory not found: {path!r} (expected 'byte' or a local Hugging Face tokenizer directory)"
        )
    config = _read_json_if_exists(os.path.join(path, "tokenizer_config.json"))
    if config.get(_BYTE_MARKER_KEY) == _BYTE_MARKER_VALUE:
        return ByteTokenizer()

    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return HFTokenizer(hf_tokenizer, fingerprint=_directory_fingerprint(path))


def _directory_fingerprint(path: str) -> str:
    """Hash of the files that define a tokenizer, so a cache built with another vocabulary is never reused."""
    digest = hashlib.sha256()
    names = (
        "tokenizer.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
    )
    for name in names:
        file_path = os.path.join(path, name)
        if os.path.isfile(file_path):
            digest.update(name.encode())
            with open(file_path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return f"hf:{digest.hexdigest()[:16]}"


def _read_json_if_exists(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            loaded = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: invalid JSON ({error})") from error
    return loaded if isinstance(loaded, dict) else {}


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


# ----------------------------------------------------------------------------------------------
# GGUF checkpoints: the tokenizer in their metadata (lard_jax.gguf reads the file)
#
# Built here with the `tokenizers` library from llama.cpp's tokenizer.ggml.* keys, not through
# transformers' GGUF loader, which needs PyTorch in every version (a gate in 4.x, an import in 5.x).
# The result matches AutoTokenizer.from_pretrained(dir, gguf_file=...) id for id (tests/test_gguf.py,
# tests/test_gguf_tokenizer.py) for the two vocabularies llama-architecture files carry:
#   "gpt2"  byte-level BPE (SmolLM, Llama 3, ...): the file's merges, GPT-2's split, or Llama 3's
#           for the pre-tokenizer types that name it;
#   "llama" SentencePiece BPE (Llama 1/2, Mistral, TinyLlama): merges rebuilt from the scores,
#           byte fallback, "▁" for spaces with one in front of the text.
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4  # llama.cpp token types (1 normal, 2 unknown, 6 byte)
_GGUF_TOKENIZER_MODELS = ("gpt2", "llama")
# Llama 3's split (its tiktoken pattern), for the pre-tokenizer names llama.cpp gives it
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_SPLITS = {name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx")}


def _gguf_tokenizer_metadata(path: str) -> dict:
    """The tokenizer.ggml.* keys of a llama-architecture GGUF (UserError when there is no tokenizer)."""
    f = gguf_lib._open(path)
    gguf_lib._architecture(f)
    model = f.get("tokenizer.ggml.model")
    if model is None or f.array_len("tokenizer.ggml.tokens") is None:
        raise UserError(
            f"{path}: GGUF metadata key 'tokenizer.ggml.tokens' is missing; the file carries "
            "no tokenizer, pass --config.data.tokenizer=<a tokenizer directory>"
        )
    if model not in _GGUF_TOKENIZER_MODELS:
        raise UserError(
            f"{path}: tokenizer.ggml.model={model!r} is not supported (supported: "
            f"{', '.join(_GGUF_TOKENIZER_MODELS)}); pass --config.data.tokenizer=<a tokenizer directory>"
        )
    tokens = [str(t) for t in f.get("tokenizer.ggml.tokens")]

    def token(key):
        i = gguf_lib._int(f, f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    return {
        "model": model,
        "pre": f.get("tokenizer.ggml.pre"),
        "tokens": tokens,
        "token_type": [int(t) for t in f.get("tokenizer.ggml.token_type", None) or ()],
        "scores": [float(s) for s in f.get("tokenizer.ggml.scores", None) or ()],
        "merges": [str(m) for m in f.get("tokenizer.ggml.merges", None) or ()],
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        # llama.cpp's defaults: a bos for SentencePiece vocabularies unless the file says otherwise
        "add_bos": bool(f.get("tokenizer.ggml.add_bos_token", model == "llama")),
        "add_eos": bool(f.get("tokenizer.ggml.add_eos_token", False)),
        "add_space_prefix": bool(f.get("tokenizer.ggml.add_space_prefix", True)),
        "chat_template": f.get("tokenizer.chat_template"),
        "context_length": gguf_lib._int(f, "llama.context_length"),
    }


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """SentencePiece BPE keeps no merge list: every split of a piece into two known pieces is a
    merge, ranked by the merged piece's score (higher first), then by the shorter left part."""
    ranked = []
    for piece, score in scores.items():
        pairs = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        ranked.extend((score, len(left), len(right), left, right) for left, right in pairs)
    ranked.sort(key=lambda r: (r[0], r[1], r[2]), reverse=True)  # stable: ties keep the file's order
    return [(left, right) for _, _, _, left, right in ranked]


def _gguf_backend(meta: dict):
    """The `tokenizers.Tokenizer` a GGUF's tokenizer metadata describes."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens, types = meta["tokens"], meta["token_type"]
    if meta["model"] == "gpt2":
        table = _gpt2_bytes_to_unicode()
        alphabet = set(table.values())
        vocab = {
            t if set(t) <= alphabet else "".join(table[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)
        }
        merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
        backend = Tokenizer(
            models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
        )
        split = _GGUF_SPLITS.get(meta["pre"])
        if split is None:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        backend.decoder = decoders.ByteLevel()
        control_ok = lambda t: set(t) <= alphabet  # a control token outside the byte alphabet is a mislabel
    else:  # "llama": SentencePiece BPE
        vocab = {t: i for i, t in enumerate(tokens)}
        if meta["merges"]:
            merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
        else:
            scores = meta["scores"] or [0.0] * len(tokens)
            merges = _merges_from_scores(vocab, dict(zip(tokens, scores)))
        unk = meta["unk_token"] if meta["unk_token"] in vocab else None
        backend = Tokenizer(
            models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None)
        )
        prefix = meta["add_space_prefix"]
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
        )
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        backend.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
        control_ok = lambda t: True
    named = {meta[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")} - {None}
    special = [
        t
        for t, kind in zip(tokens, types or [0] * len(tokens))
        if (kind == _GGUF_CONTROL and control_ok(t)) or (t in named and t in vocab)
    ]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(special)])
    user = [t for t, kind in zip(tokens, types) if kind == _GGUF_USER_DEFINED and t in vocab]
    if user:
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    # bos / eos exactly when the file asks for them (add_special_tokens=True), in every transformers
    single, pair, specials = ["$A"], ["$A", "$B:1"], []
    for flag, key, at in ((meta["add_bos"], "bos_token", 0), (meta["add_eos"], "eos_token", None)):
        tok = meta[key]
        if flag and tok is not None and tok in vocab:
            if at == 0:
                single, pair = [tok, *single], [tok, pair[0], f"{tok}:1", pair[1]]
            else:
                single, pair = [*single, tok], [pair[0], tok, pair[1], f"{tok}:1"]
            specials.append((tok, backend.token_to_id(tok)))
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=list(dict.fromkeys(specials))
    )
    return backend


def _gguf_hf_tokenizer(path: str):
    """A transformers PreTrainedTokenizerFast for the GGUF's tokenizer; no PyTorch needed."""
    meta = _gguf_tokenizer_metadata(path)
    try:
        backend = _gguf_backend(meta)
    except Exception as e:
        raise UserError(
            f"{path}: cannot build a tokenizer from its GGUF metadata (tokenizer.ggml.model="
            f"{meta['model']!r}; {type(e).__name__}: {gguf_lib._one_line(e)}); pass "
            "--config.data.tokenizer=<a tokenizer directory>"
        ) from None
    from transformers import PreTrainedTokenizerFast

    extra = {"chat_template": meta["chat_template"]} if meta["chat_template"] else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{k: meta[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if meta[k] is not None},
        clean_up_tokenization_spaces=False,
        model_max_length=meta["context_length"] or 1_000_000_000,
        **extra,
    )


class GGUFTokenizer(HFTokenizer):
    """The GGUF's own tokenizer behind the HFTokenizer interface."""

    def __init__(self, hf_tokenizer, fingerprint: str, gguf_path: str, file_vocab_size: int):
        super().__init__(hf_tokenizer, fingerprint)
        self.gguf_path = gguf_path
        self.vocab_size = min(self.vocab_size, file_vocab_size)  # the vocabulary is the file's

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = super().encode(text, add_bos=add_bos)
        if ids and max(ids) >= self.vocab_size:
            bad = self.hf_tokenizer.convert_ids_to_tokens(max(ids))
            raise ValueError(
                f"{self.gguf_path}: the text contains {bad!r}, which the tokenizer maps to id "
                f"{max(ids)} past the file's {self.vocab_size} tokens"
            )
        return ids

    def save_pretrained(self, path, *, model_max_length: int | None = None) -> None:
        """tokenizer.json, tokenizer_config.json, special_tokens_map.json for a HF export."""
        save_tokenizer_files(self.hf_tokenizer, os.fspath(path), model_max_length=model_max_length)


def load_gguf_tokenizer(path):
    """The GGUF's tokenizer as an HFTokenizer (ids as AutoTokenizer(gguf_file=...))."""
    path = gguf_lib.resolve_checkpoint(path)
    hf_tok = _gguf_hf_tokenizer(path)
    digest = hashlib.sha256(hf_tok.backend_tokenizer.to_str().encode())
    digest.update(json.dumps([hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id]).encode())
    return GGUFTokenizer(
        hf_tok, f"gguf:{digest.hexdigest()[:16]}", path, gguf_lib._open(path).array_len("tokenizer.ggml.tokens")
    )


# What a tokenizer directory of ours holds, in a form every transformers from 4.51 to 5.x loads:
# tokenizer.json (the whole pipeline), a tokenizer_config.json naming PreTrainedTokenizerFast (a class
# every version has; transformers 5 writes "TokenizersBackend", which 4.x does not know) with the
# chat template inline (4.x reads it there, 5.x too), and special_tokens_map.json.
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def save_tokenizer_files(hf_tok, out_dir: str, *, model_max_length: int | None = None) -> None:
    """Write a fast transformers tokenizer as tokenizer.json + tokenizer_config.json +
    special_tokens_map.json that AutoTokenizer loads to the same ids in transformers 4.51 and 5.x."""
    os.makedirs(out_dir, exist_ok=True)
    hf_tok.backend_tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    special = {k: str(v) for k in _SPECIAL_KEYS if (v := getattr(hf_tok, k, None)) is not None}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(model_max_length or min(int(hf_tok.model_max_length), 1_000_000_000)),
    }
    template = getattr(hf_tok, "chat_template", None)
    if isinstance(template, str) and template:
        config["chat_template"] = template
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), special)


def write_gguf_side_files(gguf_path, out_dir, *, model_max_length: int | None = None) -> None:
    """Everything a HF export of a GGUF checkpoint needs besides config.json and the weights:
    tokenizer.json, tokenizer_config.json, special_tokens_map.json and generation_config.json.
    model_max_length: the tokenizer's (default: the file's context length)."""
    gguf_path = gguf_lib.resolve_checkpoint(gguf_path)
    out_dir = os.fspath(out_dir)
    save_tokenizer_files(_gguf_hf_tokenizer(gguf_path), out_dir, model_max_length=model_max_length)
    cfg = gguf_lib.hf_config(gguf_path)
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    _write_json(os.path.join(out_dir, "generation_config.json"), gen)
