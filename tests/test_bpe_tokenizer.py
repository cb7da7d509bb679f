"""Byte-level BPE tokenizers (train_bpe, BPETokenizer, get_tokenizer by path) and the cleaning
functions of fsdfm.corpus, on small texts written here: no apt, no network."""

import random
from pathlib import Path

import pytest

from fsdfm.corpus import Source, collect
from fsdfm.corpus.htmltext import clean_html
from fsdfm.corpus.plain import parse_devil, parse_fortunes, parse_gcide, parse_jargon, parse_kjv
from fsdfm.corpus.roff import clean_roff
from fsdfm.corpus.rst import clean_rst
from fsdfm.corpus.sources import each_file
from fsdfm.corpus.text import is_prose, normalize
from fsdfm.tokenizer import BPETokenizer, get_tokenizer, train_bpe

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A tokenizer splits text into pieces that a model can count.",
    "In the beginning the heaven and the earth were without form.",
    "Pipes and FIFOs provide a unidirectional interprocess communication channel.",
    "The json module exposes an API familiar to users of the pickle module.",
    "Hope was overthrown, yet could not be abandoned.",
    "Every package in Debian must have a copyright file describing its licence.",
    "She thought it a crow, but it turned out to be a monk croaking a text.",
    "Numbers such as 1913, 2023 and 42 appear in dictionaries and manuals alike.",
    "Café, naïve, façade: accented words are common enough in English prose.",
]
TEXTS = [
    "Hello world",
    "Ünïcödé ✓ 日本語 — emoji 🤖, two  spaces,\n\ttabs and a trailing space ",
    "<|endoftext|>between<|endoftext|>",
    "never seen: ʃʒ ŋ ∮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00\x7f\r\n",
    "",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    paragraphs = [" ".join(rng.sample(SENTENCES, 5)) for _ in range(60)]  # about 16 KB
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory) -> BPETokenizer:
    pytest.importorskip("tokenizers")
    return train_bpe([corpus], 400, tmp_path_factory.mktemp("bpe") / "tokenizer.json")


def test_train_bpe(bpe):
    assert isinstance(bpe, BPETokenizer)
    assert bpe.eos_id == 0 and 300 < bpe.vocab_size <= 400
    assert bpe.encode("<|endoftext|>") == [bpe.eos_id]
    assert bpe.decode([bpe.eos_id]) == "<|endoftext|>"
    assert Path(bpe.name).name == "tokenizer.json"


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


def test_compresses_better_than_bytes(bpe, corpus):
    text = corpus.read_text(encoding="utf-8")
    assert len(text.encode()) / len(bpe.encode(text)) > 2  # bytes per token; bytes give 1
    assert len(bpe.encode(SENTENCES[0])) < len(SENTENCES[0]) / 2


def test_get_tokenizer_by_file_and_directory(bpe):
    file = Path(bpe.name)
    for name in (str(file), str(file.parent)):
        tok = get_tokenizer(name)
        assert isinstance(tok, BPETokenizer) and tok.name == name
        assert tok.vocab_size == bpe.vocab_size and tok.eos_id == bpe.eos_id
        assert tok.encode(TEXTS[1]) == bpe.encode(TEXTS[1])
    assert get_tokenizer(bpe.name) is get_tokenizer(bpe.name)  # cached like the others


