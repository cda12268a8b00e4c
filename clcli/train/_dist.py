"""Distributed training under torchrun: one process per device, on one machine or several.

`torchrun --nproc-per-node N -m clcli train ...` starts N processes with RANK, WORLD_SIZE and LOCAL_RANK set;
`setup` reads them, joins the process group (nccl on CUDA, gloo on the CPU) and picks the device (cuda:LOCAL_RANK).
Two placements (`train.placement`):

- `replicated` (DDP): every process holds the whole method (all networks, their MKB halves, the verification
  heads) inside DistributedDataParallel. Each global batch (`train.batch_size`, in the order one process would use)
  is cut into WORLD_SIZE equal contiguous slices and process r trains on slice r, augmented exactly as inside the
  whole batch; DDP averages the gradients. BatchNorm statistics are per slice, so N processes compute what one
  process computes with `train.accumulate: N` (micro-batches).
- `per-network`: one network per process (WORLD_SIZE = number of networks), each on the whole global batch. The
  processes exchange only what the losses and the shared space transfer need: the MKB embeddings (an all_gather that
  back-propagates to each owner, `Cohort.embeddings`) and the gradients of what the networks share (space
  transfers, verification heads), summed as one process sums them. At the end of each epoch every network's weights,
  buffers, optimiser state and EMA copy go from its process to all, so each process (and rank 0's checkpoint)
  holds the whole cohort.

Rank 0 alone writes the run folder (run.json, metrics.jsonl, checkpoints), shows progress and evaluates.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from clcli import mkb
from clcli.errors import ClcliError

from ._callbacks import Callback


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    placement: str = "replicated"

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def per_network(self) -> bool:
        return self.enabled and self.placement == "per-network"

    @property
    def part(self) -> tuple[int, int]:
        """(k, n): this process trains on the k-th of n equal contiguous slices of every global batch."""
        return (self.rank, self.world) if self.enabled and not self.per_network else (0, 1)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This process's slice (along dim 0) of a global batch."""
        k, n = self.part
        if n == 1:
            return x
        size = x.shape[0] // n
        return x[k * size:(k + 1) * size]


_current = Dist()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ClcliError("device 'cuda' asked for but CUDA is not available")
    return torch.device(name)


def current() -> Dist:
    """The process's place in the job (one process: rank 0 of 1), as set by `setup`."""
    return _current


def is_main_process() -> bool:
    """Rank 0 (or not under torchrun): the process that writes the run folder. Needs no process group."""
    return int(os.environ.get("RANK", "0")) == 0


