"""What a command needs to run under torchrun: join, load this rank's shard, keep ranks in step.

Every rank runs the whole generation loop on the same prompt: the collectives inside the model
need every rank to take part in every forward. To keep them in step:

- the sampling seed is rank 0's (drawn there when none is given), so the ranks sample alike;
- before each decode step the tokens fed to the model are broadcast from rank 0, so every rank's
  cache and activations follow rank 0's text even if two ranks were ever to sample differently;
- only rank 0 writes to stdout (the others' stdout goes to /dev/null); errors still reach stderr;
- after loading, every rank waits for the others (long timeout); from then on each collective has
  the short step timeout, and a failed one (a peer killed or stopped) is one line on each rank.
"""

from __future__ import annotations

import datetime
import os
import random
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import MixtralConfig
from ..model.mixtral import Mixtral
from .dist import (
    DEFAULT_TIMEOUT_S,
    STEP_TIMEOUT_S,
    ParallelError,
    ParallelState,
    broadcast_tokens,
    check_world,
    init_parallel,
    peer_lost,
    shutdown,
    wait_for_all,
)
from .load import load_parallel
from .shard import check_parallel


@dataclass
class ParallelRun:
    state: ParallelState

    def load(self, folder: str | Path, dtype: torch.dtype | str | None = None) -> Mixtral:
        """This rank's shard, returned once every rank holds its own."""
        model = load_parallel(folder, self.state, dtype=dtype)
        with self.guard():
            wait_for_all(self.state)
        return model

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Turn a failed collective (a peer died, or timed out) into one ``RunError`` line."""
        try:
            yield
        except RuntimeError as exc:  # gloo raises plain RuntimeErrors, NCCL DistBackendError
            if not isinstance(exc, dist.DistError) and not _raised_in_collective(exc):
                raise
            raise peer_lost(self.state, exc) from None

    def seed(self, seed: int | None) -> int:
        """Rank 0's seed (a fresh one when ``seed`` is None), the same on every rank."""
        value = torch.tensor([random.SystemRandom().randrange(2**62) if seed is None else seed], dtype=torch.long)
        return int(broadcast_tokens(value, self.state).item())

    def decode_fn(self, inner: Callable) -> Callable:
        """Wrap a ``decode_fn(model, tokens [B, 1], cache, slot, positions)``: feed rank 0's tokens."""

        def decode(model, tokens, cache, slot, positions):
            return inner(model, broadcast_tokens(tokens, self.state), cache, slot, positions)

        return decode

    def channel(self) -> tuple[Callable[[Any], None], Callable[[], Any]]:
        """(send, receive) of small Python objects from rank 0 to every rank, on a gloo group of its
        own with no practical timeout: a server's other ranks wait there while rank 0 has nothing to
        do (the model's collectives keep the short step timeout). Every rank must call this."""
        group = dist.new_group(list(range(self.state.world_size)), backend="gloo", timeout=datetime.timedelta(days=365))

        def send(obj: Any) -> None:
            dist.broadcast_object_list([obj], src=0, group=group)

        def receive() -> Any:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=group)
            return box[0]

        return send, receive

    def close(self) -> None:
        """Leave the group. After success, wait for every rank first (rank 0 also hosts the store the
        others read); while an error propagates, leave at once: the other ranks may be inside a
        collective this rank will never join, and torchrun stops them when this rank exits."""
        if self.state.distributed and dist.is_initialized() and sys.exc_info()[0] is None:
            with self.guard():
                dist.barrier(group=self.state.group)  # the step timeout: every rank has finished
        shutdown(self.state)


def _raised_in_collective(exc: BaseException) -> bool:
    """Whether the innermost frame of the traceback is torch.distributed's (a failed collective)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}torch{os.sep}distributed{os.sep}" in tb.tb_frame.f_code.co_filename


def start_parallel(
    tp: int = 1,
    ep: int = 1,
    device: str | None = None,
    *,
    config: MixtralConfig | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    step_timeout_s: float = STEP_TIMEOUT_S,
) -> ParallelRun | None:
    """Join torchrun's group for ``--tp`` / ``--ep``; None for a plain single-process run.

    Checks the flags against the launch (and ``config``'s sizes) first, so a wrong combination
    fails on every rank with the same message before anything waits on another rank.
    """
    if tp * ep == 1 and os.environ.get("WORLD_SIZE", "1") == "1":
        return None
    check_world(tp, ep)
    if config is not None:
        check_parallel(config, tp, ep)
    if device is not None and torch.device(device).index is not None:
        raise ParallelError(f"--device {device}: with --tp/--ep each rank uses its own GPU, pass --device cuda")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    state = init_parallel(tp, ep, device, timeout_s=timeout_s, step_timeout_s=step_timeout_s)
    if not state.is_main:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # lives as long as the process
    return ParallelRun(state)
