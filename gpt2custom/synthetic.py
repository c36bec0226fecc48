"""The machinery of `generate_synthetic.py`: a crash-safe JSONL store, retries with backoff around
`AsyncInferenceClient.chat_completion`, answer validation, prompt sources, seed topics, cost and the dataset card.

Guarantees the generator builds on:
* a row is appended whole (one `write` of one line) and fsync'ed as soon as its answer arrives, so a SIGKILL loses
  at most the answers still in flight, never a written row;
* opening a store repairs it: a torn last line is cut, unparsable lines and duplicate keys are dropped, and the
  file is rewritten through a temporary file and a rename;
* the HF token is never part of anything this module prints or writes (`redact`).
"""

import asyncio
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import DatasetCard, DatasetCardData, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from .files import DATA_BUILDERS, FILE_MODE

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "meta-llama/Llama-3.1-405B-Instruct"

# 408/425/429 and 5xx are the server saying "not now"; other 4xx will fail the same way however often we ask.
RETRY_STATUS = {408, 425, 429}
# Every prompt would fail the same way: stop the run instead of marking thousands of prompts failed.
FATAL_STATUS = {401, 402, 403, 404}

# Topics for the two-stage (instruction, then response) synthesis when no prompts are given.
SEED_TOPICS = [
    "cooking and recipes", "personal finance", "physics", "chemistry", "biology", "world history",
    "geography", "Python programming", "web development", "databases and SQL", "algorithms", "machine learning",
    "statistics", "mathematics puzzles", "creative writing", "poetry", "grammar and style", "learning languages",
    "travel planning", "fitness and exercise", "nutrition", "mental health and stress", "gardening", "home repair",
    "cars and maintenance", "music theory", "film and television", "board games and strategy", "philosophy",
    "economics", "law in everyday life", "job interviews and careers", "writing emails", "project management",
    "astronomy", "climate and weather", "pets and animal care", "parenting", "photography", "computer hardware",
    "Linux and the command line", "cybersecurity basics", "small business", "literature", "art history",
    "environment and sustainability", "sports", "productivity", "negotiation", "trivia and general knowledge",
]
INSTRUCTION_KINDS = [
    "question asking for a clear explanation", "request for step-by-step instructions",
    "request to write a short piece of text", "question comparing two things",
    "request for advice on a concrete situation", "problem that needs careful reasoning to solve",
]
INSTRUCTION_TEMPLATE = (
    "Write one {kind} that a curious person might send to an AI assistant about {topic}. Make it specific and "
    "self-contained. Reply with the message only: no preamble, no quotes, no answer."
)

# A refusal opens with an apology or an inability; this catches the common forms and few real answers.
REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry, |i apologi[sz]e|i can'?t\b|i cannot\b|i can not\b|i won'?t\b|i will not\b|"
    r"i'?m (?:not )?(?:un)?able to\b|i am (?:not )?(?:un)?able to\b|as an ai\b)",
    re.IGNORECASE,
)


# -- ids, secrets ----------------------------------------------------------------------------------------------------

