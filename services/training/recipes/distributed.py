"""Several training processes: the DeepSpeed config generated from the spec, the launcher command
(``torchrun``), and the rank entry point ``python -m services.training.recipes.rank``.

Only rank 0 reports: it writes JSON event lines to ``events.jsonl`` in the job's workdir, which the
job's child process relays to the job context; a cancel is a flag file every rank polls (and agrees
on with an all-reduce, so all ranks stop at the same step).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from .spec import Launcher


def deepspeed_config(launcher: Launcher) -> dict[str, Any]:
    """A ZeRO config for the HF Trainer integration ("auto" values are filled from TrainingArguments)."""
    zero: dict[str, Any] = {"stage": launcher.zero_stage, "contiguous_gradients": True, "overlap_comm": False,
                            "reduce_scatter": True}
    if launcher.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        if launcher.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if launcher.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        # The Trainer's torch AdamW (no compiled DeepSpeed ops are needed, also with CPU offload).
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }


def launch_command(launcher: Launcher, plan_path: Path, port: int) -> list[str]:
    """``torchrun`` for ``num_processes`` ranks on this node; with the ``deepspeed`` launcher kind the ranks run
    the Trainer's DeepSpeed engine with :func:`deepspeed_config` (torchrun starts them as DeepSpeed's own
    launcher would, and also works where that launcher finds no GPU)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(launcher.num_processes),
            "--master_addr", "127.0.0.1", "--master_port", str(port),
            "-m", "services.training.recipes.rank", str(plan_path)]


def launch_env(workdir: Path, omp_threads: int, cuda: bool) -> dict[str, str]:
    """The ranks' environment: the job's own plus one OpenMP thread per rank and build dirs in the workdir."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(omp_threads), DS_BUILD_OPS="0", TOKENIZERS_PARALLELISM="false",
               TORCH_EXTENSIONS_DIR=str(workdir / "torch_extensions"), TRITON_CACHE_DIR=str(workdir / "triton"),
               PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
    if not cuda:
        env.update(ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="")
    return env
