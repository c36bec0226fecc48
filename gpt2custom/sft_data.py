"""The conversations `sft.py` trains on: a Hub dataset or `generate_synthetic.py`'s JSONL, checked before TRL sees them.

Sources (one string):
* a Hub dataset id, by default `argilla/magpie-ultra-v1.0` (multi-turn answers of Llama-3.1-405B-Instruct), whose
  `conversation` column becomes `messages` (TRL only recognises `messages`) and whose `quality` / `difficulty`
  labels (Magpie's "very poor" .. "excellent", "very easy" .. "very hard") filter the rows; only the columns used
  here are read from its Parquet files (`load_dataset(..., columns=[...])`: magpie-ultra's 1024-d float64
  `embedding` alone would be ~8 GB of Arrow cache);
* a local `.jsonl` / `.json` / `.parquet` file, such as the rows `{"messages": [...], "model": ..., "rejection": ...}`
  that `generate_synthetic.py` writes (rows it flagged, `rejection` not null, are dropped), or a folder that
  `load_dataset` reads as a dataset (not generate_synthetic.py's: its side files would be read too).

Every row must be a list of `{"role", "content"}` messages with roles the chat template knows (the first offending
row is named in one ValueError). Rows that cannot or should not train are dropped and counted (`Conversations.counts`):
no assistant turn (Magpie-style generators emit user-only rows), Llama Guard's verdict `unsafe` in a `guard`
column (magpie-ultra: "\\n\\nsafe" / "\\n\\nunsafe\\nS<n>"; `keep_unsafe=True` keeps them), the label filters, and
generate_synthetic.py's rejections. `conversation_lengths` / `fit_to_max_length` then drop (or count the truncation
of) conversations longer than the packed row.

Held out by construction: `split_record` describes how a run's train / held-out split was made (source, filters,
eval_size, seed, the held-out source rows and a hash of the training rows); `sft.py` saves it as `sft_split.json` in
its output folder and `rebuild_split` makes the same split again from it, refusing if the data changed since.
"""

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets import Dataset, load_dataset, load_dataset_builder
from datasets.exceptions import DatasetGenerationError
from datasets.packaged_modules.parquet.parquet import Parquet
from datasets.utils.file_utils import xopen

from .chat import ROLES
from .files import DATA_BUILDERS

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "argilla/magpie-ultra-v1.0"
MESSAGES_COLUMNS = ("messages", "conversation")  # ours and TRL's; magpie-ultra's
QUALITY_LEVELS = ("very poor", "poor", "average", "good", "excellent")
DIFFICULTY_LEVELS = ("very easy", "easy", "medium", "hard", "very hard")
LOCAL_BUILDERS = {s: DATA_BUILDERS[s] for s in (".jsonl", ".json", ".parquet")}  # gpt2custom.files' map
USED_COLUMNS = (*MESSAGES_COLUMNS, "quality", "difficulty", "guard", "rejection")  # all that the filters read
SPLIT_FILE = "sft_split.json"
LONG_CONVERSATIONS = ("drop", "truncate")


def load_raw(source: str, *, config: str | None = None, split: str = "train", columns=None) -> Dataset:
    """One split of a local file, a local folder or a Hub dataset, as `datasets.Dataset`. `columns`: for a Hub
    dataset in Parquet, read only those of them it has (the others are never converted or cached)."""
    path = Path(source)
    if path.suffix in LOCAL_BUILDERS or path.exists():
        if not path.exists():
            raise ValueError(f"dataset file {source} does not exist")
        if path.is_file():
            if path.suffix not in LOCAL_BUILDERS:
                raise ValueError(f"dataset file {source}: expected one of {sorted(LOCAL_BUILDERS)}")
            try:
                return load_dataset(LOCAL_BUILDERS[path.suffix], data_files=str(path), split="train")
            except DatasetGenerationError as e:  # the useful part (e.g. "JSON parse error ... in row 7") is the cause
                raise ValueError(f"dataset file {source} cannot be read: {e.__cause__ or e}") from e
        return load_dataset(str(path), split=split)
    present = hub_parquet_columns(source, config, split) if columns else None
    if present is None:
        return load_dataset(source, name=config, split=split)
    return load_dataset(source, name=config, split=split, columns=[c for c in present if c in columns])


def hub_parquet_columns(source: str, config: str | None, split: str) -> list[str] | None:
    """The column names of a Hub dataset stored as Parquet, from the footer of its first file for `split` (a range
    request: the card's `dataset_info` may be missing or stale); None for other formats, where a column selection
    cannot be pushed into the reader."""
    builder = load_dataset_builder(source, name=config)
    if not isinstance(builder, Parquet):
        return None
    files = (builder.config.data_files or {}).get(split)
    if not files:
        return None
    with xopen(files[0], "rb") as f:
        return pq.read_schema(f).names