def stable_id(text: str) -> str:
    """A prompt id that survives reordering and re-running: the first 16 hex digits of the text's SHA-1."""
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def secrets() -> list[str]:
    """The token strings that must never be printed or written (the HF token from env or `hf auth login`)."""
    found = {get_token(), os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")}
    return sorted((s for s in found if s), key=len, reverse=True)


def redact(text: str, hidden: list[str] | None = None) -> str:
    for secret in secrets() if hidden is None else hidden:
        text = text.replace(secret, "***")
    return text


def describe_error(error: BaseException, limit: int = 500) -> str:
    """One line about an exception, token removed, for logs and the failures file."""
    status = error.response.status_code if isinstance(error, HfHubHTTPError) and error.response is not None else None
    text = " ".join(str(error).split())[:limit]
    return redact(f"{type(error).__name__}{f' (HTTP {status})' if status else ''}: {text}")


# -- the JSONL store -------------------------------------------------------------------------------------------------

def row_key(row: dict) -> Hashable:
    return row["prompt_id"], row.get("response_index", 0)


class JsonlStore:
    """An append-only JSONL file of dict rows, each with a unique key; repaired when opened.

    `rows` holds what the file held after repair; `repairs` says what was cut (torn tail, unparsable lines,
    duplicate keys). `truncate=True` starts an empty file instead.
    """

    def __init__(self, path: "str | Path", key: Callable[[dict], Hashable] = row_key, truncate: bool = False):
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate:
            self._replace([])
        self.rows, self.repairs = self._load_and_repair()
        self.keys = {key(row) for row in self.rows}
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _load_and_repair(self) -> tuple[list[dict], dict[str, int]]:
        data = self.path.read_bytes() if self.path.exists() else b""
        lines = data.split(b"\n")
        torn = lines.pop()  # b"" when the file ends with a newline, else a line cut by a crash mid-write
        rows, seen = [], set()
        repairs = {"torn": int(bool(torn)), "unparsable": 0, "duplicates": 0}
        for line in lines:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = self.key(row)
            except (ValueError, KeyError, TypeError):
                repairs["unparsable"] += 1
                continue
            if key in seen:
                repairs["duplicates"] += 1
                continue
            seen.add(key)
            rows.append(row)
        if any(repairs.values()):
            logger.warning("repaired %s: %s", self.path, ", ".join(f"{n} {k}" for k, n in repairs.items() if n))
            self._replace(rows)
        return rows, repairs

    def _replace(self, rows: list[dict]):
        """Rewrite the file atomically: a crash leaves the old file or the new one, never a mix."""
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.writelines(encode_row(row) for row in rows)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)  # mkstemp's 0600 would hide the data set from other users
        os.replace(tmp, self.path)

    def append(self, row: dict):
        data = encode_row(row)
        while data:  # one write per line; the loop only matters on a full disk or a signal
            data = data[os.write(self._fd, data):]
        os.fsync(self._fd)
        self.keys.add(self.key(row))

    def __contains__(self, key: Hashable) -> bool:
        return key in self.keys

    def close(self):
        os.close(self._fd)


def encode_row(row: dict) -> bytes:
    return (json.dumps(row, ensure_ascii=False) + "\n").encode()


def read_rows(path: "str | Path") -> list[dict]:
    """The complete rows of a JSONL file (a torn last line is ignored, the file is not touched)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_bytes().split(b"\n")[:-1] if line.strip()]


# -- retries -----------------------------------------------------------------------------------------------------------

class IncompleteAnswer(ValueError):
    """A 200 response without a usable answer (no choices, no content, finish_reason None): worth asking again."""


class FatalError(RuntimeError):
    """A failure every request would share (bad token, unknown model, offline mode): the run stops."""


@dataclass
class RetryPolicy:
    max_attempts: int = 6
    base_delay: float = 1.0  # seconds before the 2nd attempt (then doubling)
    max_delay: float = 60.0  # cap on one wait, Retry-After included

    def delay(self, attempt: int, retry_after: float | None = None, rng: random.Random = random) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based): the server's Retry-After when it sent
        one, else exponential backoff with "equal jitter" (half fixed, half random, so that clients that failed
        together do not retry together)."""
        if retry_after is not None:
            return min(retry_after + rng.uniform(0, self.base_delay), self.max_delay)
        step = min(self.base_delay * 2 ** (attempt - 1), self.max_delay)
        return step / 2 + rng.uniform(0, step / 2)


def retry_after_seconds(error: BaseException) -> float | None:
    """The Retry-After header of an HTTP error (seconds or an HTTP date), if any."""
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when else None


def is_retryable(error: BaseException) -> bool:
    """Rate limits, server errors, timeouts, dropped connections and unusable bodies are retried; a FatalError
    is raised for failures every prompt would share (a refused connection among them); anything else (a 400 on this
    prompt) is not retried."""
    if isinstance(error, OfflineModeIsEnabled):
        raise FatalError("HF_HUB_OFFLINE=1 blocks every request made through huggingface_hub, local servers "
                         "included: unset it for generation") from error
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        if status in FATAL_STATUS:
            raise FatalError(f"{describe_error(error)}\ncheck the token (HF_TOKEN or `hf auth login`, with inference "
                             "permission), the model id, its licence acceptance, and the provider") from error
        return status is None or status in RETRY_STATUS or status >= 500
    if isinstance(error, httpx2.ConnectError):  # nothing listens there: every prompt would wait out every retry
        raise FatalError(f"cannot connect to the server ({describe_error(error)}): check that it is running and the "
                         "--base_url (the run resumes where it stopped)") from error
    # After HfHubHTTPError, which is one of them: timeouts and dropped connections.
    return isinstance(error, (httpx2.HTTPError, json.JSONDecodeError, IncompleteAnswer))


