"""The collectives context parallelism uses, each counted in :class:`CommStats`.

Every cross-rank transfer of LinFusion goes through one of four calls here:
``all_reduce`` (linear state, text-query softmax statistics), ``all_gather``
(outputs at the model boundary; K/V of layers left dense), and ``exchange``
(point-to-point halo rows of local attention). Bytes are counted as what one
rank *sends* under the usual algorithms (ring all-reduce: 2(W-1)/W of the
buffer; all-gather: its own piece to W-1 peers; point-to-point: exactly).
Each call is also timed as the compute stream sees it (CUDA events around the call, so waiting
for a slower peer counts; wall clock on CPU): the exposed communication time per kind.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time

import torch
import torch.distributed as dist


@dataclasses.dataclass
class CommStats:
    """Bytes sent by this rank, number of calls and exposed milliseconds, per collective kind."""

    bytes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    calls: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    ms: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    # (kind, start, end) CUDA events not read yet: reading one waits for it, so only summary() does
    pending: list = dataclasses.field(default_factory=list)

    def add(self, kind: str, nbytes: float) -> None:
        self.bytes[kind] += int(nbytes)
        self.calls[kind] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()
        self.ms.clear()
        self.pending.clear()

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def total_ms(self) -> float:
        self._resolve()
        return float(sum(self.ms.values()))

    def _resolve(self) -> None:
        for kind, start, end in self.pending:
            end.synchronize()
            self.ms[kind] += start.elapsed_time(end)
        self.pending.clear()

    def summary(self) -> dict[str, dict[str, float]]:
        self._resolve()
        return {kind: {"bytes": self.bytes[kind], "calls": self.calls[kind], "ms": round(self.ms[kind], 3)}
                for kind in sorted(self.bytes)}


@contextlib.contextmanager
def _timed(cp, kind: str):
    """Time the enclosed call: CUDA events on the current stream (no sync now), else wall clock."""
    if cp.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        cp.stats.pending.append((kind, start, end))
    else:
        t0 = time.perf_counter()
        yield
        cp.stats.ms[kind] += (time.perf_counter() - t0) * 1e3


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_reduce(cp, tensor: torch.Tensor, op: str = "sum", kind: str = "all_reduce") -> torch.Tensor:
    """In-place all-reduce (sum or max) of a contiguous tensor; returns it."""
    if cp.world == 1:
        return tensor
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    with _timed(cp, kind):
        dist.all_reduce(tensor, op=reduce_op, group=cp.group)
    cp.stats.add(kind, 2 * (cp.world - 1) / cp.world * _nbytes(tensor))
    return tensor


def all_gather(cp, tensor: torch.Tensor, sizes: list[int], dim: int, kind: str = "all_gather") -> list[torch.Tensor]:
    """Gather pieces whose extent along ``dim`` differs per rank (``sizes[r]``); returns them in rank order.

    Pieces are padded to the largest size (gloo and older NCCL need equal shapes) and trimmed after.
    """
    if cp.world == 1:
        return [tensor]
    largest = max(sizes)
    padded = tensor
    if tensor.shape[dim] < largest:
        pad_shape = list(tensor.shape)
        pad_shape[dim] = largest - tensor.shape[dim]
        padded = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
    padded = padded.contiguous()
    buffers = [torch.empty_like(padded) for _ in range(cp.world)]
    with _timed(cp, kind):
        dist.all_gather(buffers, padded, group=cp.group)
    cp.stats.add(kind, (cp.world - 1) * _nbytes(padded))
    return [buf.narrow(dim, 0, size) for buf, size in zip(buffers, sizes)]


def exchange(
    cp, sends: dict[int, torch.Tensor], recvs: dict[int, tuple[torch.Size, torch.dtype]], kind: str = "halo"
) -> dict[int, torch.Tensor]:
    """Point-to-point: send ``sends[peer]`` to each peer, receive a tensor of the given shape from each.

    Non-blocking on both sides, so the pattern cannot deadlock; every rank must
    call it with mirror-image arguments (which the deterministic split guarantees).
    """
    if cp.world == 1 or (not sends and not recvs):
        return {}
    received = {peer: torch.empty(shape, dtype=dtype, device=cp.device) for peer, (shape, dtype) in recvs.items()}
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer, group=cp.group) for peer, t in sorted(sends.items())]
    ops += [dist.P2POp(dist.irecv, buf, peer, group=cp.group) for peer, buf in sorted(received.items())]
    with _timed(cp, kind):
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    for t in sends.values():
        cp.stats.add(kind, _nbytes(t))
    return received
