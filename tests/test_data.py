"""Document readers, the token cache and the block loader."""

import json
import os
import warnings

import numpy as np
import pytest

from lard_jax.data import BlockLoader, prepare_token_cache, read_documents, split_heldout
from lard_jax.tokenizer import ByteTokenizer


def _random_docs(rng, count, low, high):
    letters = list("abcdefghij klmnop\né漢")
    return ["".join(rng.choice(letters, size=int(rng.integers(low, high)))) for _ in range(count)]


def _write_txt_folder(folder, docs):
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"doc_{i:03d}.txt").write_text(doc, encoding="utf-8")
    return folder


class CountingTokenizer(ByteTokenizer):
    """ByteTokenizer without the array fast path, counting encode calls."""

    encode_array = None

    def __init__(self):
        self.calls = 0

    def encode(self, text, add_bos=False):
        self.calls += 1
        return [b + 3 for b in text.encode("utf-8")]


@pytest.fixture
def docs():
    return _random_docs(np.random.default_rng(21), 12, 30, 200)


@pytest.fixture
def cache(tmp_path, docs):
    return prepare_token_cache(
        _write_txt_folder(tmp_path / "src", docs), ByteTokenizer(), tmp_path / "cache", progress=False
    )


# ----------------------------------------------------------------------------- readers


