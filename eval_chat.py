"""Judged chat evaluation: our chat model's answers against a baseline's on held-out prompts, compared pairwise by a
judge model (Llama-3.1-405B-Instruct through HF Inference Providers by default, or any OpenAI-compatible server).

Prompts: by default the conversations that `sft.py` held out, made again from the `sft_split.json` it wrote into
the model folder (dataset, filters, eval_size, seed, the held-out rows; refused if the dataset changed since), less
any whose prompt also starts a training conversation: each conversation's turns before its first answer are the
prompt, that answer is the teacher's (the baseline unless --baseline_model is given). Or --prompts: conversations
(a Hub id or file, with --eval_size/--seed/filters to hold rows out as sft.py did, for a model without that record),
a .txt file (one prompt per line) or a .jsonl/.csv/.parquet file with a --prompt_column, which needs
--baseline_model. A prompt set that overlaps the model's training conversations is refused (--allow_train_overlap
true judges it anyway).

Judge (gpt2custom/judge.py): MT-Bench's pairwise prompt; the judgment must contain exactly one of [[A]], [[B]] or
[[C]] (tie). Every prompt is judged in both orders (model first, baseline first) to cancel position bias; a win or
a loss needs both orders to agree, anything else is a tie (MT-Bench's rule). A malformed judgment is asked again
(--verdict_attempts) and otherwise recorded as invalid: never a win, left out of the rates.

Outputs in --output_dir (rerun the same command to resume; a SIGKILL loses at most the requests in flight):
    answers.jsonl    {"prompt_id", "player": "model" | "baseline", "name", "messages", "answer", "finish_reason"}
    verdicts.jsonl   {"prompt_id", "order", "verdict": "A" | "B" | "tie" | null, "winner", "judgment", "usage", ...}
    verdicts.failed.jsonl   games whose requests still failed after --max_attempts (retried by the next run)
    chat_eval.json   win / tie / loss counts and rates with Wilson 95 % intervals, score, position consistency,
                     tokens, dollars and a few side-by-side examples (publish.py --chat_eval puts it on the card)

    python eval_chat.py --model runs/sft-124m --max_prompts 300 --price_per_m_input 3 --price_per_m_output 3
    python eval_chat.py --model runs/sft-124m --prompts prompts.txt --baseline_model openai-community/gpt2 \\
        --base_url http://127.0.0.1:8080/v1 --judge_model local     # any OpenAI-compatible judge
"""

import asyncio
import json
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import AsyncInferenceClient
from tqdm.auto import tqdm
from trl import TrlParser

from gpt2custom.chat import ROLE_TOKENS, add_chat_format, fit_to_context
from gpt2custom.checkpoints import load_model
from gpt2custom.evaluation import write_json
from gpt2custom.judge import ORDERS, JudgeFiles, PairwiseJudge, games_for, summarize
from gpt2custom.sft_data import (
    MESSAGES_COLUMNS,
    SPLIT_FILE,
    load_conversations,
    load_raw,
    messages_column_of,
    read_split_record,
    rebuild_split,
    train_eval_split,
)
from gpt2custom.synthetic import (
    DEFAULT_MODEL,
    FatalError,
    JsonlStore,
    RetryPolicy,
    estimated_cost,
    load_prompts,
    read_rows,
    redact,
    stable_id,
    token_totals,
)
from gpt2custom.tokenizer import load_tokenizer


