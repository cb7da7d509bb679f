"""The sources of the corpus. Each licence was read in /usr/share/doc/PKG/copyright of the
package versions in Debian 12 (bookworm); all are in Debian main, so redistributable under the
DFSG."""

from __future__ import annotations

import glob
import gzip
import os
import re
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fsdfm.corpus.htmltext import clean_html
from fsdfm.corpus.plain import (
    parse_devil,
    parse_fortunes,
    parse_gcide,
    parse_jargon,
    parse_kjv,
    read_dictd,
)
from fsdfm.corpus.roff import clean_roff
from fsdfm.corpus.rst import clean_rst
from fsdfm.corpus.text import Doc


def read_text(path: str) -> str:
    """A file's text, gunzipped if it ends in .gz; UTF-8, or Windows-1252 where that fails."""
    data = Path(path).read_bytes()
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def package_files(package: str, pattern: str) -> list[str]:
    """The regular files (not links) that a Debian package installed, matching ``pattern``."""
    listing = subprocess.run(
        ["dpkg-query", "-L", package], check=True, capture_output=True, text=True
    ).stdout
    return sorted(
        p
        for p in listing.splitlines()
        if re.search(pattern, p) and os.path.isfile(p) and not os.path.islink(p)
    )


def python_doc_files() -> list[str]:
    """The reST sources of the newest installed Python documentation, without the changelog
    (issue numbers, not prose) and the licence texts."""
    # python3.11-venv and the like are links to python3.11's folder: match the version alone
    versions = [
        int(m.group(1))
        for d in glob.glob("/usr/share/doc/python3.*/html/_sources")
        if (m := re.match(r"/usr/share/doc/python3\.(\d+)/", d))
    ]
    if not versions:
        return []
    root = f"/usr/share/doc/python3.{max(versions)}/html/_sources"
    return sorted(
        f
        for f in glob.glob(f"{root}/**/*.rst.txt", recursive=True)
        if not f.endswith(("whatsnew/changelog.rst.txt", "/license.rst.txt"))
    )


def each_file(clean: Callable[[str], list[Doc]]) -> Callable[[list[str]], Iterable[Doc]]:
    def extract(paths: list[str]) -> Iterable[Doc]:
        for path in paths:
            yield from clean(read_text(path))

    return extract


def each_dictd_entry(parse: Callable[[str], list[Doc]]) -> Callable[[list[str]], Iterable[Doc]]:
    def extract(paths: list[str]) -> Iterable[Doc]:
        index, data = paths
        for entry in read_dictd(index, data):
            yield from parse(entry)

    return extract


def extract_kjv(paths: list[str]) -> Iterable[Doc]:
    """Decodes the Bible Retrieval System's compressed text (``paths``, the reader's default
    data file) with its own reader, one line a verse (a line width larger than any verse)."""
    out = subprocess.run(
        ["bible", "-l", "100000", "Genesis1:1-Revelation22:21"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return parse_kjv(out)


@dataclass
class Source:
    name: str
    install: list[str]  # Debian packages to install; the report names the files' owners
    licence: str  # as read in the copyright file
    files: Callable[[], list[str]]
    extract: Callable[[list[str]], Iterable[Doc]]
    min_words: int = 4  # shorter paragraphs are headings, labels or debris of markup
    min_doc_words: int = 1  # shorter documents are dropped


SOURCES = [
    Source(
        "kjv-bible",
        ["bible-kjv-text", "bible-kjv"],
        "public domain (King James Version, 1611); packaging GPL-2+",
        lambda: ["/usr/lib/bible.data"],
        extract_kjv,
        min_words=1,
    ),
    Source(
        "devils-dictionary",
        ["dict-devil"],
        "public domain (Ambrose Bierce, The Devil's Dictionary, 1911)",
        lambda: ["/usr/share/dictd/devil.index", "/usr/share/dictd/devil.dict.dz"],
        each_dictd_entry(parse_devil),
        min_words=1,
    ),
    Source(
        "jargon-file",
        ["jargon-text"],
        "public domain (The Jargon File 4.4.7, Eric S. Raymond et al.)",
        lambda: ["/usr/share/doc/jargon-text/jargon.txt.gz"],
        each_file(parse_jargon),
    ),
    Source(
        "fortunes",
        ["fortunes", "fortunes-min"],
        "BSD-3-Clause (fortune-mod and its data files, as distributed by Debian)",
        lambda: [
            f
            for pkg in ("fortunes", "fortunes-min")
            for f in package_files(pkg, r"^/usr/share/games/fortunes/[a-z-]+$")
            if not f.endswith("/ascii-art")
        ],
        each_file(parse_fortunes),
        min_words=1,
    ),
    Source(
        "gcide",
        ["dict-gcide"],
        "GPL-2+ (GNU Collaborative International Dictionary of English 0.48: Webster's "
        "Revised Unabridged Dictionary of 1913, public domain, with WordNet 1.5 and GNU "
        "additions)",
        lambda: ["/usr/share/dictd/gcide.index", "/usr/share/dictd/gcide.dict.dz"],
        each_dictd_entry(parse_gcide),
        min_words=3,
        # Only the ~6,700 entries of 100 words or more: several senses, usage notes, dated
        # quotations. The other ~119,000 are one-line glosses and cross-references ("Zoril,
        # n. Same as Zorilla.") that would make 55% of the corpus and teach little but the
        # dictionary's formulas.
        min_doc_words=100,
    ),
    Source(
        "python-docs",
        ["python3-doc"],
        "PSF-2.0 (Python documentation)",
        python_doc_files,
        each_file(clean_rst),
    ),
    Source(
        "debian-handbook",
        ["debian-handbook"],
        "GPL-2+ or CC-BY-SA-3.0 (Raphaël Hertzog and Roland Mas)",
        lambda: package_files("debian-handbook", r"/html/en-US/[^/]+\.html$"),
        each_file(clean_html),
    ),
    Source(
        "debian-reference",
        ["debian-reference-en"],
        "GPL-2+ (Osamu Aoki)",
        lambda: package_files("debian-reference-en", r"/usr/share/debian-reference/.*\.en\.html$"),
        each_file(clean_html),
    ),
    Source(
        "debian-policy",
        ["debian-policy"],
        "GPL-2+ (Debian Policy Manual)",
        lambda: package_files("debian-policy", r"/_sources/(ch|ap)-[^/]+\.rst\.txt$"),
        each_file(clean_rst),
    ),
    Source(
        "developers-reference",
        ["developers-reference"],
        "GPL-2 (Debian Developer's Reference)",
        lambda: package_files("developers-reference", r"/_sources/[^/]+\.rst\.txt$"),
        each_file(clean_rst),
    ),
    Source(
        "maint-guide",
        ["maint-guide"],
        "GPL-2+ (Debian New Maintainers' Guide, Josip Rodin and Osamu Aoki)",
        lambda: package_files("maint-guide", r"/html/[^/]+\.en\.html$"),
        each_file(clean_html),
    ),
    Source(
        "gnu-standards",
        ["gnu-standards"],
        "GFDL-1.3+ with no invariant sections (GNU Coding Standards, Information for "
        "Maintainers of GNU Software)",
        lambda: package_files("gnu-standards", r"/(standards|maintain)\.html$"),
        each_file(clean_html),
    ),
    Source(
        "man-pages",
        ["manpages"],
        "Linux-man-pages-copyleft, GPL-2+, BSD and MIT-style (per page; Linux man-pages 6.03)",
        lambda: package_files("manpages", r"^/usr/share/man/man\d/[^/]+\.gz$"),
        each_file(clean_roff),
    ),
]
