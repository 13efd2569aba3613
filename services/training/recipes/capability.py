"""Hardware checks a recipe makes before it loads anything."""

from __future__ import annotations

import importlib.util

from services.core.errors import FailedPrecondition

from .spec import TrainingSpec


def describe_node() -> str:
    import torch

    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return f"cuda ({names}; torch {torch.__version__})"
    return f"cpu (torch {torch.__version__}, no CUDA device)"


def check_capabilities(spec: TrainingSpec) -> None:
    """FailedPrecondition (HARDWARE_UNSUPPORTED) for a method or precision this node cannot run."""
    import torch

    cuda = torch.cuda.is_available()
    if spec.method == "qlora":
        bnb = importlib.util.find_spec("bitsandbytes") is not None
        if not (cuda and bnb):
            missing = [] if bnb else ["bitsandbytes is not installed"]
            raise FailedPrecondition(
                f"qlora needs a CUDA GPU with bitsandbytes; this node has: {describe_node()}"
                + "".join(f", {m}" for m in missing),
                reason="HARDWARE_UNSUPPORTED", metadata={"method": "qlora", "cuda": str(cuda), "bitsandbytes": str(bnb)})
    if spec.hyperparameters.precision == "fp16" and not cuda:
        raise FailedPrecondition(f"precision fp16 needs a CUDA GPU; this node has: {describe_node()} (use fp32 or bf16)",
                                 reason="HARDWARE_UNSUPPORTED", metadata={"precision": "fp16"})
    if spec.launcher.kind != "deepspeed":
        return
    if importlib.util.find_spec("deepspeed") is None:
        raise FailedPrecondition("launcher deepspeed needs the deepspeed package on this node",
                                 reason="HARDWARE_UNSUPPORTED", metadata={"launcher": "deepspeed"})
    if not cuda and spec.hyperparameters.precision != "fp32":
        # ZeRO-2/3 (with or without CPU offload) run on DeepSpeed's CPU accelerator over gloo, tested in fp32 only
        raise FailedPrecondition(
            f"launcher deepspeed on a node without CUDA trains in fp32 only; this node has: {describe_node()}",
            reason="HARDWARE_UNSUPPORTED",
            metadata={"launcher": "deepspeed", "precision": spec.hyperparameters.precision})