@dataclass
class ChatEvalOptions:
    model: str = field(metadata={"help": "the chat model: sft.py's output folder or a Hub id"})
    output_dir: str = field(default="runs/chat_eval", metadata={"help": "answers, verdicts and the summary"})
    # Prompts
    prompts: str | None = field(default=None, metadata={
        "help": "None: the prompts sft.py held out (the model folder's sft_split.json); or conversations (Hub id or "
                "file, as sft.py's --dataset_name), or a .txt / prompt-column file"})
    allow_train_overlap: bool = field(default=False, metadata={
        "help": "judge --prompts even when some of them started conversations the model trained on"})
    dataset_config: str | None = None
    dataset_split: str = "train"
    messages_column: str | None = None
    min_quality: str | None = field(default=None, metadata={"help": "as sft.py's, to rebuild its held-out split"})
    max_difficulty: str | None = None
    max_samples: int | None = None
    eval_size: float = field(default=0.01, metadata={"help": "sft.py's --eval_size: the held-out rows are the prompts"})
    seed: int = field(default=42, metadata={"help": "sft.py's --seed (TrainingArguments' default: 42)"})
    prompt_column: str = field(default="prompt", metadata={"help": "column of a prompt file without conversations"})
    max_prompts: int | None = field(default=None, metadata={"help": "the first N held-out prompts"})
    # Baseline
    baseline_model: str | None = field(default=None, metadata={"help": "a second model; None: the teacher's answers"})
    # Generation of the answers
    max_new_tokens: int = 256
    temperature: float = field(default=0.7, metadata={"help": "0 = greedy"})
    top_p: float = 0.95
    repetition_penalty: float = field(default=1.1, metadata={"help": "small models loop without it (as chat.py)"})
    generation_seed: int = 0
    batch_size: int = field(default=8, metadata={"help": "prompts per generate call"})
    device: str | None = field(default=None, metadata={"help": "cuda / cpu; None: cuda when available"})
    # Judge
    judge_model: str = field(default=DEFAULT_MODEL, metadata={"help": "Hub id; with --base_url, the name sent"})
    provider: str | None = field(default=None, metadata={"help": "inference provider; None: the Hub's auto routing"})
    base_url: str | None = field(default=None, metadata={"help": "an OpenAI-compatible judge, http://host:port/v1"})
    judge_max_tokens: int = field(default=1024, metadata={"help": "token limit of a judgment"})
    verdict_attempts: int = field(default=3, metadata={"help": "judgments asked per game until one parses"})
    concurrency: int = field(default=8, metadata={"help": "judge requests in flight at most"})
    timeout: float = field(default=300.0, metadata={"help": "seconds before a request counts as timed out"})
    max_attempts: int = field(default=6, metadata={"help": "attempts per request before the game is recorded failed"})
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    price_per_m_input: float | None = field(default=None, metadata={"help": "$ per 1M judge prompt tokens"})
    price_per_m_output: float | None = field(default=None, metadata={"help": "$ per 1M judge completion tokens"})
    examples: int = field(default=3, metadata={"help": "side-by-side examples in the report and the summary"})

    def __post_init__(self):
        problems = [
            (self.concurrency < 1, f"concurrency={self.concurrency}: expected >= 1"),
            (self.max_attempts < 1, f"max_attempts={self.max_attempts}: expected >= 1"),
            (self.verdict_attempts < 1, f"verdict_attempts={self.verdict_attempts}: expected >= 1"),
            (self.max_new_tokens < 1, f"max_new_tokens={self.max_new_tokens}: expected >= 1"),
            (self.batch_size < 1, f"batch_size={self.batch_size}: expected >= 1"),
            (self.temperature < 0, f"temperature={self.temperature}: expected >= 0"),
            (self.base_url is not None and not self.base_url.startswith(("http://", "https://")),
             f"base_url={self.base_url!r}: expected http(s)://host:port/v1"),
            (self.base_url is not None and self.provider is not None, "give --provider or --base_url, not both"),
        ]
        for failed, message in problems:
            if failed:
                raise ValueError(message)


# -- prompts -----------------------------------------------------------------------------------------------------------

