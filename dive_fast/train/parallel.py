"""Data parallelism beyond plain DDP: FSDP2 sharding of the towers (``--fsdp``), the
gradient averaging of the steps DDP does not wrap (micro-batched steps, the parameters FSDP
leaves replicated), and full state dicts for checkpoints that load anywhere."""
from __future__ import annotations

import gc
import logging

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)
BUCKET_BYTES = 25 * 2**20  # DDP's default bucket
_meshes = []  # the device meshes shard() made (see release_groups)


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of an open_clip CLIP's towers (image, then text)."""
    blocks = []
    text = getattr(model, "text", None)  # CustomTextCLIP's text tower
    for tower in (getattr(model.visual, "transformer", None), getattr(model, "transformer", None),
                  getattr(text, "transformer", None)):
        blocks += list(getattr(tower, "resblocks", []))
    return blocks


def shard(model: nn.Module, device) -> nn.Module:
    """FSDP2 over every rank: each residual block a unit, the rest of the model at the root
    (open_clip's --fsdp layout). The logit scale stays a replicated plain tensor: the
    objective reads it outside the towers' forwards (and a micro-batched step's objective
    runs apart from them). ``encode_image``/``encode_text`` gather the root's shards as
    ``forward`` would."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    _meshes.append(mesh)
    blocks = residual_blocks(model)
    if not blocks:
        raise ValueError(f"--fsdp: no residual blocks found in {type(model).__name__} "
                         "(an open_clip ViT CLIP is expected)")
    for block in blocks:
        fully_shard(block, mesh=mesh)
    ignored = {model.logit_scale} if isinstance(getattr(model, "logit_scale", None),
                                                nn.Parameter) else set()
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    for name in ("encode_image", "encode_text"):
        register_fsdp_forward_method(model, name)
    return model


def release_groups() -> None:
    """Lets go of the process groups a finished run's objects hold. DTensor's caches keep the
    meshes ``shard`` made alive (and a mesh its groups), and DDP's and FSDP's reference cycles
    keep theirs until a collection, so ``destroy_process_group`` would leave gloo's worker
    threads running into interpreter shutdown, where one that frees a finished collective's
    tensor needs the GIL and aborts the process ("terminate called without an active
    exception"). The groups stay usable: whoever created them destroys them."""
    for mesh in _meshes:
        getattr(mesh, "_pg_registry", {}).clear()
    _meshes.clear()
    gc.collect()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


class GradientSync:
    """What DDP would do for a step it does not wrap: average over ranks the gradients of
    ``params`` (the replicated ones), once, after the last micro-batch; a sharded model's
    own reduce-scatter is held back until that micro-batch."""

    def __init__(self, params, sharded: nn.Module | None = None):
        self.params = [p for p in params if p.requires_grad and not isinstance(p, DTensor)]
        self.sharded = sharded

    def micro_batch(self, last: bool) -> None:
        if self.sharded is not None:
            self.sharded.set_requires_gradient_sync(last)

    def finish(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        bucket, size = [], 0
        for g in grads:
            bucket.append(g)
            size += g.numel() * g.element_size()
            if size >= BUCKET_BYTES:
                _average(bucket)
                bucket, size = [], 0
        if bucket:
            _average(bucket)


def _average(grads: list[torch.Tensor]) -> None:
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global gradient norm of sharded (DTensor) and plain gradients together."""
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    parts = [torch.nn.utils.get_total_norm(plain, foreach=True)] if plain else []
    if sharded:
        parts.append(torch.nn.utils.get_total_norm(sharded, foreach=True).full_tensor())
    return torch.linalg.vector_norm(torch.stack(parts)) if len(parts) > 1 else parts[0]


def clip_gradients(grads: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    for group in ([g for g in grads if isinstance(g, DTensor)],
                  [g for g in grads if not isinstance(g, DTensor)]):
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm, foreach=True)


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict:
    """The whole model's state dict on rank 0 (on the CPU; empty elsewhere): a collective."""
    return get_model_state_dict(model, options=FULL)


def whole_model_state(model: nn.Module) -> dict:
    """The whole model's state dict on every rank (on the rank's device, for each rank's
    share of an evaluation): a collective."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(module: nn.Module, opt) -> dict:
    return get_optimizer_state_dict(module, opt, options=FULL)


def load_full_state(model: nn.Module, state: dict, module: nn.Module, opt,
                    opt_state: dict) -> None:
    """A full (unsharded) model state and the optimiser state of ``module`` (which holds
    ``model``) into a sharded model; every rank passes the whole state."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state, options=options)
    set_optimizer_state_dict(module, opt, opt_state, options=options)
