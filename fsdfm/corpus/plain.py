"""Plain-text sources to documents: fortune files, dictd dictionaries (the Devil's Dictionary,
GCIDE), the Jargon File and the King James Bible."""

from __future__ import annotations

import gzip
import re
import unicodedata
from pathlib import Path

from fsdfm.corpus.text import Doc, blocks, indent_of, join_lines, unwrap


def parse_fortunes(text: str) -> list[Doc]:
    """A fortune file (sayings separated by lines holding only "%") to one document per saying;
    an attribution ("-- Mark Twain") keeps a line of its own."""
    docs = []
    for saying in re.split(r"(?m)^%\s*$", text):
        doc: Doc = []
        for block in blocks(saying):
            # the attribution runs from its "--" to the end of the block
            cut = next((i for i, line in enumerate(block) if line.strip().startswith("--")), None)
            doc += unwrap(block[:cut])
            if cut is not None:
                doc.append(join_lines(block[cut:]))
        if doc:
            docs.append(doc)
    return docs


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def read_dictd(index_path: str, dict_path: str) -> list[str]:
    """The entries of a dictd database in file order, without its "00-..." header entries and
    without repeating an entry that several headwords point at. Entries are UTF-8 except for
    a few stray Windows-1252 bytes in GCIDE, decoded as such."""
    data = gzip.decompress(Path(dict_path).read_bytes())  # .dict.dz is gzip with an index
    spans = set()
    for row in Path(index_path).read_text(encoding="utf-8").splitlines():
        word, offset, length = row.split("\t")
        if not word.startswith("00-"):
            spans.add((_b64(offset), _b64(length)))
    entries = []
    for offset, length in sorted(spans):
        chunk = data[offset : offset + length]
        try:
            entries.append(chunk.decode("utf-8"))
        except UnicodeDecodeError:
            entries.append(chunk.decode("cp1252", errors="replace"))
    return entries


def _b64(digits: str) -> int:
    value = 0
    for d in digits:
        value = value * 64 + _B64.index(d)
    return value


def parse_devil(entry: str) -> list[Doc]:
    """One entry of The Devil's Dictionary: prose paragraphs joined, verse kept by line."""
    doc: Doc = []
    for block in blocks(entry):
        if indent_of(block[0]) >= 4:  # verse, its author's name far to the right
            doc += [line.strip() for line in block]
        else:
            doc.append(join_lines(block))
    doc = [re.sub(r"\b_([^_]+)_\b", r"\1", p) for p in doc]  # _italics_
    return [doc] if doc else []


# GCIDE writes accented letters as codes: ['e] = é, [`a] = à, [^o] = ô, ["u] = ü, [~n] = ñ,
# [=a] = ā (macron), [a^] = ă (breve), [.a] = ȧ, plus ligatures and a few symbols.
_GCIDE_MARKS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", '"': "\u0308", "~": "\u0303",
                "=": "\u0304", ".": "\u0307", ",": "\u0327"}  # fmt: skip
_GCIDE_NAMED = {
    "ae": "\u00e6", "AE": "\u00c6", "oe": "\u0153", "OE": "\u0152", "eth": "\u00f0",
    "thorn": "\u00fe", "deg": "\u00b0", "sect": "\u00a7", "frac12": "\u00bd", "frac14": "\u00bc",
    "frac34": "\u00be", "pound": "\u00a3", "ng": "\u014b", "mdash": "\u2014", "root": "\u221a",
    "times": "\u00d7", "divide": "\u00f7",
}  # fmt: skip
_GCIDE_CODE = re.compile(r"\[(?:([`'^\"~=.,])([A-Za-z])|([A-Za-z])\^|([A-Za-z0-9]+))\]")
_GCIDE_SOURCE = re.compile(r"^\s*\[[^\]]*(Webster|WordNet|PJC|Century|RDH|AS\b)[^\]]*\]\s*$")
_GCIDE_SENSE = re.compile(r"^\s*(\d{1,2}\.|\([a-z]\))\s+")


