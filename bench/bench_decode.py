"""KV-cache greedy decoding speed: GPT2CustomForCausalLM against transformers' GPT2LMHeadModel on the same weights.

Builds a randomly initialised preset, copies its weights into a stock GPT2LMHeadModel (`export_gpt2`), checks
that both decode the same tokens, then times `generate(do_sample=False)` for each batch size and cache
implementation, alternating the two models so that load from other processes hits both alike. tok/s counts the
generated tokens of the whole batch over the time of the `generate` call (prefill included; wall clock, or this
process's CPU time with `--clock cpu`); the median of `--repeats` runs is shown. CPU runs in float32, CUDA in
bfloat16 (where a static cache makes `generate` compile the forward on its own).

    PYTHONPATH=. python bench/bench_decode.py                      # 124M, prompt 32, 64 new tokens, batch 1 and 8
    PYTHONPATH=. python bench/bench_decode.py --preset tiny --repeats 2 --new_tokens 16    # seconds, for CI
    PYTHONPATH=. python bench/bench_decode.py --threads 1 --clock cpu     # stable ratios on a shared CPU

Reference, 124M fp32 on the 2-core shared CPU of the project box (torch 2.13, transformers 5.24), `--threads 1
--clock cpu`, tok/s ours / GPT2LMHeadModel: dynamic cache batch 1 14 / 14 (0.99x), batch 8 36 / 35 (1.02x); static
cache batch 1 15 / 15 (0.97x), batch 8 37 / 37 (1.00x); both models decode identical tokens. Wall-clock runs of the
same table on that box, loaded by other jobs, gave ratios from 0.64x to 2.28x between two runs: read ratios from the
cpu clock there, and from the wall clock only on an idle machine or a GPU.
"""

import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, HfArgumentParser

from configuration_gpt2custom import GPT2CustomConfig
from gpt2custom.checkpoints import export_gpt2
from gpt2custom.tokenizer import EOT_ID, TOKENIZER_VOCAB_SIZE, load_tokenizer
from modeling_gpt2custom import GPT2CustomForCausalLM


@dataclass
class BenchOptions:
    preset: str = field(default="gpt2", metadata={"help": "model size: tiny, gpt2 (124M), gpt2-medium, ..."})
    prompt_tokens: int = field(default=32, metadata={"help": "prompt length of every row"})
    new_tokens: int = field(default=64, metadata={"help": "tokens generated per row (EOS does not stop early)"})
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8], metadata={"help": "batch sizes to time"})
    caches: list[str] = field(
        default_factory=lambda: ["dynamic", "static"], metadata={"help": "cache_implementation values to time"}
    )
    repeats: int = field(default=3, metadata={"help": "timed runs per cell (median shown), after one warm-up"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa or eager, for both models"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu or cuda"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch; 0 keeps torch's default"})
    clock: str = field(
        default="wall",
        metadata={
            "help": "wall, or cpu = this process's CPU time: with --threads 1 on a shared machine it leaves out the "
            "time other processes take, so the ratio stays stable under load"
        },
    )
    seed: int = field(default=0)


def build_pair(options: BenchOptions, device: torch.device, dtype: torch.dtype):
    """Our model with random weights and a GPT2LMHeadModel holding exactly the same tensors."""
    torch.manual_seed(options.seed)
    ours = GPT2CustomForCausalLM(GPT2CustomConfig.from_preset(options.preset))
    with tempfile.TemporaryDirectory() as tmp:
        theirs = export_gpt2(ours, tmp, load_tokenizer())
    models = {}
    for name, model in (("GPT2Custom", ours), ("GPT2LMHeadModel", theirs)):
        model.set_attn_implementation(options.attn_implementation)
        models[name] = model.to(device=device, dtype=dtype).eval()
    return models


def timed_generate(model, prompt: torch.Tensor, config: GenerationConfig, clock) -> tuple[float, torch.Tensor]:
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    start = clock()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - start, out


def main(options: BenchOptions):
    if options.device == "auto":
        options.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(options.device)
    if options.clock not in ("wall", "cpu") or (options.clock == "cpu" and device.type != "cpu"):
        raise ValueError(f"--clock {options.clock!r}: expected 'wall', or 'cpu' on a CPU run")
    clock = time.perf_counter if options.clock == "wall" else time.process_time
    if options.threads:
        torch.set_num_threads(options.threads)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = build_pair(options, device, dtype)
    params = sum(p.numel() for p in models["GPT2Custom"].parameters())
    print(
        f"{options.preset}: {params / 1e6:.1f}M parameters, {device.type} {dtype}, {torch.get_num_threads()} threads, "
        f"prompt {options.prompt_tokens} + {options.new_tokens} new tokens, attention {options.attn_implementation}, "
        f"median of {options.repeats}, {options.clock} clock"
    )
    generator = torch.Generator().manual_seed(options.seed)
    rows = []
    for cache in options.caches:
        for batch in options.batch_sizes:
            prompt = torch.randint(0, TOKENIZER_VOCAB_SIZE, (batch, options.prompt_tokens), generator=generator)
            prompt = prompt.to(device)
            config = GenerationConfig(
                do_sample=False,
                max_new_tokens=options.new_tokens,
                min_new_tokens=options.new_tokens,  # random weights may hit EOS; every run must do the same work
                pad_token_id=EOT_ID,
                eos_token_id=EOT_ID,
                cache_implementation=cache,
            )
            outputs = {
                name: timed_generate(model, prompt, config, clock)[1] for name, model in models.items()
            }  # warm-up
            same = torch.equal(outputs["GPT2Custom"], outputs["GPT2LMHeadModel"])
            seconds = {name: [] for name in models}
            for _ in range(options.repeats):
                for name, model in models.items():
                    seconds[name].append(timed_generate(model, prompt, config, clock)[0])
            tok_s = {name: batch * options.new_tokens / statistics.median(s) for name, s in seconds.items()}
            rows.append((cache, batch, tok_s["GPT2Custom"], tok_s["GPT2LMHeadModel"], same))

    print("\n| cache | batch | GPT2Custom tok/s | GPT2LMHeadModel tok/s | ratio | same tokens |")
    print("|---|---|---|---|---|---|")
    for cache, batch, ours, theirs, same in rows:
        print(f"| {cache} | {batch} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f}x | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    (opts,) = HfArgumentParser(BenchOptions).parse_args_into_dataclasses()
    main(opts)