def messages_column_of(dataset: Dataset, source: str, column: str | None = None) -> str:
    """The column holding the conversations: `column` if given, else the first of MESSAGES_COLUMNS present."""
    candidates = (column,) if column else MESSAGES_COLUMNS
    for name in candidates:
        if name in dataset.column_names:
            return name
    raise ValueError(
        f"{source}: no conversation column {' or '.join(map(repr, candidates))}; columns are {dataset.column_names}"
        " (pass messages_column= to name the one holding lists of {'role', 'content'} messages)"
    )


def keep_levels(dataset: Dataset, column: str, levels: tuple[str, ...], bound: str, at_least: bool, source: str,
                counts: dict | None = None) -> Dataset:
    """Rows whose ordinal label in `column` is at least (or at most) `bound` (a null label, where the labeller
    failed, is neither); all rows of a dataset without labels (so that one config serves magpie-ultra and
    generate_synthetic.py's output alike). `counts["dropped"]` gets the number of rows dropped."""
    if bound not in levels:
        raise ValueError(f"{column} bound {bound!r}: expected one of {list(levels)}")
    if column not in dataset.column_names:
        logger.warning("%s has no %r column: every row is kept", source, column)
        return dataset
    rank = levels.index(bound)
    allowed = set(levels[rank:] if at_least else levels[: rank + 1])
    keep = np.array([label in allowed for label in _column(dataset, column)], dtype=bool)
    reason = f"{column} {'below' if at_least else 'above'} {bound!r} or unlabelled"
    return _drop(dataset, keep, counts if counts is not None else {"dropped": {}}, reason)