@dataclass
class Answer:
    content: str
    finish_reason: str
    usage: dict
    model: str | None


@dataclass
class Outcome:
    answer: Answer | None  # None: failed after `attempts` attempts
    attempts: int
    error: str | None = None


async def ask(client, messages: list[dict], *, model: str, **params) -> Answer:
    """One chat completion; a body that parsed but holds no finished answer raises IncompleteAnswer."""
    out = await client.chat_completion(messages, model=model, **params)
    choice = out.choices[0] if out.choices else None
    if choice is None or choice.message is None or choice.message.content is None or choice.finish_reason is None:
        raise IncompleteAnswer(f"response without a finished answer: {str(out)[:200]}")
    usage = out.usage
    usage = {k: getattr(usage, k, None) for k in ("prompt_tokens", "completion_tokens", "total_tokens")} if usage else {}
    return Answer(choice.message.content, choice.finish_reason, usage, out.model or None)


async def ask_with_retries(client, messages: list[dict], *, model: str, policy: RetryPolicy,
                           semaphore: asyncio.Semaphore, on_retry: Callable[[str], None] | None = None,
                           **params) -> Outcome:
    """`ask` until it succeeds or `policy.max_attempts` are spent. The semaphore is held only while a request is
    in flight, so a prompt waiting out a backoff does not hold back the others."""
    error_text = None
    for attempt in range(1, policy.max_attempts + 1):
        try:
            async with semaphore:
                return Outcome(await ask(client, messages, model=model, **params), attempt)
        except Exception as error:
            error_text = describe_error(error)
            if not is_retryable(error):
                if isinstance(error, HfHubHTTPError):  # this prompt is refused (400, 413, 422): record it, go on
                    return Outcome(None, attempt, error_text)
                raise  # a bug or a configuration error ("model not supported by provider"): stop the run
            if attempt < policy.max_attempts:
                if on_retry is not None:
                    on_retry(error_text)
                await asyncio.sleep(policy.delay(attempt, retry_after_seconds(error)))
    return Outcome(None, policy.max_attempts, error_text)


# -- validation ----------------------------------------------------------------------------------------------------

def rejection(answer: Answer, reject_truncated: bool = True, reject_refusals: bool = True) -> str | None:
    """Why an answer is unfit for training ("empty", "truncated", "refusal"), or None when it is fine."""
    if not answer.content.strip():
        return "empty"
    if reject_truncated and answer.finish_reason == "length":
        return "truncated"
    if reject_refusals and REFUSAL.match(answer.content):
        return "refusal"
    return None


def instruction_rejection(row: dict) -> str | None:
    """Why a saved stage-1 row cannot be a user turn, or None. Rows written before empty-after-cleaning counted as
    rejected may hold an empty instruction without a reason."""
    return row.get("rejection") or (None if row.get("instruction") else "empty")


# -- prompts -----------------------------------------------------------------------------------------------------------

@dataclass
class Prompt:
    prompt_id: str
    user: str | None  # None: stage 1 writes the user turn from `topic` and `kind`
    topic: str | None = None
    kind: str | None = None
    index: int = 0  # which instruction of its topic (varies the stage-1 seed)


def topic_prompts(topics: list[str], per_topic: int) -> list[Prompt]:
    """`per_topic` prompts per topic, interleaved so that the first N prompts already span N topics."""
    return [Prompt(stable_id(f"topic:{topic}#{j}"), None, topic, INSTRUCTION_KINDS[j % len(INSTRUCTION_KINDS)], j)
            for j in range(per_topic) for topic in topics]


