"""`--precision auto`: fp16 on CUDA, fp32 on every CPU (VNNI or not); int8 only when asked for."""

from __future__ import annotations

import pytest

from headswap.server.inference.precision import (
    choose_precision,
    cpu_flags,
    has_vnni,
    int8_kernels,
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
        (XEON, False, ALL, "fp32"),  # VNNI: int8 would be faster, but auto keeps the model's numbers
        (ALDER_LAKE, False, ALL, "fp32"),
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


def test_auto_says_when_int8_would_pay_off() -> None:
    """The log line of the choice tells an operator on a VNNI CPU what asking for int8 would buy."""
    vnni = choose_precision("auto", on_cuda=False, available=ALL, flags=cpu_flags(XEON))
    assert "avx512_vnni" in vnni.reason and "--precision int8" in vnni.reason
    plain = choose_precision("auto", on_cuda=False, available=ALL, flags=cpu_flags(EPYC))
    assert "lacks" in plain.reason and "avx512_vnni" not in plain.reason
    old = choose_precision("auto", on_cuda=False, available=("fp32", "fp16"), flags=cpu_flags(XEON))
    assert old.precision == "fp32" and "no int8 model" in old.reason


def test_auto_on_this_machine() -> None:
    """Whatever this CPU is (VNNI or not), auto serves fp32 on it."""
    flags = read_cpu_flags()
    choice = choose_precision("auto", on_cuda=False, available=ALL, flags=flags)
    assert choice.precision == "fp32", choice
    assert ("--precision int8 is faster" in choice.reason) and (
        has_vnni(flags) == ("this CPU has" in choice.reason)
    )


def test_int8_kernel_families() -> None:
    """The family the int8 gate's margin is recorded for: VNNI first, then AVX-512 without it, then AVX2."""
    assert (
        int8_kernels(cpu_flags(XEON)) == "avx512_vnni" and int8_kernels(cpu_flags(ALDER_LAKE)) == "avx_vnni"
    )
    assert (
        int8_kernels(cpu_flags(EPYC)) == "avx2" and int8_kernels({"avx512f", "avx512bw", "avx2"}) == "avx512"
    )
    assert int8_kernels(()) == "other"
