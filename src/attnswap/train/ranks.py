"""This process's place in a torchrun job, the gradients averaged over ranks, and stop requests (signals)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from attnswap.hf.models import resolve_device

log = logging.getLogger(__name__)


@dataclass
class Ranks:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun) and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor


def start_ranks(device: str) -> Ranks:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(0, 1, resolve_device(device))
    local_rank = int(os.environ["LOCAL_RANK"])
    if device in ("auto", "cuda"):
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    torch_device = resolve_device(device)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off: it hangs on some shared hosts
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
        dist.init_process_group("nccl", device_id=torch_device)
    else:
        dist.init_process_group("gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), torch_device)


@contextlib.contextmanager
def stop_requests():
    """A flag that SIGTERM (which torchrun forwards to every rank) or Ctrl-C (SIGINT) sets, so the loop can
    checkpoint and stop after the step it is in; a second Ctrl-C stops at once, as usual."""
    flag = {"stop": False, "signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def request(number, _frame):
        if flag["stop"] and number == signal.SIGINT:
            raise KeyboardInterrupt
        flag.update(stop=True, signal=signal.Signals(number).name)
        log.info("%s: stopping after this step with a checkpoint (Ctrl-C again to quit now)", flag["signal"])

    previous = {number: signal.signal(number, request) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def agree_to_stop(sigterm: bool, timed_out: bool, ranks: Ranks) -> str | None:
    """Why to stop now (a signal on any rank, or rank 0's clock), the same answer on every rank: one collective."""
    votes = ranks.sum(torch.tensor([float(sigterm), float(timed_out and ranks.main)], device=ranks.device)).tolist()
    return "signal" if votes[0] else "max_seconds" if votes[1] else None


def average_gradients(params: list[nn.Parameter], ranks: Ranks) -> None:
    """Mean of each gradient over ranks, in one collective (the trainable set is small: no bucketing needed)."""
    if ranks.world == 1 or not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    ranks.sum(flat)
    flat /= ranks.world
    for param, chunk in zip(params, flat.split([p.numel() for p in params])):
        param.grad.copy_(chunk.view_as(param.grad))
