"""FSDP2 (`torch.distributed.fsdp.fully_shard`) through accelerate, on GPUs and, for tests, on CPU gloo ranks.

On GPUs nothing here changes accelerate: `accelerate launch --config_file accelerate_configs/fsdp_8gpu.yaml` gives
`DistributedType.FSDP` and `Accelerator.prepare` shards the model with `fsdp2_prepare_model`.

On CPU ranks accelerate 1.15 does not: `AcceleratorState` sets `DistributedType.FSDP` only inside its branch for
GPU-like multi-device types (MULTI_GPU, MULTI_NPU, ...), so a launch with an FSDP config and `use_cpu: true` comes
out as MULTI_CPU, `prepare` wraps the model in DDP and every rank holds all parameters; the FSDP plugin the
Accelerator built from the launcher's FSDP_* variables is dropped. torch's `fully_shard` itself shards over gloo
ranks on CPU, and accelerate's FSDP2 code (`fsdp2_prepare_model`, the DCP-based `save_state` / `load_state`,
`get_state_dict`, the DTensor-aware `clip_grad_norm_`) has nothing GPU-specific in it. `enable_fsdp_on_cpu` makes
the one switch accelerate skips, so a CPU test (accelerate_configs/fsdp2_cpu_2proc.yaml) runs the code path a GPU
run uses.
"""

import os

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


def fsdp_requested() -> bool:
    """True when the launcher asked for FSDP (`distributed_type: FSDP` in the accelerate config, or --use_fsdp)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_fsdp_on_cpu(accelerator: Accelerator) -> bool:
    """Turn a CPU launch that asked for FSDP into the FSDP2 setup accelerate builds on GPUs; True when it did.

    Call it right after creating the Accelerator, before `prepare`. It does what `AcceleratorState.__init__` does
    for a GPU launch with an FSDP config, and nothing else: it stores an FSDP plugin read from the launcher's FSDP_*
    variables (with the run's mixed precision) in the accelerator state and sets the state's distributed type to
    FSDP (accelerate reads both from there, so `prepare`, `save_state`, `load_state`, `get_state_dict` and
    `clip_grad_norm_` take their FSDP2 branches). A GPU launch, or a CPU launch without FSDP, is left untouched.
    """
    if not fsdp_requested() or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()  # reads FSDP_VERSION, FSDP_AUTO_WRAP_POLICY, ... as accelerate does
    if plugin.fsdp_version != 2:
        raise ValueError(f"fsdp_version={plugin.fsdp_version} on CPU ranks: only FSDP2 (fully_shard) runs on CPU; "
                         "set fsdp_version: 2 in the accelerate config")  # fmt: skip
    if accelerator.mixed_precision == "fp16":
        # The Accelerator has already made a plain GradScaler for fp16 (FSDP2 needs its own); CPUs have bf16.
        raise ValueError("precision fp16 with FSDP on CPU ranks is not supported: use bf16 or fp32")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state = accelerator.state
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # AcceleratorState copies its type into PartialState at the end of __init__; the collectives read it there.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def is_fsdp_module(model) -> bool:
    """True for a module sharded by `fully_shard` (FSDP2), compiled or not."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor parameter (FSDP2), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def block_parameter_counts(model) -> list[tuple[int, int]]:
    """Per transformer block: (elements this rank holds, elements of the whole block)."""
    return [(sum(local_tensor(p).numel() for p in block.parameters()), sum(p.numel() for p in block.parameters()))
            for block in model.transformer.h]  # fmt: skip
