"""Training text: documents from disk -> a token cache on disk -> fixed-length blocks per step.

Three stages, each a pure function of its inputs:

1. `read_documents(source)` yields one string per document from plain text (*.txt, one document
   per file), JSONL (one record per line, a `text` field by default), Parquet / Arrow files, or a
   `datasets.save_to_disk` directory (PG-19 layout: one book per record, field `text`).
2. `prepare_token_cache(source, tokenizer, cache_dir)` tokenises every document once into
   `tokens.bin` (a flat uint16/uint32 memmap, no special tokens), `doc_offsets.npy` (document d
   is tokens[offsets[d]:offsets[d+1]]) and `manifest.json` (source files with sizes and mtimes,
   tokenizer fingerprint). A later call with the same source and tokenizer reuses it; anything
   else rebuilds it. The cache is written to a temporary directory and renamed into place.
3. `BlockLoader(cache, seq_len=..., batch_size=..., mode=...)` cuts the cache into blocks and
   serves `batch_at(step)`, a pure function of (seed, step, host): the block order is a fresh
   permutation per epoch, and each host takes a disjoint slice of every global batch.

Block modes:
- "per_document": every document is split into blocks on its own (the LinearARD recipe: PG-19
  books in 4096-token blocks). With add_bos, bos="document" (the authors' data_loader.py) puts bos
  once before the document, which is then cut into blocks (only a first block starts with bos);
  bos="every_block" starts every block with bos. The tail shorter than a
  block is dropped (or padded with `pad_remainder=True`); documents shorter than one block are
  dropped with a warning (or padded with `pad_short=True`).
- "packed": documents joined as [bos] doc [eos] [bos] doc [eos] ... and cut every seq_len
  tokens; `segment_ids` number the documents inside a block (1, 2, ...) so attention and relation
  kernels can keep them apart. Padding always has segment id 0 and mask False.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lard_jax.errors import UserError

__all__ = [
    "read_documents",
    "source_fingerprint",
    "prepare_token_cache",
    "TokenCache",
    "BlockLoader",
    "split_heldout",
]

_CACHE_FORMAT = "lard_jax.token_cache/v1"
_FILE_SUFFIXES = (".txt", ".jsonl", ".parquet", ".arrow")
_MODES = ("per_document", "packed")


# ----------------------------------------------------------------------------- reading sources


def read_documents(source: str | os.PathLike, *, text_field: str = "text") -> Iterator[str]:
    """Yields the documents of `source` (a file or a folder) in a fixed order."""
    for kind, path in _resolve_source(os.fspath(source)):
        yield from _READERS[kind](path, text_field)


def source_fingerprint(source: str | os.PathLike, *, text_field: str = "text") -> dict:
    """What identifies the content of `source`: every backing file with its size and mtime."""
    files = []
    for _, path in _resolve_source(os.fspath(source)):
        backing = [path] if os.path.isfile(path) else sorted(_walk_files(path))
        for file_path in backing:
            stat = os.stat(file_path)
            files.append([os.path.abspath(file_path), stat.st_size, stat.st_mtime_ns])
    return {"path": os.path.abspath(os.fspath(source)), "text_field": text_field, "files": files}


def _resolve_source(source: str) -> list[tuple[str, str]]:
    """(reader kind, path) pairs, sorted so the document order never depends on the filesystem."""
    if not os.path.exists(source):
        raise FileNotFoundError(f"data source not found: {source!r}")
    if os.path.isfile(source):
        return [(_file_kind(source), source)]
    if os.path.isfile(os.path.join(source, "dataset_dict.json")):
        splits = sorted(d for d in os.listdir(source) if os.path.isdir(os.path.join(source, d)))
        raise ValueError(
            f"{source} is a DatasetDict with splits {splits}; point the source at one split, "
            f"e.g. {os.path.join(source, splits[0] if splits else 'train')}"
        )
    if _is_saved_dataset(source):
        return [("saved_dataset", source)]
    found, skipped = [], []
    for path in sorted(_walk_files(source)):
        if path.endswith(_FILE_SUFFIXES):
            found.append((_file_kind(path), path))
        elif not os.path.splitext(os.path.basename(path))[1]:  # no extension: text if it reads as UTF-8
            (found.append(("txt", path)) if _sniff_text(path) else skipped.append(path))
    note = (
        f"; skipped {len(skipped)} binary or empty file(s) without an extension, e.g. {skipped[0]}" if skipped else ""
    )
    if not found:
        raise UserError(
            f"{source}: folder holds no documents (looked for {', '.join(_FILE_SUFFIXES)} files and "
            f"UTF-8 text files without an extension{note}); point the source at text documents"
        )
    if skipped:
        warnings.warn(f"{source}{note[1:]}", stacklevel=2)
    return found


def _sniff_text(path: str, size: int = 1 << 16) -> bool:
    """A file without an extension counts as a text document if its start is non-empty UTF-8 without NUL bytes."""
    import codecs

    with open(path, "rb") as f:
        head = f.read(size)
    if not head.strip() or b"\0" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at `size` is fine
    except UnicodeDecodeError:
        return False
    return True


def _walk_files(folder: str) -> Iterator[str]:
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if not name.startswith("."):
                yield os.path.join(root, name)


def _is_saved_dataset(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "state.json")) and os.path.isfile(
        os.path.join(folder, "dataset_info.json")
    )


def _file_kind(path: str) -> str:
    for suffix in _FILE_SUFFIXES:
        if path.endswith(suffix):
            return suffix[1:]
    if not os.path.splitext(os.path.basename(path))[1] and _sniff_text(path):
        return "txt"  # a text file without an extension
    raise UserError(
        f"{path}: unsupported file type (expected one of {', '.join(_FILE_SUFFIXES)}, or UTF-8 text "
        "without an extension); convert it, or point the source at a supported file or folder"
    )


def _read_txt(path: str, text_field: str) -> Iterator[str]:
    del text_field  # a text file is one document
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as error:
        raise UserError(
            f"{path}: not valid UTF-8 (byte 0x{error.object[error.start]:02x} at offset {error.start}); "
            "re-encode the file as UTF-8 or remove it from the source"
        ) from None
    if not text.strip():
        raise UserError(f"{path}: empty file; remove it from the source")
    yield text


def jsonl_records(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; errors name the file and line."""
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UserError(
                    f"{path}:{line_number}: not valid UTF-8 (byte 0x{raw[error.start]:02x}); re-encode "
                    "the file as UTF-8"
                ) from None
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) carry no record
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: invalid JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            yield line_number, record


