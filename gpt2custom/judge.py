"""Pairwise LLM-as-a-judge for chat models: the judge prompt, the verdict format, position-bias control, the
concurrent resumable judging run, and win / tie / loss rates with confidence intervals.

The judge prompt is MT-Bench's pairwise prompt ("pair-v2", Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench
and Chatbot Arena"). The verdict format is fixed: the judgment must contain exactly one of ``[[A]]`` (assistant A is
better), ``[[B]]`` (B is better) or ``[[C]]`` (a tie), as MT-Bench's parser expects; anything else (none of them, or
two different ones) is malformed. A malformed judgment is asked again (``verdict_attempts``) and, if it stays
malformed, recorded with ``verdict: null`` and ``winner: "invalid"``: paid for, never asked again, never a win.

Each prompt is judged twice, the model's answer first (``model_first``: model = A) and the baseline's first
(``baseline_first``: baseline = A), to cancel the judge's preference for a position. The prompt's outcome follows
MT-Bench's conservative rule: a win (loss) only when both orders prefer the model (baseline); a tie in either order,
or two orders that disagree, make a tie. A prompt with an invalid or missing game is left out of the rates and
counted apart.

The run reuses `generate_synthetic.py`'s client machinery (`gpt2custom.synthetic`): retries with backoff around
`AsyncInferenceClient.chat_completion`, a crash-safe JSONL store keyed by (prompt id, order), a lock against two runs
on one output, token totals and cost. A SIGKILL loses at most the verdicts in flight; rerunning resumes.
"""

import asyncio
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .files import exclusive_lock
from .synthetic import JsonlStore, RetryPolicy, ask_with_retries, token_totals

ORDERS = ("model_first", "baseline_first")
OUTCOMES = ("win", "tie", "loss")

JUDGE_SYSTEM_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. You should choose the assistant that follows the user's instructions and "
    "answers the user's question better. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by "
    "comparing the two responses and provide a short explanation. Avoid any position biases and ensure that the "
    "order in which the responses were presented does not influence your decision. Do not allow the length of the "
    "responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective as "
    "possible. After providing your explanation, output your final verdict by strictly following this format: "
    '"[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.'
)
JUDGE_USER_TEMPLATE = (
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)
VERDICT = re.compile(r"\[\[([ABC])\]\]")
VERDICT_NAMES = {"A": "A", "B": "B", "C": "tie"}


def judge_messages(question: str, answer_a: str, answer_b: str) -> list[dict]:
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT},
            {"role": "user", "content": JUDGE_USER_TEMPLATE.format(question=question, answer_a=answer_a,
                                                                   answer_b=answer_b)}]


def parse_verdict(judgment: str) -> str | None:
    """"A", "B" or "tie" when the judgment holds exactly one distinct verdict token; None when it is malformed."""
    found = set(VERDICT.findall(judgment))
    return VERDICT_NAMES[found.pop()] if len(found) == 1 else None


def game_winner(order: str, verdict: str | None) -> str:
    """"model", "baseline", "tie" or "invalid": the verdict of one game mapped back from positions to players."""
    if verdict is None:
        return "invalid"
    if verdict == "tie":
        return "tie"
    model_position = "A" if order == "model_first" else "B"
    return "model" if verdict == model_position else "baseline"


