"""Fast checks of the corpus builder: cleaning, the split rule, HTML and info parsing, decontamination.

Nothing here touches the network or apt; `build` is exercised with the built-in pydoc source only."""

import hashlib
import json
import os

from experiments import build_corpus as bc
from lard_jax import sources


def test_clean_text_is_ascii_and_collapses_whitespace():
    raw = "\u201cQuoted\u201d \u2014 caf\u00e9\u00a0\u00a0na\u00efve\t\ttext \u2026\u00b6\n\n\n\n  next\u3042 line  "
    out = bc.clean_text(raw)
    assert out == '"Quoted" -- cafe naive text ...\n\nnext line'
    assert out.isascii()


def test_split_rule_is_stateless_and_about_five_percent():
    ids = [f"doc:{i}" for i in range(20_000)]
    held = [i for i in ids if bc.is_heldout(i)]
    assert held == [i for i in ids if bc.is_heldout(i)]
    assert 0.04 < len(held) / len(ids) < 0.06
    assert all(bc.split_of(i) == "heldout" for i in held)


def test_html_to_text_keeps_main_body_and_splits_at_headings():
    page = """<html><head><title>T</title><script>var x = 1;</script></head><body>
    <div class="sphinxsidebar">sidebar junk</div>
    <div class="body" role="main"><h1>Title<a class="headerlink" href="#">\u00b6</a></h1>
    <p>First   paragraph<br>same para.</p><h2>Part two</h2><p>Second &amp; last.</p>
    <pre>  indented
code</pre></div><div class="sphinxsidebar">more junk</div></body></html>"""
    whole = bc.clean_text(bc.html_to_text(page)[0])
    assert whole == "Title\n\nFirst paragraph\n\nsame para.\n\nPart two\n\nSecond & last.\n\nindented\ncode"
    sections = [bc.clean_text(s) for s in bc.html_to_text(page, split_tag="h2")]
    assert sections == ["Title\n\nFirst paragraph\n\nsame para.", "Part two\n\nSecond & last.\n\nindented\ncode"]


def test_split_info_text_cuts_at_underlined_chapters():
    text = (
        "Manual\n1 Intro\n2 Usage\n\n1 Intro\n*******\n\nHello.\n\n"
        "1.1 Sub\n=======\n\nMore.\n\n2 Usage\n*******\n\nRun it."
    )
    chapters = bc.split_info_text(text)
    assert [c.split("\n")[0] for c in chapters] == ["1 Intro", "2 Usage"]
    assert "1.1 Sub" in chapters[0] and chapters[1].endswith("Run it.")


def test_decontaminate_drops_paragraphs_copied_from_heldout():
    shared = " ".join(f"word{i}" for i in range(40))
    own = " ".join(f"other{i}" for i in range(200))
    train = [bc.Document("t:1", "t", f"{own}\n\n{shared}.")]
    heldout = [bc.Document("h:1", "t", f"Intro.\n\n{shared}")]
    kept, removed = bc.decontaminate(train, heldout)
    assert kept[0].text == own
    assert removed == len(shared) + 1 + 2


def test_signature_hides_non_literal_defaults():
    def f(a, b=3, c="x", env=os.environ, *args, key: int = None, **kw) -> int:
        """Doc."""

    assert sources._signature(f) == "(a, b=3, c='x', env=..., *args, key=None, **kw)"


def test_builtin_documents_are_deterministic_and_split():
    train, heldout = bc.builtin_documents("train"), bc.builtin_documents("heldout")
    assert heldout and len(train) > 10 * len(heldout)
    assert {d.source for d in train} == {"pydoc", "stdlib"}
    assert not {d.id for d in train} & {d.id for d in heldout}
    assert all(bc.is_heldout(d.id) for d in heldout) and not any(bc.is_heldout(d.id) for d in train)
    assert all(len(d.text) >= bc.MIN_CHARS and d.text.isascii() for d in train + heldout)
    assert [(d.id, d.text) for d in bc.builtin_documents("heldout")] == [(d.id, d.text) for d in heldout]


def test_build_writes_jsonl_and_manifest(tmp_path):
    manifest = bc.build(str(tmp_path), sources=["pydoc"])
    for split in ("train", "heldout"):
        info = manifest["splits"][split]
        path = tmp_path / info["file"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"]
        rows = bc.read_jsonl(str(path))
        assert len(rows) == info["documents"] > 0
        assert all(bc.split_of(r["id"]) == split and r["source"] == "pydoc" for r in rows)
    assert json.loads((tmp_path / "manifest.json").read_text())["sources"]["pydoc"]["documents"] > 50
