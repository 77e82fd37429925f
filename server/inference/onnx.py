"""The encoder on ONNX Runtime: one long-lived session, CUDA where a GPU is present, CPU otherwise.

`run` is blocking and thread-safe (ONNX Runtime's `run` may be called from several threads); the batcher
calls it from its backbone thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from headswap.server.inference.precision import choose_precision, int8_kernels, read_cpu_flags
from headswap.server.inference.protocols import Backbone
from headswap.server.input_kinds import InputLimits, input_kind
from headswap.server.manifest import PRECISIONS, BackboneManifest

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class OnnxEncoder:
    def __init__(
        self,
        model: Path,
        output_name: str,
        dim: int,
        *,
        providers: list[str],
        precision: str,
        intra_op_threads: int = 0,
        intra_op_spin: bool = False,
        spare_core: bool = False,
    ) -> None:
        import onnxruntime as ort

        # Always an explicit count (0: the CPUs this process may use): left at its default, ONNX Runtime pins
        # its threads to cores, and a pinned thread waits whenever anything else runs on its core (the
        # preprocessing pool, another process): MobileNetV2 batches took twice as long that way here.
        self.threads = intra_op_threads or len(os.sched_getaffinity(0))

        def session(threads: int) -> Any:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = threads
            # Spinning: ONNX Runtime's pool threads busy-wait for the next piece of work instead of sleeping.
            # It saves the wake-up between operators, and costs the CPU they burn while waiting (measured in
            # docs/BENCHMARKS.md; `--intra-op-spin`).
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if intra_op_spin else "0")
            return ort.InferenceSession(str(model), sess_options=options, providers=providers)

        self.session = session(self.threads)
        self.provider = self.session.get_providers()[0]
        if providers[0] == CUDA and self.provider != CUDA:
            log.warning("CUDA provider requested but unavailable (CUDA or cuDNN missing); running on CPU")
        # While the server refuses calls, its event loop needs a core of its own to refuse them in milliseconds:
        # on 2 cores, ONNX Runtime's two threads took it, and refusals waited for the loop 0.1 to 1.8 s (issue
        # 23.6). The same model on one thread fewer runs those passes; it got as many calls through under
        # overload as two threads did (docs/BENCHMARKS.md, "Overload: admission control").
        self.spare_session = (
            session(self.threads - 1) if spare_core and self.provider == CPU and self.threads > 1 else None
        )
        self.output_name = output_name
        self.dim = dim
        self.precision = precision

    def run(self, feeds: Mapping[str, np.ndarray], spare_core: bool = False) -> np.ndarray:
        if self.provider == CUDA:
            # I/O binding: inputs go to the device once, the output is written on the device and copied back
            # in one transfer, with no intermediate host buffers from run().
            binding = self.session.io_binding()
            for name, array in feeds.items():
                binding.bind_cpu_input(name, array)
            binding.bind_output(self.output_name, "cuda")
            self.session.run_with_iobinding(binding)
            return np.asarray(binding.copy_outputs_to_cpu()[0], dtype=np.float32)
        session = self.spare_session if spare_core and self.spare_session is not None else self.session
        (out,) = session.run([self.output_name], dict(feeds))
        return np.asarray(out, dtype=np.float32)


def load_backbone(
    directory: Path,
    *,
    device: str = "auto",
    precision: str = "auto",
    intra_op_threads: int = 0,
    max_image_bytes: int = 20 * 1024 * 1024,
    max_image_pixels: int = 40_000_000,
    intra_op_spin: bool = False,
    spare_core: bool = False,
    cpu_flags: frozenset[str] | None = None,
) -> Backbone:
    """An exported backbone directory, ready to serve (not yet warmed up). `cpu_flags`: /proc/cpuinfo's."""
    import onnxruntime as ort

    manifest = BackboneManifest.load(directory)
    limits = InputLimits(max_image_bytes, max_image_pixels)
    preprocessor = input_kind(manifest.input_kind).load_preprocessor(directory, manifest, limits)
    providers = _providers(device, ort.get_available_providers())
    flags = read_cpu_flags() if cpu_flags is None else cpu_flags
    choice = choose_precision(
        precision,
        on_cuda=providers[0] == CUDA,
        available=[p for p in PRECISIONS if manifest.has(p)],
        flags=flags,
    )
    log.info("precision %s: %s (%s)", precision, choice.precision, choice.reason)
    kernels = int8_kernels(flags)
    if choice.precision == "int8" and providers[0] != CUDA and manifest.parity_int8_cpu not in ("", kernels):
        log.warning(
            "int8's parity gate was measured with %s int8 kernels at export, and this CPU runs %s ones: "
            "`headswap export --force` here measures it again",
            manifest.parity_int8_cpu,
            kernels,
        )
    encoder = OnnxEncoder(
        directory / manifest.model_for(choice.precision),
        manifest.output_name,
        manifest.embedding_dim,
        providers=providers,
        precision=choice.precision,
        intra_op_threads=intra_op_threads,
        intra_op_spin=intra_op_spin,
        spare_core=spare_core,
    )
    backbone = Backbone(manifest, preprocessor, encoder)
    log.debug(
        "backbone %s loaded: provider=%s precision=%s fingerprint=%s",
        manifest.name,
        encoder.provider,
        encoder.precision,
        backbone.fingerprint[:12],
    )
    return backbone


def _providers(device: str, available: list[str]) -> list[Any]:
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        return [CUDA, CPU]
    if device != "auto":
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    return [CUDA, CPU] if CUDA in available and _cuda_device_present() else [CPU]


def _cuda_device_present() -> bool:
    """onnxruntime-gpu lists its CUDA provider even on machines with no GPU; ask the driver instead."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0:
            return count.value > 0
    return False
