"""What this CPU offers INT8 inference: AVX2, AVX-512, VNNI, AMX (from /proc/cpuinfo flags)."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CpuFeatures:
    """Instruction-set extensions that decide how fast ONNX Runtime's INT8 kernels can be."""

    model_name: str
    avx2: bool
    avx512: bool
    vnni: bool  # AVX512-VNNI or AVX-VNNI: u8 x s8 dot products in one instruction
    amx: bool  # AMX-INT8 tiles

    @property
    def int8_outlook(self) -> str:
        """One line on what these features mean for INT8 against FP32."""
        if self.amx:
            return (
                "AMX-INT8 and VNNI: ONNX Runtime's U8S8 kernels run on VNNI dot products "
                "(AMX tiles for large GEMMs); INT8 has the most headroom over FP32 here (2-4x)."
            )
        if self.vnni:
            return (
                "VNNI: one instruction per u8 x s8 4-element dot product (VPDPBUSD); INT8 "
                "MatMul / Conv typically run 2-4x faster than FP32."
            )
        if self.avx2:
            return (
                "no VNNI: INT8 uses AVX2 vpmaddubsw, whose int16 sum of two u8 x s8 products "
                "can saturate; 7-bit weights avoid that (QuantConfig(weight=wb.Scheme(bits=7, "
                "per_channel=True))). Expect little gain over FP32: measure with wb.benchmark."
            )
        return "no AVX2: INT8 runs on generic kernels; expect it to be no faster than FP32."

    def summary(self) -> str:
        flags = ", ".join(
            name
            for name, present in (
                ("AVX2", self.avx2),
                ("AVX512", self.avx512),
                ("VNNI", self.vnni),
                ("AMX", self.amx),
            )
            if present
        )
        return f"{self.model_name}: {flags or 'no SIMD extensions found'}. {self.int8_outlook}"

    def __str__(self) -> str:
        return self.summary()


def detect_cpu_features(cpuinfo: str | Path = "/proc/cpuinfo") -> CpuFeatures:
    """Read the CPU flags (Linux); on other systems every flag is reported absent."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return CpuFeatures(platform.processor() or platform.machine(), False, False, False, False)
    flags: set[str] = set()
    model_name = platform.machine()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "model name" and model_name == platform.machine():
            model_name = value.strip()
    return CpuFeatures(
        model_name=model_name,
        avx2="avx2" in flags,
        avx512="avx512f" in flags,
        vnni="avx512_vnni" in flags or "avx_vnni" in flags,
        amx="amx_int8" in flags,
    )


def machine_line() -> str:
    """One line naming the machine a timing was measured on: the CPU, its cores and load, and
    whether it has the instructions ONNX Runtime's integer kernels depend on (VNNI, AMX);
    without VNNI its 8-bit U8S8 kernels saturate int16 sums, so speed and parity differ."""
    import os

    cpu = detect_cpu_features()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"CPU: {cpu.model_name}; {os.cpu_count()} cores; load average {load:.1f}; "
        f"AVX2 {cpu.avx2}, AVX-512 {cpu.avx512}, VNNI {cpu.vnni}, AMX {cpu.amx}"
    )
