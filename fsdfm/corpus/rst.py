"""reStructuredText to paragraphs (the Python documentation, Debian Policy, the Developer's
Reference)."""

from __future__ import annotations

import re

from fsdfm.corpus.text import Doc, indent_of

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
        indent = indent_of(line)
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
