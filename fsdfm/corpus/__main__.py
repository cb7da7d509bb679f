"""`python -m fsdfm.corpus OUT_DIR`: build the corpus (see fsdfm/corpus/__init__.py)."""

from fsdfm.corpus import main

main()
