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

from .spec import Hyperparameters, Launcher


def deepspeed_config(launcher: Launcher, hp: Hyperparameters) -> dict[str, Any]:
    """The ZeRO config of a ``deepspeed`` launch, every value concrete (the HF Trainer checks each against its
    TrainingArguments): ``train_batch_size`` = micro batch x gradient accumulation x ``num_processes``.

    The optimizer is the Trainer's torch AdamW (``zero_allow_untested_optimizer``), so no compiled DeepSpeed op is
    needed, with CPU offload too: on a CPU node the offloaded optimizer states already live in host memory."""
    zero: dict[str, Any] = {"stage": launcher.zero_stage, "contiguous_gradients": True, "overlap_comm": False,
                            "reduce_scatter": True}
    if launcher.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if launcher.offload_parameters and launcher.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if launcher.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": hp.batch_size * hp.gradient_accumulation_steps * launcher.num_processes,
        "train_micro_batch_size_per_gpu": hp.batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "gradient_clipping": hp.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": hp.precision == "bf16"},
        "fp16": {"enabled": hp.precision == "fp16"},
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000,
        "wall_clock_breakdown": False,
    }


def launch_command(launcher: Launcher, plan_path: Path, port: int) -> list[str]:
    """``torchrun`` for ``num_processes`` ranks on this node; with the ``deepspeed`` launcher kind the ranks run
    the Trainer's DeepSpeed engine with :func:`deepspeed_config` (torchrun sets the same RANK / LOCAL_RANK /
    WORLD_SIZE / MASTER_* variables as DeepSpeed's own launcher, which needs a GPU or oneCCL's mpirun on CPU)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(launcher.num_processes),
            "--master_addr", "127.0.0.1", "--master_port", str(port),
            "-m", "services.training.recipes.rank", str(plan_path)]


def launch_env(workdir: Path, omp_threads: int, cuda: bool) -> dict[str, str]:
    """The ranks' environment: the job's own plus one OpenMP thread per rank and build dirs in the workdir.

    Without CUDA, DeepSpeed runs on its CPU accelerator (gloo unless oneCCL is installed); the Trainer's
    ``use_cpu`` (not ``ACCELERATE_USE_CPU``, which would turn a DeepSpeed run into plain DDP) picks DDP over gloo
    for the ``torchrun`` launcher."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(omp_threads), DS_BUILD_OPS="0", TOKENIZERS_PARALLELISM="false",
               TORCH_EXTENSIONS_DIR=str(workdir / "torch_extensions"), TRITON_CACHE_DIR=str(workdir / "triton"),
               PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
    if not cuda:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    return env
