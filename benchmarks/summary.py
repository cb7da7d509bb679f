"""A benchmark run's figures in two files beside its pytest-benchmark JSON:

- ``summary.json``: ``{"device", "kernel": {"jump_step_gbps", "hbm_gbps", "ref_ratio"},
  "e2e": {"fsdfm_8_steps_s", "dfm_1024_steps_s", "ar_s", "batch", "seq_len"}, "mfu",
  "fused_head": {"fused_s", "unfused_s", "peak_mem_fused_gb", "peak_mem_unfused_gb"}}``, at the
  headline shapes (GPU: B = 32, L = 1,024, V = 50,257, bf16; CPU: the CPU cases' largest batch);
  a figure the run did not measure is null;
- ``README.md``: a table of every figure of the run.

    python benchmarks/summary.py benchmarks/results/NVIDIA_H200   # reads benchmarks.json there
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def _cases(data: dict) -> list[dict]:
    return data.get("benchmarks", [])


def _find(cases, test: str, **params) -> dict | None:
    """The first case of ``test`` whose parameters (or extra_info) match."""
    for case in cases:
        if not case["name"].startswith(test + "["):
            continue
        info = {**case.get("params", {}), **case.get("extra_info", {})}
        if all(info.get(k) == v for k, v in params.items()):
            return case
    return None


def _mean(case) -> float | None:
    return case["stats"]["mean"] if case else None


def summarize(data: dict) -> dict:
    cases = _cases(data)
    gpus = {c.get("extra_info", {}).get("device") for c in cases} - {None, "cpu"}
    device = "cuda" if gpus else "cpu"
    dtype = "bf16" if device == "cuda" else "fp32"
    jump = _find(cases, "test_jump_step", device=device, dtype=dtype, impl="native")
    jump_ref = _find(cases, "test_jump_step", device=device, dtype=dtype, impl="ref")
    copy = _find(cases, "test_copy_bandwidth", device=device)
    e2e = [
        c["extra_info"]
        for c in cases
        if "kind" in c.get("extra_info", {}) and c.get("params", {}).get("device") == device
    ]
    batch = 32 if device == "cuda" else max((e["batch"] for e in e2e), default=None)

    def seconds(prefix: str) -> float | None:
        found = [e["seconds"] for e in e2e if e["kind"].startswith(prefix) and e["batch"] == batch]
        return min(found) if found else None

    ours = next((e for e in e2e if re.match(r"fsdfm (0\.17B|small) 8", e["kind"])
                 and e["batch"] == batch), None)  # fmt: skip
    peer = "gpt2-124M" if device == "cuda" else "gpt2-8M"
    fused = _find(cases, "test_head_step", device=device, case=0, impl="fused")
    unfused = _find(cases, "test_head_step", device=device, case=0, impl="unfused")
    return {
        "device": next(iter(gpus)) if gpus else "cpu",
        "kernel": {
            "jump_step_gbps": jump["extra_info"].get("gbps") if jump else None,
            "hbm_gbps": copy["extra_info"].get("gbps") if copy else None,
            "ref_ratio": _mean(jump_ref) / _mean(jump) if jump and jump_ref else None,
        },
        "e2e": {
            "fsdfm_8_steps_s": seconds("fsdfm 0.17B 8") or seconds("fsdfm small 8"),
            "dfm_1024_steps_s": seconds("dfm 0.17B") or seconds("dfm small"),
            "ar_s": seconds(peer),
            "batch": batch,
            "seq_len": ours["seq_len"] if ours else None,
        },
        "mfu": ours.get("mfu") if ours and device == "cuda" else None,
        "fused_head": {
            "fused_s": _mean(fused),
            "unfused_s": _mean(unfused),
            "peak_mem_fused_gb": fused["extra_info"].get("peak_gb") if fused else None,
            "peak_mem_unfused_gb": unfused["extra_info"].get("peak_gb") if unfused else None,
        },
    }


def _fmt(value, spec: str = ".3g") -> str:
    return "" if value is None else format(value, spec)


def markdown(data: dict, summary: dict) -> str:
    cases = _cases(data)
    lines = [
        f"# Benchmarks on {summary['device']}",
        "",
        "Every figure of one `pytest benchmarks` run (`benchmarks.json`; summary in "
        "`summary.json`, made by `python benchmarks/summary.py`).",
        "",
        "## Ops and the fused head",
        "",
        "| case | mean (ms) | GB/s | peak (GB) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for case in cases:
        info = case.get("extra_info", {})
        if "kind" in info:
            continue
        mean = _fmt(case["stats"]["mean"] * 1e3)
        gbps, peak = _fmt(info.get("gbps"), ".1f"), _fmt(info.get("peak_gb"))
        lines.append(f"| {case['name']} | {mean} | {gbps} | {peak} |")
    lines += [
        "",
        "## Whole generations",
        "",
        "| what | B | L | seconds | tokens/s | peak (GB) | TFLOP/s | MFU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case in cases:
        e = case.get("extra_info", {})
        if "kind" in e:
            lines.append(
                f"| {e['kind']} | {e['batch']} | {e['seq_len']} | {_fmt(e['seconds'])} | "
                f"{_fmt(e['tokens_per_s'], '.0f')} | {_fmt(e.get('peak_gb'))} | "
                f"{_fmt(e.get('tflops'), '.1f')} | {_fmt(e.get('mfu'), '.1%')} |"
            )
    lines += ["", "## Summary", "", "```json", json.dumps(summary, indent=1), "```", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="a results folder holding benchmarks.json")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    data = json.loads((folder / "benchmarks.json").read_text())
    summary = summarize(data)
    (folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (folder / "README.md").write_text(markdown(data, summary))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