def setup(recipe) -> torch.device:
    """The training device; under torchrun (WORLD_SIZE > 1) also join the process group, once per process."""
    global _current
    device = resolve_device(recipe.train.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _current = Dist(placement=recipe.train.placement)
        return device
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ClcliError(f"distributed training runs on CUDA (nccl) or the CPU (gloo), not on {device.type}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_teardown)
    _current = Dist(rank, world, local_rank, recipe.train.placement)
    return device


def _teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def check_placement(d: Dist, method, recipe, n_nets: int, batch_size: int, scaler) -> None:
    """Refuse what a placement cannot do, with one line, on every process alike."""
    cfg = recipe.train
    shards = d.part[1] * cfg.accumulate
    if batch_size % shards:
        raise ClcliError(f"the batch of {batch_size} must split into {shards} equal parts "
                         f"({d.part[1]} process(es) x train.accumulate {cfg.accumulate})")
    if not d.per_network:
        return
    if d.world != n_nets:
        raise ClcliError(f"train.placement per-network runs one network per process: start {n_nets} processes "
                         f"(torchrun --nproc-per-node {n_nets}), not {d.world}")
    refusal = method.placement_refusal()
    if refusal:
        raise ClcliError(refusal)
    if scaler is not None:
        raise ClcliError("train.placement per-network needs bf16 autocast (this GPU has no native bf16): set "
                         "train.amp=false")


def wrap(method: nn.Module, d: Dist, *, find_unused: bool) -> nn.Module:
    """What the loop calls each step: DDP around the method (replicated placement), else the method itself."""
    if not d.enabled or d.per_network:
        return method
    from torch.nn.parallel import DistributedDataParallel

    # device_ids=None: the inputs are already on this process's device and the CPU index tensors stay on the CPU.
    return DistributedDataParallel(method, device_ids=None, find_unused_parameters=find_unused)


def sum_shared_grads(params: list[torch.Tensor], d: Dist) -> None:
    """Per-network placement: the shared parameters' gradient, summed over the processes (one tensor, one
    all_reduce), as one process sums every network's contribution."""
    if not d.per_network or not params:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for p, g in zip(params, _unflatten_dense_tensors(flat, grads)):
        p.grad = g


@torch.no_grad()
def sync_networks(method: nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> None:
    """Per-network placement, end of an epoch: network j's weights, buffers and optimiser state (whatever the
    optimiser keeps per parameter: SGD's momentum, Adam's moments and step, ...) from process j to all;
    the shared transfers' BatchNorm statistics (each process updated them with its own network's codes; one process
    updates them with every network's in turn) averaged. A space transfer that is one network's own (mkb-solo) is
    that network's like the rest of it: its statistics come from its process."""
    if not d.per_network:
        return
    import torch.distributed as dist

    def shared(name: str) -> bool:
        return method.shared_transfer and mkb.is_shared(name)

    for j, net in enumerate(method.cohort.networks):
        own = [p for name, p in net.named_parameters() if not mkb.is_shared(name)]
        for p in own:
            dist.broadcast(p.data, src=j)
        # The other processes never stepped these parameters, so they may lack the state: it travels as objects.
        box = [[{k: v.cpu() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()} for p in own]
               if d.rank == j else None]
        dist.broadcast_object_list(box, src=j)
        if d.rank != j:
            for p, state in zip(own, box[0]):
                optimizer.state[p] = {k: v.to(p.device) if torch.is_tensor(v) and v.dim() > 0 else v
                                      for k, v in state.items()}
        for name, b in net.named_buffers():
            if not shared(name):
                dist.broadcast(b, src=j)
    for name, b in method.named_buffers():
        if shared(name) and b.is_floating_point():
            dist.all_reduce(b)
            b.div_(d.world)


@torch.no_grad()
def sync_averages(networks: list[nn.Module], d: Dist) -> None:
    """Per-network placement: network j's moving average (train.ema_decay) from process j to all."""
    if not d.per_network:
        return
    import torch.distributed as dist

    for j, net in enumerate(networks):
        for t in net.state_dict().values():
            dist.broadcast(t, src=j)


class PerNetworkSync(Callback):
    """Per-network placement: every network, its optimiser state included, on every process at each epoch's end,
    before anything evaluates or saves it."""

    def on_epoch_end(self, loop, end) -> None:
        sync_networks(loop.method, loop.optimisation.optimizer, loop.dist)


def mean_parts(d: Dist, sums: dict[str, torch.Tensor], steps: int) -> dict[str, float]:
    """The logged loss parts averaged over `steps` and over the processes, with one host sync."""
    keys = list(sums)
    values = torch.stack([sums[k] for k in keys]) / steps
    if d.enabled and not d.per_network:
        import torch.distributed as dist

        dist.all_reduce(values)
        values /= d.world
    means = dict(zip(keys, values.tolist()))
    if d.per_network:  # each process logs its own network's parts: gather them (rank order = network order)
        import torch.distributed as dist

        gathered: list[Any] = [None] * d.world
        dist.all_gather_object(gathered, means)
        means = {k: v for g in gathered for k, v in g.items()}
    return means


def total(d: Dist, x: torch.Tensor) -> torch.Tensor:
    """x summed over the processes (a copy; x itself is left as it is)."""
    if not d.enabled:
        return x
    import torch.distributed as dist

    x = x.clone()
    dist.all_reduce(x)
    return x


def from_main(d: Dist, obj):
    """Rank 0's `obj` on every process."""
    if not d.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