def test_readers_agree_across_formats(tmp_path, docs):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    txt = _write_txt_folder(tmp_path / "txt", docs)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    table = pa.table({"body": docs})
    pq.write_table(table, tmp_path / "docs.parquet")
    with pa.OSFile(str(tmp_path / "docs.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)

    assert list(read_documents(txt)) == docs
    for path in ("docs.jsonl", "docs.parquet", "docs.arrow"):
        assert list(read_documents(tmp_path / path, text_field="body")) == docs


def test_saved_dataset_directory(tmp_path, docs):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": docs, "short_book_title": ["t"] * len(docs)}).save_to_disk(tmp_path / "pg19")
    assert list(read_documents(tmp_path / "pg19")) == docs


def test_reader_errors_name_file_and_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt: empty file"):
        list(read_documents(empty))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: invalid JSON"):
        list(read_documents(bad))

    missing_field = tmp_path / "fields.jsonl"
    missing_field.write_text('{"text": "a"}\n{"content": "b"}\n')
    with pytest.raises(ValueError, match=r"fields.jsonl:2: missing field 'text'.*content"):
        list(read_documents(missing_field))

    with pytest.raises(FileNotFoundError, match="nowhere"):
        list(read_documents(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- token cache


def test_cache_holds_every_document(cache, docs):
    tok = ByteTokenizer()
    assert cache.num_documents == len(docs)
    assert cache.tokens.dtype == np.uint16
    for i in (0, 5, len(docs) - 1):
        assert tok.decode(cache.document(i)) == docs[i]


def test_cache_reused_then_rebuilt_when_source_changes(tmp_path, docs):
    source = _write_txt_folder(tmp_path / "src", docs)
    counting = CountingTokenizer()
    first = prepare_token_cache(source, counting, tmp_path / "cache", progress=False)
    assert counting.calls == len(docs) and not first.reused

    second = prepare_token_cache(source, counting, tmp_path / "cache", progress=False)
    assert counting.calls == len(docs) and second.reused  # nothing retokenised
    np.testing.assert_array_equal(second.tokens, first.tokens)

    extra = "new text appended to one document"
    (source / "doc_003.txt").write_text(docs[3] + extra, encoding="utf-8")
    third = prepare_token_cache(source, counting, tmp_path / "cache", progress=False)
    assert counting.calls == 2 * len(docs) and not third.reused
    assert ByteTokenizer().decode(third.document(3)) == docs[3] + extra
    assert sorted(os.listdir(tmp_path)) == ["cache", "src"]  # no staging or old copies left


def test_failed_build_leaves_nothing(tmp_path, docs):
    source = _write_txt_folder(tmp_path / "src", docs)
    (source / "doc_zzz.txt").write_text("")  # read last, after a partial cache was written
    with pytest.raises(ValueError, match="doc_zzz.txt: empty file"):
        prepare_token_cache(source, ByteTokenizer(), tmp_path / "cache", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["src"]


# ----------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("mode", ["per_document", "packed"])
def test_batches_deterministic_and_split_across_hosts(cache, mode):
    global_batch, hosts = 4, 2
    single = BlockLoader(cache, seq_len=16, batch_size=global_batch, mode=mode, seed=7)
    shards = [
        BlockLoader(
            cache, seq_len=16, batch_size=global_batch // hosts, mode=mode, seed=7, host_index=h, host_count=hosts
        )
        for h in range(hosts)
    ]
    again = BlockLoader(cache, seq_len=16, batch_size=global_batch, mode=mode, seed=7)
    assert single.steps_per_epoch == shards[0].steps_per_epoch > 0
    # Steps in the first epoch, and later ones asked for out of order (resuming needs no history).
    for step in (0, 1, single.steps_per_epoch + 2, 1):
        batch = single.batch_at(step)
        for key, value in again.batch_at(step).items():
            np.testing.assert_array_equal(value, batch[key])
        parts = [s.batch_at(step) for s in shards]
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key])
        blocks = [set(s.block_indices_at(step).tolist()) for s in shards]
        assert not blocks[0] & blocks[1]
        assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape == (global_batch, 16)
        assert batch["mask"].dtype == bool and batch["segment_ids"].dtype == np.int32
    other_seed = BlockLoader(cache, seq_len=16, batch_size=global_batch, mode=mode, seed=8)
    assert not np.array_equal(other_seed.block_indices_at(0), single.block_indices_at(0))


def test_epoch_visits_each_block_once(cache):
    loader = BlockLoader(cache, seq_len=16, batch_size=3, mode="per_document", seed=3)
    seen = np.concatenate([loader.block_indices_at(s) for s in range(loader.steps_per_epoch)])
    assert len(np.unique(seen)) == len(seen) == loader.steps_per_epoch * 3


def test_per_document_blocks_are_document_slices(cache):
    tok = ByteTokenizer()
    loader = BlockLoader(cache, seq_len=16, batch_size=2, mode="per_document")
    expected = []
    for d in range(cache.num_documents):
        doc = cache.document(d)
        expected += [doc[i : i + 15] for i in range(0, len(doc) - 14, 15)]
    assert loader.num_blocks == len(expected)
    for i in (0, 1, loader.num_blocks - 1):
        ids, mask, segments = loader.block(i)
        assert ids[0] == tok.bos_id and mask.all() and (segments == 1).all()
        np.testing.assert_array_equal(ids[1:], expected[i])


def test_packed_blocks_rebuild_the_stream(cache):
    tok = ByteTokenizer()
    loader = BlockLoader(cache, seq_len=16, batch_size=2, mode="packed", pad_remainder=True)
    stream = np.concatenate(
        [np.concatenate([[tok.bos_id], cache.document(d), [tok.eos_id]]) for d in range(cache.num_documents)]
    )
    blocks = [loader.block(i) for i in range(loader.num_blocks)]
    ids = np.concatenate([b[0] for b in blocks])
    mask = np.concatenate([b[1] for b in blocks])
    np.testing.assert_array_equal(ids[mask], stream)
    assert not mask[len(stream) :].any() and mask[: len(stream)].all()
    for ids, mask, segments in blocks:
        # A new segment starts exactly after each eos inside the block.
        starts = np.flatnonzero(np.diff(segments[mask]) != 0) + 1
        np.testing.assert_array_equal(starts, np.flatnonzero(ids[mask][:-1] == tok.eos_id) + 1)
        assert segments[mask][0] == 1 and (segments[~mask] == 0).all()


def test_short_documents_dropped_padded_or_rejected(tmp_path):
    rng = np.random.default_rng(22)
    source = _write_txt_folder(tmp_path / "src", _random_docs(rng, 3, 5, 9) + _random_docs(rng, 2, 40, 60))
    cache = prepare_token_cache(source, ByteTokenizer(), tmp_path / "cache", progress=False)
    with pytest.warns(UserWarning, match="dropped 3 of 5 documents"):
        dropped = BlockLoader(cache, seq_len=20, batch_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        padded = BlockLoader(cache, seq_len=20, batch_size=1, pad_short=True)
    assert padded.num_blocks == dropped.num_blocks + 3
    short_blocks = [padded.block(i) for i in range(padded.num_blocks) if not padded.block(i)[1].all()]
    assert len(short_blocks) == 3 and all(b[0][~b[1]].tolist() == [0] * int((~b[1]).sum()) for b in short_blocks)

    with pytest.raises(ValueError, match=r"no block of 100 tokens can be formed from .*src"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            BlockLoader(cache, seq_len=100, batch_size=1)


def test_split_heldout_by_document():
    items = [f"doc{i}" for i in range(50)]
    train, held = split_heldout(items, 0.1, seed=4)
    assert len(held) == 5 and not set(train) & set(held) and sorted(train + held) == sorted(items)
    assert split_heldout(items, 0.1, seed=4) == (train, held)
    assert split_heldout(items, 0.1, seed=5)[1] != held
    train_ids, held_ids = split_heldout(range(10), 0.2, seed=0)
    assert len(held_ids) == 2 and not set(train_ids) & set(held_ids)


def test_loader_reads_only_training_documents(cache):
    train_ids, held_ids = split_heldout(range(cache.num_documents), 0.25, seed=1)
    loader = BlockLoader(cache, seq_len=16, batch_size=1, document_ids=train_ids)
    held_tokens = {tuple(cache.document(d)[i : i + 15]) for d in held_ids for i in range(len(cache.document(d)) - 14)}
    train_blocks = {tuple(loader.block(i)[0][1:]) for i in range(loader.num_blocks)}
    assert loader.num_blocks == sum(len(cache.document(d)) // 15 for d in train_ids)
    assert not train_blocks & held_tokens
