"""Turn a text corpus into GPT-2 token shards for pretraining.

Sources (`--source`):
  * a Hub dataset id (default `HuggingFaceFW/fineweb-edu`, config `sample-10BT`: ~10B GPT-2 tokens), read with
    `datasets` (streamed by default) from `--split` and `--text_column`;
  * local `.txt` / `.jsonl` / `.parquet` files: a path, a folder, or a glob (quote it); a .txt file is one document
    (`--text_sample_by paragraph|line` splits it); a folder whose README.md has `configs` is a snapshot of a Hub
    dataset repo (`hf download HuggingFaceFW/fineweb-edu --repo-type dataset --include "sample/10BT/*" README.md`),
    read as the Hub reads it: only the files that the card gives `--source_config` (or its default config);
  * `stdlib`: the offline corpus every machine has, Python's own help topics (the language reference) and
    standard-library sources, found through `sysconfig`, in a fixed hash order (CPython 3.11: 1,953 documents,
    32 MB, 15.6M tokens). Real English and real code, enough for the smoke pipeline with no network.

Every document becomes `<|endoftext|>` (50256) + its GPT-2 tokens (tokenized in `--num_proc` processes). The first
documents, up to `--val_tokens` (whole documents), form the validation split; the rest, up to `--max_tokens` in all,
the training split. Output in `--out_dir`:
  val_000000.bin ..., train_000000.bin ...   `--shard_size` tokens each (the last shard of a split is shorter):
                                             a 1024-byte header (magic 20240520, version 1, token count) + uint16 ids
  manifest.json                              source, tokenizer, settings, per-split and per-shard token/document
                                             counts and sha256 checksums; written last
Each shard is written to a temporary file and renamed. After each shard, `.progress.json` records the shards so far
and the reader's position; a re-run (after Ctrl-C, a crash, SIGKILL) continues from there and writes the same bytes as
an uninterrupted run. A finished folder is left alone; other settings on the same folder are refused.

Run:
    python prepare_data.py                                                # FineWeb-Edu 10BT -> data/fineweb-edu
    python prepare_data.py --source stdlib --out_dir data/smoke --max_tokens 2000000 --val_tokens 100000 --shard_size 1000000
    python prepare_data.py --source "corpus/*.jsonl" --text_column content --out_dir data/mine
    python prepare_data.py --config my_data.yaml --num_proc 8               # YAML keys = these flags

Reference: the smoke command above (2M tokens) used 8.3 s of CPU (7.4 user + 0.9 sys, of which ~5 s is importing
torch/transformers/datasets) and 18 s of wall time on a shared 2-core machine at load average 8. Tokenizing runs at
~3M tokens per CPU-second (bench/bench_tokenize.py), so FineWeb-Edu 10BT needs ~1 CPU-hour: minutes on 16+ cores.
"""

import glob
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm
from trl import TrlParser

from gpt2custom.data import (
    MANIFEST,
    MANIFEST_FORMAT,
    SPLITS,
    DocumentEncoder,
    encode_batches,
    read_stdlib_document,
    shard_name,
    stdlib_corpus,
    write_shard,
)
from gpt2custom.files import DATA_BUILDERS

DEFAULT_SOURCE = "HuggingFaceFW/fineweb-edu"
DEFAULT_SOURCE_CONFIG = "sample-10BT"
LOCAL_BUILDERS = {s: DATA_BUILDERS[s] for s in (".txt", ".jsonl", ".json", ".parquet")}  # gpt2custom.files' map
PROGRESS = ".progress.json"
DOCS_PER_READ = 16
CHARS_PER_BATCH = 1 << 18  # the work unit of one process


