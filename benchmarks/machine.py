"""The machine a benchmark's figures came from, printed above every table: timings move ~4x between CPUs of
the same size (AVX2 only vs AVX-512), quality figures a few percent (docs/results/index.md: Reproducibility)."""

from __future__ import annotations

import platform
from pathlib import Path


def describe() -> str:
    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
        platform.processor() or "unknown CPU",
    )
    simd = "AVX-512" if "avx512f" in info else "AVX2 only" if "avx2" in info else "no AVX2"
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"Machine: {model} ({simd}){gpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
