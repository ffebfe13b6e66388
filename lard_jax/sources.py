"""English documents every Python install has: the builtin text sources and the corpus split rule.

`builtin_documents(split)` gives Python's bundled pydoc topics and the standard library's docstrings,
cleaned, deduplicated and split by `is_heldout` (a hash of each document's id, so the rule needs no
state). The shipped tiny teacher was pretrained with exactly this rule (experiments/build_corpus.py
builds the larger corpus from these plus Debian text packages), so its held-out documents are never
ones it trained on; `builtin:train` and `builtin:heldout` data sources read from here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import pkgutil
import re
import sys
import unicodedata
import warnings
from collections.abc import Iterable, Iterator

from lard_jax.errors import UserError

HELDOUT_PER_10K = 500  # 5% of documents, by a hash of their id: enough built-in held-out text (~60 kB) for the demo
MIN_CHARS = 400  # shorter documents are mostly headings, stubs and one-line docstrings
SHINGLE_WORDS = 13  # decontamination n-gram, as GPT-3 (Brown et al. 2020, appendix C)
ALL_SOURCES = ("pydoc", "stdlib", "bible", "pydocs", "debref", "gnu")
BUILTIN_SOURCES = ("pydoc", "stdlib")


@dataclasses.dataclass(frozen=True)
class Document:
    id: str  # "<source>:<name>", unique; decides the split
    source: str
    text: str


# ----------------------------------------------------------------------------- cleaning and split

_ASCII_PUNCT = {
    "\u2018": "'",
    "\u2019": "'",
    "\u201a": "'",
    "\u201b": "'",
    "\u2032": "'",
    "\u201c": '"',
    "\u201d": '"',
    "\u201e": '"',
    "\u00ab": '"',
    "\u00bb": '"',
    "\u2013": "-",
    "\u2014": "--",
    "\u2212": "-",
    "\u2010": "-",
    "\u2011": "-",
    "\u2026": "...",
    "\u2022": "*",
    "\u00b7": "*",
    "\u2192": "->",
    "\u21d2": "=>",
    "\u00a0": " ",
    "\u202f": " ",
    "\u2009": " ",
    "\u200b": "",
    "\u00b6": "",
    "\ufeff": "",
    "\u00d7": "x",
    "\u2264": "<=",
    "\u2265": ">=",
    "\u2260": "!=",
    "\u00a9": "(c)",
}
_ASCII_TABLE = str.maketrans(_ASCII_PUNCT)


def clean_text(text: str) -> str:
    """Light ASCII normalisation: typographic punctuation to ASCII, accents dropped (NFKD), other
    non-ASCII and control characters removed; spaces and tabs collapsed, lines stripped, and at
    most one blank line between paragraphs. Byte-level models then see one byte per character."""
    text = unicodedata.normalize("NFKD", text.translate(_ASCII_TABLE))
    text = "".join(c for c in text if (" " <= c <= "~") or c == "\n" or c == "\t")
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def is_heldout(doc_id: str) -> bool:
    """The split rule: stateless, so the same id lands in the same split on every machine."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 10_000 < HELDOUT_PER_10K


def split_of(doc_id: str) -> str:
    return "heldout" if is_heldout(doc_id) else "train"


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _shingles(words: list[str]) -> set[int]:
    return {hash(tuple(words[i : i + SHINGLE_WORDS])) for i in range(len(words) - SHINGLE_WORDS + 1)}


def decontaminate(train: list[Document], heldout: list[Document]) -> tuple[list[Document], int]:
    """Drops each training paragraph whose 13-word shingles are at least half held-out shingles.

    Returns the cleaned training documents (short leftovers dropped) and the bytes removed."""
    seen = set()
    for doc in heldout:
        seen |= _shingles(_words(doc.text))
    kept, removed = [], 0
    for doc in train:
        paragraphs = []
        for paragraph in doc.text.split("\n\n"):
            shingles = _shingles(_words(paragraph))
            if shingles and len(shingles & seen) * 2 >= len(shingles):
                removed += len(paragraph) + 2
            else:
                paragraphs.append(paragraph)
        text = "\n\n".join(paragraphs)
        if len(text) >= MIN_CHARS:
            kept.append(dataclasses.replace(doc, text=text))
        else:
            removed += len(text)
    return kept, removed


# ----------------------------------------------------------------------------- built-in sources


def pydoc_documents() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(f"pydoc:{name}", "pydoc", topics[name])


