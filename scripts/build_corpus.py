"""Builds the English training corpus for fsdfm's default model from texts that Debian ships
with redistributable licences.

    python scripts/build_corpus.py OUT_DIR [--min-chars 10000000] [--skip-install]

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

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import html.parser
import json
import os
import re
import subprocess
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

Doc = list[str]  # one document: its paragraphs, each a single line of text

# ---------------------------------------------------------------------------------------------
# Paragraph normalisation and filtering, shared by every source.

# C0/C1 controls and Unicode format characters (soft hyphen, zero-width space, BOM...), which
# are invisible in the sources and would only waste tokenizer merges.
_INVISIBLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u2028\u2029\ufeff]")


def normalize(text: str) -> str:
    """NFC, invisible characters dropped, every run of white space (NBSP included) one space."""
    text = _INVISIBLE.sub("", unicodedata.normalize("NFC", text))
    return " ".join(text.split())


def is_prose(paragraph: str, min_words: int) -> bool:
    """At least ``min_words`` words, and at least 75% of the non-space characters letters: what
    survives markup stripping but is really code, a table row or a list of numbers fails."""
    if len(paragraph.split()) < min_words:
        return False
    chars = [c for c in paragraph if not c.isspace()]
    return sum(c.isalpha() for c in chars) >= 0.75 * len(chars)


def join_lines(lines: list[str]) -> str:
    """Hard-wrapped lines as one line; a word hyphenated across a line break ("Brillat-" then
    "Savarin") keeps its hyphen and loses the space."""
    out = ""
    for line in (line.strip() for line in lines):
        if not line:
            continue
        glue = "" if re.search(r"[^\W\d_]-$", out) else " "
        out = out + glue + line if out else line
    return out


def unwrap(lines: list[str]) -> list[str]:
    """One block of hard-wrapped plain text as paragraph lines: joined into one line when it
    reaches the wrap margin somewhere (prose), kept line by line when every line is short
    (verse, dialogue, a list of sayings)."""
    lines = [line.strip() for line in lines if line.strip()]
    if not lines:
        return []
    if max(len(line) for line in lines) >= 55:
        return [join_lines(lines)]
    return lines


def blocks(text: str) -> list[list[str]]:
    """Runs of non-blank lines."""
    out, cur = [], []
    for line in text.splitlines():
        if line.strip():
            cur.append(line)
        elif cur:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


# ---------------------------------------------------------------------------------------------
# reStructuredText (the Python documentation, Debian Policy, the Developer's Reference).

# Directives whose body is prose: admonitions, API descriptions (the signature is dropped, the
# description kept) and version notes. Every other directive (code, tables, toctrees, indexes,
# images, includes...) is dropped with its body.
RST_PROSE_DIRECTIVES = {
    "note", "warning", "seealso", "important", "tip", "hint", "attention", "caution", "danger",
    "error", "admonition", "topic", "sidebar", "impl-detail", "versionadded", "versionchanged",
    "deprecated", "deprecated-removed", "only", "function", "method", "classmethod",
    "staticmethod", "class", "attribute", "data", "exception", "decorator", "decoratormethod",
    "coroutinefunction", "coroutinemethod", "abstractmethod", "property", "describe", "object",
    "opcode", "cmdoption", "option", "envvar", "pdbcommand", "member", "macro", "type", "var",
    "struct", "union", "enum", "enumerator", "glossary",
}  # fmt: skip
# Of those, the ones whose argument is itself a sentence (".. note:: Text.").
RST_ARGUMENT_IS_TEXT = {
    "note", "warning", "seealso", "important", "tip", "hint", "attention", "caution", "danger",
    "error", "impl-detail",
}  # fmt: skip

_RST_ADORNMENT = re.compile(r"""^([=\-~^"'`#*+<>:._])\1{2,}\s*$""")
_RST_SIMPLE_TABLE = re.compile(r"^\s*=+( +=+)+\s*$")
_RST_DIRECTIVE = re.compile(r"^\s*\.\.\s+([\w:-]+)::\s?(.*)$")
_RST_EXPLICIT = re.compile(r"^\s*\.\.(\s|$)")
_RST_FIELD = re.compile(r"^\s*:[^:`\s][^:`]*:(\s+|$)")
_RST_BULLET = re.compile(r"^\s*([-*+\u2022]|\d+[.)]|#\.)\s+")
_RST_ROLE = re.compile(r":(?:[\w-]+:)*([\w-]+):`([^`]*)`")
# Roles that Sphinx displays with a prefix: :pep:`8` is "PEP 8".
RST_ROLE_PREFIX = {"pep": "PEP ", "rfc": "RFC ", "issue": "bpo-", "gh": "gh-"}
_RST_LINK = re.compile(r"`([^`<]*?)\s*<[^>`]*>`__?")
_RST_REF = re.compile(r"`([^`]+)`__?")
_RST_INTERPRETED = re.compile(r"`([^`]+)`")
_RST_FOOTNOTE = re.compile(r"\s*\[(#\w*|\*|\d+|[A-Za-z][\w.-]*)\]_")
_RST_STRONG = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_RST_EMPHASIS = re.compile(r"(?<![\w*])\*(\S(?:.*?\S)?)\*(?![\w*])")
_RST_SUBSTITUTION = re.compile(r"(?<![\w|])\|[\w-]+\|(?![\w|])")


def _rst_role_text(match: re.Match) -> str:
    """:role:`target` or :role:`title <target>` -> what Sphinx would display."""
    role, inner = match.groups()
    titled = re.match(r"(.*?)\s*<[^>]*>$", inner, re.S)
    if titled and titled.group(1):
        return titled.group(1)
    inner = inner.lstrip("!")
    if inner.startswith("~"):  # ~a.b.c displays as c
        inner = inner[1:].rsplit(".", 1)[-1]
    return RST_ROLE_PREFIX.get(role, "") + inner


def rst_inline(text: str) -> str:
    """Inline markup of one paragraph to the displayed text."""
    text = _RST_ROLE.sub(_rst_role_text, text)
    text = text.replace("``", "")
    text = _RST_LINK.sub(r"\1", text)
    text = _RST_REF.sub(r"\1", text)
    text = _RST_INTERPRETED.sub(r"\1", text)
    text = _RST_FOOTNOTE.sub("", text)
    text = _RST_STRONG.sub(r"\1", text)
    text = _RST_EMPHASIS.sub(r"\1", text)
    text = _RST_SUBSTITUTION.sub("", text)
    return text.replace("\\ ", "").replace("\\", "")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def clean_rst(text: str) -> list[Doc]:
    """reST to documents (one per section) of paragraphs; code, tables, directives other than
    prose ones, comments, targets and section titles are dropped."""
    docs: list[Doc] = []
    doc: Doc = []
    para: list[str] = []
    para_indent = 0  # where a paragraph's continuation lines start
    skip_deeper_than: int | None = None  # dropping a block indented more than this
    skip_to_blank = False  # dropping lines up to the next blank one (tables, doctests)
    in_simple_table = False
    in_options = False  # in the ":option: value" lines right after a kept directive

    def flush():
        nonlocal para
        if para:
            line = " ".join(para)
            if line.endswith("::"):  # "Example::" shows as "Example:", "Example ::" as "Example"
                line = line[:-2].rstrip() if line[:-2].endswith(" ") or line == "::" else line[:-1]
            if line:
                doc.append(rst_inline(line))
        para = []

    def new_doc():
        nonlocal doc
        flush()
        if doc:
            docs.append(doc)
        doc = []

    lines = text.expandtabs(8).splitlines()
    for i, raw in enumerate(lines):
        line = raw.rstrip()
        stripped = line.strip()
        indent = _indent(line)
        if in_simple_table:
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if _RST_SIMPLE_TABLE.match(line) and not nxt:
                in_simple_table = False
            continue
        if skip_to_blank:
            if stripped:
                continue
            skip_to_blank = False
        if skip_deeper_than is not None:
            if not stripped or indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        in_options = in_options and bool(_RST_FIELD.match(line))
        if in_options:
            continue
        if not stripped:
            flush()
            continue
        if _RST_SIMPLE_TABLE.match(line):
            flush()
            in_simple_table = True
            continue
        if _RST_ADORNMENT.match(stripped):
            if len(para) == 1:  # the paragraph was a section title: a new section starts
                para = []
                new_doc()
            elif para:  # not a title: drop it with the rule (a malformed table, say)
                para = []
            continue
        if stripped.startswith(("+-", "+=", ">>>", "| ")):
            flush()  # grid tables, doctest sessions, line blocks
            skip_to_blank = True
            continue
        directive = _RST_DIRECTIVE.match(line)
        if directive:
            flush()
            name = directive.group(1).split(":")[-1]
            if name in RST_PROSE_DIRECTIVES:
                in_options = True
                if name in RST_ARGUMENT_IS_TEXT and directive.group(2).strip():
                    para, para_indent = [directive.group(2).strip()], indent + 3
            else:
                skip_deeper_than = indent
            continue
        if _RST_EXPLICIT.match(line):  # comments, targets, footnotes, substitutions
            flush()
            skip_deeper_than = indent
            continue
        field = _RST_FIELD.match(line)
        bullet = _RST_BULLET.match(line)
        if field or bullet:
            flush()
            marker = (field or bullet).end()
            para, para_indent = [line[marker:].strip()], marker
            if field and not para[0]:
                para = []
            continue
        if para and indent != para_indent:
            flush()  # a definition under its term, or a block quote
        if not para:
            para_indent = indent
        para.append(stripped)
        if stripped.endswith("::"):  # the indented block that follows is literal (code)
            flush()
            skip_deeper_than = para_indent
    new_doc()
    return docs


# ---------------------------------------------------------------------------------------------
# HTML (DocBook output: the Debian Administrator's Handbook, Debian Reference, the New
# Maintainers' Guide; Texinfo output: the GNU Coding Standards).

# Elements that end a paragraph where they start or end.
HTML_BLOCKS = {
    "p", "div", "li", "dd", "dt", "blockquote", "br", "ul", "ol", "dl", "section", "article",
    "td", "th", "tr", "hr", "center", "figcaption", "caption", "body", "html",
}  # fmt: skip
HTML_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
# Elements dropped with their content: code, tables, page furniture.
HTML_SKIP = {"pre", "table", "script", "style", "head", "title", "svg", "nav"}
# Classes (DocBook, Publican, Texinfo) and ids of page furniture: tables of contents,
# navigation, titles of sections, tables and figures, examples, the Handbook's banner.
HTML_SKIP_CLASSES = {
    "toc", "docnav", "navheader", "navfooter", "title", "list-of-tables", "list-of-figures",
    "list-of-examples", "mediaobject", "footnotes", "example", "header", "section-toc",
    "contents", "shortcontents", "summary-letter",
}  # fmt: skip
HTML_SKIP_IDS = {"banner", "navigation"}
HTML_VOID = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "wbr", "source"}


