"""HTML to paragraphs (DocBook output: the Debian Administrator's Handbook, Debian Reference,
the New Maintainers' Guide; Texinfo output: the GNU Coding Standards)."""

from __future__ import annotations

import html.parser

from fsdfm.corpus.text import Doc

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
