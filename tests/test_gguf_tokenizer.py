"""The GGUF tokenizer lard_jax builds from llama.cpp metadata without PyTorch (lard_jax.tokenizer):
the same ids as transformers' own AutoTokenizer(gguf_file=...) for a SentencePiece vocabulary, a
byte-level BPE one with Llama 3's split and user-defined tokens; and the tokenizer directory it
exports loads in transformers without torch."""

import json
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from lard_jax import tokenizer as tokenizer_lib  # noqa: E402
from lard_jax.errors import UserError  # noqa: E402
from lard_jax.tokenizer import load_tokenizer  # noqa: E402
from tests.tiny_gguf import CORPUS, SENTENCES, train_bpe  # noqa: E402

TEXTS = SENTENCES + [
    "never seen: xylophone quartz jukebox",
    "<s>inline specials</s> and <think>tags</think>",
    "  two leading spaces, trailing  ",
    "digits 1234567 and it's THEY'LL",
    "",
]
BYTES = [f"<0x{b:02X}>" for b in range(256)]


def _write(path, tokens, *, model, types, merges=None, scores=None, pre=None, add_bos=None, template=None):
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {
        "block_count": 1,
        "context_length": 64,
        "embedding_length": 8,
        "feed_forward_length": 16,
        "attention.head_count": 2,
        "vocab_size": len(tokens),
    }.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<s>"))
    w.add_eos_token_id(tokens.index("</s>"))
    w.add_unk_token_id(tokens.index("<unk>"))
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if template is not None:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _sentencepiece_vocab():
    """A Llama-2 style vocabulary: <unk> <s> </s>, 256 byte tokens, then pieces with falling scores."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    pieces = sorted(tok.get_vocab(), key=tok.get_vocab().get)
    tokens = ["<unk>", "<s>", "</s>"] + BYTES + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf_tok")
    tokens, types, scores = _sentencepiece_vocab()
    (d / "spm").mkdir()
    _write(d / "spm" / "spm.gguf", tokens, model="llama", types=types, scores=scores)
    bpe_tokens, merges = train_bpe()
    bpe_tokens = bpe_tokens + ["<think>", "</think>"]
    bpe_types = [3 if t in ("<unk>", "<s>", "</s>") else 4 if "think" in t else 1 for t in bpe_tokens]
    (d / "llama3").mkdir()
    template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    _write(
        d / "llama3" / "l3.gguf",
        bpe_tokens,
        model="gpt2",
        pre="llama-bpe",
        types=bpe_types,
        merges=merges,
        add_bos=True,
        template=template,
    )
    return {"spm": d / "spm" / "spm.gguf", "llama3": d / "llama3" / "l3.gguf", "template": template}


@pytest.mark.parametrize("kind", ["spm", "llama3"])
def test_matches_transformers_gguf_tokenizer(files, kind):
    pytest.importorskip("torch")  # transformers' own GGUF reader, the reference, needs it
    from transformers import AutoTokenizer

    path = files[kind]
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = load_tokenizer(str(path))
    hf_ours = ours.hf_tokenizer
    for text in TEXTS:
        want = ref.encode(text, add_special_tokens=False)
        assert ours.encode(text) == want, text
        assert hf_ours(text)["input_ids"] == ref(text)["input_ids"], text  # bos as the file asks
        assert ours.decode(want) == ref.decode(want, skip_special_tokens=True), text
        assert hf_ours.decode(want) == ref.decode(want), text
    assert (ours.bos_id, ours.eos_id) == (ref.bos_token_id, ref.eos_token_id)


def test_byte_fallback_and_prefix(files):
    ours = load_tokenizer(str(files["spm"]))
    ids = ours.encode("\u265e")  # a character the corpus never had: its three UTF-8 bytes
    assert [ours.hf_tokenizer.convert_ids_to_tokens(i) for i in ids][-3:] == ["<0xE2>", "<0x99>", "<0x9E>"]
    assert ours.decode(ids) == "\u265e"
    assert ours.decode(ours.encode("a b  c")) == "a b  c"
    assert ours.hf_tokenizer("a")["input_ids"][0] == ours.bos_id  # llama.cpp adds bos to SentencePiece vocabularies


def test_no_torch_needed(files, tmp_path):
    """The whole GGUF tokenizer path, load and export, in a process where torch cannot be imported."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from lard_jax.tokenizer import load_tokenizer, write_gguf_side_files\n"
        f"t = load_tokenizer({str(files['llama3'])!r}); print(t.encode('hello <think>'))\n"
        f"write_gguf_side_files({str(files['llama3'])!r}, {str(tmp_path / 'out')!r})\n"
        "from transformers import AutoTokenizer\n"
        f"print(AutoTokenizer.from_pretrained({str(tmp_path / 'out')!r})('hello <think>')['input_ids'])\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    plain, loaded = (json.loads(line) for line in run.stdout.strip().splitlines()[-2:])
    ours = load_tokenizer(str(files["llama3"]))
    assert plain == ours.encode("hello <think>") and loaded == [ours.bos_id] + plain


def test_export_is_version_neutral(files, tmp_path):
    out = tmp_path / "out"
    tokenizer_lib.write_gguf_side_files(str(files["llama3"]), out, model_max_length=4096)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 4.x has no TokenizersBackend
    assert config["model_max_length"] == 4096 and config["chat_template"] == files["template"]
    assert not {"backend", "is_local", "local_files_only"} & set(config)
    assert sorted(p.name for p in out.iterdir()) == [
        "generation_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(out))
    ours = load_tokenizer(str(files["llama3"]))
    for text in TEXTS:
        assert loaded.encode(text, add_special_tokens=False) == ours.encode(text), text
    chat = loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<s>user: hi</s>"


def test_unsupported_tokenizer_model_is_one_line(files, tmp_path):
    tokens, types, scores = _sentencepiece_vocab()
    path = tmp_path / "rwkv.gguf"
    _write(path, tokens, model="rwkv", types=types, scores=scores)
    with pytest.raises(UserError) as e:
        load_tokenizer(str(path))
    msg = str(e.value)
    assert "\n" not in msg and "tokenizer.ggml.model='rwkv'" in msg and "--config.data.tokenizer" in msg


def test_merges_from_scores_rank_by_score_then_left_length():
    vocab = {t: i for i, t in enumerate(["a", "b", "c", "ab", "bc", "abc"])}
    scores = {"a": 0.0, "b": 0.0, "c": 0.0, "ab": -1.0, "bc": -0.5, "abc": -2.0}
    merges = tokenizer_lib._merges_from_scores(vocab, scores)
    assert merges == [("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]
    assert np.all([len(m) == 2 for m in merges])