def _read_jsonl(path: str, text_field: str) -> Iterator[str]:
    records = 0
    for line_number, record in jsonl_records(path):
        if text_field not in record:
            raise ValueError(
                f"{path}:{line_number}: missing field {text_field!r} (fields: {', '.join(sorted(record))})"
            )
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(f"{path}:{line_number}: field {text_field!r} is {type(text).__name__}, not a string")
        records += 1
        yield text
    if records == 0:
        raise UserError(
            f'{path}: empty file (no JSON records); write one JSON object per line, e.g. {{"{text_field}": "..."}}, '
            "or remove the file from the source"
        )


def _read_table_column(path: str, text_field: str, batches: Iterator[Any], column_names: list[str]) -> Iterator[str]:
    if text_field not in column_names:
        raise ValueError(f"{path}: missing column {text_field!r} (columns: {', '.join(column_names)})")
    rows = 0
    for batch in batches:
        for text in batch.column(text_field).to_pylist():
            if not isinstance(text, str):
                raise ValueError(f"{path}: row {rows}: {text_field!r} is {type(text).__name__}, not a string")
            rows += 1
            yield text
    if rows == 0:
        raise UserError(
            f"{path}: empty file (no rows); add rows with a {text_field!r} column, or remove it from the source"
        )


def _read_parquet(path: str, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    batches = parquet.iter_batches(columns=[text_field]) if text_field in names else iter(())
    yield from _read_table_column(path, text_field, batches, names)


def _read_arrow(path: str, text_field: str) -> Iterator[str]:
    import pyarrow as pa

    source = pa.memory_map(path)
    try:  # `datasets` writes the streaming format; plain pyarrow users often write the file format
        reader = pa.ipc.open_file(source)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        source.seek(0)
        reader = pa.ipc.open_stream(source)
        batches = iter(reader)
    yield from _read_table_column(path, text_field, batches, reader.schema.names)


def _read_saved_dataset(path: str, text_field: str) -> Iterator[str]:
    import datasets

    dataset = datasets.load_from_disk(path)
    if text_field not in dataset.column_names:
        raise ValueError(f"{path}: missing column {text_field!r} (columns: {', '.join(dataset.column_names)})")
    if len(dataset) == 0:
        raise UserError(f"{path}: empty dataset (no rows); save one with rows, or point the source elsewhere")
    for batch in dataset.select_columns([text_field]).iter(batch_size=64):
        for value in batch[text_field]:
            if not isinstance(value, str):
                raise ValueError(f"{path}: a {text_field!r} value is {type(value).__name__}, not a string")
            yield value


_READERS = {
    "txt": _read_txt,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
    "arrow": _read_arrow,
    "saved_dataset": _read_saved_dataset,
}


# ----------------------------------------------------------------------------- token cache


@dataclasses.dataclass(frozen=True)
class TokenCache:
    """Every document's token ids, back to back in one memmap (no bos/eos inside)."""

    path: str
    tokens: np.ndarray  # [num_tokens] uint16 or uint32
    doc_offsets: np.ndarray  # [num_documents + 1] int64
    manifest: dict
    reused: bool = False  # True when `prepare_token_cache` found it up to date

    @classmethod
    def load(cls, path: str | os.PathLike, *, reused: bool = False) -> TokenCache:
        path = os.fspath(path)
        manifest = _read_manifest(path)
        if manifest is None:
            raise FileNotFoundError(f"no token cache at {path!r} (manifest.json missing)")
        dtype = np.dtype(manifest["dtype"])
        if manifest["num_tokens"] > 0:
            tokens = np.memmap(os.path.join(path, "tokens.bin"), dtype=dtype, mode="r", shape=(manifest["num_tokens"],))
        else:
            tokens = np.zeros((0,), dtype)  # np.memmap refuses empty files
        doc_offsets = np.load(os.path.join(path, "doc_offsets.npy"))
        return cls(path=path, tokens=tokens, doc_offsets=doc_offsets, manifest=manifest, reused=reused)

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.doc_offsets[-1])

    @property
    def source(self) -> str:
        return self.manifest["source"]["path"]

    @property
    def bos_id(self) -> int | None:
        return self.manifest["tokenizer"]["bos_id"]

    @property
    def eos_id(self) -> int | None:
        return self.manifest["tokenizer"]["eos_id"]

    @property
    def pad_id(self) -> int:
        return self.manifest["tokenizer"]["pad_id"]

    def document_lengths(self) -> np.ndarray:
        return np.diff(self.doc_offsets)

    def document(self, index: int) -> np.ndarray:
        return np.asarray(self.tokens[self.doc_offsets[index] : self.doc_offsets[index + 1]])


