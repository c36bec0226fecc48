"""The pretraining step, shared by pretrain.py and bench/bench_train.py so the benchmark times the real thing.

Optimizers follow the seed: AdamW (0.9, 0.95), weight decay on 2-D weights only, fused on CUDA. The Muon option
orthogonalises the updates of the 2-D hidden weights (attention and MLP matrices) and leaves embeddings, biases and
norms to AdamW, as modded-nanogpt does; `adjust_lr_fn="match_rms_adamw"` scales Muon's update to AdamW's RMS, so both
share one learning rate and one schedule.
"""

import math
from contextlib import nullcontext
from functools import partial

import torch

# The measured answer to "does Muon help this model?" (bench/bench_optimizers.py, bench/README.md); the model card
# prints it in its training section.
MUON_VERDICT = ("Muon against tuned AdamW, measured on a CPU at small scale (7.3M parameters, 65k tokens, 3 seeds, "
                "both learning rates swept): Muon reached AdamW's final validation loss in 0.28x the tokens "
                "(0.26-0.30 over seeds); not measured at 124M or beyond.")


def mixed_precision(precision: str, device: torch.device) -> str:
    """accelerate's `mixed_precision` for our `precision` option: auto = bf16 where the GPU has it, else fp32."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if precision not in ("bf16", "fp16", "fp32", "fp64"):
        raise ValueError(f"precision={precision!r}: expected auto, bf16, fp16, fp32 or fp64")
    return "no" if precision in ("fp32", "fp64") else precision


def device_batches(loader, device: torch.device, pin_memory: bool = True):
    """`next_batch()` on the device: pinned host memory lets the copy overlap the GPU's work on the previous step."""

    def next_batch():
        x, y = loader.next_batch()
        if pin_memory and device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    return next_batch


def build_optimizers(
    model: torch.nn.Module,
    *,
    optimizer: str = "adamw",
    lr: float = 6e-4,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
    muon_momentum: float = 0.95,
    muon_lr: float | None = None,
) -> list[torch.optim.Optimizer]:
    """One optimizer (AdamW) or two (Muon for hidden matrices + AdamW for the rest); `muon_lr` (default `lr`) is
    Muon's peak LR in AdamW units, so the two can be tuned apart."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # the tied lm_head appears once
    if optimizer == "adamw":
        muon_params = []
    elif optimizer == "muon":
        # 2-D weights inside the blocks; wte (= lm_head) and wpe are embeddings, Muon is not meant for them.
        muon_params = [p for n, p in named if p.dim() == 2 and ".h." in f".{n}"]
    else:
        raise ValueError(f"optimizer={optimizer!r}: expected 'adamw' or 'muon'")
    muon_ids = {id(p) for p in muon_params}
    rest = [(n, p) for n, p in named if id(p) not in muon_ids]
    groups = [
        {"params": [p for _, p in rest if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for _, p in rest if p.dim() < 2], "weight_decay": 0.0},  # biases and LayerNorms
    ]
    if fused is None:
        fused = all(p.is_cuda for _, p in named)
    optimizers = [torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)]
    if muon_params:
        optimizers.insert(
            0,
            torch.optim.Muon(
                muon_params, lr=lr if muon_lr is None else muon_lr, weight_decay=weight_decay, momentum=muon_momentum,
                adjust_lr_fn="match_rms_adamw",
            ),
        )
    return optimizers


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """The LR of optimizer step `step` (0-based) as a fraction of the peak: build-nanogpt's `get_lr`.

    Linear warmup that gives step 0 a nonzero LR ((step + 1) / warmup), then cosine decay to `min_lr_ratio` at
    `max_steps` (the seed: 715, 19073, 0.1)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step > max_steps:
        return min_lr_ratio
    decay = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * decay)) * (1.0 - min_lr_ratio)


def build_schedulers(optimizers, *, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1):
    """One `LambdaLR` per optimizer following `lr_factor`, stepped once per optimizer step."""
    factor = partial(lr_factor, warmup_steps=warmup_steps, max_steps=max_steps, min_lr_ratio=min_lr_ratio)
    return [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in optimizers]


def train_step(model, next_batch, optimizers, schedulers, accelerator, *, grad_accum: int, grad_clip: float | None,
               stop=None):
    """One optimizer step over `grad_accum` micro-batches; returns (mean loss, grad norm) as device tensors and the
    LR this step used (a float).

    `stop()`, when given, is asked before each micro-step (on every rank: it may be a collective); when it answers
    True the step is abandoned: gradients dropped, weights, optimizer and schedule untouched, and None returned
    (the caller rewinds its data loader).

    The forward returns only the loss (`skip_logits`): no (B·T × V) logits, and nothing for accelerate's
    mixed-precision wrapper to copy to fp32. Gradients are all-reduced only on the last micro-step (`no_sync` before
    it), so DDP costs one all-reduce per optimizer step. Nothing here syncs with the host: the caller decides when
    to read the loss.
    """
    loss_sum = None
    for micro_step in range(grad_accum):
        if stop is not None and stop():
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            return None
        x, y = next_batch()
        last = micro_step == grad_accum - 1
        with nullcontext() if last else accelerator.no_sync(model):
            loss = model(input_ids=x, shift_labels=y, skip_logits=True).loss / grad_accum
            accelerator.backward(loss)
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip else None
    lr = optimizers[-1].param_groups[0]["lr"]  # AdamW's; Muon's is scaled by the same schedule
    for opt in optimizers:
        opt.step()
    for sched in schedulers:
        sched.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return loss_sum, grad_norm, lr