def load_items(o: ChatEvalOptions) -> list[dict]:
    """``{"prompt_id", "messages" (up to the first answer), "question" (the user turn), "reference"}`` per prompt;
    ``reference`` is the teacher's answer, or None for plain prompts. None of them started a conversation the model
    trained on, unless --allow_train_overlap."""
    record_path = Path(o.model) / SPLIT_FILE
    record = read_split_record(o.model) if Path(o.model).is_dir() else None
    if o.prompts is None:
        if record is None:
            raise ValueError(f"--model {o.model} has no {SPLIT_FILE} (sft.py writes it): pass --prompts, with "
                             "sft.py's --eval_size, --seed and filters for conversations")
        train, held_out = rebuild_split(record, str(record_path))
        if len(held_out) == 0:
            raise ValueError(f"{record_path}: the run held nothing out (eval_size {record['eval_size']})")
        items = _dedup([_conversation_item(messages) for messages in held_out["messages"]])
        trained = _questions(train)
        fresh = [item for item in items if _key(item) not in trained]
        if len(fresh) < len(items):
            print(f"{len(items) - len(fresh)} held-out prompts also start a training conversation of "
                  f"{record['dataset']} (duplicates in the dataset): left out", flush=True)
        return fresh[: o.max_prompts]
    items = _items_from_prompts(o)[: o.max_prompts]
    if record is not None and not o.allow_train_overlap:
        trained = _questions(rebuild_split(record, str(record_path))[0])
        overlap = sum(_key(item) in trained for item in items)
        if overlap:
            raise ValueError(f"{overlap} of {len(items)} prompts of --prompts {o.prompts} start conversations "
                             f"{o.model} trained on ({record_path}): leave out --prompts to judge the prompts it "
                             "held out, or pass --allow_train_overlap true")
    return items


def _items_from_prompts(o: ChatEvalOptions) -> list[dict]:
    path = Path(o.prompts)
    if path.suffix != ".txt":
        wanted = {*MESSAGES_COLUMNS, o.messages_column, o.prompt_column} - {None}
        raw = load_raw(o.prompts, config=o.dataset_config, split=o.dataset_split, columns=wanted)
        try:
            messages_column_of(raw, o.prompts, o.messages_column)
        except ValueError:
            raw = None  # no conversations: a prompt column
        if raw is not None:
            dataset = load_conversations(o.prompts, config=o.dataset_config, split=o.dataset_split,
                                         messages_column=o.messages_column, min_quality=o.min_quality,
                                         max_difficulty=o.max_difficulty, max_samples=o.max_samples, seed=o.seed)
            _, held_out = train_eval_split(dataset, o.eval_size, seed=o.seed)
            if held_out is None:
                raise ValueError("--eval_size 0 holds nothing out: give sft.py's --eval_size")
            return _dedup([_conversation_item(row["messages"]) for row in held_out])
    prompts = load_prompts(o.prompts, o.prompt_column, o.dataset_config, o.dataset_split, max_prompts=o.max_prompts)
    return [{"prompt_id": p.prompt_id, "messages": [{"role": "user", "content": p.user}], "question": p.user,
             "reference": None} for p in prompts]


def _key(item: dict) -> str:
    """What makes two prompts the same for the overlap check: the user's question, whitespace aside."""
    return " ".join(item["question"].split())


def _questions(conversations) -> set[str]:
    """The keys of the prompts that start `conversations` (a Dataset with `messages`)."""
    return {_key(_conversation_item(messages)) for messages in conversations["messages"]}


def _conversation_item(messages: list[dict]) -> dict:
    first_answer = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:first_answer]]
    question = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
    return {"prompt_id": stable_id(json.dumps(prompt, sort_keys=True)), "messages": prompt, "question": question,
            "reference": messages[first_answer]["content"]}


def _dedup(items: list[dict]) -> list[dict]:
    seen = set()
    return [i for i in items if i["question"].strip() and not (i["prompt_id"] in seen or seen.add(i["prompt_id"]))]


# -- answers -----------------------------------------------------------------------------------------------------------

def answer_key(row: dict) -> tuple[str, str]:
    return row["prompt_id"], row["player"]


