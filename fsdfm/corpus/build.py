"""Building the corpus: install the sources' packages, extract, clean, deduplicate and order the
documents, and record their provenance (package versions and licences)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from fsdfm._io import atomic_write
from fsdfm.corpus.sources import SOURCES, Source
from fsdfm.corpus.text import is_prose, normalize


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
    atomic_write(out_dir / "corpus.txt", lambda f: f.write(data))
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
    text = json.dumps(record, indent=2, ensure_ascii=False) + "\n"
    atomic_write(out_dir / "sources.json", lambda f: f.write(text.encode()))
    atomic_write(out_dir / "SOURCES.md", lambda f: f.write(sources_markdown(record).encode()))
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
