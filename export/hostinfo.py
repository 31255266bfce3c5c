"""The CPU a figure was measured on, from the standard library alone: model, machine, cores and the
instruction sets that decide INT8 speed and rounding. ``run.py verify`` prints it on the device; edgedistill records
it (as ``edgedistill.runtime.hostinfo``, with torch's threads and the GPU added) in bench.json and every manifest."""
import os
import platform
from pathlib import Path

# The instruction-set features that decide INT8 (and FP32) speed and, between them, INT8 rounding.
ISA_FLAGS = {"avx2": "AVX2", "fma": "FMA", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI",
             "avx_vnni": "AVX-VNNI", "avx512_bf16": "AVX-512 BF16", "amx_tile": "AMX", "amx_int8": "AMX-INT8",
             "asimd": "NEON", "asimddp": "NEON dot product", "sve": "SVE", "i8mm": "INT8 matmul (i8mm)"}


def cpu_flags(cpuinfo: str) -> tuple[str, list[str]]:
    """(CPU model, the ISA features of ``ISA_FLAGS`` it lists) from the text of /proc/cpuinfo."""
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features"):
            flags |= set(value.split())
    return model, [name for flag, name in ISA_FLAGS.items() if flag in flags]


def cpu_profile() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model, isa = cpu_flags(text)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model or platform.processor() or platform.machine(), "machine": platform.machine(), "isa": isa,
            "cores": os.cpu_count(), "cores_usable": usable, "os": platform.platform(),
            "python": platform.python_version()}
