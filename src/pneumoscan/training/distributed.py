"""torchrun / DistributedDataParallel helpers. A plain ``python -m pneumoscan train`` is a
world of one; under ``torchrun`` the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``...) selects DDP with nccl on GPUs and gloo on CPUs."""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Rank layout of this process."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """True on rank 0 of a torchrun launch, and in a plain process (from ``RANK``)."""
    return int(os.environ.get("RANK", "0")) == 0


def setup_distributed(device_type: str) -> DistInfo:
    """Initialise the process group when launched by torchrun (no-op otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, local_rank=local, world_size=world)


def cleanup_distributed() -> None:
    """Destroy the process group, if one was set up."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device, info: DistInfo) -> list[float]:
    """Sum a list of floats across ranks."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Gather one picklable object from every rank (rank order)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's object on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in a world of one)."""
    if info.enabled:
        dist.barrier()


def wrap_ddp(model: nn.Module, device: torch.device, info: DistInfo) -> nn.Module:
    """``model`` in DistributedDataParallel under DDP, else itself."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)


@torch.no_grad()
def average_buffers(model: nn.Module, info: DistInfo) -> None:
    """Average floating-point buffers (BatchNorm running mean/var) across ranks.

    DDP broadcasts rank 0's buffers at each forward, after which every rank updates them with
    its own batch statistics, so ranks end an epoch with slightly different running stats.
    Averaging makes evaluation, checkpoints and every rank's model identical.

    Args:
        model: the unwrapped model.
        info: rank layout.
    """
    if not info.enabled:
        return
    bufs = [b for b in model.buffers() if torch.is_floating_point(b)]
    if not bufs:
        return
    flat = torch.cat([b.detach().reshape(-1).double() for b in bufs])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    i = 0
    for b in bufs:
        n = b.numel()
        b.copy_(flat[i : i + n].view_as(b).to(b.dtype))
        i += n


def state_sha256(model: nn.Module) -> str:
    """sha256 over a model's state dict (names, dtypes, shapes and values, CPU contiguous).

    Args:
        model: the model to hash.
    """
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_ranks_in_sync(model: nn.Module, info: DistInfo) -> dict[str, Any]:
    """Hash this rank's final weights and compare with every other rank (DDP sanity check).

    Args:
        model: the unwrapped model.
        info: rank layout.

    Returns:
        ``state_sha256`` (this rank), ``rank_state_sha256`` (every rank) and ``ranks_in_sync``.
    """
    mine = state_sha256(model)
    hashes = all_gather_objects(mine, info)
    in_sync = len(set(hashes)) == 1
    if info.enabled and info.is_main:
        if in_sync:
            log.info("final weights identical on all %d ranks (sha256 %s)", info.world_size, mine[:16])
        else:
            log.error("final weights differ between ranks: %s", ", ".join(h[:12] for h in hashes))
    return {"state_sha256": mine, "rank_state_sha256": hashes, "ranks_in_sync": in_sync}