def prepare_token_cache(
    source: str | os.PathLike,
    tokenizer: Any,
    cache_dir: str | os.PathLike,
    *,
    text_field: str = "text",
    progress: bool = True,
) -> TokenCache:
    """Tokenises `source` into `cache_dir` once; returns the cache (reused while source and tokenizer match).

    `cache_dir` belongs to this one cache: a stale cache there is replaced, but a non-empty
    directory that is not a token cache is refused rather than deleted.
    """
    cache_dir = os.path.abspath(os.fspath(cache_dir))
    identity = {
        "format": _CACHE_FORMAT,
        "source": source_fingerprint(source, text_field=text_field),
        "tokenizer": _tokenizer_identity(tokenizer),
    }
    existing = _read_manifest(cache_dir)
    if existing is not None and all(existing.get(k) == v for k, v in identity.items()):
        return TokenCache.load(cache_dir, reused=True)
    if os.path.isdir(cache_dir) and existing is None and os.listdir(cache_dir):
        raise ValueError(f"{cache_dir} exists and is not a token cache; refusing to overwrite it")

    parent = os.path.dirname(cache_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(cache_dir)}.tmp-", dir=parent)
    try:
        _write_cache(staging, source, tokenizer, identity, text_field, progress)
        _replace_directory(staging, cache_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return TokenCache.load(cache_dir)


def _tokenizer_identity(tokenizer: Any) -> dict:
    fingerprint = getattr(tokenizer, "fingerprint", None)
    if fingerprint is None:  # a tokenizer without one is keyed on its class and vocabulary size
        fingerprint = f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}"
    pad_id = getattr(tokenizer, "pad_id", None)
    return {
        "fingerprint": fingerprint,
        "vocab_size": int(tokenizer.vocab_size),
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": 0 if pad_id is None else int(pad_id),
    }