def first_user_turn(value) -> str | None:
    """A prompt from a dataset cell: a string, or the first user message of a conversation."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return next((m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"), None)
    return None


def load_prompts(source: str, column: str = "prompt", config: str | None = None, split: str = "train",
                 max_prompts: int | None = None) -> list[Prompt]:
    """The first `max_prompts` distinct prompts (all when None) of a .txt file (one per non-empty line), a
    .jsonl/.json/.csv/.parquet file, or a Hub dataset (`column` holds a string or a list of {role, content}
    messages). A Hub dataset is streamed, that column only, and read no further than those prompts. Duplicates
    collapse into one prompt id."""
    path = Path(source)
    if path.suffix == ".txt":
        if not path.exists():
            raise ValueError(f"--prompts {source}: no such file")
        texts = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    else:
        from datasets import load_dataset

        builders = {s: DATA_BUILDERS[s] for s in (".jsonl", ".json", ".csv", ".parquet")}
        if path.suffix in builders:
            if not path.exists():
                raise ValueError(f"--prompts {source}: no such file")
            dataset = load_dataset(builders[path.suffix], data_files=str(path), split="train")
        else:
            dataset = load_dataset(source, config, split=split, streaming=True)
        if dataset.column_names is not None and column not in dataset.column_names:
            raise ValueError(f"--prompts {source}: no column {column!r} (--prompt_column); columns: {dataset.column_names}")
        texts = (first_user_turn(row[column]) for row in dataset.select_columns([column]))
    prompts, seen = [], set()
    for text in texts:
        text = (text or "").strip()
        if text and (pid := stable_id(text)) not in seen:
            seen.add(pid)
            prompts.append(Prompt(pid, text))
            if max_prompts is not None and len(prompts) >= max_prompts:
                break
    if not prompts:
        raise ValueError(f"--prompts {source}: no non-empty prompt found")
    return prompts


def clean_instruction(text: str) -> str:
    """Stage-1 output as a user turn: models like to wrap it in quotes or prefix it with a label."""
    text = re.sub(r"^\s*(?:message|question|request|user)\s*:\s*", "", text.strip(), flags=re.IGNORECASE)
    return text.strip().strip('"“”').strip()


# -- cost, dataset, card -----------------------------------------------------------------------------------------------

def token_totals(rows: list[dict]) -> dict[str, int]:
    totals = {"prompt_tokens": 0, "completion_tokens": 0}
    for row in rows:
        for key in totals:
            totals[key] += (row.get("usage") or {}).get(key) or 0
    return totals


def estimated_cost(totals: dict[str, int], price_per_m_input: float | None, price_per_m_output: float | None) -> float | None:
    """Dollars for the tokens at the given prices per million input / output tokens (None when no price is set)."""
    if price_per_m_input is None and price_per_m_output is None:
        return None
    return (totals["prompt_tokens"] * (price_per_m_input or 0) + totals["completion_tokens"] * (price_per_m_output or 0)) / 1e6


@dataclass(frozen=True)
class OutputFiles:
    """The files of one generation run, named after its output (`x.jsonl`, `x.rejected.jsonl`, ...)."""

    answers: Path  # the dataset: accepted rows (and, with invalid=flag, rejected ones with `rejection` set)
    rejected: Path  # answers that failed validation (invalid=drop): paid for, so never asked again
    failed: Path  # prompts that failed after every retry in the latest run: asked again by the next run
    instructions: Path  # stage-1 user turns written from seed topics, reused on resume; a rejected one is final
    lock: Path  # held by the running generator

    @classmethod
    def for_output(cls, output: "str | Path") -> "OutputFiles":
        path = Path(output)
        stem = path.name.removesuffix(".jsonl")
        parts = ("", ".rejected", ".failed", ".instructions")
        return cls(*(path.with_name(f"{stem}{part}.jsonl") for part in parts), path.with_name(f"{stem}.lock"))


def file_counts(files: OutputFiles, price_per_m_input: float | None = None, price_per_m_output: float | None = None) -> dict:
    """Rows, accepted, rejected answers by reason, seed-topic user turns rejected (their prompts never answered),
    failed, tokens (every request ever paid for) and estimated cost."""
    answers, rejected, failed, instructions = (read_rows(p) for p in (files.answers, files.rejected, files.failed, files.instructions))
    totals = token_totals(answers + rejected + instructions)
    return {
        "rows": len(answers),
        "accepted": sum(row.get("rejection") is None for row in answers),
        "rejected": dict(Counter(row["rejection"] for row in answers + rejected if row.get("rejection"))),
        "rejected_instructions": dict(Counter(filter(None, map(instruction_rejection, instructions)))),
        "failed": len(failed),
        **totals,
        "cost": estimated_cost(totals, price_per_m_input, price_per_m_output),
    }


DATASET_COLUMNS = ("messages", "model", "prompt_id", "response_index", "finish_reason", "usage", "rejection")


def rows_to_dataset(rows: list[dict]):
    """A `datasets.Dataset` with the chat rows (`messages` for TRL's SFTTrainer) and their provenance."""
    from datasets import Dataset

    return Dataset.from_list([{k: row.get(k) for k in DATASET_COLUMNS} for row in rows])


CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ pretty_name }}