class _HTMLText(html.parser.HTMLParser):
    """Collects paragraphs of visible text, a new document at each heading."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.docs: list[Doc] = []
        self.doc: Doc = []
        self.text: list[str] = []
        self.stack: list[tuple[str, bool]] = []  # open elements and whether each is dropped
        self.skipping = 0  # how many open elements are dropped

    def flush(self):
        line = "".join(self.text)
        if line.strip():
            self.doc.append(line)
        self.text = []

    def new_doc(self):
        self.flush()
        if self.doc:
            self.docs.append(self.doc)
        self.doc = []

    def handle_starttag(self, tag, attrs):
        if tag in HTML_VOID:
            if tag in HTML_BLOCKS and not self.skipping:
                self.flush()
            return
        if tag in HTML_HEADINGS and not self.skipping:
            self.new_doc()
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        skip = (
            tag in HTML_SKIP
            or bool(classes & HTML_SKIP_CLASSES)
            or attrs.get("id") in HTML_SKIP_IDS
        )
        self.stack.append((tag, skip))
        self.skipping += skip
        if tag in HTML_BLOCKS and not self.skipping:
            self.flush()

    def handle_endtag(self, tag):
        if tag in HTML_VOID or not any(t == tag for t, _ in self.stack):
            return  # stray end tag
        while self.stack:  # close anything left open inside it, as browsers do
            open_tag, skip = self.stack.pop()
            self.skipping -= skip
            if open_tag == tag:
                break
        if self.skipping:
            return
        if tag in HTML_HEADINGS:
            self.text = []  # the heading's own text is dropped: titles are not sentences
        elif tag in HTML_BLOCKS:
            self.flush()

    def handle_data(self, data):
        if not self.skipping:
            self.text.append(data)


def clean_html(text: str) -> list[Doc]:
    """HTML to documents (one per section) of paragraphs of visible text."""
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    parser.new_doc()
    return parser.docs


# ---------------------------------------------------------------------------------------------
# Manual pages (roff with the man macros: the Linux man-pages project).

ROFF_CHARS = {
    "em": "\u2014", "en": "\u2013", "hy": "-", "aq": "'", "dq": '"', "lq": "\u201c",
    "rq": "\u201d", "oq": "\u2018", "cq": "\u2019", "bu": "\u2022", "co": "\u00a9",
    "rg": "\u00ae", "tm": "\u2122", "mu": "\u00d7", "di": "\u00f7", "de": "\u00b0",
    "+-": "\u00b1", "<=": "\u2264", ">=": "\u2265", "!=": "\u2260", "->": "\u2192",
    "<-": "\u2190", "ti": "~", "ha": "^", "rs": "\\", "sl": "/", "ba": "|", "dg": "\u2020",
    "ga": "`", "aa": "\u00b4", "ss": "\u00df", "'e": "\u00e9", "`e": "\u00e8", ":u": "\u00fc",
    ":o": "\u00f6", ":a": "\u00e4",
}  # fmt: skip
_ROFF_ESCAPE = re.compile(
    r"\\(?:\((?P<two>..)|\[(?P<long>[^\]]*)\]|\*(?:\((?P<s2>..)|\[(?P<sl>[^\]]*)\]|(?P<s1>.))"
    r"|f(?:\(..|\[[^\]]*\]|.)|s[-+]?\d+|[\-e&~0 |^:c%]|(?P<other>.))"
)
# Sections that are lists, code or boilerplate rather than prose.
ROFF_SKIP_SECTIONS = {"SYNOPSIS", "SEE ALSO", "COLOPHON", "EXAMPLES", "EXAMPLE", "AUTHORS",
                      "AUTHOR", "FILES", "COPYRIGHT", "REPORTING BUGS"}  # fmt: skip
# Requests that open a dropped block (no-fill text, examples, tables, equations, macro
# definitions, ignored input), and the request that closes it (".." is ".", then ".").
_ROFF_BLOCK_END = {"nf": "fi", "EX": "EE", "TS": "TE", "EQ": "EN", "de": ".", "ig": "."}
_ROFF_ALTERNATING = {"BR", "RB", "IR", "RI", "BI", "IB"}
_ROFF_FONT_MACROS = {"B", "I", "R", "SM", "SB"} | _ROFF_ALTERNATING


def _roff_escape(match: re.Match) -> str:
    name = match.group("two") or match.group("long") or match.group("s2") or match.group("sl")
    if name is not None or match.group("s1") is not None:
        return ROFF_CHARS.get(name or "", "")
    text = match.group(0)
    if text in ("\\-", "\\e"):
        return "-" if text == "\\-" else "\\"
    if text in ("\\~", "\\0", "\\ "):
        return " "
    return match.group("other") or ""  # font, size and spacing escapes vanish


def roff_inline(text: str) -> str:
    return _ROFF_ESCAPE.sub(_roff_escape, text)


def _roff_args(rest: str) -> list[str]:
    """A macro line's arguments: separated by spaces, "double quoted" ones may hold spaces."""
    return [a[1:-1] if a.startswith('"') else a for a in re.findall(r'"[^"]*"?|\S+', rest)]