def prompt_outcome(winners: dict[str, str]) -> str:
    """"win", "tie", "loss" of the model on one prompt from its two games' winners, or "invalid" when a game is
    missing or malformed (MT-Bench's rule: a win or a loss needs both orders to agree)."""
    games = [winners.get(order, "invalid") for order in ORDERS]
    if "invalid" in games:
        return "invalid"
    if games == ["model", "model"]:
        return "win"
    if games == ["baseline", "baseline"]:
        return "loss"
    return "tie"


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n (95 % by default); (0, 1) when n is 0. Unlike the normal
    approximation it stays inside [0, 1] and is usable for the few hundred prompts a judged evaluation has."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def summarize(verdicts: list[dict], prompt_ids: list[str]) -> dict:
    """Counts and rates over ``prompt_ids`` from the verdict rows (``prompt_id``, ``order``, ``winner``).

    ``outcomes``: per prompt, "win"/"tie"/"loss"/"invalid"/"pending" (a game not judged yet, e.g. failed requests).
    ``rates``: each of win/tie/loss over the decided prompts with its Wilson 95 % interval. ``score``: (wins +
    ties / 2) / decided, with a normal 95 % interval from the per-prompt scores (1, 0.5, 0). ``games``: per order,
    how often the judge picked A, B, a tie or nothing, and how often the two orders agreed (position consistency)."""
    by_prompt: dict[str, dict[str, str]] = {}
    for row in verdicts:
        by_prompt.setdefault(row["prompt_id"], {})[row["order"]] = row["winner"]
    outcomes = {}
    for pid in prompt_ids:
        winners = by_prompt.get(pid, {})
        outcomes[pid] = "pending" if len(winners) < len(ORDERS) and "invalid" not in winners.values() \
            else prompt_outcome(winners)
    counts = Counter(outcomes.values())
    decided = sum(counts[o] for o in OUTCOMES)
    rates = {o: {"rate": counts[o] / decided if decided else None, "ci95": list(wilson_interval(counts[o], decided))}
             for o in OUTCOMES}
    scores = [1.0] * counts["win"] + [0.5] * counts["tie"] + [0.0] * counts["loss"]
    score = None
    if scores:
        mean = sum(scores) / len(scores)
        sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)) if len(scores) > 1 else 0.0
        half = 1.959964 * sd / math.sqrt(len(scores))
        score = {"value": mean, "ci95": [max(0.0, mean - half), min(1.0, mean + half)]}
    games = {order: dict(Counter(_position(row) for row in verdicts if row["order"] == order)) for order in ORDERS}
    both = [w for w in by_prompt.values() if all(w.get(o) in ("model", "baseline", "tie") for o in ORDERS)]
    consistency = sum(w[ORDERS[0]] == w[ORDERS[1]] for w in both) / len(both) if both else None
    return {"prompts": len(prompt_ids), "decided": decided,
            "counts": {o: counts[o] for in_order in (OUTCOMES, ("invalid", "pending")) for o in in_order},
            "rates": rates, "score": score, "games": games, "position_consistency": consistency,
            "outcomes": outcomes}


def _position(row: dict) -> str:
    return {None: "invalid", "tie": "tie"}.get(row.get("verdict"), row.get("verdict"))


# -- the judging run -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JudgeFiles:
    """The files of one judging run, named after its verdicts file (`x.jsonl`, `x.failed.jsonl`, `x.lock`)."""

    verdicts: Path  # one row per (prompt id, order): the verdict, the judgment, tokens; appended as they arrive
    failed: Path  # games whose requests failed after every retry in the latest run: asked again by the next run
    lock: Path

    @classmethod
    def for_output(cls, verdicts: "str | Path") -> "JudgeFiles":
        path = Path(verdicts)
        stem = path.name.removesuffix(".jsonl")
        return cls(path, path.with_name(f"{stem}.failed.jsonl"), path.with_name(f"{stem}.lock"))


def verdict_key(row: dict) -> tuple[str, str]:
    return row["prompt_id"], row["order"]


@dataclass
class Game:
    prompt_id: str
    order: str
    question: str
    answer_a: str
    answer_b: str


def games_for(items: list[dict]) -> list[Game]:
    """Both orders of every ``{"prompt_id", "question", "model_answer", "baseline_answer"}``."""
    games = []
    for item in items:
        pair = (item["model_answer"], item["baseline_answer"])
        for order in ORDERS:
            a, b = pair if order == "model_first" else pair[::-1]
            games.append(Game(item["prompt_id"], order, item["question"], a, b))
    return games


