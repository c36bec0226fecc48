"""Synthetic chat data for SFT: prompts answered by Llama-3.1-405B-Instruct (or any chat model) through
`huggingface_hub`'s AsyncInferenceClient, robust to rate limits and crashes, resumable, pushed as a Hub dataset.

Prompts come from a .txt file (one per line), a .jsonl/.json/.csv/.parquet file or a Hub dataset column
(`--prompts`, `--prompt_column`), or, by default, from built-in seed topics in two stages: the model first writes a
user message about a topic (self-instruct style), then answers it.

Outputs, beside `--output x.jsonl`:
    x.jsonl               {"messages": [...], "model", "prompt_id", "response_index", "finish_reason", "usage",
                           "rejection"}: one row per answer, appended whole and fsync'ed as it arrives
    x.rejected.jsonl      answers that failed validation (empty, truncated, refusal) with --invalid drop
    x.failed.jsonl        prompts that still failed after --max_attempts (latest run only; the next run retries them)
    x.instructions.jsonl  stage-1 user turns from seed topics, so a resumed run does not pay for them again; one
                          that failed validation keeps its `rejection` and is final: that prompt is never answered
                          (delete its line to have it written anew)
Re-running the same command resumes: finished prompt ids are skipped, a torn last line is repaired, duplicates are
removed. At most --concurrency answers in flight when a run is killed are paid twice.

Provider, model and token: HF Inference Providers routing by default (`--provider auto`), the token from HF_TOKEN or
`hf auth login` (needs inference permission and the accepted Llama 3.1 licence); never printed or written. Or any
OpenAI-compatible server with `--base_url http://host:port/v1` (TGI, vLLM, `serve_openai.py`); the HF token, if
any, is sent to it as the bearer token, as InferenceClient does.

Run:
    python generate_synthetic.py --output data/synthetic/llama405b.jsonl --max_prompts 2000 \\
        --price_per_m_input 3 --price_per_m_output 3 --push-to-hub org/gpt2custom-synthetic
    # locally, no account: a checkpoint served by serve_openai.py
    python serve_openai.py --model out/sft-124m --port 8080 &
    python generate_synthetic.py --base_url http://127.0.0.1:8080/v1 --output data/synthetic/local.jsonl \\
        --max_tokens 64 --reject_truncated false
"""

import asyncio
import sys
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import AsyncInferenceClient, create_repo
from tqdm.auto import tqdm
from trl import TrlParser

from gpt2custom.files import exclusive_lock
from gpt2custom.synthetic import (
    DEFAULT_MODEL,
    INSTRUCTION_TEMPLATE,
    SEED_TOPICS,
    Answer,
    FatalError,
    JsonlStore,
    OutputFiles,
    Prompt,
    RetryPolicy,
    ask_with_retries,
    clean_instruction,
    dataset_card,
    estimated_cost,
    file_counts,
    instruction_rejection,
    load_prompts,
    read_rows,
    redact,
    rejection,
    rows_to_dataset,
    token_totals,
    topic_prompts,
)


