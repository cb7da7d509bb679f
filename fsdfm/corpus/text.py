"""Paragraph normalisation and filtering, shared by every source of the corpus."""

from __future__ import annotations

import re
import unicodedata

Doc = list[str]  # one document: its paragraphs, each a single line of text

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


def indent_of(line: str) -> int:
    """The number of leading white-space characters."""
    return len(line) - len(line.lstrip())


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
