"""More than one process: `torchrun --nproc_per_node N X.py` runs N copies of a script (docs/distributed.md).

torchrun puts RANK, LOCAL_RANK and WORLD_SIZE in each process's environment; plain
`python X.py` sets none of them, and then every function here does nothing: one process is
world size 1. With N processes the scripts do data parallelism, the field's plain recipe
(nanochat, TRL, verl):
  - each rank samples its own share of the prompts (whole groups), with its own RNG stream;
  - each rank computes the loss of its own rows, divided by the *global* normalisers
    (token and sequence counts all-reduced): normalising per rank is the multi-GPU version of
    the micro-batch accumulation bug;
  - DDP averages the gradients over ranks after the last micro-batch (the `grad_sync` context),
    so every rank takes the same optimizer step; `--fsdp` shards weights, gradients and
    optimizer state with FSDP2 (`fully_shard`) instead, for models that do not fit one device;
  - rank 0 alone writes metrics, checkpoints and the final model.
"""

import atexit
import gc
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.cli import check


@dataclass(frozen=True)
class World:
    """This process's place among the N processes torchrun started (rank 0 of 1 under plain python)."""

    rank: int
    size: int
    device: torch.device
    launched: bool  # under torchrun (a process group exists), even with one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> World:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPU); one GPU per rank (cuda:LOCAL_RANK).

    Non-main ranks print nothing (their stdout goes to /dev/null): one copy of every line.
    """
    from common.cli import check_device
    from common.models import pick_device

    check_device(device)
    device = pick_device(device)
    if "WORLD_SIZE" not in os.environ:
        return World(0, 1, device, launched=False)
    rank, size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        check(local_rank < torch.cuda.device_count(), "nproc_per_node",
              f"local rank {local_rank} needs GPU {local_rank}, this machine has {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_destroy_at_exit)
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
    return World(rank, size, device, launched=True)


def cleanup():
    """Wait for every rank at the end of a torchrun run (a no-op under plain python). The process
    group itself is destroyed at exit (`_destroy_at_exit`), once the script's DDP wrappers are gone."""
    if dist.is_initialized():
        dist.barrier()


def _destroy_at_exit():
    """Tear the process group down in order: first the DDP reducers that hold it (collected once main()
    has returned), then the group. Destroying it while a reducer lives made that reducer's destructor hang;
    leaving it to interpreter teardown sometimes aborted ("terminate called without an active exception")."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def all_reduce(x, op: str = "sum"):
    """Sum (or max, min) of x over all ranks: a number gives a number, a tensor a new tensor."""
    if world_size() == 1:
        return x
    tensor = torch.as_tensor(x, dtype=torch.float64 if not torch.is_tensor(x) else None)
    tensor = tensor.detach().clone().to(_comm_device())
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    if not torch.is_tensor(x):
        return type(x)(tensor.item())
    return tensor.to(x.device)


def all_gather(x: torch.Tensor, pad_value=0) -> torch.Tensor:
    """Every rank's rows, in rank order: (b, ...) on each rank -> (N * b, ...). Each rank must hold
    the same number of rows; a ragged dim 1 (completion lengths differ per rank) is padded with
    pad_value to the longest. Rank r's own rows are then rows r * b .. r * b + b - 1."""
    if world_size() == 1:
        return x
    if x.dim() >= 2:
        width = int(all_reduce(torch.tensor(x.shape[1]), "max"))
        x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, width - x.shape[1]), value=pad_value)
    parts = [torch.empty_like(x, device=_comm_device()) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous().to(_comm_device()))
    return torch.cat(parts).to(x.device)


def any_rank(flag: bool) -> bool:
    """True if the flag is true on any rank (so every rank takes the same branch)."""
    return bool(all_reduce(int(flag), "max"))


def fewest_over_ranks(count: int) -> int:
    """The smallest count over the ranks (so every rank keeps as many rows)."""
    return int(all_reduce(count, "min"))


def gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """all_gather of each tensor: every rank's rows, in rank order, ragged widths padded with 0."""
    return tuple(all_gather(t) for t in tensors)