def _gcide_char(match: re.Match) -> str:
    mark, letter, breve_letter, name = match.groups()
    if mark:
        return unicodedata.normalize("NFC", letter + _GCIDE_MARKS[mark])
    if breve_letter:
        return unicodedata.normalize("NFC", breve_letter + "\u0306")
    return _GCIDE_NAMED.get(name, match.group(0))  # [Obs.], [L.]...: labels, dropped later


def gcide_inline(text: str) -> str:
    """One joined GCIDE paragraph to plain text: accents decoded; pronunciations (\\A*ban"don\\
    and the respelling in parentheses after them), bracketed etymologies and labels, cross-
    reference braces and quotation attributions (--Shak.) removed."""
    text = _GCIDE_CODE.sub(_gcide_char, text)
    text = re.sub(r"\\[^\\]*\\(\s*\([^)]*\))?", "", text)
    while True:  # etymologies may hold bracketed parts: remove innermost first
        shorter = re.sub(r"\[[^\[\]]*\]", "", text)
        if shorter == text:
            break
        text = shorter
    text = text.replace("{", "").replace("}", "")
    text = re.sub(r"(?<=[A-Za-z])[\"`*]+(?=[A-Za-z])|(?<=[A-Za-z])`", "", text)  # Clip"per`
    text = re.sub(r"\s*--(?=[A-Z]).*$", "", text)  # "--Shak." ends a quotation
    text = re.sub(r"\s+([,.;:])", r"\1", " ".join(text.split()))
    return text.strip(" ,;")


def parse_gcide(entry: str) -> list[Doc]:
    """One GCIDE entry (all homographs of a headword) to one document: each homograph's
    headline with its first sense, the other senses, usage notes and quotations, one paragraph
    each. Synonym lists and source tags ([1913 Webster]) are dropped."""
    doc: Doc = []
    for block in blocks(entry):
        lines = [line for line in block if not _GCIDE_SOURCE.match(line)]
        if not lines or lines[0].strip().startswith("Syn:"):
            continue
        para: list[str] = []
        numbered = False  # the headline runs into sense 1; senses 2, 3... start paragraphs
        for line in lines:
            sense = _GCIDE_SENSE.match(line)
            if sense and numbered:
                doc.append(gcide_inline(join_lines(para)))
                para = []
            numbered = numbered or bool(sense)
            para.append(line[sense.end() :] if sense else line.strip())
        text = gcide_inline(join_lines(para))
        text = re.sub(r"^(Usage|Note):\s*", "", text)
        doc.append(text)
    doc = [p for p in doc if p]
    return [doc] if doc else []


def parse_jargon(text: str) -> list[Doc]:
    """The Jargon File as plain text to one document per lexicon entry (":term: n." starts
    one) or per section of the front and back matter; the headword joins the entry's first
    paragraph, e.g. "hacker, n. [originally, someone who makes furniture with an axe]"."""
    docs: list[Doc] = []
    doc: Doc = []
    headword = ""
    for block in blocks(text.replace("\u2550", "")):
        entry = re.match(r"^\s*:([^:]+):\s*(.*)$", block[0])
        if entry and len(block) == 1:
            if doc:
                docs.append(doc)
            doc = []
            rest = re.sub(r"/[^/]*/,?\s*", "", entry.group(2)).strip()
            headword = f"{entry.group(1)}, {rest}" if rest else entry.group(1)
            continue
        para = re.sub(r"^\d+\.\s+", "", join_lines(block)).replace("{", "").replace("}", "")
        if headword:
            para, headword = f"{headword} {para}", ""
        doc.append(para)
    if doc:
        docs.append(doc)
    return docs


def parse_kjv(text: str) -> list[Doc]:
    """The output of `bible -l 100000 Genesis1:1-Revelation22:21` (a "Book N" heading, then one
    verse a line after its number) to one document per chapter, one paragraph per verse."""
    docs: list[Doc] = []
    for block in blocks(text):
        verses = [re.sub(r"^\s*\d+\s+", "", line) for line in block if re.match(r"^\s+\d", line)]
        if verses:
            docs.append(verses)
    return docs
