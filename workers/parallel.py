"""Tensor parallelism: which slice of each weight a rank holds, and the all-reduce that joins them.

Column-parallel layers (q/k/v/gate/up) split their output features by attention head or by
intermediate size; row-parallel layers (o/down) split their input features the same way and sum
their partial outputs with an all-reduce. Everything else is replicated.
"""

from __future__ import annotations

import datetime

import torch
from torch import nn

from workers.sharding import Shard


class TPGroup:
    """This rank's place in a model's tensor-parallel group and its communicator.

    One group per model (not torch.distributed's global default group), so a worker can hold
    models with different groups at once.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, pg: object | None = None, store: object | None = None):
        self.rank = rank
        self.world_size = world_size
        self._pg = pg
        self._store = store  # the rendezvous store must outlive the group

    @classmethod
    def connect(cls, rank: int, world_size: int, address: str, device: torch.device, timeout_s: float) -> TPGroup:
        """Join the group that rendezvous at ``address`` (no address: a lone rank, no communicator).
        Raises if the other ranks have not all arrived within ``timeout_s``."""
        if not address:
            if world_size != 1:
                raise ValueError(f"a group of {world_size} ranks needs a rendezvous address")
            return cls()
        import torch.distributed as dist

        host, port = address.rsplit(":", 1)
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, int(port), world_size, is_master=rank == 0, timeout=timeout)
        if device.type == "cuda":
            pg = dist.ProcessGroupNCCL(store, rank, world_size)
        else:
            pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        return cls(rank, world_size, pg, store)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self._pg is not None:
            import torch.distributed as dist

            opts = dist.AllreduceOptions()
            opts.reduceOp = dist.ReduceOp.SUM
            self._pg.allreduce([t], opts).wait()
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as rank 0 holds it, on every rank (in place)."""
        if self._pg is not None:
            import torch.distributed as dist

            opts = dist.BroadcastOptions()
            opts.rootRank, opts.rootTensor = 0, 0
            self._pg.broadcast([t], opts).wait()
        return t

    def close(self) -> None:
        self._pg = self._store = None


class ParallelLinear(nn.Module):
    """A linear layer holding one rank's slice; ``shard`` says which slice of the checkpoint it is.

    Row-parallel layers (``reduce=True``) sum partial results across the group. Weights are
    allocated uninitialised: the loader fills every one of them.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        shard: Shard | None,
        tp: TPGroup,
        reduce: bool = False,
        bias: bool = False,
        bias_shard: Shard | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.weight.shard = shard
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.shard = bias_shard
        self.reduce = reduce
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reduce:
            y = self.tp.all_reduce(torch.nn.functional.linear(x, self.weight))
            return y if self.bias is None else y + self.bias  # bias added once, after the sum
        return torch.nn.functional.linear(x, self.weight, self.bias)


def fused(in_f: int, parts: list[tuple[str, int, int]], tp: TPGroup, dtype: torch.dtype, bias: bool = False):
    """Several column-parallel projections of the same input as one layer (one matmul instead of
    several): ``parts`` are (checkpoint module name, local out features, start) in output order.
    ``weight.parts`` tells the loader which checkpoint slices to concatenate."""
    out = sum(n for _, n, _ in parts)
    layer = ParallelLinear(in_f, out, None, tp, bias=bias, dtype=dtype)
    layer.weight.parts = [(name, Shard(0, start, n)) for name, n, start in parts]
    if bias:
        layer.bias.parts = layer.weight.parts
    layer.parts, layer.sizes = [name for name, _, _ in parts], [n for _, n, _ in parts]
    return layer


def row(in_local: int, out_f: int, start: int, tp: TPGroup, dtype: torch.dtype, bias: bool = False) -> ParallelLinear:
    shard = Shard(1, start, in_local)
    return ParallelLinear(in_local, out_f, shard, tp, reduce=True, bias=bias, dtype=dtype)
