"""``edgedistill doctor``: backends, the host's instruction sets, and which recipes run offline."""
import importlib.util

import pytest

from edgedistill.cli import main
from edgedistill.host import cpu_flags

X86 = """processor	: 0
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu sse2 avx2 fma avx512f avx512_vnni amx_tile amx_int8
"""
ARM = """processor	: 0
Features	: fp asimd evtstrm aes crc32 asimddp
CPU part	: 0xd42
"""


def test_cpu_flags_name_the_int8_relevant_instruction_sets():
    assert cpu_flags(X86) == ("Intel(R) Xeon(R) Platinum 8480+", ["AVX2", "FMA", "AVX-512", "AVX-512 VNNI", "AMX",
                                                                    "AMX-INT8"])
    assert cpu_flags(ARM)[1] == ["NEON", "NEON dot product"]  # a Jetson's Cortex-A78AE lists these


def test_doctor_lists_backends_host_and_offline_recipes(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for backend in ("onnxruntime", "openvino"):
        if importlib.util.find_spec(backend) is None:
            pytest.skip(f"{backend} is not installed here")
        assert f"  {backend}" in out and "present" in out.split(f"  {backend}")[1].splitlines()[0]
    if importlib.util.find_spec("tensorrt") is None:
        line = out.split("  tensorrt")[1].splitlines()[0]
        assert "absent" in line and "pip install 'edgedistill[tensorrt]'" in line
    assert "  isa      " in out
    assert "quickstart      runs here offline" in out
    assert "pets-tinyvit    needs teacher weights clip" in out
