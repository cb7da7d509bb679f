"""Builds the English training corpus of the bundled model: ``fsdfm.corpus`` (see its docstring
and docs/corpus.md).

    python scripts/build_corpus.py OUT_DIR [--min-chars 10000000] [--skip-install]
"""

from fsdfm.corpus import main

if __name__ == "__main__":
    main()