Synthetic single-turn chat data: {{ prompt_source }}, answered by
[{{ source_model }}](https://huggingface.co/{{ source_model }}) through `huggingface_hub`'s inference client,
generated with `generate_synthetic.py` of GPT2-Custom. Each row has `messages` (the conversation, ready for TRL's
`SFTTrainer`), `model`, `prompt_id`, `response_index`, `finish_reason`, `usage` (tokens) and `rejection` (null unless
the answer failed validation and was kept with a flag).

## Generation parameters

| parameter | value |
|---|---|
{% for name, value in parameters.items() -%}
| {{ name }} | {{ value }} |
{% endfor %}
## Counts and filtering

| | rows |
|---|---|
| in this dataset | {{ counts.rows }} |
| accepted | {{ counts.accepted }} |
{% for reason, n in counts.rejected.items() -%}
| rejected: {{ reason }} | {{ n }} |
{% endfor -%}
{% for reason, n in (counts.rejected_instructions or {}).items() -%}
| seed-topic user turn rejected: {{ reason }} (not answered) | {{ n }} |
{% endfor -%}
| failed after retries (not included) | {{ counts.failed }} |

Validation: an answer is rejected when it is empty{% if parameters.reject_truncated %}, truncated by the token
limit (`finish_reason == "length"`){% endif %}{% if parameters.reject_refusals %}, or opens like a refusal
("I'm sorry", "I can't", "As an AI", ...){% endif %}. Rejected answers are {{ invalid_policy }}.
Tokens used: {{ counts.prompt_tokens }} prompt, {{ counts.completion_tokens }} completion{% if counts.cost is not none %}
(about ${{ "%.2f"|format(counts.cost) }} at the prices given){% endif %}.

## Licence

The answers are outputs of {{ source_model }}, so this dataset follows its licence (`{{ license }}`): read it,
including its acceptable-use policy and its terms on using outputs to train other models, before use.
"""


def dataset_card(*, source_model: str, license: str, prompt_source: str, parameters: dict, counts: dict,
                 invalid_policy: str, pretty_name: str) -> DatasetCard:
    """The card pushed with the dataset: YAML metadata, source model and licence, parameters, counts, filtering."""
    size = counts["rows"]
    size_category = ("n<1K" if size < 1_000 else "1K<n<10K" if size < 10_000 else "10K<n<100K" if size < 100_000
                     else "100K<n<1M" if size < 1_000_000 else "1M<n<10M")
    data = DatasetCardData(
        language="en", license=license, task_categories=["text-generation"], size_categories=size_category,
        pretty_name=pretty_name, tags=["synthetic", "sft", "chat", "gpt2custom"],
    )
    return DatasetCard.from_template(
        data, template_str=CARD_TEMPLATE, pretty_name=pretty_name, source_model=source_model, license=license,
        prompt_source=prompt_source, parameters=parameters, counts=counts,
        invalid_policy="dropped (kept aside in `*.rejected.jsonl`)" if invalid_policy == "drop" else
        "kept with `rejection` set to the reason: filter on `rejection is None` for training",
    )
