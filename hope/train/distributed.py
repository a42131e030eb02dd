"""Process group setup for ``torchrun`` (backend auto: nccl on GPU, gloo on CPU), the data-parallel
collectives the trainer uses (gradient averaging, the divergence guard's agreement) and FSDP2 (``dist.fsdp``):
sharding and full state dicts."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' asked but no CUDA device is available")
    return torch.device(device)


def setup(device: str = "auto", backend: str = "auto") -> DistInfo:
    """Init the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world_size <= 1:
        return DistInfo(0, 1, 0, dev, None)
    chosen = ("nccl" if dev.type == "cuda" else "gloo") if backend == "auto" else backend
    if chosen == "nccl" and dev.type != "cuda":
        raise ValueError("dist.backend: 'nccl' needs a CUDA device; use 'gloo' on CPU")
    if not dist.is_initialized():
        dist.init_process_group(backend=chosen)
    return DistInfo(rank, world_size, local_rank, dev, chosen)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def average_gradients(model: torch.nn.Module, info: DistInfo) -> None:
    """All-reduce (mean) every gradient: one flat buffer per dtype, so each step costs one collective."""
    if not info.enabled:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def any_flag(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on any rank (the divergence guard skips together)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def bad_ranks(reason, info: DistInfo) -> list[tuple[int, object]]:
    """``(rank, reason)`` of every rank whose ``reason`` (any picklable value) is not None, the same list on every
    rank: the divergence guard skips a step on all ranks when one is bad. One 1-element all-reduce when no rank
    is bad (like ``any_flag``); the reasons themselves are gathered only when some rank is."""
    if not info.enabled:
        return [] if reason is None else [(0, reason)]
    if not any_flag(reason is not None, info):
        return []
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, reason)
    return [(r, g) for r, g in enumerate(gathered) if g is not None]


def from_main(value, error: BaseException | None, info: DistInfo):
    """Collective: rank 0's ``value`` on every rank. When rank 0 failed (``error``), rank 0 re-raises it and
    every other rank raises a RunError with its message, so no rank waits in a collective the others skip."""
    if not info.enabled:
        if error is not None:
            raise error
        return value
    obj = [(value, None if error is None else str(error))]
    dist.broadcast_object_list(obj, src=0)
    value, message = obj[0]
    if message is not None:
        if error is not None:
            raise error
        from hope.train.errors import RunError

        raise RunError(f"rank 0: {message}")
    return value


def mean_scalar(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t.item() / info.world_size)


# --------------------------------------------------------------------------------------------- FSDP2
def fully_shard_model(model: torch.nn.Module, info: DistInfo, *, reshard_after_forward: bool = True):
    """FSDP2 in place: each block of ``model.blocks`` its own unit, then the root (embedding = tied head,
    final norm). The tied head is ``model.embed.weight`` itself (no second parameter), so it is one sharded
    parameter of the root unit, gathered for the root's forward where both the embedding and the loss use it.
    Buffers (CMS momenta) are not sharded: every rank keeps a full copy. Needs a process group of several
    ranks (the trainer refuses ``dist.fsdp`` with one process before building anything)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def reshard(model: torch.nn.Module) -> None:
    """FSDP2: free every unit's gathered parameters (a forward without backward, e.g. evaluation, leaves units
    that do not reshard after forward unsharded); a no-op for sharded units and unsharded models."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state_dict(model: torch.nn.Module) -> dict:
    """Collective: the unsharded state dict (CPU tensors, same keys as the unwrapped model) on rank 0, {} elsewhere."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(cpu_offload=True))


def load_full_model_state_dict(model: torch.nn.Module, state: dict) -> None:
    """Collective: load a full (unsharded) state dict, given on every rank, into the sharded model; strict."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint: missing {missing}, unexpected {unexpected}")
    set_model_state_dict(model, state, options=_full_options())


def _param_names(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def full_optimizer_state_dict(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Collective: the optimizer's unsharded state on rank 0 ({} elsewhere), in ``opt.state_dict()``'s own format
    (parameters numbered in param-group order), so a checkpoint does not depend on whether FSDP wrote it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if not opt.state:  # before the first step: get_optimizer_state_dict would initialise the state by running
        return opt.state_dict()  # a zero-lr step (AdamW's step count 1 too many); nothing sharded to gather
    full = get_optimizer_state_dict(model, opt, options=_full_options(cpu_offload=True))
    if not full:
        return {}
    index = {name: i for i, name in enumerate(_param_names(model, opt))}
    return {"state": {index[name]: value for name, value in full["state"].items()},
            "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in full["param_groups"]]}


def load_full_optimizer_state_dict(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Collective: load an ``opt.state_dict()``-format state (unsharded, on every rank) into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if not state["state"]:  # saved before the first step: no moments (set_optimizer_state_dict would make some)
        opt.load_state_dict(state)
        return
    names = _param_names(model, opt)
    full = {"state": {names[int(i)]: value for i, value in state["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, opt, full, options=_full_options())
    for group, saved in zip(opt.param_groups, state["param_groups"], strict=True):  # exactly as saved (the
        group.update({k: v for k, v in saved.items() if k != "params"})  # round trip turns tuples into lists)
