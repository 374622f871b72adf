"""The device helpers the benchmark scripts share: a readable device name, and a synchronize
before and after timing on a GPU."""
from __future__ import annotations

import platform
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