@torch.inference_mode()
def generate_answers(name: str, items: list[dict], o: ChatEvalOptions, store: JsonlStore, player: str):
    """``name``'s answer to every item, ``o.batch_size`` prompts per left-padded ``generate`` call; each batch's rows
    are appended to ``store`` as soon as it is done."""
    device = o.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(name, dtype=torch.bfloat16 if device == "cuda" else torch.float32).to(device).eval()
    tokenizer = load_tokenizer(name)
    if not tokenizer.chat_template:  # a pretrained-only model: our chat format, as serve_openai.py does
        add_chat_format(tokenizer, model.config.vocab_size)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues at the right end of every row
    room = model.config.max_position_embeddings - o.max_new_tokens
    if room < 1:
        raise ValueError(f"--max_new_tokens {o.max_new_tokens} leaves no room for a prompt in {name}'s context")
    # A role marker means the model started the next turn itself: stop there, as at <|endoftext|>.
    stops = [tokenizer.eos_token_id] + [t for t in tokenizer.convert_tokens_to_ids(ROLE_TOKENS)
                                        if t is not None and t != tokenizer.unk_token_id]
    sampling = (dict(do_sample=True, temperature=o.temperature, top_p=o.top_p) if o.temperature > 0
                else dict(do_sample=False))
    for start in tqdm(range(0, len(items), o.batch_size), desc=f"answers ({player})", unit="batch"):
        batch = items[start : start + o.batch_size]
        texts = [tokenizer.apply_chat_template(fit_to_context(tokenizer, item["messages"], room), tokenize=False,
                                               add_generation_prompt=True) for item in batch]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        torch.manual_seed(o.generation_seed + start)  # a batch's answers do not depend on what ran before it
        out = model.generate(**inputs, max_new_tokens=o.max_new_tokens, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id, repetition_penalty=o.repetition_penalty, **sampling)
        for item, ids in zip(batch, out[:, inputs["input_ids"].shape[1]:].tolist()):
            ended = [i for i, t in enumerate(ids) if t in stops]
            ids = ids[: ended[0]] if ended else ids
            store.append({"prompt_id": item["prompt_id"], "player": player, "name": name,
                          "messages": item["messages"], "answer": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                          "finish_reason": "stop" if ended else "length"})
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def collect_answers(items: list[dict], o: ChatEvalOptions, out_dir: Path) -> list[dict]:
    """Generate what is missing (the model's answers; the baseline model's, or the teacher's from the dataset) and
    return the judge's input: ``{"prompt_id", "question", "model_answer", "baseline_answer"}``."""
    store = JsonlStore(out_dir / "answers.jsonl", key=answer_key)
    try:
        for player, name in (("model", o.model), ("baseline", o.baseline_model)):
            todo = [item for item in items if (item["prompt_id"], player) not in store]
            if not todo:
                continue
            if name is None:  # the teacher's answers, written like generated ones so the file is the full record
                for item in todo:
                    store.append({"prompt_id": item["prompt_id"], "player": player, "name": "reference",
                                  "messages": item["messages"], "answer": item["reference"], "finish_reason": None})
            else:
                print(f"generating {len(todo)} answers with {name}", flush=True)
                generate_answers(name, todo, o, store, player)
    finally:
        store.close()
    answers = {answer_key(row): row["answer"] for row in read_rows(out_dir / "answers.jsonl")}
    return [{"prompt_id": item["prompt_id"], "question": item["question"],
             "model_answer": answers[item["prompt_id"], "model"],
             "baseline_answer": answers[item["prompt_id"], "baseline"]} for item in items]


# -- the run -----------------------------------------------------------------------------------------------------------

RUN_KEYS = ("model", "baseline_model", "prompts", "dataset_config", "dataset_split", "eval_size", "seed",
            "judge_model", "base_url", "provider", "judge_max_tokens",  # the judge is its server too, not its name
            "max_new_tokens", "temperature", "top_p", "repetition_penalty", "generation_seed")