def clean_roff(text: str) -> list[Doc]:
    """A man page to one document of paragraphs; no-fill blocks (examples), tables, the
    synopsis, see-also and colophon sections, headings and macro definitions are dropped."""
    doc: Doc = []
    para: list[str] = []
    skip_until: str | None = None  # a request that ends a dropped block (".fi", ".TE"...)
    in_skipped_section = False
    tag_next = False  # the next line is a .TP tag (a term, not part of the description)

    def flush():
        nonlocal para
        if para:
            doc.append(roff_inline(" ".join(para)))
        para = []

    for line in text.splitlines():
        if line.startswith(("'", ".")):
            request, _, rest = line[1:].strip().partition(" ")
        else:
            request, rest = None, ""
        if skip_until is not None:
            if request == skip_until:
                skip_until = None
            continue
        if request is None or request in _ROFF_FONT_MACROS:
            if in_skipped_section:
                continue
            if request is None:
                words = line.strip()
            else:  # alternating-font macros (.BR, .IR...) join their arguments without spaces
                args = _roff_args(rest)
                words = ("" if request in _ROFF_ALTERNATING else " ").join(args)
            if words:
                para.append(words)
                if tag_next:
                    flush()
                    tag_next = False
            continue
        if request in ("SH", "SS"):
            flush()
            if request == "SH":
                in_skipped_section = " ".join(_roff_args(rest)).upper() in ROFF_SKIP_SECTIONS
            continue
        if in_skipped_section:
            continue
        if request in _ROFF_BLOCK_END:
            flush()
            skip_until = _ROFF_BLOCK_END[request]
        elif request in ("PP", "P", "LP", "TP", "IP", "HP", "sp", "TQ", "RS", "RE", "in"):
            flush()
            tag_next = request in ("TP", "TQ")
        # any other request (.TH, .ad, .hy, .so, .\" comments...) carries no text
    flush()
    return [doc] if doc else []


