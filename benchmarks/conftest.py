"""Benchmark helpers: device cases, bytes moved, and a closing table of native/reference ratios.

Each benchmark records `bytes` (the fewest bytes the op must move: every input read once, the
output written once) and, after the run, `gbps`; `test_copy_bandwidth` measures the device's
copy bandwidth in the same session so that GB/s can be read against it.
"""

import pytest
import torch

CUDA = torch.cuda.is_available()
RESULTS: dict[str, dict[str, float]] = {}
NOTES: list[str] = []  # free-form closing lines (end-to-end sampling figures)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def record(benchmark, key: str, impl: str, nbytes: int, device: str) -> None:
    """Store bytes and device in extra_info; after the run, GB/s and the mean for the summary."""
    benchmark.extra_info.update(bytes=nbytes, device=device_name(device))
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    mean = stats.stats.mean
    benchmark.extra_info["gbps"] = nbytes / mean / 1e9
    RESULTS.setdefault(key, {})[impl] = mean
    RESULTS[key][f"{impl}_gbps"] = nbytes / mean / 1e9


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    if NOTES:
        tr.section("fsdfm: end-to-end sampling")
        for line in NOTES:
            tr.write_line(line)
    if not RESULTS:
        return
    tr.section("fsdfm: native vs reference (same run)")
    copy = {k: v for k, v in RESULTS.items() if k.startswith("copy")}
    for key, row in copy.items():
        tr.write_line(f"{key:<48} {row['native_gbps']:8.1f} GB/s (device copy bandwidth)")
    for key, row in sorted(RESULTS.items()):
        if key in copy or "native" not in row:
            continue
        ratio = f"{row['ref'] / row['native']:7.1f}x" if "ref" in row else "      -"
        # Peers measured in the same case (e.g. the transformers-style filter chain).
        peers = "".join(
            f"  {impl}/native {row[impl] / row['native']:6.1f}x"
            for impl in sorted(row)
            if impl not in ("native", "ref") and not impl.endswith("_gbps")
        )
        tr.write_line(
            f"{key:<48} native {row['native'] * 1e3:9.3f} ms  {row['native_gbps']:7.1f} GB/s"
            f"  ref/native {ratio}{peers}"
        )


DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA device")]
    ),
]