def check_same_run(o: ChatEvalOptions, out_dir: Path):
    """Answers and verdicts of another configuration must not mix into this one's rates."""
    path = out_dir / "run.json"
    wanted = {k: getattr(o, k) for k in RUN_KEYS}
    if path.exists():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = {k: (before.get(k), v) for k, v in wanted.items() if before.get(k) != v}
        if changed:
            raise ValueError(f"{out_dir} holds a run with other settings ({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changed.items())}): "
                             "use another --output_dir")
    else:
        write_json(path, wanted)


def side_by_side(items: list[dict], verdicts: list[dict], outcomes: dict[str, str], k: int) -> list[dict]:
    """Up to ``k`` judged prompts, a win, a loss and a tie first when there are, for the report and the card."""
    judged = {}
    for row in verdicts:
        judged.setdefault(row["prompt_id"], {})[row["order"]] = {"verdict": row["verdict"], "winner": row["winner"],
                                                                 "judgment": row["judgment"]}
    picked, order = [], {"win": 0, "loss": 1, "tie": 2}
    candidates = sorted((i for i in items if outcomes.get(i["prompt_id"]) in order),
                        key=lambda i: order[outcomes[i["prompt_id"]]])
    for outcome in order:  # one of each first, then the rest in order
        picked += [i for i in candidates if outcomes[i["prompt_id"]] == outcome][:1]
    picked += [i for i in candidates if i not in picked]
    return [{**item, "outcome": outcomes[item["prompt_id"]], "games": judged.get(item["prompt_id"], {})}
            for item in picked[:k]]


def summary(o: ChatEvalOptions, items: list[dict], files: JudgeFiles) -> dict:
    verdicts = read_rows(files.verdicts)
    ids = {i["prompt_id"] for i in items}
    verdicts = [v for v in verdicts if v["prompt_id"] in ids]  # --max_prompts may have shrunk since
    stats = summarize(verdicts, [i["prompt_id"] for i in items])
    tokens = token_totals(verdicts)
    outcomes = stats.pop("outcomes")
    stats.pop("prompts")  # the count; the prompts' description below says it
    return {
        "model": o.model,
        "baseline": o.baseline_model or f"reference answers of {o.prompts or 'the held-out conversations'}",
        "judge": {"model": o.judge_model, "endpoint": o.base_url or (o.provider or "HF Inference Providers (auto)"),
                  "prompt": "MT-Bench pairwise (pair-v2), both orders", "max_tokens": o.judge_max_tokens},
        "prompts": ({"source": f"{o.model}/{SPLIT_FILE}", "held_out": "by sft.py", "n": len(items)}
                    if o.prompts is None else
                    {"source": o.prompts, "held_out": o.eval_size if Path(o.prompts).suffix != ".txt" else None,
                     "seed": o.seed, "n": len(items)}),
        "generation": {k: getattr(o, k) for k in ("max_new_tokens", "temperature", "top_p", "repetition_penalty",
                                                  "generation_seed")},
        **stats,
        "failed_games": len(read_rows(files.failed)),
        "tokens": tokens,
        "cost": estimated_cost(tokens, o.price_per_m_input, o.price_per_m_output),
        "examples": side_by_side(items, verdicts, outcomes, o.examples),
    }