def test_train_bpe_into_directory(corpus, tmp_path):
    pytest.importorskip("tokenizers")
    tok = train_bpe([corpus], 300, tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and tok.vocab_size <= 300
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe([corpus], 256, tmp_path)


def test_bad_ids_and_names(bpe, tmp_path):
    with pytest.raises(ValueError, match="token ids"):
        bpe.decode([bpe.vocab_size])
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer(str(tmp_path / "missing.json"))


# ---------------------------------------------------------------------------------------------
# fsdfm.corpus (scripts/build_corpus.py)


RST = """\
:mod:`json` --- JSON encoder
============================

.. module:: json
   :synopsis: Encode and decode the JSON format.

.. index:: single: JSON

The :mod:`json` module exposes an API familiar to users of the
:mod:`marshal` and :mod:`pickle` modules, see :pep:`8` and
`the spec <https://json.org>`_.  Use **strong** and *emphasis*.

Encoding basic Python object hierarchies::

    >>> import json
    >>> json.dumps(['foo'])

.. code-block:: python

   print("dropped")

.. note:: Be cautious when parsing JSON data from untrusted sources.

Basic Usage
-----------

.. function:: dump(obj, fp, *, skipkeys=False)
   :noindex:

   Serialize *obj* as a JSON formatted stream to *fp* (a
   ``.write()``-supporting :term:`file-like object`).

   * If *skipkeys* is true, then dict keys that are not of a basic
     type will be skipped.
   * The :class:`~json.JSONEncoder` is used by default.

   ======  ======
   JSON    Python
   ======  ======
   object  dict
   ======  ======

   +------+--------+
   | grid | table  |
   +------+--------+

   .. versionchanged:: 3.6
      All optional parameters are now keyword-only.

.. [#] A footnote that is dropped.

term
   A definition under its term.
"""


def test_clean_rst():
    assert clean_rst(RST) == [
        [
            "The json module exposes an API familiar to users of the marshal and pickle "
            "modules, see PEP 8 and the spec.  Use strong and emphasis.",
            "Encoding basic Python object hierarchies:",
            "Be cautious when parsing JSON data from untrusted sources.",
        ],
        [
            "Serialize obj as a JSON formatted stream to fp (a .write()-supporting "
            "file-like object).",
            "If skipkeys is true, then dict keys that are not of a basic type will be skipped.",
            "The JSONEncoder is used by default.",
            "All optional parameters are now keyword-only.",
            "term",
            "A definition under its term.",
        ],
    ]


HTML = """<html><head><title>T</title><style>p {}</style></head><body>
<div class="toc"><dl class="toc"><dt>1. Chapter One Is Here</dt></dl></div>
<h1 class="title">Chapter One</h1>
<div class="para">The <code class="command">apt</code> tool installs packages &amp; their
dependencies, as in <em>most</em> distributions.</div>
<pre class="screen">$ apt install foo</pre>
<table><tr><td>a table cell with several words</td></tr></table>
<ul><li>First item of the list.</li><li>Second item.</li></ul>
<h2>Section Two</h2><p>A paragraph in the second section.<br/>After a line break.</p>
</body></html>"""


def test_clean_html():
    assert clean_html(HTML) == [
        [
            "The apt tool installs packages & their\ndependencies, as in most distributions.",
            "First item of the list.",
            "Second item.",
        ],
        ["A paragraph in the second section.", "After a line break."],
    ]


ROFF = r""".\" Copyright comment
.TH PIPE 7 2023-02-05 "Linux man-pages 6.03"
.SH NAME
pipe \- overview of pipes and FIFOs
.SH SYNOPSIS
.nf
.B #include <unistd.h>
.fi
.SH DESCRIPTION
Pipes and FIFOs provide a unidirectional
interprocess communication channel; see
.BR pipe (2)
and
.IR "the signal handler" ,
which is \fBnot\fP portable \(em really.
.PP
.EX
int fd[2];
.EE
.TP
.B O_NONBLOCK
Set the file status flag on the open file description.
.SH SEE ALSO
.BR mkfifo (1)
"""


def test_clean_roff():
    assert clean_roff(ROFF) == [
        [
            "pipe - overview of pipes and FIFOs",
            "Pipes and FIFOs provide a unidirectional interprocess communication channel; see "
            "pipe(2) and the signal handler, which is not portable \u2014 really.",
            "O_NONBLOCK",
            "Set the file status flag on the open file description.",
        ]
    ]


GCIDE = """Abandon \\A*ban"don\\ ([.a]*b[a^]n"d[u^]n), v. t. [imp. & p. p.
   {Abandoned} (-d[u^]nd); p. pr. & vb. n. {Abandoning}.] [OF.
   abandoner, F. abandonner; a (L. ad) + bandon permission.
   See {Ban}.]
   1. To cast or drive out; to banish; to expel; to reject.
      [Obs.]
      [1913 Webster]

            That he might . . . abandon them from him. --Udall.
      [1913 Webster]

   2. To give up absolutely; to forsake entirely; -- used of
      persons in the caf['e] and the [ae]ther.
      [1913 Webster]

   Syn: To give up; yield; forego; cede; surrender; resign.

   Usage: {To Abandon}, {Desert}, {Forsake}. These words agree
          in representing a person as giving up or leaving some
          object.
          [1913 Webster]
"""


def test_parse_gcide():
    assert parse_gcide(GCIDE) == [
        [
            "Abandon, v. t. To cast or drive out; to banish; to expel; to reject.",
            "That he might... abandon them from him.",
            "To give up absolutely; to forsake entirely; -- used of persons in the caf\u00e9 "
            "and the \u00e6ther.",
            "To Abandon, Desert, Forsake. These words agree in representing a person as giving "
            "up or leaving some object.",
        ]
    ]


FORTUNES = """A fool and his money are soon parted, and this line is long enough to be
wrapped by the editor of the file.
\t\t-- Thomas Tusser, "Five Hundred Points of Good
\t\t   Husbandry"
%
Roses are red,
  Violets are blue.
%
"""


def test_parse_fortunes():
    assert parse_fortunes(FORTUNES) == [
        [
            "A fool and his money are soon parted, and this line is long enough to be wrapped "
            "by the editor of the file.",
            '-- Thomas Tusser, "Five Hundred Points of Good Husbandry"',
        ],
        ["Roses are red,", "Violets are blue."],  # verse keeps its lines
    ]


def test_parse_devil_jargon_kjv():
    devil = (
        "ACCOUNTABILITY, n.  The mother of caution, and a definition long enough to wrap\n"
        "where Brillat-\nSavarin is hyphenated.\n\n"
        '    "My accountability, bear in mind,"\n'
        '        Said the Grand Vizier:  "Yes, yes,"\n'
        "                                                  Joram Tate\n"
    )
    assert parse_devil(devil) == [
        [
            "ACCOUNTABILITY, n.  The mother of caution, and a definition long enough to wrap "
            "where Brillat-Savarin is hyphenated.",
            '"My accountability, bear in mind,"',
            'Said the Grand Vizier:  "Yes, yes,"',
            "Joram Tate",
        ]
    ]
    jargon = (
        "   :hacker: n.\n\n   [originally, someone who makes furniture with an axe]\n\n"
        "   1. A person who enjoys exploring the details of programmable systems. See\n"
        "   {hack value}.\n\n   :hack value: /hak val'yoo/, n.\n\n   Often adduced as a reason.\n"
    )
    assert parse_jargon(jargon) == [
        [
            "hacker, n. [originally, someone who makes furniture with an axe]",
            "A person who enjoys exploring the details of programmable systems. See hack value.",
        ],
        ["hack value, n. Often adduced as a reason."],
    ]
    kjv = "\nGenesis 1\n\n  1 In the beginning.\n  2 And the earth.\n\nGenesis 2\n\n  1 Thus.\n"
    assert parse_kjv(kjv) == [["In the beginning.", "And the earth."], ["Thus."]]


def test_normalize_and_filter():
    assert normalize("  caf\u0065\u0301\u00a0 au\u00adlait\t\n ok ") == "caf\u00e9 aulait ok"
    assert is_prose("This is a sentence.", 4)
    assert not is_prose("Too short.", 4)
    assert not is_prose("x = f(a[0], b[1]) + 42 * {k: v}", 1)


def test_collect_is_deterministic_and_deduplicates(tmp_path, capsys):
    (tmp_path / "a.rst").write_text(RST)
    (tmp_path / "b.txt").write_text(FORTUNES + FORTUNES)  # each saying twice

    def sources():
        return [
            Source(
                "rst",
                [],
                "test",
                lambda: [str(tmp_path / "a.rst")],
                each_file(clean_rst),
            ),
            Source(
                "fortune",
                [],
                "test",
                lambda: [str(tmp_path / "b.txt")],
                each_file(parse_fortunes),
                min_words=1,
            ),
        ]

    first, counts = collect(sources())
    second, _ = collect(sources())
    assert first == second
    docs = first[:-1].split("\n\n")
    assert first.endswith("\n") and not first.endswith("\n\n")
    assert all(d and "\n\n" not in d and d == d.strip() for d in docs)
    assert [c["documents"] for c in counts] == [2, 2]
    assert [c["duplicates_dropped"] for c in counts] == [0, 2]
    assert sum(c["chars"] for c in counts) + 2 * (len(docs) - 1) + 1 == len(first)
    assert "Roses are red,\nViolets are blue." in docs
