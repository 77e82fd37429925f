"""Which model variant a backbone serves: `--precision auto|fp32|fp16|int8`.

auto: fp16 on CUDA (tensor cores; ONNX Runtime's fp16 CPU kernels are slower than fp32 ones); int8 on a CPU
with VNNI (AVX-512 VNNI or AVX-VNNI: one instruction multiplies and sums int8 pairs into int32, so ONNX
Runtime's int8 kernels run well ahead of fp32, without the int16 saturation of the AVX2 path); fp32
elsewhere. Pure functions over /proc/cpuinfo's text, so the choice is testable on any machine.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

VNNI_FLAGS = ("avx512_vnni", "avx_vnni")
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of the first processor listed in /proc/cpuinfo's text (x86: `flags`; they are the same for
    every core of a machine)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def read_cpu_flags(path: Path = CPUINFO) -> frozenset[str]:
    try:
        return cpu_flags(path.read_text(errors="replace"))
    except OSError:  # not Linux, or /proc not mounted: no flags known, so no int8 by default
        return frozenset()


def has_vnni(flags: Iterable[str]) -> bool:
    return any(f in VNNI_FLAGS for f in flags)


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str
    reason: str


def choose_precision(
    requested: str, *, on_cuda: bool, available: Iterable[str], flags: Iterable[str]
) -> PrecisionChoice:
    """The precision to serve. `available`: the precisions the backbone directory has models for."""
    available = set(available)
    if requested != "auto":
        if requested not in available:
            raise ValueError(
                f"--precision {requested}: this backbone has no {requested} model (it has "
                f"{', '.join(sorted(available))}); export it again with `headswap export --force`"
            )
        return PrecisionChoice(requested, "asked for")
    if on_cuda:
        return PrecisionChoice("fp16" if "fp16" in available else "fp32", "auto: CUDA")
    vnni = sorted(set(flags) & set(VNNI_FLAGS))
    if vnni and "int8" in available:
        return PrecisionChoice("int8", f"auto: CPU with {'/'.join(vnni)}")
    if vnni:
        return PrecisionChoice("fp32", "auto: CPU with VNNI, but this backbone has no int8 model")
    return PrecisionChoice("fp32", "auto: CPU without VNNI (int8 pays off with avx512_vnni or avx_vnni)")
