"""Which model variant a backbone serves: `--precision auto|fp32|fp16|int8`.

auto keeps the model's own numbers: fp16 on CUDA (tensor cores; fp16's export gate holds it to cosine 0.999
of fp32, and ONNX Runtime's fp16 CPU kernels are slower than its fp32 ones), fp32 on every CPU. int8 runs only
when asked for (`--precision int8`): its embeddings drift by about 0.5% from fp32's (mean cosine 0.995), so an
Embed user who stores vectors would get different ones from different nodes of one fleet, or from one node
rescheduled onto another CPU type, if the choice followed the CPU. The peers do the same (Hugging Face TEI and
Infinity: fp32 on CPU, fp16 on GPU, quantisation opt-in). int8 pays off most on a CPU with VNNI (AVX-512 VNNI
or AVX-VNNI: one instruction multiplies and sums int8 pairs into int32); the choice's log line says whether
this CPU has it. Pure functions over /proc/cpuinfo's text, so the choice is testable on any machine.
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
    except OSError:  # not Linux, or /proc not mounted: no flags known
        return frozenset()


def has_vnni(flags: Iterable[str]) -> bool:
    return any(f in VNNI_FLAGS for f in flags)


def int8_kernels(flags: Iterable[str]) -> str:
    """Which family of ONNX Runtime's x86 int8 kernels runs on a CPU of these flags: "avx512_vnni",
    "avx_vnni", "avx512" (AVX-512 without VNNI), "avx2" or "other". Their rounding differs, so an int8 model's
    drift from fp32 is a property of the model and of this family; the export's parity gate records which
    family it was measured on (`BackboneManifest.parity_int8_cpu`)."""
    flags = set(flags)
    for family, flag in (("avx512_vnni", "avx512_vnni"), ("avx_vnni", "avx_vnni"), ("avx512", "avx512bw")):
        if flag in flags:
            return family
    return "avx2" if "avx2" in flags else "other"


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
        hint = f"this CPU has {'/'.join(vnni)}: --precision int8 is faster at a small cost in accuracy"
    elif "int8" in available:
        hint = "--precision int8 is faster at a small cost in accuracy (most with VNNI, which this CPU lacks)"
    else:
        hint = "this backbone has no int8 model"
    return PrecisionChoice("fp32", f"auto: CPU, the model's own numbers; {hint}")