@dataclass
class PrepareDataArguments:
    source: str = field(default=DEFAULT_SOURCE, metadata={
        "help": "Hub dataset id; local .txt/.jsonl/.parquet file, folder or glob; or 'stdlib' (offline corpus)"})
    source_config: str | None = field(default=None, metadata={
        "help": f"Hub dataset config (default: {DEFAULT_SOURCE_CONFIG} for {DEFAULT_SOURCE}, else none)"})
    split: str = field(default="train", metadata={"help": "split of the Hub dataset to read"})
    text_column: str = field(default="text", metadata={"help": "column holding the documents' text"})
    text_sample_by: str = field(default="document", metadata={
        "help": "for .txt files: one document per 'document' (file), 'paragraph' or 'line'"})
    streaming: bool = field(default=True, metadata={"help": "stream a Hub dataset instead of downloading it first"})
    out_dir: str = field(default="data/fineweb-edu", metadata={"help": "folder for the shards and manifest.json"})
    shard_size: int = field(default=100_000_000, metadata={"help": "tokens per shard"})
    val_tokens: int = field(default=10_000_000, metadata={
        "help": "validation tokens, carved first from the start of the corpus (whole documents; 0 for none)"})
    max_tokens: int | None = field(default=None, metadata={"help": "stop after this many tokens in all (val + train)"})
    num_proc: int | None = field(default=None, metadata={"help": "tokenizer processes (default: all cores)"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "Hub id or folder of another tokenizer (default: GPT-2's BPE, offline)"})
    engine: str = field(default="auto", metadata={
        "help": "'tiktoken' or 'hf' (tokenizers); 'auto' = tiktoken for the default GPT-2 BPE (same ids, faster)"})


def parse_options(argv: list[str] | None = None) -> PrepareDataArguments:
    """Flags, with defaults from `--config file.yaml` (its keys are the flag names; the command line wins)."""
    try:
        (opts,) = TrlParser((PrepareDataArguments,)).parse_args_and_config(argv)
    except ValueError as e:  # an unknown key in the YAML file
        raise SystemExit(f"prepare_data.py: {e}") from None
    if opts.source == DEFAULT_SOURCE and opts.source_config is None:
        opts.source_config = DEFAULT_SOURCE_CONFIG
    if opts.text_sample_by not in ("document", "paragraph", "line"):
        raise SystemExit(f"--text_sample_by must be 'document', 'paragraph' or 'line', got {opts.text_sample_by!r}")
    if opts.shard_size <= 0 or opts.val_tokens < 0:
        raise SystemExit(f"--shard_size must be > 0 and --val_tokens >= 0 (got {opts.shard_size}, {opts.val_tokens})")
    if opts.max_tokens is not None and opts.max_tokens <= opts.val_tokens:
        raise SystemExit(f"--max_tokens {opts.max_tokens} leaves no training tokens after --val_tokens {opts.val_tokens}")
    return opts


# ----------------------------------------------------------------------------------------------------------------
# Sources: every one becomes a datasets.IterableDataset, whose state_dict() lets a restart seek instead of re-read


def stdlib_examples(names: list[str]):
    for name in names:
        yield {"text": read_stdlib_document(name)}


def local_files(pattern: str) -> list[str]:
    path = Path(pattern)
    if not path.exists() and not any(c in pattern for c in "*?["):
        raise SystemExit(f"--source {pattern!r}: no such file or folder (expected a Hub dataset id, a local "
                         f"{'/'.join(LOCAL_BUILDERS)} file, folder or glob, or 'stdlib')")
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS and p.is_file())
    else:
        files = sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise SystemExit(f"--source {pattern!r}: no {'/'.join(LOCAL_BUILDERS)} files found")
    suffixes = {Path(f).suffix for f in files}
    if len(suffixes) > 1 or not suffixes <= set(LOCAL_BUILDERS):
        raise SystemExit(f"--source {pattern!r}: expected files of one kind among {sorted(LOCAL_BUILDERS)}, got {sorted(suffixes)}")
    return files


def card_configs(folder: Path) -> list:
    """The `configs` of the dataset card (README.md) of a folder: a snapshot of a Hub dataset repo has them."""
    from huggingface_hub import DatasetCard

    readme = folder / "README.md"
    if not readme.is_file():
        return []
    return DatasetCard.load(readme).data.get("configs") or []


def is_local(source: str) -> bool:
    return Path(source).exists() or any(c in source for c in "*?[") or Path(source).suffix in LOCAL_BUILDERS


