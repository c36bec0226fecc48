"""The conversations `sft.py` trains on: a Hub dataset or `generate_synthetic.py`'s JSONL, checked before TRL sees them.

Sources (one string):
* a Hub dataset id, by default `argilla/magpie-ultra-v1.0` (multi-turn answers of Llama-3.1-405B-Instruct), whose
  `conversation` column becomes `messages` (TRL only recognises `messages`) and whose `quality` / `difficulty`
  labels (Magpie's "very poor" .. "excellent", "very easy" .. "very hard") filter the rows;
* a local `.jsonl` / `.json` / `.parquet` file, such as the rows `{"messages": [...], "model": ..., "rejection": ...}`
  that `generate_synthetic.py` writes (rows it flagged, `rejection` not null, are dropped), or a folder that
  `load_dataset` reads as a dataset (not generate_synthetic.py's: its side files would be read too).

Every row must be a list of `{"role", "content"}` messages with roles the chat template knows and at least one
assistant turn (TRL would otherwise stop deep in tokenisation); the first offending row is named in one ValueError.
"""

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, load_dataset
from datasets.exceptions import DatasetGenerationError

from .chat import ROLES

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "argilla/magpie-ultra-v1.0"
MESSAGES_COLUMNS = ("messages", "conversation")  # ours and TRL's; magpie-ultra's
QUALITY_LEVELS = ("very poor", "poor", "average", "good", "excellent")
DIFFICULTY_LEVELS = ("very easy", "easy", "medium", "hard", "very hard")
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_raw(source: str, *, config: str | None = None, split: str = "train") -> Dataset:
    """One split of a local file, a local folder or a Hub dataset, as `datasets.Dataset`."""
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
    return load_dataset(source, name=config, split=split)


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


def keep_levels(dataset: Dataset, column: str, levels: tuple[str, ...], bound: str, at_least: bool, source: str):
    """Rows whose ordinal label in `column` is at least (or at most) `bound`; all rows of a dataset without labels
    (so that one config serves magpie-ultra and generate_synthetic.py's output alike)."""
    if bound not in levels:
        raise ValueError(f"{column} bound {bound!r}: expected one of {list(levels)}")
    if column not in dataset.column_names:
        logger.warning("%s has no %r column: every row is kept", source, column)
        return dataset
    rank = levels.index(bound)
    allowed = set(levels[rank:] if at_least else levels[: rank + 1])
    return dataset.filter(
        lambda labels: [label in allowed for label in labels],
        batched=True,
        input_columns=[column],
        desc=f"Keeping {column} {'>=' if at_least else '<='} {bound}",
    )


def check_conversations(dataset: Dataset, source: str = "dataset", column: str = "messages", batch_size: int = 10_000):
    """Raise one ValueError naming the first row (0-based) that the chat template cannot render or that has nothing
    to train on.

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
    for start, batch in enumerate(dataset.with_format("arrow").iter(batch_size=batch_size)):
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
        answers = np.bincount(parent[is_assistant], minlength=len(conversations))
        if not answers.all():
            row = first + int(np.flatnonzero(answers == 0)[0])
            raise ValueError(f"{source}: row {row} has no assistant message in column {column!r}: nothing to train on")


def load_conversations(
    source: str = DEFAULT_DATASET,
    *,
    config: str | None = None,
    split: str = "train",
    messages_column: str | None = None,
    min_quality: str | None = None,
    max_difficulty: str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
) -> Dataset:
    """A Dataset with one column, `messages`, ready for SFTTrainer (see the module docstring for the sources).

    `min_quality` / `max_difficulty` filter on Magpie's labels; `max_samples` keeps a random subset (after filtering).
    """
    dataset = load_raw(source, config=config, split=split)
    column = messages_column_of(dataset, source, messages_column)
    check_conversations(dataset, source, column)  # before filtering, so that row numbers are the source's
    if min_quality is not None:
        dataset = keep_levels(dataset, "quality", QUALITY_LEVELS, min_quality, at_least=True, source=source)
    if max_difficulty is not None:
        dataset = keep_levels(dataset, "difficulty", DIFFICULTY_LEVELS, max_difficulty, at_least=False, source=source)
    if "rejection" in dataset.column_names:  # generate_synthetic.py keeps answers that failed validation, flagged
        dataset = dataset.filter(
            lambda flags: [f is None for f in flags],
            batched=True,
            input_columns=["rejection"],
            desc="Dropping rows flagged as rejected",
        )
    dataset = dataset.select_columns([column])
    if column != "messages":
        dataset = dataset.rename_column(column, "messages")
    if len(dataset) == 0:
        raise ValueError(
            f"{source}: no rows left after filtering (min_quality={min_quality}, max_difficulty={max_difficulty})"
        )
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(max_samples))
    return dataset


def train_eval_split(dataset: Dataset, eval_size: float, seed: int = 0) -> tuple[Dataset, Dataset | None]:
    """Hold out `eval_size` rows (a fraction when < 1, a count otherwise; 0 = no eval set)."""
    if eval_size <= 0:
        return dataset, None
    n_eval = int(eval_size) if eval_size >= 1 else max(1, round(eval_size * len(dataset)))
    if n_eval >= len(dataset):
        raise ValueError(f"eval_size={eval_size} leaves no training rows out of {len(dataset)}")
    split = dataset.train_test_split(test_size=n_eval, seed=seed)
    return split["train"], split["test"]