def check_conversations(dataset: Dataset, source: str = "dataset", column: str = "messages",
                        batch_size: int = 10_000) -> np.ndarray:
    """Which rows have an assistant turn to train on (a boolean array); raises one ValueError naming the first row
    (0-based) that the chat template cannot render.

    Works on the Arrow columns (roles and null flags only), so a million-row Hub dataset is checked in seconds.
    """
    kind = dataset.data.schema.field(column).type
    fields = set()
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_struct(kind.value_type):
        fields = {kind.value_type.field(i).name for i in range(kind.value_type.num_fields)}
    if not {"role", "content"} <= fields:
        raise ValueError(
            f"{source}: column {column!r} has type {kind}; expected a list of {{'role': str, 'content': str}} messages"
        )
    answered = []
    for start, batch in enumerate(dataset.with_format("arrow").select_columns([column]).iter(batch_size=batch_size)):
        first = start * batch_size
        conversations = batch.column(column).combine_chunks()
        if conversations.null_count:
            row = first + int(np.flatnonzero(conversations.is_null().to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"{source}: row {row}: {column!r} is null; expected a list of messages")
        messages = conversations.flatten()
        parent = pc.list_parent_indices(conversations).to_numpy()
        offsets = conversations.offsets.to_numpy()
        position = np.arange(len(parent)) - (offsets[parent] - offsets[0])
        roles = pc.struct_field(messages, "role")
        known = pc.fill_null(pc.is_in(roles, value_set=pa.array(ROLES)), False).to_numpy(zero_copy_only=False)
        if not known.all():
            i = int(np.flatnonzero(~known)[0])
            raise ValueError(
                f"{source}: row {first + parent[i]}, message {position[i]}: role {roles[i].as_py()!r} "
                f"in column {column!r}; the chat template knows {', '.join(ROLES)}"
            )
        contents = pc.struct_field(messages, "content")
        if contents.null_count:
            i = int(np.flatnonzero(contents.is_null().to_numpy(zero_copy_only=False))[0])
            raise ValueError(
                f"{source}: row {first + parent[i]}, message {position[i]}: content is null; expected a string"
            )
        is_assistant = pc.equal(roles, "assistant").to_numpy(zero_copy_only=False)
        answered.append(np.bincount(parent[is_assistant], minlength=len(conversations)) > 0)
    return np.concatenate(answered) if answered else np.zeros(0, dtype=bool)


def is_unsafe(guard: str | None) -> bool:
    """Llama Guard's verdict as magpie-ultra stores it: "\\n\\nsafe", or "\\n\\nunsafe\\nS<n>" (the hazard category)."""
    return guard is not None and guard.strip().lower().startswith("unsafe")


@dataclass
class Conversations:
    """The rows to train and evaluate on: `dataset` has `messages` and `row` (the source row each comes from);
    `counts`: source rows, rows kept, and the rows each filter dropped, by reason."""

    dataset: Dataset
    counts: dict = field(default_factory=dict)


def _drop(dataset: Dataset, keep: np.ndarray, counts: dict, reason: str) -> Dataset:
    dropped = int((~keep).sum())
    if dropped:
        counts["dropped"][reason] = counts["dropped"].get(reason, 0) + dropped
        dataset = dataset.select(np.flatnonzero(keep))
    return dataset


def _column(dataset: Dataset, name: str) -> list:
    return dataset.with_format("arrow").select_columns([name])[:][name].to_pylist()


def select_conversations(
    source: str = DEFAULT_DATASET,
    *,
    config: str | None = None,
    split: str = "train",
    messages_column: str | None = None,
    min_quality: str | None = None,
    max_difficulty: str | None = None,
    keep_unsafe: bool = False,
    max_samples: int | None = None,
    seed: int = 0,
) -> Conversations:
    """The conversations of `source` (see the module docstring) that can and should train, and what was dropped.

    `min_quality` / `max_difficulty` filter on Magpie's labels (an unlabelled row fails the filter); rows Llama
    Guard flagged unsafe go unless `keep_unsafe`; `max_samples` keeps a random subset (after filtering)."""
    for bound, levels, name in ((min_quality, QUALITY_LEVELS, "quality"), (max_difficulty, DIFFICULTY_LEVELS,
                                                                            "difficulty")):
        if bound is not None and bound not in levels:
            raise ValueError(f"{name} bound {bound!r}: expected one of {list(levels)}")
    dataset = load_raw(source, config=config, split=split, columns=USED_COLUMNS)
    column = messages_column_of(dataset, source, messages_column)
    counts = {"source_rows": len(dataset), "dropped": {}}
    dataset = dataset.add_column("row", np.arange(len(dataset)))
    answered = check_conversations(dataset, source, column)  # before filtering, so that row numbers are the source's
    dataset = _drop(dataset, answered, counts, "no assistant turn")
    if min_quality is not None:
        dataset = keep_levels(dataset, "quality", QUALITY_LEVELS, min_quality, True, source, counts)
    if max_difficulty is not None:
        dataset = keep_levels(dataset, "difficulty", DIFFICULTY_LEVELS, max_difficulty, False, source, counts)
    if "guard" in dataset.column_names and not keep_unsafe:
        safe = np.array([not is_unsafe(g) for g in _column(dataset, "guard")], dtype=bool)
        dataset = _drop(dataset, safe, counts, "flagged unsafe (guard)")
    if "rejection" in dataset.column_names:  # generate_synthetic.py keeps answers that failed validation, flagged
        accepted = np.array([r is None for r in _column(dataset, "rejection")], dtype=bool)
        dataset = _drop(dataset, accepted, counts, "rejected by generate_synthetic.py")
    dataset = dataset.select_columns([column, "row"])
    if column != "messages":
        dataset = dataset.rename_column(column, "messages")
    if len(dataset) == 0:
        raise ValueError(f"{source}: no rows left after filtering ({counts['dropped']})")
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(max_samples))
        counts["dropped"]["max_samples"] = counts["source_rows"] - sum(counts["dropped"].values()) - max_samples
    counts["kept"] = len(dataset)
    return Conversations(dataset, counts)


def load_conversations(source: str = DEFAULT_DATASET, **options) -> Dataset:
    """`select_conversations(source, **options)`'s rows as a Dataset with one column, `messages`, ready for
    SFTTrainer."""
    return select_conversations(source, **options).dataset.remove_columns("row")


def train_eval_split(dataset: Dataset, eval_size: float, seed: int = 0) -> tuple[Dataset, Dataset | None]:
    """Hold out `eval_size` rows (a fraction when < 1, a count otherwise; 0 = no eval set)."""
    if eval_size <= 0:
        return dataset, None
    n_eval = int(eval_size) if eval_size >= 1 else max(1, round(eval_size * len(dataset)))
    if n_eval >= len(dataset):
        raise ValueError(f"eval_size={eval_size} leaves no training rows out of {len(dataset)}")
    split = dataset.train_test_split(test_size=n_eval, seed=seed)
    return split["train"], split["test"]


# ----------------------------------------------------------------------------------------- held out by construction


SPLIT_SETTINGS = ("dataset", "config", "split", "messages_column", "min_quality", "max_difficulty", "keep_unsafe",
                  "max_samples", "eval_size", "seed")