class PairwiseJudge:
    """Judges every pending game, ``concurrency`` requests in flight, and writes each verdict the moment it is known.

    ``client`` is an (async) ``AsyncInferenceClient``; ``params`` go to every ``chat_completion`` call."""

    def __init__(self, files: JudgeFiles, *, model: str, policy: RetryPolicy, verdict_attempts: int = 3,
                 concurrency: int = 8, seed: int = 0, **params):
        files.verdicts.parent.mkdir(parents=True, exist_ok=True)
        self.lock = exclusive_lock(files.lock, "another --output_dir")
        self.verdicts = JsonlStore(files.verdicts, key=verdict_key)
        self.failed = JsonlStore(files.failed, key=verdict_key, truncate=True)
        self.model, self.policy, self.verdict_attempts = model, policy, verdict_attempts
        self.concurrency, self.seed, self.params = concurrency, seed, params
        self.stats, self.retried, self.usage = Counter(), Counter(), []

    def pending(self, games: list[Game]) -> list[Game]:
        return [g for g in games if (g.prompt_id, g.order) not in self.verdicts]

    async def run(self, client, games: list[Game]):
        self.client = client
        self.semaphore = asyncio.Semaphore(self.concurrency)  # requests in flight
        self.bar = tqdm(total=len(games), desc="verdicts", unit="verdict", dynamic_ncols=True)
        queue = iter(games)

        async def worker():  # twice as many workers as slots: games waiting out a backoff leave the slot to others
            for game in queue:
                await self.judge(game)

        workers = [asyncio.create_task(worker()) for _ in range(2 * self.concurrency)]
        try:
            await asyncio.gather(*workers)
        finally:  # a fatal error in one worker stops the others
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            self.bar.close()

    async def judge(self, game: Game):
        """Ask until the verdict parses (at most ``verdict_attempts`` answers); every answer's tokens are counted."""
        messages = judge_messages(game.question, game.answer_a, game.answer_b)
        usage, requests, judgments = Counter(), 0, []
        for attempt in range(self.verdict_attempts):
            # A new seed per attempt: a server that honours seeds would repeat the same malformed text.
            outcome = await ask_with_retries(self.client, messages, model=self.model, policy=self.policy,
                                             semaphore=self.semaphore, on_retry=self.note_retry,
                                             seed=self.seed + attempt, **self.params)
            requests += outcome.attempts
            if outcome.answer is None:
                self.failed.append({"prompt_id": game.prompt_id, "order": game.order, "attempts": requests,
                                    "error": outcome.error})
                return self.advance("failed")
            usage.update({k: v for k, v in outcome.answer.usage.items() if v})
            judgments.append(outcome.answer.content)
            verdict = parse_verdict(outcome.answer.content)
            if verdict is not None:
                break
            self.stats["malformed"] += 1
        row = {"prompt_id": game.prompt_id, "order": game.order, "verdict": verdict,
               "winner": game_winner(game.order, verdict), "judgment": judgments[-1], "judge_answers": len(judgments),
               "requests": requests, "usage": dict(usage), "judge_model": self.model}
        if verdict is None:
            row["malformed_judgments"] = judgments
        self.verdicts.append(row)
        self.usage.append(row)
        self.advance("invalid" if verdict is None else "judged")

    def note_retry(self, error: str):
        self.retried[error.split(":")[0]] += 1
        self.show_stats()

    def advance(self, outcome: str):
        self.stats[outcome] += 1
        self.show_stats()
        self.bar.update()

    def show_stats(self):
        self.bar.set_postfix({**self.stats, "retries": self.retried.total()}, refresh=False)

    def tokens(self) -> dict[str, int]:
        """Tokens of this run's judgments (the stores hold every run's)."""
        return token_totals(self.usage)

    def close(self):
        for store in (self.verdicts, self.failed):
            store.close()
        self.lock.close()