def report(result: dict, run_tokens: dict, run_cost: float | None):
    c, r = result["counts"], result["rates"]

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    print(f"\n{result['model']} vs {result['baseline']}, judged by {result['judge']['model']} in both orders")
    print(f"prompts {result['prompts']['n']}: decided {result['decided']}, invalid verdicts {c['invalid']}, "
          f"pending {c['pending']}" + (f" ({result['failed_games']} games failed: rerun the same command to retry "
                                      "them)" if result["failed_games"] else ""))
    for outcome in ("win", "tie", "loss"):
        lo, hi = r[outcome]["ci95"]
        print(f"  {outcome:<4} {c[outcome]:>5}  {pct(r[outcome]['rate']):>6}  95% CI [{pct(lo)}, {pct(hi)}]")
    if result["score"]:
        lo, hi = result["score"]["ci95"]
        print(f"  score (win + tie/2) {pct(result['score']['value'])}  95% CI [{pct(lo)}, {pct(hi)}]")
    print(f"  position consistency {pct(result['position_consistency'])}; picks by order: "
          + "; ".join(f"{order}: {result['games'].get(order, {})}" for order in ORDERS))
    print(f"judge tokens: this run {run_tokens['prompt_tokens']} + {run_tokens['completion_tokens']}"
          + (f" (about ${run_cost:.2f})" if run_cost is not None else "")
          + f"; all runs {result['tokens']['prompt_tokens']} + {result['tokens']['completion_tokens']}"
          + (f" (about ${result['cost']:.2f})" if result["cost"] is not None else ""))
    for ex in result["examples"]:
        print(f"\n--- {ex['outcome'].upper()}: {ex['question'][:300]}")
        print(f"[model]    {ex['model_answer'][:400]}")
        print(f"[baseline] {ex['baseline_answer'][:400]}")
        print("verdicts: " + ", ".join(f"{order} -> {g['winner']}" for order, g in ex["games"].items()))


def main(o: ChatEvalOptions):
    out_dir = Path(o.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = load_items(o)
    if not items:
        raise ValueError(f"--prompts {o.prompts}: no prompts to evaluate")
    if o.baseline_model is None and any(item["reference"] is None for item in items):  # a .txt or prompt column
        raise ValueError(f"--prompts {o.prompts} has no reference answers: pass --baseline_model")
    check_same_run(o, out_dir)
    pairs = collect_answers(items, o, out_dir)
    files = JudgeFiles.for_output(out_dir / "verdicts.jsonl")
    judge = PairwiseJudge(files, model=o.judge_model, verdict_attempts=o.verdict_attempts, concurrency=o.concurrency,
                          policy=RetryPolicy(o.max_attempts, o.backoff_base, o.backoff_max),
                          temperature=0.0, max_tokens=o.judge_max_tokens)
    try:
        games = judge.pending(games_for(pairs))
        print(f"{len(items)} prompts x {len(ORDERS)} orders: {2 * len(items) - len(games)} judged before, "
              f"{len(games)} to ask {o.base_url or o.judge_model}", flush=True)
        if games:
            client_args = {"base_url": o.base_url} if o.base_url else {"provider": o.provider}

            async def run():
                async with AsyncInferenceClient(timeout=o.timeout, **client_args) as client:
                    await judge.run(client, games)

            asyncio.run(run())
    finally:
        judge.close()
    result = summary(o, pairs, files)
    write_json(out_dir / "chat_eval.json", result)
    run_tokens = judge.tokens()
    report(result, run_tokens, estimated_cost(run_tokens, o.price_per_m_input, o.price_per_m_output))
    print(f"\nwrote {out_dir / 'chat_eval.json'}, {files.verdicts} and {out_dir / 'answers.jsonl'}")
    return result


def cli(argv=None):
    """Parse the options and run; bad input ends in one line on stderr, never a traceback with the token in it."""
    try:
        (options,) = TrlParser(ChatEvalOptions).parse_args_and_config(argv)
        return main(options)
    except (FatalError, ValueError, OSError) as e:
        sys.exit(redact(f"eval_chat.py: error: {e}"))
    except KeyboardInterrupt:
        sys.exit("interrupted: every answer and verdict received so far is saved; rerun the same command to resume")
    except Exception:  # the traceback, with the token cut out of any message that carried it
        sys.exit(redact(traceback.format_exc()))


if __name__ == "__main__":
    cli()
