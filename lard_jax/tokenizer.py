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
class GGUFTokenizer(HFTokenizer):
    """The GGUF's own tokenizer (transformers' GGUF conversion) behind the HFTokenizer interface."""

    def __init__(self, hf_tokenizer, fingerprint: str, gguf_path: str, file_vocab_size: int):
        super().__init__(hf_tokenizer, fingerprint)
        self.gguf_path = gguf_path
        # transformers' byte-level class may add a default "<|endoftext|>" the file does not have
        # (an id past the model's embedding); the vocabulary is the file's.
        self.vocab_size = min(self.vocab_size, file_vocab_size)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = super().encode(text, add_bos=add_bos)
        if ids and max(ids) >= self.vocab_size:
            bad = self.hf_tokenizer.convert_ids_to_tokens(max(ids))
            raise ValueError(
                f"{self.gguf_path}: the text contains {bad!r}, which transformers' GGUF tokenizer "
                f"adds as id {max(ids)} past the file's {self.vocab_size} tokens"
            )
        return ids

    def save_pretrained(self, path) -> None:
        """tokenizer.json, tokenizer_config.json, special_tokens_map.json for a HF export."""
        _save_tokenizer_files(self.hf_tokenizer, os.fspath(path))


def _gguf_hf_tokenizer(path: str):
    f = gguf_lib._open(path)
    gguf_lib._architecture(f)
    model = f.get("tokenizer.ggml.model")
    if model is None or f.array_len("tokenizer.ggml.tokens") is None:
        raise UserError(
            f"{path}: GGUF metadata key 'tokenizer.ggml.tokens' is missing; the file carries "
            "no tokenizer, pass --config.data.tokenizer=<a tokenizer directory>"
        )
    from transformers import AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    try:
        return AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except Exception as e:
        raise UserError(
            f"{path}: transformers cannot build a tokenizer from this GGUF "
            f"(tokenizer.ggml.model={model!r}; {type(e).__name__}: {gguf_lib._one_line(e)})"
        ) from None


def load_gguf_tokenizer(path):
    """The GGUF's tokenizer as an HFTokenizer (ids as AutoTokenizer(gguf_file=...))."""
    path = gguf_lib.resolve_checkpoint(path)
    hf_tok = _gguf_hf_tokenizer(path)
    digest = hashlib.sha256(hf_tok.backend_tokenizer.to_str().encode())
    digest.update(json.dumps([hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id]).encode())
    return GGUFTokenizer(
        hf_tok, f"gguf:{digest.hexdigest()[:16]}", path, gguf_lib._open(path).array_len("tokenizer.ggml.tokens")
    )


def _save_tokenizer_files(hf_tok, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    hf_tok.save_pretrained(out_dir)
    special = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = getattr(hf_tok, key, None)
        if value is not None:
            special[key] = str(value)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as fh:
        json.dump(special, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


def write_gguf_side_files(gguf_path, out_dir) -> None:
    """Everything a HF export of a GGUF checkpoint needs besides config.json and the weights:
    tokenizer.json, tokenizer_config.json, special_tokens_map.json and generation_config.json."""
    gguf_path = gguf_lib.resolve_checkpoint(gguf_path)
    out_dir = os.fspath(out_dir)
    _save_tokenizer_files(_gguf_hf_tokenizer(gguf_path), out_dir)
    cfg = gguf_lib.hf_config(gguf_path)
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as fh:
        json.dump(gen, fh, indent=2)
        fh.write("\n")