# ---------------------------------------------------------------------------------------------
# Plain-text sources.


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
        if _indent(block[0]) >= 4:  # verse, its author's name far to the right
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


# ---------------------------------------------------------------------------------------------
# The sources. Each licence was read in /usr/share/doc/PKG/copyright of the package versions in
# Debian 12 (bookworm); all are in Debian main, so redistributable under the DFSG.


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


# ---------------------------------------------------------------------------------------------
# Provenance.


def dpkg_version(package: str) -> str:
    return subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", package], check=True, capture_output=True, text=True
    ).stdout


def file_owners(paths: list[str]) -> list[str]:
    """The Debian packages that installed these files."""
    out = subprocess.run(
        ["dpkg-query", "-S", *paths], check=True, capture_output=True, text=True
    ).stdout
    owners = set()
    for line in out.splitlines():
        for pkg in line.split(": ", 1)[0].split(", "):
            owners.add(pkg.split(":")[0])  # drop an architecture qualifier
    return sorted(owners)


def copyright_licences(package: str) -> list[str]:
    """The licence names of a machine-readable (DEP-5) copyright file, in order of first
    appearance; empty for a free-form one (whose licence is then the one stated in SOURCES)."""
    path = Path(f"/usr/share/doc/{package}/copyright")
    text = path.read_text(errors="replace") if path.exists() else ""
    if not text.startswith("Format:"):
        return []
    names: list[str] = []
    for m in re.finditer(r"(?m)^License:[ \t]*(\S[^\n]*)", text):
        if m.group(1).strip() not in names:
            names.append(m.group(1).strip())
    return names