# Modules whose import opens windows or browsers, prints, or is slow or huge for no text.
_STDLIB_DENY = {
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "test",
    "__main__",
    "__hello__",
    "__phello__",
    "pydoc_data",
    "ensurepip",
    "lib2to3",
    "msilib",
    "winreg",
    "winsound",
    "msvcrt",
    "_msi",
    "nt",
    "_winapi",
    "encodings",
}


def _stdlib_module_names() -> list[str]:
    names = []
    for top in sorted(getattr(sys, "stdlib_module_names", ())):
        if top.startswith("_") or top in _STDLIB_DENY:
            continue
        names.append(top)
        spec = importlib.util.find_spec(top) if _safe_find(top) else None
        if spec is not None and spec.submodule_search_locations:
            for info in sorted(pkgutil.iter_modules(spec.submodule_search_locations), key=lambda i: i.name):
                if not info.name.startswith("_") and info.name not in {"test", "tests", "idle_test"}:
                    names.append(f"{top}.{info.name}")
    return names


def _safe_find(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except BaseException:  # noqa: BLE001 -- any failure just means "skip this module"
        return False


def _signature(obj) -> str:
    """A signature without annotations, and with only plain literal defaults: other defaults' reprs
    differ between machines and runs (`cgi.parse(environ=os.environ)` prints the environment)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    params = []
    for p in sig.parameters.values():
        if p.default is not p.empty:
            literal = type(p.default) in (type(None), bool, int, float, str, bytes)
            shown = repr(p.default) if literal and len(repr(p.default)) <= 40 else "..."
            p = p.replace(default=_Shown(shown))
        params.append(p.replace(annotation=p.empty))
    return str(sig.replace(parameters=params, return_annotation=sig.empty))


class _Shown(str):
    def __repr__(self):
        return str(self)


def _module_text(module) -> str:
    """The module's docstring, then its own public classes and functions with their docstrings."""
    parts = [f"Module {module.__name__}", inspect.getdoc(module) or ""]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        doc = inspect.getdoc(obj)
        if not doc:
            continue
        kind = "class" if inspect.isclass(obj) else "def"
        parts.append(f"{kind} {name}{_signature(obj)}\n{doc}")
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items()):
                member_doc = inspect.getdoc(member) if not member_name.startswith("_") else None
                if member_doc and (inspect.isfunction(member) or inspect.ismethoddescriptor(member)):
                    parts.append(f"{name}.{member_name}{_signature(member)}\n{member_doc}")
    return "\n\n".join(p for p in parts if p)


def stdlib_documents() -> Iterator[Document]:
    for name in _stdlib_module_names():
        try:
            with (
                warnings.catch_warnings(),
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
                text = _module_text(module)
        except BaseException:  # noqa: BLE001 -- platform-only or broken modules are skipped
            continue
        yield Document(f"stdlib:{name}", "stdlib", text)


def finalize(docs: Iterable[Document]) -> list[Document]:
    """Cleans, drops short documents and exact duplicates (first id wins), sorts by id."""
    out, seen = [], set()
    for doc in sorted(docs, key=lambda d: d.id):
        text = clean_text(doc.text)
        digest = hashlib.sha256(text.encode()).digest()
        if len(text) < MIN_CHARS or digest in seen:
            continue
        seen.add(digest)
        out.append(dataclasses.replace(doc, text=text))
    return out


def builtin_documents(split: str) -> list[Document]:
    """The pydoc and stdlib documents of `split` ("train" or "heldout"): no network, no apt.

    The README's demo uses these: restore training on "train", perplexity on "heldout". They follow
    the corpus's split rule, so the shipped teacher never trained on the held-out ones."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    docs = finalize(list(pydoc_documents()) + list(stdlib_documents()))
    return [d for d in docs if split_of(d.id) == split]


# ----------------------------------------------------------------------------- data sources

BUILTIN_PREFIX = "builtin:"  # builtin:train / builtin:heldout


def resolve_source(source: str, workdir: str) -> str:
    """Materialise a builtin text split as JSONL under the workdir; other sources pass through."""
    if not source.startswith(BUILTIN_PREFIX):
        return source
    split = source[len(BUILTIN_PREFIX) :]
    if split not in ("train", "heldout"):
        raise UserError(f"data source {source!r}: unknown builtin text; use builtin:train or builtin:heldout")
    path = os.path.join(workdir, "builtin_text", f"{split}.jsonl")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"  # every host writes the same content; the rename is atomic
        with open(tmp, "w") as f:
            for doc in builtin_documents(split):
                f.write(json.dumps({"id": doc.id, "text": doc.text}) + "\n")
        os.replace(tmp, path)
    return path