def open_source(opts: PrepareDataArguments):
    """(IterableDataset, its text column, a description of the source for the manifest)."""
    from datasets import IterableDataset, load_dataset, load_dataset_builder

    column = opts.text_column
    if opts.source == "stdlib":
        names = stdlib_corpus()
        dataset = IterableDataset.from_generator(stdlib_examples, gen_kwargs={"names": names})
        description = {"name": "stdlib", "python": platform.python_version(), "documents": len(names)}
        column = "text"
    elif Path(opts.source).is_dir() and (opts.source_config is not None or card_configs(Path(opts.source))):
        # A snapshot of a Hub dataset repo (`hf download --repo-type dataset`): its card's `configs` say which files
        # make the config (the card's default one without --source_config), as on the Hub: FineWeb-Edu's sample-10BT
        # is sample/10BT/*, not the whole tree.
        try:
            builder = load_dataset_builder(opts.source, name=opts.source_config)
            files = builder.config.data_files[opts.split]
        except (ValueError, KeyError) as e:  # an unknown config or split, or a card that defines no configs
            raise SystemExit(f"--source {opts.source} --source_config {opts.source_config} --split {opts.split}: "
                             f"{e!r} (the folder's README.md `configs` name the configs and their files)") from e
        dataset = builder.as_streaming_dataset(split=opts.split)
        description = {"name": opts.source, "config": opts.source_config, "split": opts.split,
                       "files": [os.path.relpath(f, opts.source) for f in files],
                       "text_column": column}
    elif is_local(opts.source):
        files = local_files(opts.source)
        builder = LOCAL_BUILDERS[Path(files[0]).suffix]
        extra = {"sample_by": opts.text_sample_by} if builder == "text" else {}
        dataset = load_dataset(builder, data_files=files, split="train", streaming=True, **extra)
        if builder == "text":
            column = "text"
            description = {"name": opts.source, "files": files, "sample_by": opts.text_sample_by}
        else:
            description = {"name": opts.source, "files": files, "text_column": column}
    else:
        try:
            dataset = load_dataset(opts.source, name=opts.source_config, split=opts.split, streaming=opts.streaming)
        except (ConnectionError, FileNotFoundError) as e:  # DatasetNotFoundError is a FileNotFoundError
            raise SystemExit(f"--source {opts.source!r}: {e} (offline? `--source stdlib` needs no network)") from e
        if not opts.streaming:
            dataset = dataset.to_iterable_dataset()
        description = {"name": opts.source, "config": opts.source_config, "split": opts.split, "text_column": column}
    if dataset.column_names is not None and column not in dataset.column_names:
        raise SystemExit(f"{opts.source}: no column {column!r} (columns: {dataset.column_names}); pick one with --text_column")
    return dataset.select_columns([column]) if dataset.column_names else dataset, column, description


def read_batches(dataset, column: str, source: str, start_state: dict | None, start_row: int):
    """Yields `((reader state before the batch, its first row), texts)`, ~256k characters of documents at a time.

    Batches only split the work between processes: their size never changes the output. Empty documents are skipped.
    """
    if start_state is not None:
        dataset.load_state_dict(start_state)
    state, row, next_row, texts, chars = start_state, start_row, start_row, [], 0
    for rows in dataset.iter(batch_size=DOCS_PER_READ):
        if column not in rows:
            raise SystemExit(f"{source}: no column {column!r} (columns: {sorted(rows)}); pick one with --text_column")
        texts += [text for text in rows[column] if text]
        chars += sum(len(text) for text in rows[column] if text)
        next_row += len(rows[column])
        if chars >= CHARS_PER_BATCH:
            yield (state, row), texts
            state, row, texts, chars = dataset.state_dict(), next_row, [], 0
    if texts:
        yield (state, row), texts


# ----------------------------------------------------------------------------------------------------------------
# Cutting the token stream into shards


