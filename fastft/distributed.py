"""Several processes, one run: what fastft adds to torchrun/accelerate and the HF Trainer.

fastft distributes nothing itself. torchrun (or `accelerate launch`) starts one process
per GPU and sets RANK/WORLD_SIZE; the Trainer, through accelerate, wraps the model in
DDP (or FSDP), gives each process its share of every batch and averages the gradients.
What is left to fastft, and lives here:

- one process (rank 0) writes the run folder; the others wait for it where it matters;
- all processes agree before acting on something only one of them saw (a Ctrl-C);
- settings that cannot work with several processes are refused before any starts;
- `fastft run --nproc N` becomes `torchrun --standalone --nproc-per-node N -m fastft run ...`.

Nothing here imports torch at module level: the CLI imports this file.
"""

from __future__ import annotations

import contextlib
import os
import sys

from fastft.errors import FastftError


def world_size() -> int:
    """Processes in this run, as set by torchrun/accelerate (1 when started plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True in the one process that writes the run folder (global rank 0)."""
    return int(os.environ.get("RANK", "0")) == 0


def under_launcher() -> bool:
    """True when torchrun or `accelerate launch` started this process."""
    return "LOCAL_RANK" in os.environ


def process_state():
    """accelerate's `PartialState`, joining this run's processes on first use.

    fastft needs it before the Trainer exists (to wait for rank 0), so it is created here with
    the settings the Trainer would use (gloo on CPU, NCCL on GPU, the Trainer's 30-minute
    `ddp_timeout`); the Trainer then reuses it.
    """
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    if not torch.cuda.is_available():
        # accelerate would name each CPU process's device "cpu:0", which the Trainer then passes to
        # torch.load as a map_location it cannot restore to: resuming a checkpoint would fail.
        os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=1800))


def wait_for_everyone() -> None:
    """Block until every process gets here (nothing when there is one process)."""
    if world_size() > 1:
        process_state().wait_for_everyone()


def any_process(flag: bool) -> bool:
    """`flag` OR-ed over all processes. A collective: every process must call it at the same point."""
    if world_size() == 1:
        return flag
    import torch
    import torch.distributed as dist

    state = process_state()
    value = torch.tensor([int(flag)], device=state.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def leave_process_group() -> None:
    """Leave the process group, if this process joined one, before exiting on an error.

    Left to interpreter exit, gloo's threads sometimes end the process with SIGABRT ("terminate
    called without an active exception"; 5 of 20 runs of its test under torchrun on CPU) instead of the
    exit code fastft chose. Imports nothing: without torch loaded there is no group to leave.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def local_main_first():
    """Let the first process of each machine run the block before the others (e.g. fill a cache)."""
    if world_size() == 1:
        yield
        return
    with process_state().local_main_process_first():
        yield


def check_processes(recipe, backend: str, processes: int) -> None:
    """Refuse what cannot run as `processes` processes, before any of them loads a model.

    Raises `FastftError`.
    """
    if processes > 1 and backend == "unsloth":
        # Unsloth documents DDP through accelerate, but fastft's unsloth backend has not been run that
        # way; refusing is better than a hang or a silent single-GPU run on every rank.
        raise FastftError(
            f"--backend unsloth runs as one process on one GPU, and this run has {processes} processes "
            "(--nproc, torchrun or accelerate launch). Use --backend hf for several GPUs, or drop --nproc / "
            "run without torchrun."
        )
    if recipe.train.fsdp and processes < 2:
        raise FastftError(
            f"{recipe.source}: `train.fsdp = true` shards the model across processes, and this run has one. "
            "Start one process per GPU (`fastft run RECIPE --nproc N`, or torchrun), or set `train.fsdp = false`."
        )
    if recipe.train.fsdp:
        import torch

        if not torch.cuda.is_available():
            raise FastftError(
                f"{recipe.source}: `train.fsdp = true` needs NVIDIA GPUs (accelerate has no FSDP for CPU "
                "processes). Set `train.fsdp = false` to train with plain data parallelism here."
            )


def torchrun_command(nproc: int, fastft_args: list[str]) -> list[str]:
    """The command that runs `fastft <fastft_args>` as `nproc` processes on this machine.

    `--standalone` picks a free port for the rendezvous, so two runs on one machine do not collide.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "fastft", *fastft_args]
