"""Process groups for DistributedDataParallel: NCCL on GPU, gloo on CPU; one process is a world of one.

Where a multi-process world comes from, first match wins:

1. torchrun (``torchrun --nproc_per_node=N -m fixedcls.commands.train ...``, single or multi node): it sets
   RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT itself.
2. a task of a submitit job (Hydra's ``hydra/launcher=slurm`` / ``submitit_slurm`` / ``submitit_local``
   with ``tasks_per_node * nodes > 1``): each task is one process; rank, world size, local rank and the
   master host come from ``submitit.JobEnvironment()``.
3. a plain ``srun`` step with more than one task (SLURM_STEP_NUM_TASKS > 1): SLURM_PROCID,
   SLURM_LOCALID and the first host of the step's node list.

For 2 and 3 the torch ``env://`` variables are exported before ``init_process_group``; MASTER_ADDR and
MASTER_PORT already in the environment win, otherwise the port is drawn from the job id so every task
of a job picks the same one.  A single process (none of the above) never creates a process group.

Only rank 0 writes the run directory, metrics, checkpoints, plots and W&B; `worker_hydra_args` keeps
the other ranks from creating Hydra run directories of their own, and `train.train` gives every rank
rank 0's run directory.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist

from ..errors import FixedclsError


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device_index: int = 0  # the CUDA device of this process (local_rank, modulo the devices it can see)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensors: Union[torch.Tensor, Sequence[torch.Tensor]]) -> None:
        """Sum a tensor, or each tensor of a sequence, across processes in place (a no-op in one process)."""
        if not self.distributed:
            return
        for tensor in [tensors] if torch.is_tensor(tensors) else tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when `flag` is true on any rank."""
        if not self.distributed:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def all_gather_object(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_buffers(self, *modules: Optional[torch.nn.Module]) -> None:
        """Copy rank 0's buffers (batch-norm running statistics, ...) into every rank's modules.

        DDP broadcasts buffers at the start of each training forward, so after the last step of an
        epoch every rank holds rank 0's statistics updated with its own last batch. Evaluation,
        collapse measures and the EMA must see one set of statistics, the one rank 0 checkpoints.
        """
        if not self.distributed:
            return
        for module in modules:
            if module is not None:
                for buffer in module.buffers():
                    dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def check_same_config(self, config: dict[str, str]) -> None:
        """Stop every rank with the same line when the ranks were started with different configs (flat
        key -> text); otherwise they would build different models or loaders and wait on each other forever."""
        if not self.distributed:
            return
        configs = self.all_gather_object(config)
        for rank, other in enumerate(configs[1:], 1):
            differing = sorted(k for k in set(other) | set(configs[0]) if other.get(k) != configs[0].get(k))
            if differing:
                shown = ", ".join(f"{k}={other.get(k, '<unset>')} (rank 0: {configs[0].get(k, '<unset>')})"
                                  for k in differing[:3])
                more = f" and {len(differing) - 3} more" if len(differing) > 3 else ""
                raise FixedclsError(f"rank {rank} was started with another config than rank 0: {shown}{more}: start "
                                    f"every rank with the same command line and overrides")

    @contextlib.contextmanager
    def fail_together(self) -> Iterator[None]:
        """A block that every rank leaves together: when it raises on any rank, every rank raises one
        FixedclsError with the same line (naming the rank), instead of the others waiting in the next
        collective until a gloo/NCCL timeout.  Inside the block there must be no collective."""
        if not self.distributed:
            yield
            return
        failure, original = None, None
        try:
            yield
        except FixedclsError as error:
            failure = str(error)
        except Exception as error:  # a bug or a system error: this rank keeps its traceback, the others get one line
            failure, original = f"{type(error).__name__}: {error}", error
        self._raise_any(failure, original)

    def on_main(self, task: Callable[[], Any]) -> Any:
        """Rank 0's `task()` result on every rank; when it raises, every rank raises the same line."""
        if not self.distributed:
            return task()
        outcome: tuple = (None, None)
        if self.is_main:
            try:
                outcome = (task(), None)
            except FixedclsError as error:
                outcome = (None, str(error))
            except Exception as error:
                outcome = (None, f"{type(error).__name__}: {error}")
        value, failure = self.broadcast_object(outcome)
        if failure is not None:
            raise FixedclsError(f"rank 0: {failure}")
        return value

    def _raise_any(self, failure: Optional[str], original: Optional[BaseException]) -> None:
        failures = self.all_gather_object(failure)
        failed = [(rank, text) for rank, text in enumerate(failures) if text is not None]
        if not failed:
            return
        if original is not None:
            raise original
        rank, text = failed[0]
        raise FixedclsError(f"rank {rank}: {text}")


@dataclass
class LaunchEnv:
    """The multi-process launch this process belongs to (see the module docstring)."""

    source: str  # torchrun, submitit or srun
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: Optional[str] = None  # None: already in the environment (torchrun)
    master_port: Optional[int] = None


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list: 'gpu[003-004,010],cpu1' -> 'gpu003'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    return prefix if ranges is None else prefix + re.split(r"[-,]", ranges, maxsplit=1)[0]


def _job_port(job_id: str) -> int:
    """A port every task of one job agrees on (the same rule as submitit's TorchDistributedEnvironment)."""
    return random.Random(str(job_id)).randint(20000, 60000)


def launch_env() -> Optional[LaunchEnv]:
    """How this process was launched, or None for a single process."""
    if launched_by_torchrun():
        world_size = int(os.environ["WORLD_SIZE"])
        return LaunchEnv("torchrun", int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", 0)),
                         int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    if "RANK" in os.environ:  # torchrun --nproc_per_node=1, or a world of one set by hand
        return None
    if os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        job = submitit.JobEnvironment()
        if job.num_tasks <= 1:
            return None
        nodes = max(job.num_nodes, 1)
        master = "127.0.0.1" if nodes == 1 else job.hostnames[0]
        return LaunchEnv("submitit", job.global_rank, job.num_tasks, job.local_rank, job.num_tasks // nodes,
                         os.environ.get("MASTER_ADDR", master), int(os.environ.get("MASTER_PORT", _job_port(job.job_id))))
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if tasks > 1 and "SLURM_PROCID" in os.environ:
        nodes = int(os.environ.get("SLURM_STEP_NUM_NODES", os.environ.get("SLURM_JOB_NUM_NODES", "1")) or 1)
        nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or ""
        master = "127.0.0.1" if nodes == 1 or not nodelist else first_host(nodelist)
        job_id = f"{os.environ.get('SLURM_JOB_ID', '0')}.{os.environ.get('SLURM_STEP_ID', '0')}"
        return LaunchEnv("srun", int(os.environ["SLURM_PROCID"]), tasks, int(os.environ.get("SLURM_LOCALID", 0)),
                         max(tasks // max(nodes, 1), 1), os.environ.get("MASTER_ADDR", master),
                         int(os.environ.get("MASTER_PORT", _job_port(job_id))))
    return None


def process_rank() -> int:
    """This process's global rank (0 for a single process), known before any process group exists."""
    env = launch_env()
    return env.rank if env is not None else 0


def export_env(env: LaunchEnv) -> None:
    """Set the variables torch's env:// rendezvous reads (torchrun has set them already)."""
    if env.source == "torchrun":
        return
    os.environ.update({
        "MASTER_ADDR": str(env.master_addr), "MASTER_PORT": str(env.master_port), "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size), "LOCAL_RANK": str(env.local_rank), "LOCAL_WORLD_SIZE": str(env.local_world_size),
    })


def init_world(device_type: str) -> World:
    """Join the process group of a torchrun / submitit / srun launch (NCCL on CUDA, gloo on CPU); a world of one otherwise."""
    env = launch_env()
    if env is None:
        return World()
    export_env(env)
    device_index = 0
    if device_type == "cuda":
        # One process per GPU: a task sees either every GPU of its node (index = local rank) or only its own.
        device_index = env.local_rank % max(torch.cuda.device_count(), 1)
        torch.cuda.set_device(device_index)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return World(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank, device_index=device_index)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


# Hydra settings of a rank > 0: no .hydra/ config copy, no log file; warnings still reach stderr.
WORKER_OVERRIDES = ("hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none")
_WORKER_KEYS = ("hydra.run.dir=", "hydra.sweep.dir=", "hydra.output_subdir=", "hydra/job_logging=",
                "hydra/hydra_logging=", "hydra.job_logging.", "hydra.hydra_logging.")


@contextlib.contextmanager
def worker_hydra_args(argv: list[str]) -> Iterator[Optional[str]]:
    """On a rank > 0 of a multi-process launch, point Hydra's run/sweep dir at a scratch directory.

    Hydra evaluates ``${now:...}`` in each process, so every rank would otherwise make (and fill with
    ``.hydra/`` and a log file) a run directory of its own, possibly with another time stamp. Ranks > 0
    run Hydra in a temporary directory that is removed afterwards; `train.train` then gives them rank 0's
    run directory (a broadcast: robust across nodes, with or without a shared clock or file system).
    ``argv`` (sys.argv) is changed in place for the duration of the block. Yields the scratch dir or None.
    """
    rank = process_rank()
    if rank == 0:
        yield None
        return
    scratch = tempfile.mkdtemp(prefix=f"fixedcls-rank{rank}-")
    original = list(argv)
    kept = [arg for arg in original[1:] if not arg.lstrip("+~").startswith(_WORKER_KEYS)]
    argv[1:] = kept + [f"hydra.run.dir={scratch}", f"hydra.sweep.dir={scratch}", *WORKER_OVERRIDES]
    try:
        yield scratch
    finally:
        argv[:] = original
        shutil.rmtree(scratch, ignore_errors=True)
