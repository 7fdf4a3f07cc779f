"""Process groups for tensor and expert parallelism, and the collectives the model hooks call.

``torchrun --nproc-per-node N`` starts N copies of the program and sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address; ``init_parallel(tp, ep, device)`` checks that
``tp * ep`` matches, joins the group (nccl on CUDA, gloo on the CPU) and builds the
tensor-parallel subgroups.

Rank layout: ``rank = ep_rank * tp + tp_rank``, so one tensor-parallel group is ``tp`` consecutive
ranks (on a multi-node launch, the GPUs of one node: the attention all-reduce, which runs once per
layer on every token, stays on the fast links).

Nothing may hang: the size checks run before any rank joins (every rank computes the same answer
from the same flags and environment, so all of them exit with the same message), and torchrun stops
the remaining ranks when one of them exits. Two timeouts: joining and the "every rank has loaded"
barrier wait long (a rank may still be reading its weights), while the per-step collectives of
generation run on groups with a short one, so a rank that stops answering (stopped, swapping, a
dead link) ends the job in seconds with one line on every rank instead of a wait of many minutes.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import RunError, UserError

DEFAULT_TIMEOUT_S = 600.0  # joining and the loaded barrier: a rank still loading weights is waited for
STEP_TIMEOUT_S = 30.0  # every collective after that: a forward pass is the same work on every rank


class ParallelError(UserError):
    """A parallel launch that cannot work: sizes that do not divide, a wrong process count."""


@dataclass(frozen=True)
class ParallelState:
    """Where this process sits: ``tp`` x ``ep`` ranks; ``tp_group`` is None when ``tp`` is 1."""

    tp: int = 1
    ep: int = 1
    rank: int = 0
    device: torch.device = torch.device("cpu")
    tp_group: Any = None  # short timeout (per-step collectives)
    group: Any = None  # all ranks, short timeout; None in a single process

    @property
    def world_size(self) -> int:
        return self.tp * self.ep

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def ep_rank(self) -> int:
        return self.rank // self.tp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def backend_for(device: torch.device | str) -> str:
    """nccl for CUDA tensors, gloo for CPU tensors (NCCL cannot reduce host memory)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def check_world(tp: int, ep: int, environ: dict[str, str] | None = None) -> tuple[int, int]:
    """(rank, local_rank) for a ``--tp tp --ep ep`` launch, or a ParallelError naming the fix."""
    environ = os.environ if environ is None else environ
    for flag, value in (("--tp", tp), ("--ep", ep)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ParallelError(f"{flag}: expected a positive integer, got {value!r}")
    world = tp * ep
    found = environ.get("WORLD_SIZE")
    if found is None:
        if world == 1:
            return 0, 0
        raise ParallelError(
            f"--tp {tp} --ep {ep}: needs {world} processes, launch with "
            f"`torchrun --nproc-per-node {world} -m mixtral_lite ...` (WORLD_SIZE is not set)"
        )
    if int(found) != world:
        raise ParallelError(
            f"--tp {tp} x --ep {ep} = {world}: must equal the number of processes, got WORLD_SIZE={found} "
            f"(launch with torchrun --nproc-per-node {world})"
        )
    rank = int(environ.get("RANK", "0"))
    return rank, int(environ.get("LOCAL_RANK", rank))


def init_parallel(
    tp: int = 1,
    ep: int = 1,
    device: torch.device | str = "cpu",
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    step_timeout_s: float = STEP_TIMEOUT_S,
) -> ParallelState:
    """Join the process group started by torchrun (a no-op for ``tp = ep = 1`` without torchrun).

    ``device`` "cuda" means this rank's GPU (``cuda:LOCAL_RANK``). ``timeout_s`` bounds joining,
    ``step_timeout_s`` every collective of the returned groups.
    """
    if not step_timeout_s > 0:
        raise ParallelError(f"step timeout: expected a positive number of seconds, got {step_timeout_s!r}")
    rank, local_rank = check_world(tp, ep)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        if local_rank >= torch.cuda.device_count():
            raise ParallelError(
                f"--device cuda: rank {rank} needs GPU {local_rank}, found {torch.cuda.device_count()} GPU(s)"
            )
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if tp * ep == 1:
        return ParallelState(device=device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend_for(device), timeout=timeout)
        except (RuntimeError, ValueError) as exc:  # DistStoreError (a timeout) is a RuntimeError
            raise ParallelError(
                f"rank {rank}: could not join the {tp * ep} processes within {timeout_s:.0f} s: {exc}"
            ) from None
    step = datetime.timedelta(seconds=step_timeout_s)
    world = dist.new_group(list(range(tp * ep)), timeout=step)
    tp_group = None
    if tp == tp * ep:
        tp_group = world
    elif tp > 1:
        for e in range(ep):  # every rank creates every subgroup, in the same order
            group = dist.new_group(list(range(e * tp, (e + 1) * tp)), timeout=step)
            if e == rank // tp:
                tp_group = group
    return ParallelState(tp=tp, ep=ep, rank=rank, device=device, tp_group=tp_group, group=world)


def wait_for_all(state: ParallelState) -> None:
    """Block until every rank gets here, with the long join timeout (after loading: a slow disk
    on one rank must not count against the short per-step timeout)."""
    if state.distributed and dist.is_initialized():
        dist.barrier()  # the default group carries the join timeout


def peer_lost(state: ParallelState, exc: BaseException) -> RunError:
    """The one line a rank prints when a collective fails: a peer died or stopped answering."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    timed_out = "timed out" in first.lower() or "timeout" in first.lower()
    what = "a peer rank stopped answering" if timed_out else "lost a peer rank"
    return RunError(f"rank {state.rank}: {what} during generation, stopping ({first[:160]})", exit_now=True)


def shutdown(state: ParallelState) -> None:
    """Leave the process group (after the last collective)."""
    if state.distributed and dist.is_initialized():
        dist.destroy_process_group()


class AllReduce:
    """A ``reduce`` hook: sum the partial outputs of the ranks in ``group`` (in place, same dtype)."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(y, group=self.group)
        return y

    def __repr__(self) -> str:
        return f"AllReduce(ranks={dist.get_process_group_ranks(self.group)})"


def broadcast_tokens(tokens: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """Every rank continues with rank 0's tokens (the ranks must feed the same ids to the model).

    Logits are equal on every rank, so with the same seed the samples already agree; broadcasting
    makes that a guarantee rather than a consequence of bitwise-identical arithmetic.
    """
    if not state.distributed:
        return tokens
    buf = tokens.to(state.device).contiguous()
    dist.broadcast(buf, src=0, group=state.group)
    return buf.to(tokens.device)
