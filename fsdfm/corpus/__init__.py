"""Builds the English training corpus for fsdfm's default model from texts that Debian ships
with redistributable licences.

    python -m fsdfm.corpus OUT_DIR [--min-chars 10000000] [--skip-install]
    python scripts/build_corpus.py OUT_DIR ...       (the same)

Installs the Debian packages listed in SOURCES (apt-get, needs root) unless --skip-install,
extracts the prose from each (reST, HTML, man-page roff, dictd dictionaries, fortune files,
the Jargon File and the King James Bible), cleans it and writes

* OUT_DIR/corpus.txt: UTF-8 documents separated by one blank line ("\\n\\n"); inside a document
  each line is one paragraph (or one verse line), with white space collapsed; no document holds
  a blank line. The file ends with a single "\\n".
* OUT_DIR/sources.json and OUT_DIR/SOURCES.md: every package with its version, licence, the
  number of files read and the characters it contributes, and the sha256 of corpus.txt.

The output depends only on the installed package versions: files are read in sorted order,
nothing records a time, duplicates are removed keeping the first copy in SOURCES order, and the
documents are ordered by the sha256 of their text, a fixed shuffle that mixes the sources so
that any contiguous slice (a held-out tail, say) samples all of them.
"""

from fsdfm.corpus.build import build, collect, main
from fsdfm.corpus.sources import SOURCES, Source

__all__ = ["SOURCES", "Source", "build", "collect", "main"]
