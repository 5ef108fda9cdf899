"""Processes and data parallelism for the training loop: one process, or one of torchrun's.

`ddp`: every process holds the whole model, adapters and Adam states; gradients are averaged.
`fsdp` (PyTorch's FSDP2, `fully_shard`): each decoder layer is its own unit and the rest of the
model the root unit; parameters (the frozen base too), gradients and Adam states are
sharded over the processes and gathered one unit at a time for its forward and backward. Adapters
and their Adam states stay fp32, as with ddp, so both give the same update. Outside a forward the
parameters of a sharded model are DTensors: the helpers below turn them into local shards for
checkpoints and into full tensors for the final model.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..errors import AwakerError
from ..model.build import decoder_layers


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def gather_objects(self, obj) -> list:
        if self.world == 1:
            return [obj]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered


def setup_dist(device: str) -> Dist:
    """One process, or one of torchrun's (WORLD_SIZE/RANK/LOCAL_RANK): gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise AwakerError("train.device is cuda but no CUDA device is available")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        # an hour: the other processes wait in a barrier while the main one writes a 7B checkpoint
        dist.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None,
                                timeout=datetime.timedelta(minutes=60))
        owns = True
    return Dist(rank, world, local, dev, owns)


def wrap(model, ctx: Dist, mode: str):
    """The module the loop calls: the model itself (one process, or fsdp, which shards it in place) or
    its DistributedDataParallel wrapper."""
    if ctx.world == 1:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # gradients as views into DDP's buckets: no second copy of the (fp32, 7B: 11 GB) adapter gradients
        return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                       gradient_as_bucket_view=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    # The root unit holds the rest: embeddings, final norm, lm_head, routers and the vision tower. Every
    # process must run the same collectives in the same order, and a text-only batch skips the vision
    # tower, so its blocks cannot be units of their own (frozen and ~1.3 GB in bf16 for the 7B).
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def fused_adamw(device: torch.device, sharded: bool) -> bool:
    """On a GPU, AdamW's fused kernel: one launch per step and no temporary copy of the parameters
    (11 GB less for the 7B stage II). Sharded (fsdp) parameters keep the default foreach step."""
    return device.type == "cuda" and not sharded


def make_optimizer(params, t, device: torch.device, sharded: bool) -> torch.optim.AdamW:
    """AdamW over the trainable parameters with the recipe's train section `t`."""
    return torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                             weight_decay=t.weight_decay, fused=fused_adamw(device, sharded))


def state_bytes(model, world: int, sharded: bool, fused: bool) -> int:
    """Bytes of weights, gradients and AdamW state one process holds while training (activations not
    counted): a trainable parameter has a gradient, two moments and, unless AdamW is fused, a temporary
    during the step, all of its own dtype; a frozen one only itself. fsdp divides it all by the number of
    processes."""
    per_trainable = 4 if fused else 5
    total = sum(p.numel() * p.element_size() * (per_trainable if p.requires_grad else 1) for p in model.parameters())
    return total // world if sharded else total


def check_fits(need: int, device: torch.device, sharded: bool):
    """Stop before the first step, not with an out-of-memory error minutes later, when the training
    state alone leaves no room for activations on the GPU."""
    if device.type != "cuda":
        return
    have = torch.cuda.get_device_properties(device).total_memory
    if need > 0.9 * have:
        more = "run on more GPUs" if sharded else "run under torchrun with train.parallel=fsdp on several GPUs"
        raise AwakerError(f"training needs about {need / 1e9:.1f} GB per GPU for weights, gradients and AdamW "
                          f"states alone (activations come on top) and the GPU has {have / 1e9:.1f} GB: {more}, "
                          "or train a smaller LoRA rank")


def gradient_sync(net, sync: bool):
    """Accumulating micro-batches under ddp: reduce gradients over the processes only after the last one.
    fsdp reduces after every micro-batch, on purpose: deferring would keep every layer's whole, unsharded
    gradient on every GPU until the last one (11 GB in fp32 for the 7B stage II), which is what
    sharding is for; the reduce-scatters overlap the backward of the layers before."""
    if hasattr(net, "no_sync") and not sync:  # ddp
        return net.no_sync()
    return contextlib.nullcontext()


def scalar(x: torch.Tensor) -> float:
    return float(x.full_tensor() if isinstance(x, DTensor) else x)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter (all of it unless sharded)."""
    return t.to_local() if isinstance(t, DTensor) else t


def to_cpu(obj):
    """A copy of a (nested) state with every tensor on the CPU; DTensors become this process's shard."""
    if isinstance(obj, torch.Tensor):
        return local(obj).detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def load_optimizer_shard(optimizer: torch.optim.Optimizer, saved: dict):
    """Load what to_cpu(optimizer.state_dict()) saved: per-parameter states shaped like a sharded
    parameter's shard become DTensors placed like that parameter again."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, state in saved["state"].items():
        p = params[index]
        if not isinstance(p, DTensor):
            continue
        for name, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape == p.to_local().shape:
                state[name] = DTensor.from_local(value.to(p.device), p.device_mesh, p.placements, run_check=False,
                                                 shape=p.shape, stride=p.stride())
    optimizer.load_state_dict(saved)


def full_tensors(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Whole tensors on the CPU, gathered one at a time (every process must call this); `keep`: this
    process wants them (the others get an empty dict)."""
    out = {}
    for key, t in tensors.items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if keep:
            out[key] = full.detach().to("cpu", copy=True)
        del full
    return out
