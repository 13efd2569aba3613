"""What this node can run jobs on: CUDA GPUs, Ascend NPUs, Apple MPS, CPU cores and RAM (training and quantization).

Detected once when the service starts (importing torch takes a moment), then passed down.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

import psutil


@dataclass(frozen=True)
class Device:
    """One accelerator: its name, total and free memory, and (CUDA) compute capability."""

    name: str
    total_memory_bytes: int
    free_memory_bytes: int
    capability: tuple[int, int] | None = None


@dataclass(frozen=True)
class Hardware:
    """The node as training sees it. ``accelerator`` is ``cuda``, ``npu``, ``mps`` or ``cpu``."""

    accelerator: str
    devices: tuple[Device, ...] = ()
    cpu_cores: int = 1
    ram_total_bytes: int = 0
    ram_available_bytes: int = 0
    bitsandbytes: bool = False
    deepspeed: bool = False
    extras: dict[str, str] = field(default_factory=dict)

    @property
    def device_count(self) -> int:
        return len(self.devices)

    def supports_bf16(self) -> bool:
        if self.accelerator == "cuda":
            return all(d.capability is not None and d.capability >= (8, 0) for d in self.devices)
        return self.accelerator == "npu"


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def detect_hardware() -> Hardware:
    """Probe torch (and torch_npu when importable) for accelerators; psutil for CPU and RAM."""
    import torch

    mem = psutil.virtual_memory()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    common = dict(
        cpu_cores=cores,
        ram_total_bytes=mem.total,
        ram_available_bytes=mem.available,
        bitsandbytes=_has_module("bitsandbytes"),
        deepspeed=_has_module("deepspeed"),
    )
    if torch.cuda.is_available():
        devices = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            devices.append(Device(props.name, int(total), int(free), (props.major, props.minor)))
        return Hardware("cuda", tuple(devices), **common)
    if _has_module("torch_npu"):
        import torch_npu  # noqa: F401  - registers torch.npu

        if torch.npu.is_available():  # type: ignore[attr-defined]
            devices = []
            for i in range(torch.npu.device_count()):  # type: ignore[attr-defined]
                free, total = torch.npu.mem_get_info(i)  # type: ignore[attr-defined]
                devices.append(Device(torch.npu.get_device_name(i), int(total), int(free)))  # type: ignore[attr-defined]
            return Hardware("npu", tuple(devices), **common)
    if torch.backends.mps.is_available():
        # MPS shares the system memory.
        return Hardware("mps", (Device("mps", mem.total, mem.available),), **common)
    return Hardware("cpu", (), **common)


def choose_precision(requested: str, hw: Hardware) -> str:
    """``auto`` -> bf16 on Ampere+ CUDA and NPU, fp16 on older CUDA, fp32 on CPU and MPS; else as asked."""
    if requested != "auto":
        return requested
    if hw.supports_bf16():
        return "bf16"
    if hw.accelerator == "cuda":
        return "fp16"
    return "fp32"
