"""ByteTokenizer ids, its Hugging Face export, and load_tokenizer."""

import json
import os

import numpy as np
import pytest

from lard_jax.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

# Code points from several scripts, emoji (4-byte UTF-8), controls and the special-token spellings.
_ALPHABET = list("aZ09 \n\t.,é漢字😀🤖ß∑") + ["<s>", "</s>", "<pad>", "\x00", "\r\n"]


def _random_text(rng, size):
    return "".join(rng.choice(_ALPHABET, size=size))


@pytest.fixture(scope="module")
def saved_byte_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("byte_tokenizer")
    ByteTokenizer().save_pretrained(path)
    return path


def test_byte_ids_and_roundtrip():
    rng = np.random.default_rng(11)
    tok = ByteTokenizer()
    text = _random_text(rng, 200)
    ids = tok.encode(text)
    assert ids == [b + 3 for b in text.encode("utf-8")]
    assert tok.encode(text, add_bos=True) == [tok.bos_id] + ids
    assert tok.decode(ids) == text
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)


def test_byte_decode_skips_specials_and_replaces_bad_utf8():
    tok = ByteTokenizer()
    truncated_kanji = [0xE6 + 3, 0x97 + 3]  # first two of the three bytes of a CJK character
    assert tok.decode([tok.bos_id, ord("A") + 3, tok.eos_id, tok.pad_id]) == "A"
    assert tok.decode(truncated_kanji + [ord("b") + 3]) == "\ufffdb"


def test_saved_byte_tokenizer_loads_in_transformers_with_same_ids(saved_byte_dir):
    from transformers import AutoTokenizer

    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(os.listdir(saved_byte_dir))
    hf = AutoTokenizer.from_pretrained(saved_byte_dir, local_files_only=True)
    tok = ByteTokenizer()
    rng = np.random.default_rng(12)
    for size in (1, 37, 300):
        text = _random_text(rng, size)
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf(text)["input_ids"] == tok.encode(text, add_bos=True)  # bos by default, like LLaMA
        assert hf.decode(tok.encode(text)) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, len(hf)) == (1, 2, 0, 259)


def test_load_tokenizer_spec(saved_byte_dir, tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    assert isinstance(load_tokenizer(saved_byte_dir), ByteTokenizer)  # recognised without transformers
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        load_tokenizer(missing)


def test_hf_adapter_matches_interface(saved_byte_dir, tmp_path):
    # The same vocabulary without the marker goes through AutoTokenizer and the adapter.
    plain = tmp_path / "plain_hf"
    plain.mkdir()
    for name in os.listdir(saved_byte_dir):
        (plain / name).write_bytes((saved_byte_dir / name).read_bytes())
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["lard_jax_tokenizer"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))

    tok = load_tokenizer(plain)
    assert isinstance(tok, HFTokenizer)
    reference = ByteTokenizer()
    text = _random_text(np.random.default_rng(13), 120)
    assert tok.encode(text) == reference.encode(text)
    assert tok.encode(text, add_bos=True) == reference.encode(text, add_bos=True)
    assert tok.decode(reference.encode(text, add_bos=True) + [reference.eos_id]) == text
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 1, 2, 0)
    assert tok.fingerprint.startswith("hf:") and tok.fingerprint != reference.fingerprint
