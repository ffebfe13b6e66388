"""An English text corpus that a fresh machine can build from Python and the Debian archive alone.

The tiny teacher (experiments/pretrain_teacher.py) is pretrained on it, so the README's demo needs
no model or dataset hub. Sources (ids as in `--sources`):

  pydoc   Python's bundled `pydoc_data.topics` (the language reference, as plain text)
  stdlib  docstrings of the standard library's modules, one document per module
  bible   the King James Bible (Debian `bible-kjv-text`, read with `bible-kjv`'s reader), per book
  pydocs  the Python HTML manual (Debian `python3.X-doc`), one page per document
  debref  the Debian Reference (Debian `debian-reference-en`, HTML), one section per document
  gnu     the GNU Coding Standards and Maintainers' guide (Debian `gnu-standards`), per chapter

`pydoc` and `stdlib` need nothing but the running Python; the Debian ones are fetched with
`apt-get download` and unpacked with `dpkg-deb -x` (no install, no root needed), and a package that
cannot be fetched is skipped with a warning. The split is by document: a document is held out when
a hash of its id says so (`is_heldout`), so the rule needs no state and `builtin_documents` gives the
same split at demo time. Because pydoc topics and the HTML manual render the same reference text,
training paragraphs that mostly repeat held-out text (13-word shingles, as GPT-3's decontamination)
are removed, so held-out perplexity measures text the teacher has not read.

    python -m experiments.build_corpus --out .corpus [--sources pydoc,stdlib,bible,pydocs,debref,gnu]
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator

from lard_jax.sources import (  # noqa: F401  (re-exported: the split rule lives in the library)
    ALL_SOURCES,
    BUILTIN_SOURCES,
    HELDOUT_PER_10K,
    MIN_CHARS,
    SHINGLE_WORDS,
    Document,
    builtin_documents,
    clean_text,
    decontaminate,
    finalize,
    is_heldout,
    pydoc_documents,
    split_of,
    stdlib_documents,
)

# ----------------------------------------------------------------------------- HTML to text

_BLOCK_TAGS = {
    "p",
    "div",
    "section",
    "pre",
    "br",
    "li",
    "ul",
    "ol",
    "dl",
    "dt",
    "dd",
    "tr",
    "table",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "blockquote",
    "hr",
    "title",
    "article",
    "header",
    "footer",
}
_VOID_TAGS = {"br", "hr", "img", "meta", "link", "input", "col", "area", "base", "wbr", "source"}
_SKIP_TAGS = {"script", "style", "head", "nav", "noscript", "button"}
_SKIP_CLASSES = {
    "headerlink",
    "navheader",
    "navfooter",
    "toc",
    "sphinxsidebar",
    "related",
    "footer",
    "breadcrumbs",
    "toctree-wrapper",
    "mobile-nav",
    "navigation",
}


class _TextExtractor(html.parser.HTMLParser):
    """Collects visible text, paragraph breaks at block elements, and where `split_tag` headings start.

    With `main_only`, text outside <div role="main"> (Sphinx's page body) is ignored when the page
    has such a div (sidebars and navigation then never reach the corpus)."""

    def __init__(self, split_tag: str | None = None):
        super().__init__(convert_charrefs=True)
        self.split_tag = split_tag
        self.parts: list[str] = []
        self.breaks: list[int] = []  # indices into parts where a split_tag heading starts
        self._stack: list[tuple[str, bool]] = []  # (tag, skipped)
        self._skip_depth = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        skip = tag in _SKIP_TAGS or bool(classes & _SKIP_CLASSES) or attrs.get("role") == "navigation"
        if tag in _BLOCK_TAGS:
            self.parts.append("\n\n")
        if tag == self.split_tag and not self._skip_depth:
            self.breaks.append(len(self.parts))
        if tag in _VOID_TAGS:
            return
        self._stack.append((tag, skip))
        self._skip_depth += skip

    def handle_endtag(self, tag):
        if tag in _VOID_TAGS or not any(t == tag for t, _ in self._stack):
            return
        while self._stack:  # close unclosed children (<p>, <li> without end tags)
            open_tag, skipped = self._stack.pop()
            self._skip_depth -= skipped
            if open_tag == tag:
                break
        if tag in _BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self._skip_depth:
            in_pre = any(t == "pre" for t, _ in self._stack)
            self.parts.append(data if in_pre else re.sub(r"\s+", " ", data))

    def sections(self) -> list[str]:
        bounds = [0] + self.breaks + [len(self.parts)]
        return ["".join(self.parts[a:b]) for a, b in zip(bounds, bounds[1:])]


def _main_region(page: str) -> str:
    """Sphinx wraps a page's body in <div class="body" role="main">; keep from there to the footer."""
    start = page.find('role="main"')
    if start < 0:
        return page
    end = page.find('class="sphinxsidebar"', start)
    end = page.rfind("<", start, end) if end > 0 else len(page)
    return page[page.rfind("<", 0, start) : end]


def html_to_text(page: str, split_tag: str | None = None) -> list[str]:
    """Visible text of an HTML page, cut into sections before each `split_tag` heading (one if None)."""
    parser = _TextExtractor(split_tag)
    parser.feed(_main_region(page))
    parser.close()
    return parser.sections()


# ----------------------------------------------------------------------------- Debian sources


def apt_fetch(packages: list[str], dest: str) -> list[str]:
    """Downloads and unpacks each package into `dest`; returns the ones that arrived."""
    got = []
    for updated in (False, True):
        for pkg in packages:
            if pkg in got:
                continue
            ok = subprocess.run(["apt-get", "download", pkg], cwd=dest, capture_output=True).returncode == 0
            debs = glob.glob(os.path.join(dest, f"{pkg}_*.deb"))
            if ok and debs:
                subprocess.run(["dpkg-deb", "-x", debs[0], os.path.join(dest, "root")], check=True)
                got.append(pkg)
        if len(got) == len(packages) or updated:
            break
        subprocess.run(["apt-get", "update"], capture_output=True)  # stale lists; fails without root
    return got


# Book names in the reader's order (Genesis to Revelation), so documents carry real titles.
_BIBLE_BOOKS = (
    "Genesis Exodus Leviticus Numbers Deuteronomy Joshua Judges Ruth 1_Samuel 2_Samuel 1_Kings 2_Kings "
    "1_Chronicles 2_Chronicles Ezra Nehemiah Esther Job Psalms Proverbs Ecclesiastes Song_of_Solomon "
    "Isaiah Jeremiah Lamentations Ezekiel Daniel Hosea Joel Amos Obadiah Jonah Micah Nahum Habakkuk "
    "Zephaniah Haggai Zechariah Malachi Matthew Mark Luke John Acts Romans 1_Corinthians 2_Corinthians "
    "Galatians Ephesians Philippians Colossians 1_Thessalonians 2_Thessalonians 1_Timothy 2_Timothy "
    "Titus Philemon Hebrews James 1_Peter 2_Peter 1_John 2_John 3_John Jude Revelation"
).split()


def bible_documents(workdir: str) -> Iterator[Document]:
    """One document per book. The text ships in a compressed format that only the package's own
    reader decodes, so `bible-kjv` is fetched too and its reader dumps Gen1:1-Rev22:21."""
    if apt_fetch(["bible-kjv-text", "bible-kjv"], workdir) != ["bible-kjv-text", "bible-kjv"]:
        raise RuntimeError("apt-get download bible-kjv-text bible-kjv failed")
    root = os.path.join(workdir, "root")
    out = subprocess.run(
        [os.path.join(root, "usr/bin/bible"), "-f", "-p", os.path.join(root, "usr/lib"), "Gen1:1-Rev22:21"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    books: dict[str, list[str]] = {}
    chapter_of: dict[str, str] = {}
    for line in out.splitlines():
        m = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$", line)
        if not m:
            continue
        abbr, chapter, verse, text = m.groups()
        lines = books.setdefault(abbr, [])
        if chapter_of.get(abbr) != chapter:
            chapter_of[abbr] = chapter
            lines.append(f"\nChapter {chapter}\n")
        lines.append(f"{verse} {text}")
    if len(books) != len(_BIBLE_BOOKS):
        raise RuntimeError(f"expected 66 books from the reader, got {len(books)}")
    for number, (name, lines) in enumerate(zip(_BIBLE_BOOKS, books.values()), 1):
        title = name.replace("_", " ")
        yield Document(f"bible:{number:02d}-{name}", "bible", f"The Book of {title}\n" + "\n".join(lines))


_PYDOCS_SKIP = re.compile(
    r"(^|/)(genindex[^/]*|search|py-modindex|contents|download|copyright|license|"
    r"bugs|about)\.html$|^whatsnew/changelog\.html$|^_"
)


def pydocs_documents(workdir: str) -> Iterator[Document]:
    minor = f"python3.{sys.version_info.minor}-doc"
    for pkg in dict.fromkeys([minor, "python3.11-doc", "python3-doc"]):
        if apt_fetch([pkg], workdir):
            break
    else:
        raise RuntimeError("no python3.X-doc package could be downloaded")
    roots = sorted(glob.glob(os.path.join(workdir, "root/usr/share/doc/python3*/html")))
    if not roots:
        raise RuntimeError("the python doc package has no html directory (a meta package?)")
    root = roots[-1]
    for path in sorted(glob.glob(os.path.join(root, "**/*.html"), recursive=True)):
        rel = os.path.relpath(path, root)
        if _PYDOCS_SKIP.search(rel):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            yield Document(f"pydocs:{rel[:-5]}", "pydocs", html_to_text(f.read())[0])


def debref_documents(workdir: str) -> Iterator[Document]:
    """One document per section (<h2>) of each chapter: chapters are few and large, sections give
    the document-level split enough granularity to hold some out."""
    if not apt_fetch(["debian-reference-en"], workdir):
        raise RuntimeError("apt-get download debian-reference-en failed")
    root = os.path.join(workdir, "root/usr/share/debian-reference")
    for path in sorted(glob.glob(os.path.join(root, "*.en.html"))):
        name = os.path.basename(path)[: -len(".en.html")]
        if name == "index":
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for i, section in enumerate(html_to_text(f.read(), split_tag="h2")):
                yield Document(f"debref:{name}.{i:02d}", "debref", section)


def split_info_text(text: str) -> list[str]:
    """Cuts a makeinfo --plaintext manual at its top-level chapter headings (`N Title` or
    `Appendix X Title`, underlined with `*` or `=`); the table of contents before them is dropped."""
    lines = text.split("\n")
    starts = [
        i
        for i in range(len(lines) - 1)
        if re.match(r"^(\d+|Appendix [A-Z]) \S", lines[i])
        and re.fullmatch(r"[*=]{3,}", lines[i + 1])
        and len(lines[i + 1]) == len(lines[i])
    ]
    bounds = starts + [len(lines)]
    return ["\n".join(lines[a:b]) for a, b in zip(bounds, bounds[1:])]


def gnu_documents(workdir: str) -> Iterator[Document]:
    if not apt_fetch(["gnu-standards"], workdir):
        raise RuntimeError("apt-get download gnu-standards failed")
    root = os.path.join(workdir, "root/usr/share/doc/gnu-standards")
    for manual in ("standards", "maintain"):
        with gzip.open(os.path.join(root, f"{manual}.text.gz"), "rt", encoding="utf-8", errors="replace") as f:
            for i, chapter in enumerate(split_info_text(f.read())):
                yield Document(f"gnu:{manual}.{i:02d}", "gnu", chapter)


SOURCES: dict[str, Callable[[str], Iterable[Document]]] = {
    "pydoc": lambda workdir: pydoc_documents(),
    "stdlib": lambda workdir: stdlib_documents(),
    "bible": bible_documents,
    "pydocs": pydocs_documents,
    "debref": debref_documents,
    "gnu": gnu_documents,
}

# ----------------------------------------------------------------------------- writing


def _write_jsonl(path: str, docs: list[Document]) -> None:
    with open(path, "w", encoding="ascii", newline="\n") as f:
        for doc in docs:
            f.write(json.dumps({"id": doc.id, "source": doc.source, "text": doc.text}) + "\n")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cap(docs: list[Document], max_bytes: int) -> list[Document]:
    """Keeps whole documents, in an order fixed by their id's hash, until `max_bytes`."""
    order = sorted(docs, key=lambda d: hashlib.sha256(d.id.encode()).digest())
    kept, total = set(), 0
    for doc in order:
        if total + len(doc.text) > max_bytes:
            continue
        kept.add(doc.id)
        total += len(doc.text)
    return [d for d in docs if d.id in kept]


def build(out_dir: str, sources: Iterable[str] = ALL_SOURCES, max_mb_per_source: float = 16.0) -> dict:
    """Builds `out_dir/{train,heldout}.jsonl` and `manifest.json`; returns the manifest."""
    os.makedirs(out_dir, exist_ok=True)
    docs: list[Document] = []
    used, skipped, capped = {}, {}, []
    for source in sources:
        workdir = tempfile.mkdtemp(prefix=f"corpus_{source}_")
        try:
            found = finalize(SOURCES[source](workdir))
        except Exception as err:  # noqa: BLE001 -- a missing source is skipped, not fatal
            warnings.warn(f"source {source!r} skipped: {err}", stacklevel=2)
            skipped[source] = str(err)
            continue
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if sum(len(d.text) for d in found) > max_mb_per_source * 1e6:
            found = _cap(found, int(max_mb_per_source * 1e6))
            capped.append(source)
        used[source] = {"documents": len(found), "bytes": sum(len(d.text) for d in found)}
        print(f"{source}: {len(found)} documents, {used[source]['bytes'] / 1e6:.2f} MB", flush=True)
        docs += found
    docs = finalize(docs)  # exact duplicates across sources
    heldout = [d for d in docs if is_heldout(d.id)]
    train, removed = decontaminate([d for d in docs if not is_heldout(d.id)], heldout)
    manifest = {
        "sources": used,
        "skipped": skipped,
        "capped_sources": capped,
        "max_mb_per_source": max_mb_per_source,
        "heldout_per_10k": HELDOUT_PER_10K,
        "min_chars": MIN_CHARS,
        "decontaminated_bytes": removed,
        "python": sys.version.split()[0],
        "splits": {},
    }
    for split, split_docs in (("train", train), ("heldout", heldout)):
        path = os.path.join(out_dir, f"{split}.jsonl")
        _write_jsonl(path, split_docs)
        manifest["splits"][split] = {
            "file": f"{split}.jsonl",
            "documents": len(split_docs),
            "bytes": sum(len(d.text) for d in split_docs),
            "sha256": _sha256(path),
            "by_source": {s: sum(d.source == s for d in split_docs) for s in used},
        }
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def read_jsonl(path: str) -> list[dict]:
    """Every record of a JSONL file, through the library's one JSONL reader (errors name file and line)."""
    from lard_jax.data import jsonl_records

    return [record for _, record in jsonl_records(path)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--sources", default=",".join(ALL_SOURCES), help="comma-separated source ids")
    parser.add_argument("--max-mb-per-source", type=float, default=16.0)
    args = parser.parse_args(argv)
    sources = [s for s in args.sources.split(",") if s]
    unknown = set(sources) - set(SOURCES)
    if unknown:
        parser.error(f"unknown sources {sorted(unknown)}; choose from {list(SOURCES)}")
    manifest = build(args.out, sources, args.max_mb_per_source)
    print(json.dumps(manifest["splits"], indent=2))


if __name__ == "__main__":
    main()
