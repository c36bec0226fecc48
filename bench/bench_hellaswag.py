"""HellaSwag scoring speed: examples per second of `gpt2custom.hellaswag.score_endings` against a naive batched loop.

The naive loop is what most scripts do: one
right-padded row per (example, ending) holding context + ending, full logits, fp32 log_softmax over the whole
vocabulary at every position, then a gather. Ours runs each context once (KV cache repeated for the 4 endings)
and computes log-probs only where an ending token is predicted. Both must pick the same endings; the bench checks.

Data: `--hellaswag_path` (the real validation jsonl) or, by default, HellaSwag-shaped examples cut from real text
(contexts of 15-90 words, endings of 5-40 words; HellaSwag's validation set has similar lengths) so it runs offline.
Models are randomly initialised presets: speed does not depend on the weights.

    PYTHONPATH=. python bench/bench_hellaswag.py                                   # tiny on CPU (+ 124M on a GPU)
    PYTHONPATH=. python bench/bench_hellaswag.py --presets gpt2 --num_examples 10042 --batch_sizes 64 128
    PYTHONPATH=. python bench/bench_hellaswag.py --hellaswag_path ~/.cache/gpt2custom/hellaswag/hellaswag_val.jsonl

Goal (issue 5): the full validation set (10,042 examples) in <= 15 s for the 124M model on one H100 (stretch: 2 s).
"""

import functools
import random
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import HfArgumentParser

from configuration_gpt2custom import GPT2CustomConfig
from gpt2custom.hellaswag import inference_autocast, load_hellaswag, render, score_endings
from gpt2custom.tokenizer import load_tokenizer
from modeling_gpt2custom import GPT2CustomForCausalLM


@dataclass
class BenchOptions:
    presets: list[str] = field(default_factory=list, metadata={"help": "default: tiny, plus gpt2 (124M) on a GPU"})
    num_examples: int | None = field(default=None, metadata={"help": "default: 10042 on a GPU, 200 on CPU"})
    batch_sizes: list[int] = field(default_factory=list, metadata={"help": "examples per forward; default: "
                                   "8 on CPU (the naive loop holds 2 fp32 full-vocab tensors), 32 64 128 on a GPU"})
    conventions: list[str] = field(default_factory=lambda: ["completion"])
    hellaswag_path: str | None = field(default=None, metadata={"help": "real HellaSwag jsonl; default: synthetic"})
    naive: bool = field(default=True, metadata={"help": "also time the naive full-softmax loop"})
    repeats: int = field(default=3, metadata={"help": "timed runs (median shown) after one warm-up"})
    attn_implementation: str = "sdpa"
    threads: int = field(default=0, metadata={"help": "CPU threads for torch; 0 keeps torch's default"})
    seed: int = 0


def synthetic_examples(n: int, seed: int) -> list[dict]:
    from gpt2custom.data import read_stdlib_document, stdlib_corpus  # the offline corpus every Python has

    words = " ".join(read_stdlib_document(name) for name in stdlib_corpus()[:200]).split()
    rng = random.Random(seed)

    def span(lo, hi):
        k = rng.randint(lo, hi)
        start = rng.randrange(len(words) - k)
        return " ".join(words[start : start + k])

    examples = []
    for i in range(n):
        ctx_a, ctx_b = span(10, 70), span(3, 20).lower()
        examples.append({"ind": i, "activity_label": span(1, 3), "ctx_a": ctx_a, "ctx_b": ctx_b,
                         "ctx": f"{ctx_a} {ctx_b}", "endings": [span(5, 40) for _ in range(4)],
                         "label": rng.randrange(4)})
    return examples


@torch.inference_mode()
def naive_scores(model, tokenizer, examples, convention, batch_size) -> torch.Tensor:
    """(n, 4) summed log-probs: context + ending per row, right-padded, fp32 log_softmax everywhere, gather."""
    device = next(model.parameters()).device
    out = []
    rendered = render(examples, tokenizer, convention)
    with inference_autocast(device):
        for start in range(0, len(rendered), batch_size):
            rows = [(r.context, e) for r in rendered[start : start + batch_size] for e in r.endings]
            width = max(len(c) + len(e) for c, e in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            ending_mask = torch.zeros(len(rows), width, dtype=torch.bool)
            attention = torch.zeros(len(rows), width, dtype=torch.long)
            for i, (c, e) in enumerate(rows):
                ids[i, : len(c) + len(e)] = torch.tensor(c + e)
                attention[i, : len(c) + len(e)] = 1
                ending_mask[i, len(c) : len(c) + len(e)] = True
            ids, attention, ending_mask = ids.to(device), attention.to(device), ending_mask.to(device)
            logprobs = F.log_softmax(model(input_ids=ids, attention_mask=attention).logits.float(), dim=-1)
            picked = logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
            out.append((picked * ending_mask[:, 1:]).sum(dim=1).double().reshape(-1, 4).cpu())
    return torch.cat(out)


def timed(fn, device, repeats) -> tuple[float, object]:
    fn()  # warm-up: kernels, allocator, tokenizer caches
    times, result = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main():
    (opts,) = HfArgumentParser(BenchOptions).parse_args_into_dataclasses()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    presets = opts.presets or (["tiny", "gpt2"] if cuda else ["tiny"])
    n = opts.num_examples or (10042 if cuda else 200)
    opts.batch_sizes = opts.batch_sizes or ([32, 64, 128] if cuda else [8])
    examples = load_hellaswag(opts.hellaswag_path)[:n] if opts.hellaswag_path else synthetic_examples(n, opts.seed)
    tokenizer = load_tokenizer()
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {len(examples)} "
          f"{'HellaSwag' if opts.hellaswag_path else 'synthetic HellaSwag-shaped'} examples", flush=True)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    print(f"{'preset':<8}{'convention':<12}{'batch':>6}  {'method':<8}{'seconds':>9}{'examples/s':>12}"
          f"{'full val (s)':>14}  same picks")
    for preset in presets:
        bench_preset(preset, opts, examples, tokenizer, device)


def bench_preset(preset, opts, examples, tokenizer, device):
    torch.manual_seed(opts.seed)
    config = GPT2CustomConfig.from_preset(preset, initializer_range=0.2 if preset == "tiny" else 0.02)
    model = GPT2CustomForCausalLM(config)
    model.set_attn_implementation(opts.attn_implementation)
    model = model.to(device).eval()
    methods = {"ours": lambda c, bs: score_endings(model, tokenizer, examples, c, bs).logprob}
    if opts.naive:
        methods["naive"] = lambda c, bs: naive_scores(model, tokenizer, examples, c, bs)
    for convention in opts.conventions:
        for batch_size in opts.batch_sizes:
            picks = {}
            for method, fn in methods.items():
                seconds, logprob = timed(functools.partial(fn, convention, batch_size), device, opts.repeats)
                picks[method] = logprob.argmax(dim=1)
                same = f"{(picks[method] == picks['ours']).float().mean():.1%}" if method != "ours" else ""
                rate = len(examples) / seconds
                print(f"{preset:<8}{convention:<12}{batch_size:>6}  {method:<8}{seconds:>9.3f}{rate:>12.1f}"
                      f"{10042 / rate:>14.1f}  {same}", flush=True)
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")

if __name__ == "__main__":
    main()
