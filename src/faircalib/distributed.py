"""Data parallelism through torch.distributed: rank/world helpers and collectives.

`torchrun --nproc-per-node N -m faircalib.cli ...` starts N processes with WORLD_SIZE, RANK,
LOCAL_RANK and the rendezvous address in their environment; `launched` (the CLI wraps every
command in it) joins them into one process group: gloo for CPU devices, NCCL for CUDA (each
rank on cuda:LOCAL_RANK; NCCL's own settings, NVLink multicast included, stay as they are).
Without WORLD_SIZE nothing is initialised and every helper here is a no-op or the identity, so
a single process runs exactly the code it ran before data parallelism existed.

Collectives move tensors to the backend's device (the current CUDA device for NCCL, the CPU
for gloo) and return results on the caller's device. Gathers return one entry per rank in
rank order, which is what makes reductions here deterministic: callers fold them in a fixed
order instead of relying on an all-reduce whose summation order the backend chooses.

This module imports only torch and faircalib.errors (quant/ uses it and must not see models/).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from faircalib.errors import ConfigError

T = TypeVar("T")
_session = 0  # commands run under `launched` so far; names this command's error counter


def active() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0 (or a single process): the one rank that writes outputs and prints results."""
    return rank() == 0


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group torchrun describes in the environment; False (and nothing done)
    when WORLD_SIZE is unset. CUDA ranks are pinned to cuda:LOCAL_RANK, so "cuda" means the
    rank's own GPU everywhere after this call."""
    if not launched_by_torchrun() or not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    # without CUDA, gloo: the command then refuses the device itself, inside the group (so
    # with one error line rather than one per rank)
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher) describes a process group in the environment."""
    return "WORLD_SIZE" in os.environ


_loud_stderr: Any = None  # rank > 0's real stderr while `quiet_other_ranks` silences it


@contextlib.contextmanager
def quiet_other_ranks() -> Iterator[None]:
    """Under torchrun, send stdout/stderr of every rank but 0 to /dev/null (read from the
    environment, so even argparse's usage errors print once); a no-op otherwise."""
    global _loud_stderr
    if not launched_by_torchrun() or os.environ.get("RANK", "0") == "0":
        yield
        return
    saved = sys.stdout, sys.stderr
    with open(os.devnull, "w") as devnull:
        _loud_stderr, sys.stdout, sys.stderr = saved[1], devnull, devnull
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved
            _loud_stderr = None


@contextlib.contextmanager
def launched(device: str = "cpu") -> Iterator[None]:
    """Join torchrun's process group for the body (a no-op without WORLD_SIZE) and, if this
    call created it, leave it once every rank is done. On an error the group is left alone:
    the failing process exits and torchrun stops the other ranks."""
    global _session
    created = dist.is_available() and not dist.is_initialized()
    if not init_from_env(device):
        yield
        return
    _session += 1  # every rank runs the same commands, so the ranks agree on the number
    if active() and str(device).startswith("cuda:"):  # checked in the group: one error line
        raise ConfigError(
            f"--device {device} under torchrun: pass --device cuda, each rank then uses its "
            "own GPU (cuda:LOCAL_RANK)"
        )
    yield
    dist.barrier()  # rank 0 may still be writing: nobody leaves before everyone is done
    if created:
        dist.destroy_process_group()


def print_error(line: str) -> None:
    """Print an error line to stderr; across ranks only the first rank to fail prints (ranks
    that meet the same bad input would otherwise each print it). The rendezvous store counts
    failures: it answers even while the other ranks are blocked in a collective."""
    if active():
        if _error_count(1) != 1:
            return
        if rank() != 0:
            line = f"{line} (rank {rank()})"
    print(line, file=_loud_stderr or sys.stderr, flush=True)


def peer_failed() -> bool:
    """Whether some rank of this process group has already reported an error."""
    if not active():
        return False
    return _error_count(0) > 0


def _error_count(increment: int) -> int:
    """This command's failure counter in the rendezvous store, after adding `increment`."""
    store = dist.distributed_c10d._get_default_store()
    return store.add(f"faircalib/errors/{_session}", increment)


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of `items`: every world_size-th item from position rank."""
    return list(items[rank() :: world_size()])


def owners(costs: Sequence[float]) -> list[int]:
    """Rank that does each job of the given cost: longest job first onto the least loaded rank
    (ties to the lower rank), so every rank computes the same assignment."""
    load = [0.0] * world_size()
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner[i] = min(range(len(load)), key=lambda r: (load[r], r))
        load[owner[i]] += costs[i]
    return owner


def comm_device() -> torch.device:
    """Where the backend wants tensors: the rank's GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _wire(t: torch.Tensor) -> torch.Tensor:
    # NCCL has no bool type: bools travel as uint8 and are turned back by the caller's dtype.
    t = t.to(comm_device())
    return t.to(torch.uint8) if t.dtype == torch.bool else t.contiguous()


def all_gather(tensor: torch.Tensor | None, like: torch.Tensor) -> list[torch.Tensor | None]:
    """Every rank's tensor, in rank order, on `like`'s device. Tensors may differ in their
    first dimension; None (a rank with nothing this time) comes back as None. `like` gives the
    dtype and trailing shape every rank agrees on (a rank sending None has no tensor of its own).
    """
    if not active():
        return [tensor]
    rows = -1 if tensor is None else tensor.shape[0]
    sizes = [torch.zeros(1, dtype=torch.long, device=comm_device()) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([rows], device=comm_device()))
    sizes_list = [int(s) for s in sizes]
    longest = max(sizes_list)
    if longest <= 0:  # nothing to send anywhere (empty tensors or none at all)
        return [None if n < 0 else like[:0].clone() for n in sizes_list]
    buf = torch.zeros((longest, *like.shape[1:]), dtype=like.dtype, device=comm_device())
    if tensor is not None and rows:
        buf[:rows] = tensor.to(buf.device, buf.dtype)
    wire = _wire(buf)
    parts = [torch.empty_like(wire) for _ in range(world_size())]
    dist.all_gather(parts, wire)
    return [
        None if n < 0 else p[:n].to(device=like.device, dtype=like.dtype)
        for p, n in zip(parts, sizes_list, strict=True)
    ]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over ranks (identical on every rank), on the tensor's device. Exact
    where at most one rank holds a non-zero value per element (sharded results)."""
    if not active():
        return tensor
    wire = _wire(tensor).clone()
    dist.all_reduce(wire)
    return wire.to(tensor.device, tensor.dtype)


def sum_float(value: float) -> float:
    """A Python float summed over ranks (in float64)."""
    if not active():
        return value
    return float(all_reduce_sum(torch.tensor([value], dtype=torch.float64))[0])


def all_reduce_grads(params: Sequence[torch.Tensor]) -> None:
    """Sum the parameters' gradients over ranks in place (one flat buffer, one collective). A
    missing gradient counts as zeros, so every rank takes part with the same tensor list."""
    if not active() or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce_sum(torch.cat([g.reshape(-1).float() for g in grads]))
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n


def broadcast_params(params: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite the parameters' values with rank `src`'s (every rank ends bit-identical)."""
    if not active():
        return
    with torch.no_grad():
        for p in params:
            wire = _wire(p.detach()).clone()
            dist.broadcast(wire, src)
            p.copy_(wire.to(p.device, p.dtype))


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable object, in rank order."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@dataclasses.dataclass(frozen=True)
class _TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    index: int


def _strip(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """obj with every tensor replaced by a _TensorSpec (the tensors appended to `tensors`)."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _TensorSpec(tuple(obj.shape), obj.dtype, len(tensors) - 1)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: _strip(getattr(obj, f.name), tensors) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **fields)
    if isinstance(obj, dict):
        return {k: _strip(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_strip(v, tensors) for v in obj)
    return obj


def _fill(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, _TensorSpec):
        return tensors[obj.index]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: _fill(getattr(obj, f.name), tensors) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **fields)
    if isinstance(obj, dict):
        return {k: _fill(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_fill(v, tensors) for v in obj)
    return obj


def broadcast_tree(obj: Any, src: int, device: torch.device | str) -> Any:
    """Rank `src`'s `obj` (nested dataclasses, dicts, lists of tensors and plain values) on
    every rank, its tensors on `device`: the structure travels pickled, the tensors as tensors
    (pickling large weights would copy them through host memory twice)."""
    if not active():
        return obj
    tensors: list[torch.Tensor] = []
    box = [_strip(obj, tensors) if rank() == src else None]
    dist.broadcast_object_list(box, src)
    skeleton, specs = box[0], []
    _collect_specs(skeleton, specs)
    received = []
    for spec in sorted(specs, key=lambda s: s.index):
        if rank() == src:
            wire = _wire(tensors[spec.index])
        else:
            wire_dtype = torch.uint8 if spec.dtype == torch.bool else spec.dtype
            wire = torch.empty(spec.shape, dtype=wire_dtype, device=comm_device())
        dist.broadcast(wire, src)
        received.append(wire.to(device=device, dtype=spec.dtype))
    return _fill(skeleton, received)


def _collect_specs(obj: Any, out: list[_TensorSpec]) -> None:
    if isinstance(obj, _TensorSpec):
        out.append(obj)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _collect_specs(getattr(obj, f.name), out)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect_specs(v, out)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _collect_specs(v, out)