@dataclass
class SyntheticOptions:
    output: str = field(default="data/synthetic/llama405b.jsonl", metadata={"help": "the answers JSONL (side files are named after it)"})
    # Where the answers come from
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Hub model id; with --base_url, the name sent in the payload"})
    provider: str | None = field(default=None, metadata={"help": "inference provider (together, fireworks-ai, ...); None: the Hub's auto routing"})
    base_url: str | None = field(default=None, metadata={"help": "an OpenAI-compatible server instead, e.g. http://127.0.0.1:8080/v1"})
    # Prompts
    prompts: str | None = field(default=None, metadata={"help": ".txt/.jsonl/.json/.csv/.parquet file or Hub dataset id; None: seed topics"})
    prompt_column: str = field(default="prompt", metadata={"help": "column with the prompt (a string or a list of messages)"})
    dataset_config: str | None = field(default=None, metadata={"help": "config name of a Hub dataset"})
    dataset_split: str = field(default="train", metadata={"help": "split of a Hub dataset"})
    max_prompts: int | None = field(default=None, metadata={"help": "use the first N prompts"})
    topics_file: str | None = field(default=None, metadata={"help": "seed topics, one per line; None: the built-in list"})
    instructions_per_topic: int = field(default=20, metadata={"help": "user messages written per seed topic"})
    instruction_temperature: float = field(default=1.0, metadata={"help": "sampling temperature of stage 1 (user messages)"})
    instruction_max_tokens: int = field(default=256, metadata={"help": "token limit of stage 1"})
    # Generation
    system_prompt: str | None = field(default=None, metadata={"help": "system message of every answer (kept in the rows)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature of the answers"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling of the answers"})
    max_tokens: int = field(default=1024, metadata={"help": "token limit of an answer"})
    seed: int = field(default=0, metadata={"help": "request seed (+ response index): reproducible where the server honours it"})
    responses_per_prompt: int = field(default=1, metadata={"help": "answers per prompt, as separate requests with their own seed"})
    # Robustness
    concurrency: int = field(default=8, metadata={"help": "requests in flight at most"})
    timeout: float = field(default=300.0, metadata={"help": "seconds before a request counts as timed out (then retried)"})
    max_attempts: int = field(default=6, metadata={"help": "attempts per request before it is recorded as failed"})
    backoff_base: float = field(default=1.0, metadata={"help": "seconds before the second attempt; doubles per attempt, with jitter"})
    backoff_max: float = field(default=60.0, metadata={"help": "longest single wait, Retry-After included"})
    # Validation
    reject_truncated: bool = field(default=True, metadata={"help": "reject answers cut by max_tokens (finish_reason length)"})
    reject_refusals: bool = field(default=True, metadata={"help": "reject answers that open like a refusal"})
    invalid: str = field(default="drop", metadata={"help": "drop: rejected answers go to x.rejected.jsonl; flag: kept with `rejection` set"})
    # Cost
    price_per_m_input: float | None = field(default=None, metadata={"help": "$ per 1M prompt tokens, for the cost estimate"})
    price_per_m_output: float | None = field(default=None, metadata={"help": "$ per 1M completion tokens"})
    # Publishing
    push_to_hub: str | None = field(default=None, metadata={"help": "org/name of a dataset repo to push the answers and a card to"})
    private: bool = field(default=True, metadata={"help": "create the dataset repo private"})
    license: str = field(default="llama3.1", metadata={"help": "licence of the data: that of the model that wrote it"})

    def __post_init__(self):
        problems = [
            (self.concurrency < 1, f"concurrency={self.concurrency}: expected >= 1"),
            (self.max_attempts < 1, f"max_attempts={self.max_attempts}: expected >= 1"),
            (self.responses_per_prompt < 1, f"responses_per_prompt={self.responses_per_prompt}: expected >= 1"),
            (self.instructions_per_topic < 1, f"instructions_per_topic={self.instructions_per_topic}: expected >= 1"),
            (min(self.max_tokens, self.instruction_max_tokens) < 1, "max_tokens and instruction_max_tokens: expected >= 1"),
            (min(self.temperature, self.instruction_temperature) < 0, "temperature: expected >= 0"),
            (not 0 < self.top_p <= 1, f"top_p={self.top_p}: expected in (0, 1]"),
            (self.invalid not in ("drop", "flag"), f"invalid={self.invalid!r}: expected 'drop' or 'flag'"),
            (self.base_url is not None and not self.base_url.startswith(("http://", "https://")),
             f"base_url={self.base_url!r}: expected http(s)://host:port/v1"),
            (self.base_url is not None and self.provider is not None, "give --provider or --base_url, not both"),
            (not self.output.endswith(".jsonl"), f"output={self.output!r}: expected a .jsonl path"),
            (self.push_to_hub is not None and self.push_to_hub.count("/") != 1,
             f"push_to_hub={self.push_to_hub!r}: expected org/name"),
        ]
        for failed, message in problems:
            if failed:
                raise ValueError(message)


def build_prompts(options: SyntheticOptions) -> list[Prompt]:
    if options.prompts:
        prompts = load_prompts(options.prompts, options.prompt_column, options.dataset_config, options.dataset_split,
                               max_prompts=options.max_prompts)
    else:
        topics = SEED_TOPICS
        if options.topics_file:
            topics = [t.strip() for t in Path(options.topics_file).read_text(encoding="utf-8").splitlines() if t.strip()]
        prompts = topic_prompts(topics, options.instructions_per_topic)
    return prompts[: options.max_prompts]


class Generator:
    """Asks for every pending (prompt, response index) and writes each outcome the moment it is known."""

    def __init__(self, options: SyntheticOptions, files: OutputFiles):
        self.options = options
        files.answers.parent.mkdir(parents=True, exist_ok=True)
        self.lock = exclusive_lock(files.lock)
        self.answers = JsonlStore(files.answers)
        self.rejected = JsonlStore(files.rejected)
        self.failed = JsonlStore(files.failed, truncate=True)
        self.instructions = JsonlStore(files.instructions, key=lambda row: row["prompt_id"])
        self.cached_instructions = {row["prompt_id"]: row for row in self.instructions.rows}
        self.policy = RetryPolicy(options.max_attempts, options.backoff_base, options.backoff_max)
        self.stats = Counter()
        self.retried = Counter()
        self.usage = []

    def rejected_instructions(self, prompts: list[Prompt]) -> set[str]:
        """Ids of the seed-topic prompts whose saved user turn was rejected: final, they are not asked again."""
        saved = self.cached_instructions
        return {p.prompt_id for p in prompts if p.prompt_id in saved and instruction_rejection(saved[p.prompt_id])}

    def pending(self, prompts: list[Prompt]) -> dict[str, list[int]]:
        done = self.answers.keys | self.rejected.keys
        final = self.rejected_instructions(prompts)
        todo = {p.prompt_id: [k for k in range(self.options.responses_per_prompt) if (p.prompt_id, k) not in done]
                for p in prompts if p.prompt_id not in final}
        return {pid: ks for pid, ks in todo.items() if ks}

    async def run(self, prompts: list[Prompt], todo: dict[str, list[int]]):
        o = self.options
        client_args = {"base_url": o.base_url} if o.base_url else {"provider": o.provider}
        self.semaphore = asyncio.Semaphore(o.concurrency)  # requests in flight
        self.bar = tqdm(total=sum(map(len, todo.values())), desc="answers", unit="answer", dynamic_ncols=True)
        queue = iter([p for p in prompts if p.prompt_id in todo])

        async def worker():  # twice as many workers as slots: prompts waiting out a backoff leave the slot to others
            for prompt in queue:
                await self.one_prompt(prompt, todo[prompt.prompt_id])

        async with AsyncInferenceClient(timeout=o.timeout, **client_args) as self.client:
            workers = [asyncio.create_task(worker()) for _ in range(2 * o.concurrency)]
            try:
                await asyncio.gather(*workers)
            finally:  # a fatal error in one worker stops the others before the client closes
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                self.bar.close()

    async def ask(self, messages: list[dict], **params):
        def note_retry(error: str):
            self.retried[error.split(":")[0]] += 1
            self.show_stats()

        return await ask_with_retries(self.client, messages, model=self.options.model, policy=self.policy,
                                      semaphore=self.semaphore, on_retry=note_retry, **params)

    async def one_prompt(self, prompt: Prompt, response_indexes: list[int]):
        user = prompt.user
        if user is None:
            row, error, attempts = await self.instruction(prompt)
            if row is None:  # no answer after every retry: x.failed.jsonl, and the next run asks again
                for k in response_indexes:
                    self.record_failure(prompt, k, "instruction", error, attempts=attempts)
                return
            if instruction_rejection(row):  # paid for and recorded once in x.instructions.jsonl: final
                for _ in response_indexes:
                    self.advance("instruction rejected")
                return
            user = row["instruction"]
        messages = ([{"role": "system", "content": self.options.system_prompt}] if self.options.system_prompt else [])
        messages.append({"role": "user", "content": user})
        await asyncio.gather(*(self.answer(prompt, k, messages) for k in response_indexes))

    async def instruction(self, prompt: Prompt) -> tuple[dict | None, str | None, int]:
        """Stage 1: the row of a user message about the prompt's topic, usable or rejected (saved, so paid once);
        or None when the request failed, why, and the attempts made."""
        row, attempts = self.cached_instructions.get(prompt.prompt_id), 0
        if row is None:
            o = self.options
            request = INSTRUCTION_TEMPLATE.format(kind=prompt.kind, topic=prompt.topic)
            outcome = await self.ask([{"role": "user", "content": request}], temperature=o.instruction_temperature,
                                     top_p=o.top_p, max_tokens=o.instruction_max_tokens, seed=o.seed + prompt.index)
            attempts = outcome.attempts
            if outcome.answer is None:
                return None, outcome.error, attempts
            answer = outcome.answer
            instruction = clean_instruction(answer.content)
            # A reply that is only a label or quotes is empty once cleaned, though `rejection` saw text.
            reason = rejection(answer, o.reject_truncated, o.reject_refusals) or (None if instruction else "empty")
            row = {"prompt_id": prompt.prompt_id, "topic": prompt.topic, "kind": prompt.kind,
                   "instruction": instruction, "model": self.model_name(answer),
                   "finish_reason": answer.finish_reason, "usage": answer.usage, "rejection": reason}
            self.instructions.append(row)
            self.cached_instructions[prompt.prompt_id] = row
            self.usage.append(row)
        return row, None, attempts

    async def answer(self, prompt: Prompt, k: int, messages: list[dict]):
        """Stage 2: the assistant turn, validated and written at once."""
        o = self.options
        outcome = await self.ask(messages, temperature=o.temperature, top_p=o.top_p, max_tokens=o.max_tokens,
                                 seed=o.seed + k)
        if outcome.answer is None:
            return self.record_failure(prompt, k, "answer", outcome.error, messages, outcome.attempts)
        answer = outcome.answer
        reason = rejection(answer, o.reject_truncated, o.reject_refusals)
        row = {"messages": [*messages, {"role": "assistant", "content": answer.content}],
               "model": self.model_name(answer), "prompt_id": prompt.prompt_id, "response_index": k,
               "finish_reason": answer.finish_reason, "usage": answer.usage, "rejection": reason}
        (self.rejected if reason and o.invalid == "drop" else self.answers).append(row)
        self.usage.append(row)
        self.advance("rejected" if reason else "accepted")

    def model_name(self, answer: Answer) -> str:
        """The Hub id asked for; behind --base_url, the name the server reports (it may serve anything)."""
        return (answer.model or self.options.model) if self.options.base_url else self.options.model

    def record_failure(self, prompt: Prompt, k: int, stage: str, error: str | None, messages=None, attempts=None):
        self.failed.append({"prompt_id": prompt.prompt_id, "response_index": k, "stage": stage, "attempts": attempts,
                            "error": error, "messages": messages, "topic": prompt.topic})
        self.advance("failed")

    def advance(self, outcome: str):
        self.stats[outcome] += 1
        self.show_stats()
        self.bar.update()

    def show_stats(self):
        self.bar.set_postfix({**self.stats, "retries": self.retried.total()}, refresh=False)

    def close(self):
        for store in (self.answers, self.rejected, self.failed, self.instructions):
            store.close()
        self.lock.close()


def card_parameters(options: SyntheticOptions) -> dict:
    keys = ["model", "provider", "base_url", "system_prompt", "temperature", "top_p", "max_tokens", "seed",
            "responses_per_prompt", "reject_truncated", "reject_refusals"]
    if not options.prompts:
        keys += ["instructions_per_topic", "instruction_temperature", "instruction_max_tokens"]
    return {key: getattr(options, key) for key in keys}


def push(options: SyntheticOptions, files: OutputFiles):
    counts = file_counts(files, options.price_per_m_input, options.price_per_m_output)
    source = f"prompts from `{options.prompts}`" if options.prompts else "user messages written by the same model from seed topics"
    card = dataset_card(source_model=options.model, license=options.license, prompt_source=source,
                        parameters=card_parameters(options), counts=counts, invalid_policy=options.invalid,
                        pretty_name=options.push_to_hub.split("/")[1])
    # The card first: datasets' push_to_hub then adds its dataset_info/configs to the card's YAML and keeps the text.
    create_repo(options.push_to_hub, repo_type="dataset", private=options.private, exist_ok=True)
    card.push_to_hub(options.push_to_hub)
    rows_to_dataset(read_rows(files.answers)).push_to_hub(options.push_to_hub, private=options.private, split="train")
    print(f"pushed {counts['rows']} rows to https://huggingface.co/datasets/{options.push_to_hub}")


def report(generator: Generator, files: OutputFiles, asked: int):
    o, stats = generator.options, generator.stats
    counts = file_counts(files, o.price_per_m_input, o.price_per_m_output)
    run_tokens = token_totals(generator.usage)
    run_cost = estimated_cost(run_tokens, o.price_per_m_input, o.price_per_m_output)
    print(f"this run: {asked} answers asked, {stats['accepted']} accepted, {stats['rejected']} rejected, "
          f"{stats['failed']} failed" + (f" (in {files.failed}; rerun the same command to retry them)" if stats["failed"] else ""))
    if stats["instruction rejected"]:
        print(f"{stats['instruction rejected']} of them not sent: the user turn written for their prompt (stage 1) was "
              f"rejected; final, kept with the reason in {files.instructions} (delete a line there to have it "
              "written anew)")
    if generator.retried:
        print(f"retries: {generator.retried.total()} ({', '.join(f'{k}: {n}' for k, n in generator.retried.most_common())})")
    print(f"tokens this run: {run_tokens['prompt_tokens']} prompt + {run_tokens['completion_tokens']} completion"
          + (f", about ${run_cost:.2f}" if run_cost is not None else ""))
    rejected = ", ".join(f"{n} {reason}" for reason, n in counts["rejected"].items()) or "none"
    if counts["rejected_instructions"]:
        turns = counts["rejected_instructions"]
        rejected += "; user turns rejected: " + ", ".join(f"{n} {reason}" for reason, n in turns.items())
    print(f"{files.answers}: {counts['rows']} rows ({counts['accepted']} accepted), rejected: {rejected}, "
          f"all runs {counts['prompt_tokens']} + {counts['completion_tokens']} tokens"
          + (f", about ${counts['cost']:.2f}" if counts["cost"] is not None else ""))


def main(options: SyntheticOptions):
    files = OutputFiles.for_output(options.output)
    prompts = build_prompts(options)
    generator = Generator(options, files)
    todo = generator.pending(prompts)
    asked = sum(map(len, todo.values()))
    final = len(generator.rejected_instructions(prompts)) * options.responses_per_prompt
    done = len(prompts) * options.responses_per_prompt - asked - final
    print(f"{len(prompts)} prompts x {options.responses_per_prompt}: {done} done before, "
          + (f"{final} not asked (their user turn was rejected before: final), " if final else "")
          + f"{asked} to ask {options.base_url or options.model}", flush=True)
    try:
        if todo:
            asyncio.run(generator.run(prompts, todo))
    finally:
        generator.close()
    report(generator, files, asked)
    if options.push_to_hub:
        push(options, files)


if __name__ == "__main__":
    try:
        (synthetic_options,) = TrlParser(SyntheticOptions).parse_args_and_config()
        main(synthetic_options)
    except (FatalError, ValueError, OSError) as e:
        sys.exit(redact(f"error: {e}"))
    except KeyboardInterrupt:
        sys.exit("interrupted: every answer received so far is saved; rerun the same command to resume")
    except Exception:  # the traceback, with the token cut out of any message that carried it
        sys.exit(redact(traceback.format_exc()))
