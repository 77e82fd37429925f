"""`--precision auto`: fp16 on CUDA, int8 on a CPU with VNNI, fp32 elsewhere; explicit choices are checked."""

from __future__ import annotations

import pytest

from headswap.server.inference.precision import (
    choose_precision,
    cpu_flags,
    has_vnni,
    read_cpu_flags,
)

ALL = ("fp32", "fp16", "int8")
# Abridged /proc/cpuinfo of two real machines: an Ice Lake Xeon (AVX-512 VNNI) and an AMD EPYC Milan (AVX2).
XEON = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16
"""
EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx avx2 fma bmi2 vaes vpclmulqdq rdpid fsrm
"""
ALDER_LAKE = "flags\t\t: sse avx avx2 avx_vnni\n"


def test_flags_are_read_from_cpuinfo() -> None:
    assert "avx512_vnni" in cpu_flags(XEON) and "avx2" in cpu_flags(EPYC)
    assert has_vnni(cpu_flags(XEON)) and has_vnni(cpu_flags(ALDER_LAKE)) and not has_vnni(cpu_flags(EPYC))
    assert cpu_flags("") == frozenset() and not has_vnni(cpu_flags("processor : 0\n"))


@pytest.mark.parametrize(
    ("cpuinfo", "on_cuda", "available", "expected"),
    [
        (XEON, False, ALL, "int8"),
        (ALDER_LAKE, False, ALL, "int8"),
        (EPYC, False, ALL, "fp32"),
        (XEON, True, ALL, "fp16"),
        (XEON, False, ("fp32", "fp16"), "fp32"),  # an older backbone directory without an int8 model
        (EPYC, True, ("fp32",), "fp32"),
    ],
)
def test_auto(cpuinfo: str, on_cuda: bool, available: tuple[str, ...], expected: str) -> None:
    choice = choose_precision("auto", on_cuda=on_cuda, available=available, flags=cpu_flags(cpuinfo))
    assert choice.precision == expected and choice.reason.startswith("auto")


def test_explicit_choices() -> None:
    assert choose_precision("int8", on_cuda=False, available=ALL, flags=()).precision == "int8"
    assert choose_precision("fp32", on_cuda=False, available=ALL, flags=cpu_flags(XEON)).precision == "fp32"
    with pytest.raises(ValueError, match="no int8 model"):
        choose_precision("int8", on_cuda=False, available=("fp32", "fp16"), flags=cpu_flags(XEON))


def test_auto_on_this_machine() -> None:
    """What auto picks here follows from this CPU's own flags: int8 exactly when it has VNNI."""
    flags = read_cpu_flags()
    choice = choose_precision("auto", on_cuda=False, available=ALL, flags=flags)
    assert choice.precision == ("int8" if has_vnni(flags) else "fp32"), choice