def drop_head(tokens: np.ndarray, lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The stream without its first `n` tokens; the first document may then be a partial one."""
    ends = np.cumsum(lengths)
    k = int(np.searchsorted(ends, n, side="right"))
    lengths = lengths[k:].copy()
    if len(lengths):
        lengths[0] = ends[k] - n
    return tokens[n:], lengths


class ShardWriter:
    """Fills the shards from the token stream: whole documents go to "val" until it holds `val_tokens` (the document
    that crosses the mark ends it), then "train"; a shard every `shard_size` tokens; a stop at `max_tokens`.

    After each shard (and when "val" closes) `.progress.json` gets the shard list, the counters and `position`: the
    reader's state before the current batch, its first row and the tokens of that batch already used. That is
    everything a restart needs: a deterministic stream cut by token counts gives the same shards.
    """

    def __init__(self, out_dir: Path, opts: PrepareDataArguments, eot_id: int, settings: dict, progress: dict | None):
        self.out_dir, self.eot_id, self.settings = out_dir, eot_id, settings
        self.shard_size, self.val_tokens, self.max_tokens = opts.shard_size, opts.val_tokens, opts.max_tokens
        fresh = {"split": "val" if opts.val_tokens else "train", "tokens": 0, "val_tokens": 0, "shards": [],
                 "position": {"state": None, "row": 0, "skip_tokens": 0}}
        self.progress = progress or fresh
        capacity = self.shard_size if self.max_tokens is None else min(self.shard_size, self.max_tokens)
        self.buffer, self.filled = np.empty(capacity, dtype=np.uint16), 0
        self.batch_tag, self.batch_used = None, 0
        self.skip = self.progress["position"]["skip_tokens"]

    @property
    def done(self) -> bool:
        return self.max_tokens is not None and self.progress["tokens"] >= self.max_tokens

    def add(self, batch_tag: tuple, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append one encoded batch; the first one after a restart skips what the finished shards already hold."""
        self.batch_tag, self.batch_used = batch_tag, self.skip
        if self.skip:
            if self.skip > len(tokens):
                raise RuntimeError(f"cannot resume: the batch at document {batch_tag[1]} has {len(tokens)} tokens, "
                                   f"fewer than the {self.skip} that {PROGRESS} says were used (did the source change?)")
            tokens, lengths = drop_head(tokens, lengths, self.skip)
            self.skip = 0
        if self.progress["split"] == "val":
            # "val" closes at the first document boundary where it holds val_tokens; the batch may start at one
            bounds = np.cumsum(lengths)
            if len(tokens) and tokens[0] == self.eot_id:
                bounds = np.concatenate([[0], bounds])
            k = int(np.searchsorted(self.progress["val_tokens"] + bounds, self.val_tokens, side="left"))
            if k == len(bounds):
                self._emit(tokens)
                return
            cut = int(bounds[k])
            self._emit(tokens[:cut])
            if self.done:
                return
            self._write_buffer()
            self.progress["split"] = "train"
            self._save_progress()
            tokens = tokens[cut:]
        self._emit(tokens)

    def _emit(self, tokens: np.ndarray) -> None:
        p = self.progress
        while len(tokens) and not self.done:
            room = len(self.buffer) - self.filled
            if self.max_tokens is not None:
                room = min(room, self.max_tokens - p["tokens"])
            take = tokens[:room]
            self.buffer[self.filled:self.filled + len(take)] = take
            self.filled += len(take)
            self.batch_used += len(take)
            p["tokens"] += len(take)
            if p["split"] == "val":
                p["val_tokens"] += len(take)
            tokens = tokens[len(take):]
            if self.filled == self.shard_size or self.done:
                self._write_buffer()
                self._save_progress()

    def _write_buffer(self) -> None:
        if not self.filled:
            return
        split, shards = self.progress["split"], self.progress["shards"]
        name = shard_name(split, sum(s["split"] == split for s in shards))
        tokens = self.buffer[:self.filled]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        sha = write_shard(self.out_dir / name, tokens)
        shards.append({"file": name, "split": split, "tokens": self.filled,
                       "documents": int(np.count_nonzero(tokens == self.eot_id)), "sha256": sha})
        self.filled = 0

    def _save_progress(self) -> None:
        state, row = self.batch_tag
        self.progress["position"] = {"state": state, "row": row, "skip_tokens": self.batch_used}
        write_json(self.out_dir / PROGRESS, {"settings": self.settings, **self.progress})

    def finish(self) -> dict:
        """Write the last partial shard and the manifest; returns the manifest."""
        self._write_buffer()
        splits = {}
        for split in SPLITS:
            shards = [{k: v for k, v in s.items() if k != "split"} for s in self.progress["shards"] if s["split"] == split]
            if shards:
                splits[split] = {"tokens": sum(s["tokens"] for s in shards),
                                 "documents": sum(s["documents"] for s in shards), "shards": shards}
        if "train" not in splits:
            raise SystemExit(f"the source has {self.progress['tokens']:,} tokens: nothing is left for training after "
                             f"--val_tokens {self.val_tokens:,}; lower --val_tokens")
        manifest = {"format": MANIFEST_FORMAT, "version": 1, **self.settings, "splits": splits}
        write_json(self.out_dir / MANIFEST, manifest)
        (self.out_dir / PROGRESS).unlink(missing_ok=True)
        return manifest


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def check_settings(path: Path, settings: dict) -> dict | None:
    """The JSON at `path` if it was made with these settings; None if absent; exits if it was made with others."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    theirs = {k: saved.get(k) for k in settings} if path.name == MANIFEST else saved["settings"]
    if theirs != settings:
        diff = {k: (theirs.get(k), v) for k, v in settings.items() if theirs.get(k) != v}
        raise SystemExit(f"{path} was made with other settings (theirs, ours): {diff}. "
                         "Use another --out_dir or delete that folder.")
    return saved


def main(opts: PrepareDataArguments) -> dict:
    out_dir = Path(opts.out_dir)  # created with the first shard: a bad source or setting leaves no empty folder
    dataset, column, source = open_source(opts)
    encoder = DocumentEncoder(opts.tokenizer, opts.engine)
    settings = {"source": source,
                "tokenizer": {"name": encoder.name, "eot_id": encoder.eot_id, "vocab_size": encoder.vocab_size},
                "shard_size": opts.shard_size, "val_tokens": opts.val_tokens, "max_tokens": opts.max_tokens}
    if (manifest := check_settings(out_dir / MANIFEST, settings)) is not None:
        (out_dir / PROGRESS).unlink(missing_ok=True)
        print(f"{out_dir} is already complete: {manifest_summary(manifest)}")
        return manifest
    for stale in out_dir.glob(".*.tmp"):  # temporary files of a killed run
        stale.unlink()
    progress = check_settings(out_dir / PROGRESS, settings)
    if progress is not None:
        del progress["settings"]
        for shard in progress["shards"]:
            if not (out_dir / shard["file"]).is_file():
                raise SystemExit(f"{out_dir / PROGRESS} lists {shard['file']}, which is gone: delete {out_dir} and start over")
        print(f"resuming after {len(progress['shards'])} finished shards ({progress['tokens']:,} tokens, "
              f"document {progress['position']['row']:,})")
    writer = ShardWriter(out_dir, opts, encoder.eot_id, settings, progress)
    num_proc = opts.num_proc or available_cores()
    position = writer.progress["position"]
    batches = read_batches(dataset, column, opts.source, position["state"], position["row"])
    bar = tqdm(total=opts.max_tokens, initial=writer.progress["tokens"], unit="tok", unit_scale=True, desc="tokens",
               disable=writer.done)
    start, documents = time.perf_counter(), 0
    stream = encode_batches(batches, encoder, num_proc)
    for tag, tokens, lengths in stream:
        before = writer.progress["tokens"]
        writer.add(tag, tokens, lengths)
        documents += len(lengths)
        bar.update(writer.progress["tokens"] - before)
        bar.set_postfix(docs_per_s=f"{documents / (time.perf_counter() - start):,.0f}", refresh=False)
        if writer.done:
            break
    stream.close()  # stops the worker processes
    bar.close()
    manifest = writer.finish()
    print(f"wrote {out_dir}: {manifest_summary(manifest)}")
    return manifest


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def manifest_summary(manifest: dict) -> str:
    return ", ".join(f"{split} {info['tokens']:,} tokens / {info['documents']:,} documents / {len(info['shards'])} shards"
                     for split, info in manifest["splits"].items())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(parse_options(sys.argv[1:]))
