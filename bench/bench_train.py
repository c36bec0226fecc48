"""Training-step speed and memory: GPT2CustomForCausalLM against transformers' GPT2LMHeadModel, side by side.

Times the real step of pretrain.py, `gpt2custom.training.train_step` (forward + loss, backward, clip, optimizer and
scheduler steps over `--grad_accum` micro-batches) under an `Accelerator`, built the way pretrain.py builds it:
`build_optimizers` (fused AdamW on CUDA, or Muon), `torch.compile` before `accelerator.prepare`, precision through
accelerate's `mixed_precision`. Then the same for GPT2LMHeadModel (sdpa, dropout 0, vocab 50304) holding the same
starting weights (`export_gpt2`), with identical settings and the same batches. GPT2LMHeadModel computes a loss only
from unshifted `labels`, so a thin wrapper gives it the loader's shifted targets and the loss function ours uses: the
first-step losses of the rows must agree (up to bf16 rounding), which checks that they all do the same work.

`--models` picks the rows (default ours,hf): `ours` is the step as pretrain.py runs it (`skip_logits=True`: only
the loss, from the chunked `chunked_linear_cross_entropy` op, never the B·T × V logits); `ours_logits` is our model the old way (logits
returned, the library's `ForCausalLMLoss`, and accelerate's fp32 copy of the returned logits under bf16/fp16);
`hf` is GPT2LMHeadModel, which always returns logits (the wrappers accept `skip_logits` and ignore it).

Step time is the median of `--steps` steps after `--warmup` (compilation happens there). On CUDA it comes from events
recorded between steps, so timing adds no host sync (one synchronize at the end); peak memory is
`torch.cuda.max_memory_allocated` over the timed steps. On CPU it is wall time per step, plus the process's CPU time
per step (steadier on a shared machine), and memory is the process's peak RSS sampled during the timed steps.
By default CUDA runs one model after the other (each freed first, so peak memory is its own) and CPU interleaves
them in `--rounds 4` (all resident), so that load from other processes hits them alike. MFU uses
`flops_per_token` (6·N + 12·L·C·T, PaLM / nanoGPT) against the GPU's dense bf16 peak from gpt2custom/metrics.py or
`--peak_flops`; `--profile true` prints the busiest kernels of each model.

`--isolate true` runs each model in a fresh subprocess of this script, one after the other, so that each peak is the
model's own: on CPU the peak is `resource.getrusage(...).ru_maxrss` over warm-up + timed steps (the optimizer state
is created in the first step), and the table also shows that peak minus the RSS after model + optimizer creation;
on CUDA, `max_memory_allocated` minus the memory allocated after creation. The report then states the logits'
share of the logits path's peak (12 bytes per logit, see `logits_bytes`).

    PYTHONPATH=. python bench/bench_train.py                         # CUDA: 124M, T=1024, B=64, compiled, bf16
    PYTHONPATH=. python bench/bench_train.py --micro_batch_size 16 --sdpa_backend cudnn --compile_mode max-autotune
    PYTHONPATH=. python bench/bench_train.py --device cpu --threads 1                # tiny, eager, fp32; CI-sized
    PYTHONPATH=. python bench/bench_train.py --device cpu --threads 1 --compile true  # + TorchInductor's C++ build
    # peak memory of one step (2 steps: the optimizer state appears in the first), each model in its own process:
    OMP_NUM_THREADS=2 PYTHONPATH=. python bench/bench_train.py --device cpu --threads 2 --preset gpt2 \
        --precision bf16 --micro_batch_size 8 --warmup 1 --steps 1 --rounds 1 --isolate true

`--eval_forward true` times instead the forward that validation runs (no_grad, under the run's autocast) of our model
with `skip_logits=True` and on the logits path, interleaved, and checks that both give the same loss.

    PYTHONPATH=. python bench/bench_train.py --device cpu --threads 2 --preset gpt2 --micro_batch_size 1 \
        --seq_len 512 --eval_forward true

Reference numbers (CPU measured, GPU not measured yet) and which flag measures which lever: bench/README.md. The
goal on one H100 is >= 580k tok/s (50 % MFU at 989 TFLOP/s dense bf16 and 855 MFLOP/token) and >= 1.3x
GPT2LMHeadModel at the same micro-batch.
"""