def own_rows(gathered: torch.Tensor, num_rows: int, width: int) -> torch.Tensor:
    """This rank's rows of a gather_rows result, cut back to its own width: (N * b, W) -> (b, width)."""
    start = rank() * num_rows
    return gathered[start:start + num_rows, :width]


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (any picklable object; [obj] under plain python)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ---- the model: DDP by default, FSDP2 with --fsdp -------------------------------------------------


def wrap_model(model, world: World, fsdp: bool):
    """The model as the update calls it. Plain python: the model itself. torchrun: DDP (a full copy
    per rank, gradients averaged), or with fsdp=True FSDP2, each decoder layer and then the root
    `fully_shard`ed in place (each rank holds 1/N of the weights, gradients and AdamW state).
    Sampling, scoring and saving use the unwrapped model (`unwrap`)."""
    check(not fsdp or world.launched, "fsdp", "shards across torchrun's processes; launch with "
          "torchrun --nproc_per_node N (N >= 1), or drop --fsdp")
    if not world.launched:
        return model
    if fsdp:  # the frozen reference is sharded too: it is as large as the policy
        from torch.distributed.fsdp import fully_shard

        for layer in _decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model
    if not any(p.requires_grad for p in model.parameters()):
        return model  # a frozen reference under DDP: a plain copy per rank, nothing to synchronise
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[world.device.index] if world.device.type == "cuda" else None)


def unwrap(model):
    """The HF model inside DDP (FSDP2 shards in place: the model is itself)."""
    return getattr(model, "module", model)


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(model), FSDPModule)


def _decoder_layers(model):
    """The transformer blocks (LlamaDecoderLayer, Qwen2DecoderLayer, ...): FSDP2's unit of sharding."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def grad_sync(model, last: bool):
    """Accumulating micro-batches: all-reduce the gradients in the last one's backward only. Call before
    each micro-batch's forward. DDP: `require_backward_grad_sync` (the flag its no_sync() context
    sets); FSDP2: set_requires_gradient_sync. A no-op under plain python."""
    if is_sharded(model):
        unwrap(model).set_requires_gradient_sync(last)
    elif hasattr(model, "require_backward_grad_sync"):
        model.require_backward_grad_sync = last


def clip_grad_norm(model, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over the (possibly sharded) parameters; returns the global norm as a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def full_state_dict(model, to_cpu: bool = False) -> dict:
    """Full (unsharded) weights with the HF model's names, on every rank: what vLLM and a checkpoint
    need. FSDP2 gathers them (collective: every rank must call it); a LoRA model is merged
    (W + B A * alpha / r), base and adapters untouched. to_cpu copies each tensor to the CPU."""
    model = unwrap(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    else:
        state = model.state_dict()
    if hasattr(model, "get_base_model"):
        state = merged_lora_state_dict(model, state)
    return {k: (v.detach().cpu() if to_cpu else v.detach()) for k, v in state.items()}


def load_full_state_dict(model, state: dict):
    """Load full (unsharded) weights into a model, sharded (FSDP2) or not."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(unwrap(model), state, options=StateDictOptions(full_state_dict=True))
    else:
        unwrap(model).load_state_dict(state)


def optimizer_state_dict(model, optimizer) -> dict:
    """The optimizer's full state (gathered under FSDP2: a collective), ready for torch.save."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(unwrap(model), optimizer, options=options)
    return optimizer.state_dict()


def load_optimizer_state_dict(model, optimizer, state: dict):
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def merged_lora_state_dict(model, state: dict) -> dict:
    """A peft model's state dict -> the base model's names with each LoRA layer merged: W + scale * B A."""
    merged = {}
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight") and module.active_adapters:
            key = f"{name}.base_layer.weight"
            if key in state:
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
                merged[key] = state[key] + delta.to(state[key].dtype)
    out = {}
    for key, value in state.items():
        if "lora_" in key:
            continue
        value = merged.get(key, value)
        out[key.removeprefix("base_model.model.").replace(".base_layer.", ".")] = value
    return out
