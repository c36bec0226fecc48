"""lm-evaluation-harness HellaSwag on one fixture, three ways, in one process: our fast scorer
(`gpt2custom.hellaswag.score_endings`, harness convention), lm-eval on the model object `eval_hellaswag.py --tasks`
hands it (`HFLM(pretrained=model, tokenizer=...)`), and lm-eval's own `--model hf` path (`pretrained=<folder>`,
`trust_remote_code=True`: it loads the checkpoint folder itself, timed apart). All three must pick the same endings
(acc and acc_norm); the bench checks, then prints seconds, examples/s and the ratios.

lm-eval reads the fixture through its own `hellaswag` task definition pointed at a local jsonl (`local_task_file`).
Data: `--hellaswag_path` (the real validation jsonl) or HellaSwag-shaped examples cut from real text (contexts of
15-90 words, endings of 5-40 words), so it runs offline. The model is a randomly initialised preset saved as one of
our checkpoint folders (remote code); speed does not depend on the weights.

    PYTHONPATH=. python bench/bench_lmeval.py                                   # tiny, 200 examples, CPU
    PYTHONPATH=. python bench/bench_lmeval.py --preset gpt2 --num_examples 2000 --batch_size 64   # a GPU
"""

import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from configuration_gpt2custom import GPT2CustomConfig
from gpt2custom.checkpoints import save_model_folder
from gpt2custom.evaluation import lm_eval_version, local_task_file, run_lm_eval, task_manager
from gpt2custom.hellaswag import load_hellaswag, score_endings
from gpt2custom.tokenizer import load_tokenizer
from modeling_gpt2custom import GPT2CustomForCausalLM


@dataclass
class BenchOptions:
    preset: str = field(default="", metadata={"help": "default: tiny on CPU, gpt2 (124M) on a GPU"})
    num_examples: int = 200
    batch_size: int = field(default=16, metadata={"help": "examples per forward (ours); requests per forward (lm-eval)"})
    hellaswag_path: str | None = field(default=None, metadata={"help": "real HellaSwag jsonl; default: synthetic"})
    repeats: int = field(default=3, metadata={"help": "timed runs (median shown) after one warm-up"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch; 0 keeps torch's default"})
    seed: int = 0


def synthetic_examples(n: int, seed: int) -> list[dict]:
    """HellaSwag rows with spans of real words (Python's own module docs)."""
    import pydoc

    words = " ".join(pydoc.getdoc(m) for m in (random, statistics, tempfile, time)).split()
    rng = random.Random(seed)

    def span(lo, hi):
        k = rng.randint(lo, hi)
        start = rng.randrange(len(words) - k)
        return " ".join(words[start : start + k])

    return [{"ind": i, "activity_label": span(1, 3), "ctx_a": span(10, 70), "ctx_b": span(3, 20).lower(),
             "ctx": "", "endings": [span(5, 40) for _ in range(4)], "label": rng.randrange(4)} for i in range(n)]


def timed(fns: dict, device, repeats: int) -> dict:
    """{name: (median seconds, last result)}; one warm-up each, then the repeats interleaved, so that load from other
    processes on a shared machine hits every path alike."""
    times, results = {name: [] for name in fns}, {}
    for fn in fns.values():
        fn()  # warm-up: kernels, allocator, tokenizer and dataset caches
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            results[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(times[name]), results[name]) for name in fns}


def picks_of(samples: list[dict]) -> tuple[list[int], list[int]]:
    """lm-eval's acc and acc_norm picks per example, in fixture order, from its logged samples."""
    samples = sorted(samples, key=lambda s: s["doc_id"])
    lls = [[r[0] for r in s["filtered_resps"]] for s in samples]
    lengths = [[len(c) for c in s["doc"]["choices"]] for s in samples]
    acc = [max(range(4), key=ll.__getitem__) for ll in lls]
    norm = [max(range(4), key=lambda j, ll=ll, n=n: ll[j] / n[j]) for ll, n in zip(lls, lengths)]
    return acc, norm


def main():
    (opts,) = HfArgumentParser(BenchOptions).parse_args_into_dataclasses()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = opts.preset or ("gpt2" if device.type == "cuda" else "tiny")
    examples = (load_hellaswag(opts.hellaswag_path) if opts.hellaswag_path
                else synthetic_examples(opts.num_examples, opts.seed))[: opts.num_examples]
    tokenizer = load_tokenizer()
    torch.manual_seed(opts.seed)
    model = GPT2CustomForCausalLM(GPT2CustomConfig.from_preset(preset)).to(device).eval()
    mixed = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if device.type == "cuda" else None

    with tempfile.TemporaryDirectory(prefix="bench-lmeval-") as tmp:
        folder, tasks = Path(tmp) / "model", Path(tmp) / "tasks"
        save_model_folder(model.cpu(), folder, tokenizer)
        model.to(device)
        data = Path(tmp) / "hellaswag.jsonl"
        data.write_text("".join(json.dumps(ex) + "\n" for ex in examples), encoding="utf-8")
        local_task_file(tasks, "hellaswag", data)
        examples = load_hellaswag(data)  # labels as ints, as our scorer reads them

        def ours():
            scores = score_endings(model, tokenizer, examples, "harness", opts.batch_size)
            return scores.predictions().tolist(), scores.predictions(normalized=True).tolist()

        def through_object():
            out = run_lm_eval(model, tokenizer, ["hellaswag"], include_path=tasks, batch_size=opts.batch_size,
                              bootstrap_iters=0, log_samples=True)
            return picks_of(out["samples"]["hellaswag"])

        t0 = time.perf_counter()
        hf = HFLM(pretrained=str(folder), trust_remote_code=True, batch_size=opts.batch_size, device=str(device),
                  dtype="float32", mixed_precision_dtype=mixed)
        load_s = time.perf_counter() - t0

        def through_hf_path():
            out = lm_eval.simple_evaluate(model=hf, tasks=["hellaswag"], task_manager=task_manager(["hellaswag"], tasks),
                                          num_fewshot=0, bootstrap_iters=0, log_samples=True)
            return picks_of(out["samples"]["hellaswag"])

        measured = timed({"ours: score_endings (harness convention)": ours,
                          "lm-eval on our model object (eval_hellaswag.py --tasks)": through_object,
                          "lm-eval --model hf, pretrained=folder, trust_remote_code": through_hf_path},
                         device, opts.repeats)
        rows = [(name, seconds, picks) for name, (seconds, picks) in measured.items()]

    reference = rows[1][2]
    for name, _, picks in rows:
        if picks != reference:
            raise SystemExit(f"{name}: picks differ from lm-eval's on our model object")
    base = rows[1][1]
    print(f"\nHellaSwag (harness convention), {len(examples)} examples, preset {preset}, {device.type}, batch "
          f"{opts.batch_size}, torch threads {torch.get_num_threads()}, lm-eval {lm_eval_version()}; "
          f"median of {opts.repeats}, interleaved. Same acc and acc_norm picks on every example: yes.\n")
    print("| path | seconds | examples/s | time vs lm-eval on our object |")
    print("|---|---|---|---|")
    for name, seconds, _ in rows:
        print(f"| {name} | {seconds:.3f} | {len(examples) / seconds:.1f} | {seconds / base:.2f}x |")
    print(f"| (lm-eval --model hf: loading the folder, once) | {load_s:.3f} | | |")


if __name__ == "__main__":
    main()