import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import psutil
import torch
from accelerate import Accelerator
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import HfArgumentParser
from transformers.modeling_outputs import CausalLMOutput

from configuration_gpt2custom import GPT2CustomConfig
from gpt2custom.checkpoints import export_gpt2
from gpt2custom.data import ShardLoader, list_shards
from gpt2custom.metrics import detect_gpu, flops_per_token, mfu
from gpt2custom.tokenizer import TOKENIZER_VOCAB_SIZE
from gpt2custom.training import build_optimizers, build_schedulers, device_batches, mixed_precision, train_step
from modeling_gpt2custom import GPT2CustomForCausalLM

MODEL_NAMES = {
    "ours": "GPT2CustomForCausalLM",  # pretrain.py's step: loss only (skip_logits, chunked CE)
    "ours_logits": "GPT2CustomForCausalLM, logits + library loss",
    "hf": "GPT2LMHeadModel",
}
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class BenchTrainOptions:
    device: str = field(default="auto", metadata={"help": "auto (cuda if available) | cuda | cpu"})
    preset: str | None = field(default=None, metadata={"help": "model size; default gpt2 (124M) on CUDA, tiny on CPU"})
    seq_len: int | None = field(default=None, metadata={"help": "tokens per sequence; default the preset's block_size"})
    micro_batch_size: int | None = field(
        default=None, metadata={"help": "sequences per forward; default 64 CUDA, 2 CPU"}
    )
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    compile: bool | None = field(default=None, metadata={"help": "torch.compile the model; default true on CUDA"})
    compile_mode: str = field(default="default", metadata={"help": " | ".join(COMPILE_MODES)})
    precision: str = field(
        default="auto", metadata={"help": "auto (bf16 on capable GPUs, else fp32) | bf16 | fp16 | fp32"}
    )
    tf32: bool = field(default=True, metadata={"help": "TF32 matmuls for fp32 work on CUDA, as pretrain.py"})
    sdpa_backend: str = field(
        default="auto", metadata={"help": "auto (PyTorch's choice) | flash | efficient | cudnn | math"}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa | eager, for all models"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw | muon (Muon on block matrices + AdamW)"})
    fused_adamw: bool = field(default=True, metadata={"help": "fused AdamW kernel on CUDA (false: foreach)"})
    grad_clip: float = field(default=1.0, metadata={"help": "0 disables clipping"})
    learning_rate: float = 6e-4
    steps: int | None = field(default=None, metadata={"help": "timed steps (median shown); default 25 CUDA, 8 CPU"})
    warmup: int | None = field(
        default=None, metadata={"help": "untimed steps first (compilation); default 5 CUDA, 2 CPU"}
    )
    rounds: int | None = field(
        default=None,
        metadata={
            "help": "> 1: all models resident, timed steps interleaved in this many rounds; default 1 CUDA, 4 CPU"
        },
    )
    sync_every_step: bool = field(default=False, metadata={"help": "read loss.item() every step (a host sync)"})
    pin_memory: bool = field(default=True, metadata={"help": "pinned, non-blocking host-to-device batch copies"})
    data_dir: str | None = field(default=None, metadata={"help": "prepare_data.py folder; default random tokens"})
    models: str = field(
        default="ours,hf",
        metadata={
            "help": "comma-separated rows: ours (skip_logits, chunked CE: the pretrain.py step), ours_logits "
            "(our model the old way: logits returned, library loss), hf (GPT2LMHeadModel)"
        },
    )
    loss_chunk_tokens: int | None = field(
        default=None, metadata={"help": "tokens per chunk of our skip_logits loss; default the model's (1024)"}
    )
    isolate: bool = field(
        default=False,
        metadata={
            "help": "each model in a fresh subprocess, one after the other: peak memory is its own "
            "(CPU: ru_maxrss); the table adds the peak above the memory after model + optimizer creation"
        },
    )
    result_json: str | None = field(default=None, metadata={"help": "internal (--isolate): write results here"})
    eval_forward: bool = field(default=False, metadata={
        "help": "time validation's no_grad forward of our model, skip_logits against the logits path"})  # fmt: skip
    peak_flops: float | None = field(default=None, metadata={"help": "per device, for MFU; default from the GPU name"})
    profile: bool = field(default=False, metadata={"help": "after timing, print the top kernels of 3 profiled steps"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads; default torch's choice"})
    seed: int = 1337


def resolve_options(opts: BenchTrainOptions) -> torch.device:
    """Fill the device-dependent defaults in place and check the values; returns the device."""
    if opts.device == "auto":
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.device not in ("cuda", "cpu"):
        raise ValueError(f"device={opts.device!r}: expected auto, cuda or cpu")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but torch.cuda.is_available() is False")
    cuda = opts.device == "cuda"
    opts.preset = opts.preset or ("gpt2" if cuda else "tiny")
    opts.micro_batch_size = opts.micro_batch_size or (64 if cuda else 2)
    opts.compile = cuda if opts.compile is None else opts.compile
    opts.steps = opts.steps or (25 if cuda else 8)
    opts.warmup = (5 if cuda else 2) if opts.warmup is None else opts.warmup
    opts.rounds = opts.rounds or (1 if cuda else 4)
    checks = [
        ("compile_mode", opts.compile_mode, COMPILE_MODES),
        ("precision", opts.precision, ("auto", "bf16", "fp16", "fp32")),
        ("sdpa_backend", opts.sdpa_backend, ("auto", *SDPA_BACKENDS)),
        ("attn_implementation", opts.attn_implementation, ("sdpa", "eager")),
        ("optimizer", opts.optimizer, ("adamw", "muon")),
    ]
    for key, value, allowed in checks:
        if value not in allowed:
            raise ValueError(f"{key}={value!r}: expected one of {', '.join(allowed)}")
    names = model_names(opts)
    if not names or set(names) - set(MODEL_NAMES):
        raise ValueError(f"models={opts.models!r}: expected a comma-separated subset of {', '.join(MODEL_NAMES)}")
    if opts.sdpa_backend == "cudnn" and not cuda:
        raise ValueError("sdpa_backend=cudnn needs device=cuda")
    if opts.loss_chunk_tokens is not None and opts.loss_chunk_tokens < 1:
        raise ValueError(f"loss_chunk_tokens={opts.loss_chunk_tokens}: expected >= 1")
    if opts.isolate:
        opts.rounds = 1  # one model per process: nothing to interleave
    for key in ("micro_batch_size", "grad_accum", "steps", "warmup", "rounds"):  # warm-up compiles, gives loss 1
        if getattr(opts, key) < 1:
            raise ValueError(f"{key}={getattr(opts, key)}: expected >= 1")
    if opts.steps % opts.rounds:
        raise ValueError(f"steps={opts.steps} must be a multiple of rounds={opts.rounds}")
    return torch.device(opts.device)


def model_names(opts: BenchTrainOptions) -> list[str]:
    return [name.strip() for name in opts.models.split(",") if name.strip()]


class ShiftedLabelsLM(nn.Module):
    """GPT2LMHeadModel behind our model's training call, `model(input_ids=x, shift_labels=y, skip_logits=True).loss`.

    GPT2LMHeadModel computes a loss only when given unshifted `labels`; this computes the loss of the loader's
    already-shifted targets with the same `ForCausalLMLoss` as GPT2CustomForCausalLM. The loss function is looked up
    once here: GPT2LMHeadModel has no `loss_type`, so its `loss_function` property logs a warning on every call, which
    breaks the compiled graph in two. No KV cache in training, as in ours. `skip_logits` is accepted and ignored:
    GPT2LMHeadModel always returns its logits, which is what the comparison measures.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.loss_function = model.loss_function

    def forward(self, input_ids, shift_labels, skip_logits: bool = False):
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        loss = self.loss_function(
            logits=logits, labels=None, vocab_size=self.model.config.vocab_size, shift_labels=shift_labels
        )
        return CausalLMOutput(loss=loss, logits=logits)


class WithLogits(nn.Module):
    """Our model's training step before `skip_logits`: the call ignores `skip_logits`, so the forward returns the
    (B·T × V) logits and the loss comes from the library's `ForCausalLMLoss` on them (upcast to fp32), and under
    bf16/fp16 accelerate's output wrapper copies the returned logits to fp32."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, shift_labels, skip_logits: bool = False):
        return self.model(input_ids=input_ids, shift_labels=shift_labels)


class RandomWindows:
    """ShardLoader's interface over a few fixed random batches, cycled: making data costs nothing in the timed loop."""

    def __init__(self, batch_size: int, seq_len: int, seed: int, distinct: int = 8):
        generator = torch.Generator().manual_seed(seed)
        windows = [torch.randint(0, TOKENIZER_VOCAB_SIZE, (batch_size, seq_len + 1), generator=generator)
                   for _ in range(distinct)]  # fmt: skip
        self.batches = [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in windows]
        self.step = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batches[self.step % len(self.batches)]
        self.step += 1
        return batch


def current_rss() -> int:
    return psutil.Process().memory_info().rss


def max_rss() -> int:
    """This process's peak resident memory in bytes since it started (the kernel's high-water mark; Linux: KiB)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakRSS:
    """The process's peak resident memory while the block runs, sampled every 10 ms (CPU runs)."""

    def __enter__(self):
        self.peak = psutil.Process().memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        process = psutil.Process()
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def build_models(opts: BenchTrainOptions, config: GPT2CustomConfig) -> dict[str, nn.Module]:
    """Our model with random weights and, if asked, a GPT2LMHeadModel holding a copy of the same tensors."""
    names = model_names(opts)
    torch.manual_seed(opts.seed)
    ours = GPT2CustomForCausalLM(config)
    ours.set_attn_implementation(opts.attn_implementation)
    if opts.loss_chunk_tokens:
        ours.loss_chunk_tokens = opts.loss_chunk_tokens
    models = {"ours": ours}
    if "ours_logits" in names:
        models["ours_logits"] = WithLogits(copy.deepcopy(ours) if "ours" in names else ours)
    if "hf" in names:
        with tempfile.TemporaryDirectory() as tmp:
            hf = export_gpt2(ours, tmp)
        hf.set_attn_implementation(opts.attn_implementation)
        models["hf"] = ShiftedLabelsLM(hf)
    return {name: models[name] for name in names}


def timed_steps(step, n: int, device: torch.device, sync_every_step: bool) -> tuple[list[float], list[float], float]:
    """Wall seconds and process CPU seconds of each of `n` calls of `step`, and the last loss.

    On CUDA the times come from events recorded between steps, so that the CPU may queue the next step while the GPU
    runs this one, as in pretrain.py (no CPU seconds there). On a shared CPU the CPU seconds are the steadier figure.
    """
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        events[0].record()
        for i in range(n):
            loss, *_ = step()  # (loss, grad norm, lr)
            if sync_every_step:
                loss.item()
            events[i + 1].record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in zip(events, events[1:])], [], loss.item()
    wall, cpu = [], []
    for _ in range(n):
        start, start_cpu = time.perf_counter(), time.process_time()
        loss, *_ = step()
        if sync_every_step:
            loss.item()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu, loss.item()


def profile_table(step, device: torch.device, steps: int = 3, rows: int = 15) -> str:
    """torch.profiler's busiest operators over a few steps: where the step time goes (attention, lm_head, AdamW)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows)


class StepRunner:
    """One model's training step, built as pretrain.py builds it: optimizers on the raw model, `torch.compile`, then
    `accelerator.prepare`. `run(n)` times n more steps, keeping step times, the last loss and the peak memory."""

    def __init__(self, model: nn.Module, opts: BenchTrainOptions, accelerator: Accelerator):
        self.opts, self.accelerator, self.device = opts, accelerator, accelerator.device
        model.to(self.device).train()
        fused = opts.fused_adamw and self.device.type == "cuda"
        optimizers = build_optimizers(model, optimizer=opts.optimizer, lr=opts.learning_rate, fused=fused)
        schedulers = build_schedulers(optimizers, warmup_steps=0, max_steps=opts.warmup + opts.steps + 3)
        if opts.compile:
            model = torch.compile(model, mode=None if opts.compile_mode == "default" else opts.compile_mode)
        self.model, *rest = accelerator.prepare(model, *optimizers, *schedulers)
        self.optimizers, self.schedulers = rest[: len(optimizers)], rest[len(optimizers) :]
        if opts.data_dir:
            loader = ShardLoader(opts.data_dir, "train", opts.micro_batch_size, opts.seq_len, seed=opts.seed)
        else:
            loader = RandomWindows(opts.micro_batch_size, opts.seq_len, opts.seed)
        self.next_batch = device_batches(loader, self.device, opts.pin_memory)
        self.seconds, self.cpu_seconds, self.memory = [], [], 0
        self.first_loss = self.last_loss = self.profile = None
        # What the model, its optimizer and the prepared wrappers hold before any step (the optimizer state comes
        # with the first step): --isolate subtracts it from the peak to get what the steps add.
        gc.collect()
        self.setup_memory = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else current_rss()
        self.setup_maxrss = max_rss()

    def step(self):
        return train_step(self.model, self.next_batch, self.optimizers, self.schedulers, self.accelerator,
                          grad_accum=self.opts.grad_accum, grad_clip=self.opts.grad_clip or None)  # fmt: skip

    def warm_up(self, n: int):
        for _ in range(n):
            loss, *_ = self.step()
            self.first_loss = loss.item() if self.first_loss is None else self.first_loss

    def run(self, n: int):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with nullcontext() if cuda else PeakRSS() as rss:
            seconds, cpu_seconds, self.last_loss = timed_steps(self.step, n, self.device, self.opts.sync_every_step)
        self.seconds += seconds
        self.cpu_seconds += cpu_seconds
        self.memory = max(self.memory, torch.cuda.max_memory_allocated() if cuda else rss.peak)

    def result(self) -> dict:
        return {
            "seconds": statistics.median(self.seconds),
            "cpu_seconds": statistics.median(self.cpu_seconds) if self.cpu_seconds else None,
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "memory": self.memory,
            "setup_memory": self.setup_memory,
            "setup_maxrss": self.setup_maxrss,
            "maxrss": max_rss(),  # the whole process's peak so far: warm-up and timed steps, and the setup
            "profile": profile_table(self.step, self.device) if self.opts.profile else None,
        }


def free(accelerator: Accelerator, device: torch.device):
    """Drop the prepared objects and compiled graphs (which hold the weights) so the next model starts clean."""
    accelerator.free_memory()
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_models(models: dict[str, nn.Module], opts: BenchTrainOptions, accelerator: Accelerator) -> dict[str, dict]:
    """With one round, one model after the other, each freed before the next so that peak memory is its own. With
    `rounds` > 1, all resident and their timed steps interleaved, so that a busy machine slows them alike."""
    results = {}
    if opts.rounds == 1:
        for name in list(models):
            runner = StepRunner(models.pop(name), opts, accelerator)
            runner.warm_up(opts.warmup)
            runner.run(opts.steps)
            results[name] = runner.result()
            del runner
            free(accelerator, accelerator.device)
        return results
    runners = {name: StepRunner(models.pop(name), opts, accelerator) for name in list(models)}
    for runner in runners.values():
        runner.warm_up(opts.warmup)
    for _ in range(opts.rounds):
        for runner in runners.values():
            runner.run(opts.steps // opts.rounds)
    return {name: runner.result() for name, runner in runners.items()}


def logits_bytes(opts: BenchTrainOptions, config: GPT2CustomConfig) -> dict[str, int]:
    """What the logits cost at the peak of one micro-step, N = B·T·V logits (V = the padded vocab, 50304).

    The logits path (`ours_logits`, GPT2LMHeadModel), 12 bytes per logit at its peak:
    - forward, inside `ForCausalLMLoss`: the bf16 logits (2) + their fp32 upcast (4) + the fp32 log-softmax that
      `cross_entropy` saves for backward (4) = 10; then accelerate's fp32 copy of the returned logits (4) replaces
      the upcast (freed when the loss returns): 2 + 4 + 4 = 10 again (fp32 training: 4 + 4 + 0);
    - backward, at the log-softmax node: the saved log-softmax (4) + nll's dense gradient (4) + the gradient of the
      upcast logits (4) = 12, with every saved activation of the blocks still held: this is the step's peak.
    The chunked loss (`ours`), c = `loss_chunk_tokens` (1024): one chunk's logits in fp32 (4), made from the bf16
    matmul's output (2, alive while it is converted), then turned in place into softmax − one-hot, whose bf16 copy
    (2) feeds the gradient matmuls: about 6 bytes × c × V while it runs (4 in fp32 training), all of it freed before
    backward starts.
    """
    n = opts.micro_batch_size * opts.seq_len * config.vocab_size
    chunk = min(opts.loss_chunk_tokens or GPT2CustomForCausalLM.loss_chunk_tokens, opts.micro_batch_size * opts.seq_len)
    per_logit = 4 if opts.precision == "fp32" else 6
    return {"logits": n, "logits_path": 12 * n, "chunked": per_logit * chunk * config.vocab_size, "chunk": chunk}


def ratio_cells(ours: dict, hf: dict, keys: list[str], bold: str = "tok_s") -> list[str]:
    cells = []
    for key in keys:
        text = f"{ours[key] / hf[key]:.2f}x" if ours.get(key) is not None and hf.get(key) else "—"
        cells.append(f"**{text}**" if key == bold else text)
    return cells


def print_report(opts: BenchTrainOptions, config: GPT2CustomConfig, results: dict[str, dict], device: torch.device,
                 peak: float | None):  # fmt: skip
    flops_token = flops_per_token(config, opts.seq_len)
    attention = 12 * config.n_layer * config.n_embd * opts.seq_len
    n_params = (flops_token - attention) / 6
    tokens_step = opts.micro_batch_size * opts.seq_len * opts.grad_accum
    cuda = device.type == "cuda"
    memory_kind = "peak CUDA memory" if cuda else "peak RSS (process)"
    peak_text = f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (pass --peak_flops)"
    print(
        f"FLOPs/token = 6N + 12·L·C·T = 6 × {n_params:,.0f} + 12·{config.n_layer}·{config.n_embd}·{opts.seq_len} "
        f"= {flops_token / 1e6:.1f} MFLOP (N without wpe, tied lm_head once); peak {peak_text}"
    )
    interleaved = f", interleaved in {opts.rounds} rounds (models resident together)" if opts.rounds > 1 else ""
    isolated = ", each model in a fresh process" if opts.isolate else ""
    print(
        f"{tokens_step:,} tokens per step; step time = median of {opts.steps} steps after {opts.warmup} warm-up"
        f"{interleaved}{isolated}\n"
    )
    cpu = not cuda
    step_kind = "peak − after setup" + ("" if cuda else " (ru_maxrss − RSS)")
    header = ["model", "step ms", "tok/s", "MFU", *(["CPU ms/step"] if cpu else []), memory_kind,
              *([step_kind, "after setup"] if opts.isolate else []), "loss first → last"]  # fmt: skip
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    numbers = {}
    for name, r in results.items():
        tok_s = tokens_step / r["seconds"]
        memory = max(r["memory"], r["maxrss"]) if opts.isolate and cpu else r["memory"]
        n = numbers[name] = {"step": r["seconds"], "tok_s": tok_s, "mfu": mfu(tok_s, flops_token, peak),
                             "cpu": r["cpu_seconds"], "memory": memory,
                             "step_memory": memory - r["setup_memory"]}  # fmt: skip
        cells = [
            MODEL_NAMES[name], f"{n['step'] * 1e3:,.1f}", f"{tok_s:,.0f}",
            f"{n['mfu']:.1%}" if n["mfu"] is not None else "—", *([f"{n['cpu'] * 1e3:,.1f}"] if cpu else []),
            f"{memory / 2**30:.2f} GiB",
            *([f"{n['step_memory'] / 2**30:.2f} GiB", f"{r['setup_memory'] / 2**30:.2f} GiB"] if opts.isolate else []),
            f"{r['first_loss']:.4f} → {r['last_loss']:.4f}",
        ]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    if "hf" in numbers:
        keys = ["step", "tok_s", "mfu", *(["cpu"] if cpu else []), "memory", *(["step_memory"] if opts.isolate else [])]
        for name in numbers:
            if name != "hf":
                cells = [f"{name} / HF", *ratio_cells(numbers[name], numbers["hf"], keys),
                         *([""] if opts.isolate else []), ""]  # fmt: skip
                print("| " + " | ".join(cells) + " |")
    if opts.isolate:
        for name, r in results.items():
            if r["setup_maxrss"] >= r["maxrss"] and cpu:
                print(f"warning: {name}: the peak RSS was reached while building the model, not in the steps")
        b = logits_bytes(opts, config)
        print(
            f"\nlogits: B·T·V = {opts.micro_batch_size}·{opts.seq_len}·{config.vocab_size} = {b['logits']:,}; the "
            f"logits path holds about 12 bytes per logit at its peak (bf16 2 + fp32 upcast 4 + saved log-softmax 4 "
            f"in the forward, then accelerate's fp32 copy 4; backward: saved log-softmax 4 + nll grad 4 + logits grad "
            f"4) = {b['logits_path'] / 2**30:.2f} GiB; the chunked loss about 6·c·V with c = {b['chunk']} = "
            f"{b['chunked'] / 2**30:.2f} GiB (formula: `logits_bytes` in bench/bench_train.py)"
        )
        for name in ("ours_logits", "hf"):
            if name in numbers and numbers[name]["step_memory"] > 0:
                share = b["logits_path"] / numbers[name]["step_memory"]
                print(f"logits' share of {MODEL_NAMES[name]}'s step peak: {share:.0%} (predicted bytes / measured)")
        if "ours" in numbers and "ours_logits" in numbers:
            saved = numbers["ours_logits"]["step_memory"] - numbers["ours"]["step_memory"]
            print(
                f"measured saving of skip_logits over the logits path: {saved / 2**30:.2f} GiB; predicted "
                f"{(b['logits_path'] - b['chunked']) / 2**30:.2f} GiB"
            )


def eval_forward_report(opts: BenchTrainOptions, config: GPT2CustomConfig, accelerator: Accelerator):
    """Validation's forward (no_grad, autocast as in training, no KV cache), skip_logits against the logits path: median
    wall ms of `steps` calls each, interleaved so that load from other processes hits both alike."""
    torch.manual_seed(opts.seed)
    model = GPT2CustomForCausalLM(config).to(accelerator.device).eval()
    model.set_attn_implementation(opts.attn_implementation)
    x, y = (t.to(accelerator.device) for t in RandomWindows(opts.micro_batch_size, opts.seq_len, opts.seed).next_batch())

    def forward(skip):
        with torch.no_grad(), accelerator.autocast():
            loss = model(input_ids=x, shift_labels=y, use_cache=False, skip_logits=skip).loss
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize(accelerator.device)
        return loss.item()

    times, losses = {True: [], False: []}, {}
    for i in range(opts.warmup + opts.steps):
        for skip in (True, False):
            start = time.perf_counter()
            losses[skip] = forward(skip)
            if i >= opts.warmup:
                times[skip].append(time.perf_counter() - start)
    ms = {skip: statistics.median(t) * 1e3 for skip, t in times.items()}
    print(f"validation forward, {opts.micro_batch_size}×{opts.seq_len} tokens, V={config.vocab_size}, median of "
          f"{opts.steps} after {opts.warmup} warm-up\n| forward | ms | loss |\n|---|---|---|")  # fmt: skip
    print(f"| skip_logits (chunked loss) | {ms[True]:,.1f} | {losses[True]:.6f} |")
    print(f"| logits path | {ms[False]:,.1f} | {losses[False]:.6f} |")
    print(f"| skip_logits / logits path | **{ms[True] / ms[False]:.2f}x** | |")


def run_isolated(opts: BenchTrainOptions, argv: list[str]) -> dict[str, dict]:
    """Each model in a fresh process of this script, one after the other; their results come back through JSON."""
    results = {}
    for name in model_names(opts):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            command = [sys.executable, os.path.abspath(__file__), *argv,
                       "--models", name, "--isolate", "false", "--rounds", "1", "--result_json", out]  # fmt: skip
            print(f"{name}: fresh process ...", flush=True)
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
            if done.returncode != 0 or not os.path.exists(out):
                print(done.stdout, end="")
                sys.exit(f"bench_train.py: the {name} process failed (exit code {done.returncode})")
            with open(out) as f:
                results[name] = json.load(f)[name]
    return results


def main(argv=None):
    (opts,) = HfArgumentParser(BenchTrainOptions).parse_args_into_dataclasses(argv)
    try:
        device = resolve_options(opts)
        opts.seq_len = opts.seq_len or GPT2CustomConfig.from_preset(opts.preset).block_size
        config = GPT2CustomConfig.from_preset(opts.preset, block_size=opts.seq_len)
        if opts.data_dir:
            list_shards(opts.data_dir, "train")  # fail now, naming the folder, rather than after building the models
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"bench_train.py: {e}")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    mixed = mixed_precision(opts.precision, device)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed, step_scheduler_with_optimizer=False)
    if device.type == "cuda" and opts.tf32:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    gpu = detect_gpu(device)
    peak = opts.peak_flops or (gpu.peak_bf16_flops if gpu else None)
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    )
    compiled = f"compiled ({opts.compile_mode})" if opts.compile else "eager"
    print(
        f"{device_name}; torch {torch.__version__}; preset {opts.preset}, T={opts.seq_len}, B={opts.micro_batch_size}, "
        f"grad_accum {opts.grad_accum}; {compiled}; precision {mixed if mixed != 'no' else 'fp32'}; "
        f"attention {opts.attn_implementation} (backend {opts.sdpa_backend}); {opts.optimizer}"
        f"{' fused' if opts.optimizer == 'adamw' and opts.fused_adamw and device.type == 'cuda' else ''}; "
        f"clip {opts.grad_clip or 'off'}; data {opts.data_dir or 'random tokens'}"
    )
    if opts.result_json is None:
        print("command: python " + " ".join(sys.argv))
    if opts.eval_forward:
        eval_forward_report(opts, config, accelerator)
        return
    if opts.isolate:
        results = run_isolated(opts, sys.argv[1:] if argv is None else list(argv))
    else:
        models = build_models(opts, config)
        backend = SDPA_BACKENDS.get(opts.sdpa_backend)
        # Around the warm-up too: a compiled graph keeps the attention kernel chosen while it was traced.
        with sdpa_kernel(backend) if backend is not None else nullcontext():
            results = bench_models(models, opts, accelerator)
    if opts.result_json:
        with open(opts.result_json, "w") as f:
            json.dump(results, f)
        return
    for name, result in results.items():
        if result["profile"]:
            print(f"\nprofile of {MODEL_NAMES[name]}, 3 steps:\n{result['profile']}")
    print_report(opts, config, results, device, peak)


if __name__ == "__main__":
    main()
