"""Throughput, MFU and dollars: every run knows what it costs.

FLOPs per token follow PaLM / nanoGPT: 6·N + 12·L·H·Q·T, with N the parameters without position embeddings
(the tied wte/lm_head counted once). For GPT-2 124M at T=1024 that is ≈ 855 MFLOP per token.
llm.c uses 6N + 6·L·C·T (≈ 7 % lower): do not compare MFUs across formulas.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_bf16_flops: float  # dense, no sparsity
    dollars_per_hour: float  # a typical on-demand price for one GPU; override with --gpu_price_per_hour


# Matched by substring of torch.cuda.get_device_name(), first match wins (H200 before H100, etc.).
GPU_SPECS = [
    GPUSpec("H200", 989e12, 3.49),
    GPUSpec("H100", 989e12, 2.49),
    GPUSpec("A100", 312e12, 1.79),
    GPUSpec("L40S", 362e12, 1.19),
    GPUSpec("A10G", 125e12, 1.01),
    GPUSpec("L4", 121e12, 0.80),
    GPUSpec("4090", 165e12, 0.69),
    GPUSpec("3090", 71e12, 0.44),
    GPUSpec("V100", 125e12, 0.89),  # fp16 tensor cores; no bf16
    GPUSpec("T4", 65e12, 0.35),  # fp16 tensor cores; no bf16
]


def detect_gpu(device: torch.device | None = None) -> GPUSpec | None:
    """The spec of the current CUDA device, or None on CPU / unknown GPUs (then MFU and cost need flags)."""
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((spec for spec in GPU_SPECS if spec.name in name), None)


def flops_per_token(config, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward) of a GPT2CustomConfig: 6·N + 12·L·H·Q·T."""
    seq_len = seq_len or config.block_size
    c, v, layer = config.n_embd, config.vocab_size, config.n_layer
    per_block = 12 * c * c + (13 * c if config.bias else 4 * c)  # qkv, proj, fc, proj (+ biases, 2 LayerNorms)
    n_params = v * c + layer * per_block + (2 * c if config.bias else c)  # wte (= lm_head) + blocks + ln_f
    return 6 * n_params + 12 * layer * config.n_embd * seq_len


def mfu(tokens_per_second: float, flops_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1] (None when the peak is unknown, e.g. on CPU)."""
    return tokens_per_second * flops_token / peak_flops if peak_flops else None


def dollars(seconds: float, num_gpus: int, price_per_gpu_hour: float | None) -> float | None:
    return seconds / 3600 * num_gpus * price_per_gpu_hour if price_per_gpu_hour else None