def rows_sha256(rows) -> str:
    """A hash of a set of source row numbers (order-free)."""
    return hashlib.sha256(np.sort(np.asarray(rows, dtype=np.int64)).tobytes()).hexdigest()


def split_record(settings: dict, selection: Conversations, train: Dataset, held_out: Dataset | None) -> dict:
    """How a train / held-out split was made, enough to make it again (`rebuild_split`): `settings` (the keys of
    SPLIT_SETTINGS), the counts, the held-out source rows and a hash of the training rows."""
    held = sorted(held_out["row"]) if held_out is not None else []
    return {**{k: settings[k] for k in SPLIT_SETTINGS}, "counts": selection.counts, "train_rows": len(train),
            "train_rows_sha256": rows_sha256(train["row"]), "eval_rows": held}


def write_split_record(folder, record: dict) -> Path:
    path = Path(folder) / SPLIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return path


def read_split_record(folder) -> dict | None:
    """The record `sft.py` left in a model folder; None when there is none (not an SFT folder, or a Hub id)."""
    path = Path(folder) / SPLIT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    missing = [k for k in (*SPLIT_SETTINGS, "eval_rows", "train_rows_sha256") if k not in record]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; expected the record sft.py writes")
    return record


def rebuild_split(record: dict, where: str = SPLIT_FILE) -> tuple[Dataset, Dataset]:
    """(training rows, held-out rows) of the run `record` describes, made again from its source; raises ValueError
    when the source no longer gives the same training rows (the dataset changed since)."""
    selection = select_conversations(
        record["dataset"], config=record["config"], split=record["split"], messages_column=record["messages_column"],
        min_quality=record["min_quality"], max_difficulty=record["max_difficulty"],
        keep_unsafe=record["keep_unsafe"], max_samples=record["max_samples"], seed=record["seed"])
    dataset = selection.dataset
    held = np.isin(np.asarray(dataset["row"]), np.asarray(record["eval_rows"], dtype=np.int64))
    train, held_out = dataset.select(np.flatnonzero(~held)), dataset.select(np.flatnonzero(held))
    if int(held.sum()) != len(record["eval_rows"]) or rows_sha256(train["row"]) != record["train_rows_sha256"]:
        raise ValueError(f"{where}: {record['dataset']} no longer gives the rows that run trained on and held out "
                         "(the dataset changed since): its held-out prompts cannot be rebuilt")
    return train, held_out


# ----------------------------------------------------------------------------------------------- long conversations


def conversation_lengths(dataset: Dataset, tokenizer, num_proc: int | None = None) -> np.ndarray:
    """Tokens of each conversation in the chat format (what TRL's tokenization gives, special tokens included)."""
    def lengths(batch):
        ids = tokenizer.apply_chat_template(batch["messages"], tokenize=True)["input_ids"]
        return {"n_tokens": [len(x) for x in ids]}

    # The fingerprint names what decides the lengths; datasets would otherwise hash the tokenizer with dill (seconds).
    template = hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest()[:16]
    fingerprint = hashlib.sha256(f"{dataset._fingerprint}|{tokenizer.name_or_path}|{len(tokenizer)}|{template}"
                                 .encode()).hexdigest()[:32]
    counted = dataset.select_columns(["messages"]).map(lengths, batched=True, batch_size=256, num_proc=num_proc,
                                                       remove_columns=["messages"], desc="Counting tokens",
                                                       new_fingerprint=fingerprint)
    return np.asarray(counted["n_tokens"], dtype=np.int64)


def fit_to_max_length(dataset: Dataset, tokenizer, max_length: int, policy: str = "drop",
                      num_proc: int | None = None) -> tuple[Dataset, dict]:
    """Conversations longer than `max_length` tokens (one packed row): `drop` them (every trained conversation
    stays whole), or keep them for TRL to `truncate` at `max_length` (the tokens past it are lost). Returns the
    dataset and ``{"longer_than_max_length", "dropped", "truncated", "tokens_cut"}``."""
    if policy not in LONG_CONVERSATIONS:
        raise ValueError(f"long_conversations={policy!r}: expected one of {list(LONG_CONVERSATIONS)}")
    n_tokens = conversation_lengths(dataset, tokenizer, num_proc)
    long = n_tokens > max_length
    stats = {"max_length": max_length, "longer_than_max_length": int(long.sum()), "dropped": 0, "truncated": 0,
             "tokens_cut": 0}
    if policy == "drop":
        stats["dropped"] = int(long.sum())
        return (dataset.select(np.flatnonzero(~long)) if long.any() else dataset), stats
    stats["truncated"] = int(long.sum())
    stats["tokens_cut"] = int((n_tokens[long] - max_length).sum())
    return dataset, stats
