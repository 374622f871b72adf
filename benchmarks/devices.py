"""The device helpers the benchmark scripts share: a readable device name, a synchronize before
and after timing on a GPU, and the process's peak resident memory."""
from __future__ import annotations

import platform
import resource
import sys
from pathlib import Path


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def worker_device(threads: int | None, device: str) -> str:
    """A benchmark worker's device (`--device`: auto, cpu or cuda), torch's thread count set first
    when `--threads` gives one."""
    import torch

    from ktpipe.models import pick_device

    if threads:
        torch.set_num_threads(threads)
    return pick_device(device)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
