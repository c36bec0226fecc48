"""Tokenization throughput: our data-preparation encoder against tiktoken and HF `tokenizers`, same text, same cores.

The text is >= `--megabytes` of real text: the offline `stdlib` corpus of prepare_data.py (Python's help topics and
standard-library sources). Every encoder gets the same
documents; tiktoken's GPT-2 encoding is built offline from the same BPE files as our tokenizer. Rows:
  * tiktoken: `encode_ordinary` per document (1 process), `encode_ordinary_batch(num_threads=N)` (all cores);
  * HF tokenizers (GPT2TokenizerFast's backend): `encode_batch_fast`, TOKENIZERS_PARALLELISM off / on (rayon);
  * ours (`gpt2custom.data.DocumentEncoder` + `encode_batches`, what prepare_data.py runs): uint16 output with
    <|endoftext|> before each document, 1 process / N worker processes.
All must give identical ids (checked). Best of `--repeats` runs (HF: one run, it is slow). Wall-clock rates need an
idle machine; the CPU-seconds column (threads and worker processes included) is the per-core figure on a busy one.

Run:  python bench/bench_tokenize.py [--megabytes 12 --repeats 3 --num_proc N]
"""

import os
import time
from dataclasses import dataclass, field

import numpy as np
from transformers import HfArgumentParser

from gpt2custom.data import DocumentEncoder, encode_batches, gpt2_tiktoken, read_stdlib_document, stdlib_corpus
from gpt2custom.tokenizer import load_tokenizer


@dataclass
class BenchArguments:
    megabytes: float = field(default=12.0, metadata={"help": "at least this much text (UTF-8 MB)"})
    repeats: int = field(default=3, metadata={"help": "best of this many runs (tiktoken and ours)"})
    num_proc: int | None = field(default=None, metadata={"help": "cores for the parallel rows (default: all)"})


def real_documents(megabytes: float) -> list[str]:
    docs = []
    for name in stdlib_corpus():
        if sum(len(d.encode()) for d in docs) >= megabytes * 1e6:
            break
        docs.append(read_stdlib_document(name))
    return docs


def cpu_seconds() -> float:
    t = os.times()  # threads and reaped worker processes included: tokens per CPU-second holds on a busy machine
    return t.user + t.system + t.children_user + t.children_system


def best_time(fn, repeats: int) -> tuple[float, float, object]:
    """(best wall seconds, CPU seconds of that run, result)."""
    runs, result = [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), cpu_seconds()
        result = fn()
        runs.append((time.perf_counter() - wall, cpu_seconds() - cpu))
    return *min(runs), result


def batches(docs: list[str], chars: int = 1 << 18):
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= chars:
            yield None, batch
            batch, size = [], 0
    if batch:
        yield None, batch


def main(args: BenchArguments) -> None:
    cores = args.num_proc or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    docs = real_documents(args.megabytes)
    megabytes = sum(len(d.encode()) for d in docs) / 1e6
    print(f"{len(docs)} documents, {megabytes:.1f} MB of real text, {cores} cores")

    tiktoken = gpt2_tiktoken()
    hf = load_tokenizer().backend_tokenizer
    ours = DocumentEncoder()

    def hf_ids(parallel: bool):
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"
        return [e.ids for e in hf.encode_batch_fast(docs, add_special_tokens=False)]

    def ours_parallel():
        parts = [tokens for _, tokens, _ in encode_batches(batches(docs), ours, num_proc=cores)]
        return np.concatenate(parts)

    rows = {}
    rows["tiktoken", 1] = best_time(lambda: [tiktoken.encode_ordinary(d) for d in docs], args.repeats)
    rows["tiktoken", cores] = best_time(lambda: tiktoken.encode_ordinary_batch(docs, num_threads=cores), args.repeats)
    rows["ours (prepare_data)", 1] = best_time(lambda: ours(docs)[0], args.repeats)
    rows["ours (prepare_data)", cores] = best_time(ours_parallel, args.repeats)
    rows["HF tokenizers", 1] = best_time(lambda: hf_ids(False), 1)  # after ours: a fork after rayon threads warns
    rows["HF tokenizers", cores] = best_time(lambda: hf_ids(True), 1)

    reference = rows["tiktoken", 1][2]
    expected = np.concatenate([[ours.eot_id, *ids] for ids in reference]).astype(np.uint16)
    n_tokens = sum(map(len, reference))
    for (name, n), (*_, result) in rows.items():
        same = np.array_equal(result, expected) if isinstance(result, np.ndarray) else result == reference
        assert same, f"{name} ({n} cores) gives other ids than tiktoken"
    print(f"{n_tokens:,} tokens; all encoders give identical ids; load average {os.getloadavg()[0]:.1f} on {cores} cores\n")

    print("| encoder | cores | wall s | tokens/s | MB/s | vs tiktoken, same cores | CPU s | tokens per CPU-second |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, n), (seconds, cpu, _) in rows.items():
        print(f"| {name} | {n} | {seconds:.2f} | {n_tokens / seconds / 1e6:.2f} M | {megabytes / seconds:.1f} "
              f"| {rows['tiktoken', n][0] / seconds:.2f}x | {cpu:.2f} | {n_tokens / cpu / 1e6:.2f} M |")

if __name__ == "__main__":
    (bench_args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses()
    main(bench_args)