def install(packages: list[str]) -> None:
    """apt-get install, refreshing the package lists once if the first try fails."""
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(cmd, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(cmd, env=env, check=True)


# ---------------------------------------------------------------------------------------------


def collect(sources: list[Source]) -> tuple[str, list[dict]]:
    """The corpus text and, for each source, the counts of what it contributed: documents are
    normalised and filtered, exact duplicates dropped (the first copy in ``sources`` order
    stays), and the rest ordered by the sha256 of their text."""
    seen: set[str] = set()
    docs: list[tuple[str, str]] = []  # (sha256 of the text, text)
    counts = []
    for src in sources:
        start = time.perf_counter()
        paths = src.files()
        if not paths:
            raise SystemExit(f"{src.name}: no input files (is {' '.join(src.install)} installed?)")
        n_docs = n_chars = n_dupes = 0
        for doc in src.extract(paths):
            paras = [p for p in map(normalize, doc) if is_prose(p, src.min_words)]
            text = "\n".join(paras)
            if not paras or len(text.split()) < src.min_doc_words:
                continue
            key = hashlib.sha256(text.encode()).hexdigest()
            if key in seen:
                n_dupes += 1
                continue
            seen.add(key)
            docs.append((key, text))
            n_docs += 1
            n_chars += len(text)
        counts.append(
            {
                "source": src.name,
                "paths": paths,
                "documents": n_docs,
                "duplicates_dropped": n_dupes,
                "chars": n_chars,
            }
        )
        print(
            f"{src.name:22s} {len(paths):5d} files {n_docs:7d} docs {n_chars:11,d} chars"
            f"  ({time.perf_counter() - start:.1f} s)",
            file=sys.stderr,
        )
    docs.sort()
    return "\n\n".join(text for _, text in docs) + "\n", counts


def build(out_dir: Path, sources: list[Source]) -> dict:
    """Writes corpus.txt, sources.json and SOURCES.md; returns what sources.json holds."""
    corpus, counts = collect(sources)
    records = []
    for src, count in zip(sources, counts, strict=True):
        paths = count.pop("paths")
        owners = sorted(set(file_owners(paths)) | set(src.install))
        versions = {p: v for p in owners if (v := dpkg_version(p))}  # installed ones
        records.append(
            {
                "source": src.name,
                "packages": versions,
                "licence": src.licence,
                "copyright_licences": {p: copyright_licences(p) for p in versions},
                "files": len(paths),
                **{k: v for k, v in count.items() if k != "source"},
            }
        )
    data = corpus.encode("utf-8")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "corpus.txt").write_bytes(data)
    record = {
        "corpus": "corpus.txt",
        "format": "UTF-8; documents separated by a blank line; one paragraph per line",
        "sha256": hashlib.sha256(data).hexdigest(),
        "chars": len(corpus),
        "bytes": len(data),
        "documents": sum(c["documents"] for c in counts),
        "built_by": "python scripts/build_corpus.py OUT_DIR",
        "debian": Path("/etc/debian_version").read_text().strip(),
        "sources": records,
    }
    (out_dir / "sources.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "SOURCES.md").write_text(sources_markdown(record))
    return record


def sources_markdown(record: dict) -> str:
    lines = [
        "# Corpus sources",
        "",
        f"corpus.txt: {record['chars']:,} characters, {record['bytes']:,} bytes, "
        f"{record['documents']:,} documents, sha256 `{record['sha256']}`.",
        f"Built on Debian {record['debian']} by `{record['built_by']}`.",
        "",
        "| source | packages (versions) | licence | files | documents | characters | share |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    total = sum(r["chars"] for r in record["sources"])
    for r in record["sources"]:
        pkgs = ", ".join(f"{p} {v}" for p, v in r["packages"].items())
        lines.append(
            f"| {r['source']} | {pkgs} | {r['licence']} | {r['files']} | {r['documents']:,} "
            f"| {r['chars']:,} | {100 * r['chars'] / total:.1f}% |"
        )
    lines += ["", "Licence fields of the machine-readable copyright files:", ""]
    for r in record["sources"]:
        for pkg, names in r["copyright_licences"].items():
            if names:
                lines.append(f"- {pkg}: {', '.join(names)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument(
        "--min-chars",
        type=int,
        default=10_000_000,
        help="fail if the corpus is smaller (default 10,000,000)",
    )
    ap.add_argument(
        "--skip-install", action="store_true", help="use the Debian packages already installed"
    )
    args = ap.parse_args(argv)
    start = time.perf_counter()
    if not args.skip_install:
        install(sorted({p for s in SOURCES for p in s.install}))
    record = build(args.out_dir, SOURCES)
    print(
        f"{args.out_dir / 'corpus.txt'}: {record['chars']:,} chars, {record['documents']:,} "
        f"documents, sha256 {record['sha256']} ({time.perf_counter() - start:.0f} s)",
        file=sys.stderr,
    )
    if record["chars"] < args.min_chars:
        raise SystemExit(f"corpus has {record['chars']:,} chars, fewer than --min-chars")


if __name__ == "__main__":
    main()