def _write_cache(folder: str, source, tokenizer, identity: dict, text_field: str, progress: bool) -> None:
    vocab_size = identity["tokenizer"]["vocab_size"]
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    encode_array = getattr(tokenizer, "encode_array", None)
    lengths = []
    with open(os.path.join(folder, "tokens.bin"), "wb") as out:
        documents = read_documents(source, text_field=text_field)
        for text in tqdm(
            documents, desc=f"tokenising {os.path.basename(os.fspath(source))}", unit="doc", disable=not progress
        ):
            ids = np.asarray(encode_array(text) if encode_array else tokenizer.encode(text), dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise ValueError(f"tokenizer produced id {int(ids.max())} outside its vocabulary of {vocab_size}")
            out.write(ids.astype(dtype).tobytes())
            lengths.append(ids.size)
    doc_offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=doc_offsets[1:])
    np.save(os.path.join(folder, "doc_offsets.npy"), doc_offsets)
    manifest = {
        **identity,
        "dtype": dtype.name,
        "num_tokens": int(doc_offsets[-1]),
        "num_documents": len(lengths),
    }
    with open(os.path.join(folder, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)  # written last: a folder without it is never read as a cache


def _read_manifest(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == _CACHE_FORMAT else None


def _replace_directory(new: str, target: str) -> None:
    """Puts `new` at `target`; an old cache there is moved aside first, then deleted."""
    if not os.path.exists(target):
        os.rename(new, target)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
    os.rmdir(old)
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- blocks and batches


class BlockLoader:
    """Fixed-length blocks from a `TokenCache`, served as deterministic per-host batches.

    `batch_at(step)` depends only on (seed, step, host_index, host_count, options): epoch e uses
    permutation `default_rng([seed, e])` of all blocks; global batch s of that epoch is the slice
    [s * G, (s + 1) * G) with G = batch_size * host_count, and host h takes the h-th run of
    `batch_size` blocks of it. Blocks that do not fill the last global batch of an epoch are
    skipped in that epoch (a different permutation next epoch covers them).
    """

    def __init__(
        self,
        cache: TokenCache,
        *,
        seq_len: int,
        batch_size: int,
        mode: str = "per_document",
        seed: int = 0,
        host_index: int = 0,
        host_count: int = 1,
        add_bos: bool = True,
        bos: str = "every_block",
        pad_short: bool = False,
        pad_remainder: bool = False,
        document_ids: Sequence[int] | None = None,
    ):
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if bos not in ("document", "every_block"):
            raise ValueError(f"bos must be 'document' or 'every_block', got {bos!r}")
        if seq_len < 2 or batch_size < 1:
            raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len} and {batch_size}")
        if not 0 <= host_index < host_count:
            raise ValueError(f"host_index {host_index} is not in [0, {host_count})")
        if add_bos and cache.bos_id is None:
            raise ValueError("add_bos=True but the cache's tokenizer has no bos token")
        if mode == "packed" and cache.eos_id is None:
            raise ValueError("packed mode separates documents with eos, but the tokenizer has none")
        self.cache = cache
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.mode = mode
        self.seed = seed
        self.host_index = host_index
        self.host_count = host_count
        self.add_bos = add_bos
        self.bos = bos  # per_document only; packed mode always frames documents as [bos] doc [eos]
        self.pad_remainder = pad_remainder
        ids = np.arange(cache.num_documents) if document_ids is None else np.asarray(document_ids, np.int64)
        lengths = cache.document_lengths()[ids]
        self.document_ids = ids[lengths > 0]  # empty documents carry nothing in either mode
        self.dropped_documents = 0
        if mode == "per_document":
            self._starts, self._counts, self._has_bos = self._per_document_blocks(pad_short)
        else:
            self._build_packed_stream()
        self._check_enough_blocks(lengths)  # too few blocks: one error, no warning before it
        if self.dropped_documents:
            warnings.warn(
                f"{self.cache.source}: dropped {self.dropped_documents} of {len(self.document_ids)} documents "
                f"shorter than a block of {self.seq_len} tokens (pad_short=True keeps them, padded)",
                stacklevel=2,
            )
        self._permutation_epoch = -1
        self._permutation = np.zeros(0, np.int64)

    # -- the block index

    def _per_document_blocks(self, pad_short: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(start in cache.tokens, number of document tokens, starts with bos) for every block.

        Blocks cut the framed document: bos="every_block": each block is [bos] + seq_len - 1 tokens;
        bos="document": [bos] + document cut every seq_len tokens."""
        lead = int(self.add_bos)
        every = self.bos == "every_block"
        body = self.seq_len - lead if every else self.seq_len  # framed positions per block
        starts_doc = self.cache.doc_offsets[self.document_ids]
        lengths = self.cache.doc_offsets[self.document_ids + 1] - starts_doc
        framed = lengths if every else lengths + lead
        full = framed // body
        doc_of_block = np.repeat(np.arange(len(lengths)), full)
        k = np.arange(len(doc_of_block)) - np.repeat(np.cumsum(full) - full, full)  # block index in its document
        if every:
            has_bos = [np.full(len(k), bool(lead))]
            starts = [starts_doc[doc_of_block] + k * body]
        else:
            has_bos = [(k == 0) & bool(lead)]
            starts = [starts_doc[doc_of_block] + np.maximum(k * body - lead, 0)]
        counts = [body - has_bos[0].astype(np.int64) * int(not every)]  # bos of a first block takes a slot
        remainder = framed - full * body
        tail = (remainder > 0) & (full > 0) & self.pad_remainder
        short = full == 0
        starts += [starts_doc[tail] + full[tail] * body - (0 if every else lead)]
        counts += [remainder[tail]]
        has_bos += [np.full(int(tail.sum()), every and bool(lead))]
        if pad_short:
            starts += [starts_doc[short]]
            counts += [lengths[short]]
            has_bos += [np.full(int(short.sum()), bool(lead))]
        else:
            self.dropped_documents = int(short.sum())  # warned about in __init__ unless it becomes an error
        starts, counts, has_bos = np.concatenate(starts), np.concatenate(counts), np.concatenate(has_bos)
        order = np.argsort(starts, kind="stable")
        return starts[order], counts[order], has_bos[order]

    def _build_packed_stream(self) -> None:
        """The virtual stream [bos] doc [eos] ...: where each document starts in it."""
        lengths = self.cache.document_lengths()[self.document_ids]
        framed = lengths + int(self.add_bos) + 1
        self._stream_starts = np.concatenate([[0], np.cumsum(framed)]).astype(np.int64)
        total = int(self._stream_starts[-1])
        full, remainder = divmod(total, self.seq_len)
        self._num_packed_blocks = full + int(self.pad_remainder and remainder > 0)

    def _check_enough_blocks(self, lengths: np.ndarray) -> None:
        global_batch = self.batch_size * self.host_count
        if self.num_blocks == 0:
            longest = int(lengths.max()) if len(lengths) else 0
            # the facts only: the caller (lard_jax.plan) adds the remedies in its own terms, once
            raise ValueError(
                f"no block of {self.seq_len} tokens can be formed from {self.cache.source}: "
                f"{len(lengths)} document(s), the longest {longest} tokens"
            )
        if self.num_blocks < global_batch:
            raise ValueError(
                f"{self.cache.source}: only {self.num_blocks} blocks of {self.seq_len} tokens, fewer than "
                f"one global batch of {global_batch} ({self.batch_size} per host x {self.host_count} hosts)"
            )

    @property
    def num_blocks(self) -> int:
        return len(self._starts) if self.mode == "per_document" else self._num_packed_blocks

    @property
    def steps_per_epoch(self) -> int:
        return self.num_blocks // (self.batch_size * self.host_count)

    # -- one block

    def block(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids int32, mask bool, segment_ids int32), each [seq_len], of block `index`."""
        if self.mode == "per_document":
            return self._document_block(index)
        return self._packed_block(index)

    def _document_block(self, index: int):
        ids = np.full(self.seq_len, self.cache.pad_id, np.int32)
        start, count = int(self._starts[index]), int(self._counts[index])
        offset = int(self._has_bos[index])
        if offset:
            ids[0] = self.cache.bos_id
        ids[offset : offset + count] = self.cache.tokens[start : start + count]
        mask = np.arange(self.seq_len) < offset + count
        return ids, mask, mask.astype(np.int32)

    def _packed_block(self, index: int):
        ids = np.full(self.seq_len, self.cache.pad_id, np.int32)
        segment_ids = np.zeros(self.seq_len, np.int32)
        lo, hi = index * self.seq_len, (index + 1) * self.seq_len
        first = int(np.searchsorted(self._stream_starts, lo, side="right")) - 1
        doc = first
        while doc < len(self.document_ids) and self._stream_starts[doc] < hi:
            doc_lo, doc_hi = int(self._stream_starts[doc]), int(self._stream_starts[doc + 1])
            piece_lo, piece_hi = max(lo, doc_lo), min(hi, doc_hi)
            ids[piece_lo - lo : piece_hi - lo] = self._framed_document(doc, piece_lo - doc_lo, piece_hi - doc_lo)
            segment_ids[piece_lo - lo : piece_hi - lo] = doc - first + 1
            doc += 1
        return ids, segment_ids > 0, segment_ids

    def _framed_document(self, doc: int, lo: int, hi: int) -> np.ndarray:
        """Positions [lo, hi) of [bos] + document + [eos]."""
        offset = int(self.add_bos)
        cache_id = self.document_ids[doc]
        start, end = int(self.cache.doc_offsets[cache_id]), int(self.cache.doc_offsets[cache_id + 1])
        framed = np.full(hi - lo, self.cache.eos_id, np.int32)
        body_lo, body_hi = max(lo, offset), min(hi, offset + end - start)
        if body_hi > body_lo:
            framed[body_lo - lo : body_hi - lo] = self.cache.tokens[start + body_lo - offset : start + body_hi - offset]
        if self.add_bos and lo == 0:
            framed[0] = self.cache.bos_id
        return framed

    # -- batches

    def block_indices_at(self, step: int) -> np.ndarray:
        """The block indices this host reads at `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        if epoch != self._permutation_epoch:  # memo only: the result never depends on call order
            self._permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)
            self._permutation_epoch = epoch
        global_batch = self.batch_size * self.host_count
        first = step_in_epoch * global_batch + self.host_index * self.batch_size
        return self._permutation[first : first + self.batch_size]

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        blocks = [self.block(int(i)) for i in self.block_indices_at(step)]
        return {
            "input_ids": np.stack([b[0] for b in blocks]),
            "mask": np.stack([b[1] for b in blocks]),
            "segment_ids": np.stack([b[2] for b in blocks]),
        }


def split_heldout(documents: Sequence[Any], fraction: float, seed: int) -> tuple[list, list]:
    """(train, heldout): a random `fraction` of whole documents held out, both in original order.

    Pass `range(cache.num_documents)` to split a token cache by document id, then give the
    train ids to `BlockLoader(document_ids=...)` and the held-out ones to the evaluation.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    count = len(documents)
    heldout_count = int(round(fraction * count))
    if fraction > 0 and heldout_count == 0 and count >= 2:
        heldout_count = 1  # a requested held-out set is never silently empty
    if heldout_count >= count and count > 0:
        raise ValueError(f"holding out {heldout_count} of {count} documents leaves none for training")
    heldout = np.zeros(count, bool)
    heldout[np.random.default_rng(seed).permutation(count)[:heldout_count]] = True
    train = [documents[i] for i in range(count) if not heldout[i]]
    held = [documents[i] for i in range(count) if heldout[i]]
    return train, held
