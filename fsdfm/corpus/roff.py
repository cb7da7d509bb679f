"""Manual pages to paragraphs (roff with the man macros: the Linux man-pages project)."""

from __future__ import annotations

import re

from fsdfm.corpus.text import Doc

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
