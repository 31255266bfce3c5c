"""The host a figure was measured on: the CPU profile the target runtime also prints (``export/hostinfo.py``), plus
torch's threads, the GPU and torch's version. Recorded in bench.json and every bundle's manifest; printed by
``edgedistill doctor``."""
from .runtime.hostinfo import ISA_FLAGS, cpu_flags, cpu_profile  # noqa: F401 (ISA_FLAGS, cpu_flags: used by doctor)


def host_profile() -> dict:
    """The CPU, its INT8-relevant instruction sets, cores and threads, the GPU and the runtimes' versions."""
    import torch

    cuda = torch.cuda.is_available()
    return {**cpu_profile(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.version.cuda if cuda else None,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []}
