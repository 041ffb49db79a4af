"""Process-group setup under torchrun: which rank am I, which device, which backend.

Each rank works on `cuda:LOCAL_RANK` with NCCL where CUDA is present, otherwise on the CPU with gloo.
The torchrun CLI and the tests share this; inside a training script the process group is normally the
trainer's own, and nothing here needs to be called.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Launch:
    """Where this process stands in the job (torchrun's RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {text!r}") from None


def device_and_backend(local_rank: int, cuda_count: int | None = None) -> tuple[torch.device, str]:
    """(cuda:local_rank, "nccl") when this host has CUDA devices, else (cpu, "gloo"). More ranks on a
    host than it has GPUs is an error (two ranks on one GPU would each hold a full weight there)."""
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if count <= 0:
        return torch.device("cpu"), "gloo"
    if not 0 <= local_rank < count:
        raise ValueError(f"LOCAL_RANK={local_rank} but this host has {count} CUDA device(s); start at most "
                         f"{count} processes per node (torchrun --nproc-per-node {count})")
    return torch.device("cuda", local_rank), "nccl"


def from_env(env: Mapping[str, str] | None = None, cuda_count: int | None = None) -> Launch:
    """Read RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them; without them, a single process."""
    env = os.environ if env is None else env
    world = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    local = _env_int(env, "LOCAL_RANK", 0)
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE = {world}), got {rank}")
    if local < 0:
        raise ValueError(f"LOCAL_RANK must be >= 0, got {local}")
    device, backend = device_and_backend(local, cuda_count)
    if world > 1 and device.type == "cuda" and not env.get("LOCAL_RANK", "").strip():
        raise ValueError("WORLD_SIZE > 1 but LOCAL_RANK is not set, so the GPU of this rank is unknown; "
                         "start the job with torchrun (or set LOCAL_RANK)")
    return Launch(rank=rank, world_size=world, local_rank=local, device=device, backend=backend)


def init(launch: Launch | None = None, timeout: timedelta = timedelta(minutes=30)) -> Launch:
    """Join the job's default process group (if it is not joined yet) on this rank's device.

    torchrun provides MASTER_ADDR / MASTER_PORT; `timeout` bounds every collective, so a rank that
    dies makes the others fail instead of waiting forever.
    """
    launch = from_env() if launch is None else launch
    if launch.device.type == "cuda":
        torch.cuda.set_device(launch.device)  # NCCL and all_gather_object use the current device
    if launch.distributed and not dist.is_initialized():
        dist.init_process_group(launch.backend, rank=launch.rank, world_size=launch.world_size, timeout=timeout,
                                device_id=launch.device if launch.device.type == "cuda" else None)
    return launch


def comm_device(local: torch.device, group=None) -> torch.device:
    """The device whose tensors the backend of `group` moves: CUDA tensors for NCCL, CPU ones for
    gloo; `local` when the backend takes it (a "cpu:gloo,cuda:nccl" group takes both)."""
    backend = str(dist.get_backend(group)).lower()
    if local.type == "cuda" and "nccl" not in backend:
        return torch.device("cpu")
    if local.type == "cpu" and "gloo" not in backend and "mpi" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return local
