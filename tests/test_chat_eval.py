"""eval_chat.py and gpt2custom/judge.py: the verdict format, MT-Bench's two-order rule and the rates on a hand-checked
case; end to end against a judge on 127.0.0.1 that fails a share of requests (429, 500, 503, timeouts), writes
malformed verdicts, and is SIGKILLed mid-run then resumed."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter

import huggingface_hub
import pytest

import eval_chat
from conftest import REPO, serve_json
from gpt2custom.judge import (
    game_winner,
    games_for,
    judge_messages,
    parse_verdict,
    summarize,
    wilson_interval,
)
from gpt2custom.sft_data import load_conversations, train_eval_split
from gpt2custom.synthetic import read_rows

# ----------------------------------------------------------------------------------------------- the pure parts


@pytest.mark.parametrize("judgment, verdict", [
    ("A is clearer. [[A]]", "A"),
    ("Both miss the point.\n\n[[C]]", "tie"),
    ("[[B]] B answers the question; I repeat: [[B]]", "B"),  # the same verdict twice is still one verdict
    ("A is better.", None),  # no token
    ("[[A]] ... on reflection [[B]]", None),  # two different verdicts
    ("[A]", None),
    ("[[D]]", None),
])
def test_verdict_needs_exactly_one_of_the_three_tokens(judgment, verdict):
    assert parse_verdict(judgment) == verdict


def test_orders_map_positions_back_to_players():
    games = games_for([{"prompt_id": "p", "question": "q?", "model_answer": "mine", "baseline_answer": "theirs"}])
    assert [(g.order, g.answer_a, g.answer_b) for g in games] == [("model_first", "mine", "theirs"),
                                                                  ("baseline_first", "theirs", "mine")]
    user = judge_messages("q?", "mine", "theirs")[1]["content"]
    assert user.index("mine") < user.index("theirs") and "[User Question]\nq?" in user
    assert [game_winner("model_first", v) for v in ("A", "B", "tie", None)] == ["model", "baseline", "tie", "invalid"]
    assert [game_winner("baseline_first", v) for v in ("A", "B", "tie", None)] == ["baseline", "model", "tie",
                                                                                  "invalid"]


def test_hand_checked_rates_with_mt_bench_rule_and_wilson_intervals():
    # prompt: (winner when the model is A, winner when the baseline is A)
    games = {
        "p1": ("model", "model"),  # win
        "p2": ("model", "model"),  # win
        "p3": ("model", "model"),  # win
        "p4": ("baseline", "baseline"),  # loss
        "p5": ("tie", "tie"),  # tie
        "p6": ("model", "baseline"),  # the judge always picked A: position bias -> tie
        "p7": ("model", "tie"),  # one tie -> tie
        "p8": ("model", "model"),  # win
        "p9": ("model", "invalid"),  # a malformed verdict: left out, never a win
        "p10": ("model", None),  # the second game not judged yet (a failed request)
    }
    rows = [{"prompt_id": p, "order": order, "winner": w, "verdict": None if w == "invalid" else "A"}
            for p, pair in games.items() for order, w in zip(("model_first", "baseline_first"), pair) if w]
    s = summarize(rows, list(games))
    assert s["counts"] == {"win": 4, "tie": 3, "loss": 1, "invalid": 1, "pending": 1}
    assert s["decided"] == 8
    assert s["outcomes"]["p6"] == "tie" and s["outcomes"]["p9"] == "invalid" and s["outcomes"]["p10"] == "pending"
    assert s["rates"]["win"]["rate"] == 0.5 and s["rates"]["tie"]["rate"] == 0.375 and s["rates"]["loss"]["rate"] == 0.125
    # Wilson 95 % for 4/8, worked by hand: centre (0.5 + 1.96²/16) / (1 + 1.96²/8) = 0.5,
    # half-width 1.96 / 1.4802 * sqrt(0.25/8 + 1.96²/256) = 0.2848  ->  [0.2152, 0.7848]
    assert s["rates"]["win"]["ci95"] == pytest.approx([0.2152, 0.7848], abs=5e-5)
    # 1/8: [0.0224, 0.4709] (Wilson, the usual tables)
    assert s["rates"]["loss"]["ci95"] == pytest.approx([0.0224, 0.4709], abs=5e-5)
    # score = (4 + 3/2) / 8; per-prompt scores 1,1,1,1,.5,.5,.5,0: squared deviations sum to 0.96875, sample sd
    # sqrt(0.96875 / 7) = 0.37201 -> half-width 1.96 * 0.37201 / sqrt(8) = 0.25779
    assert s["score"]["value"] == 0.6875
    assert s["score"]["ci95"] == pytest.approx([0.6875 - 0.25779, 0.6875 + 0.25779], abs=5e-5)
    # position consistency over prompts with two valid games: p1-p5 and p8 agree, p6 and p7 do not
    assert s["position_consistency"] == pytest.approx(6 / 8)


def test_wilson_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 5), (3, 7), (50, 100), (99, 100)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-6)


# ------------------------------------------------------------------------------------------- end to end

REFERENCE = "<<REFERENCE ANSWER>>"
# What the scripted judge does for each plan, and the prompt's outcome that follows (worked out by hand).
PLANS = {
    "win": "win",  # prefers the model's answer in both orders
    "loss": "loss",  # prefers the reference in both orders
    "tie": "tie",  # [[C]] in both orders
    "bias": "tie",  # always [[A]]: the two orders disagree
    "split": "tie",  # the model when it is A, [[C]] when it is B
    "flaky": "win",  # the first judgment of each game has no verdict, the next prefers the model
    "mute": "invalid",  # never a verdict
    "torn": "invalid",  # two different verdicts in one judgment
}
FAULTS = (429, 500, 503, "timeout", None)  # the first request of a game fails like this, chosen by a hash of the game
CLIENT_TIMEOUT = 1.0


class ScriptedJudge:
    """An OpenAI-compatible judge on 127.0.0.1. The verdict format is MT-Bench's ([[A]], [[B]], [[C]]); which one it
    writes follows the plan named in the question ("plan=win", ...), the reference answer being the one that
    carries REFERENCE. After `gate_after` judgments it holds every request until `gate` is set."""

    def __init__(self, gate_after: int | None = None):
        self.lock = threading.Lock()
        self.requests, self.answered = Counter(), Counter()  # per game: requests seen, judgments sent
        self.held, self.gate, self.gate_after, self.sent = 0, threading.Event(), gate_after, 0
        self.server = serve_json(self.respond)
        self.url = self.server.url + "/v1"

    def respond(self, method, path, headers, body):
        user = json.loads(body)["messages"][-1]["content"]
        question = user.split("[User Question]\n", 1)[1].split("\n\n[The Start", 1)[0]
        plan, prompt = question.split("plan=", 1)[1].split()[0], question.split()[0]
        a = user.split("[The Start of Assistant A's Answer]", 1)[1].split("[The End of Assistant A's Answer]")[0]
        order = "baseline_first" if REFERENCE in a else "model_first"
        game = (prompt, order)
        with self.lock:
            self.requests[game] += 1
            first = self.requests[game] == 1
            gated = self.gate_after is not None and self.sent >= self.gate_after
            self.held += gated
        if gated:
            self.gate.wait(timeout=120)
            return 503, {"error": "released after the test"}
        fault = FAULTS[zlib.crc32(repr(game).encode()) % len(FAULTS)] if first else None
        if fault == "timeout":
            time.sleep(CLIENT_TIMEOUT + 0.5)
            return 200, self.completion("[[C]] (too late: the client has given up)")
        if fault:
            return fault, {"error": {"message": f"scripted {fault}"}}
        model, reference = ("A", "B") if order == "model_first" else ("B", "A")
        with self.lock:
            self.answered[game] += 1
            nth = self.answered[game]
            self.sent += 1
        text = {"win": f"[[{model}]]", "loss": f"[[{reference}]]", "tie": "[[C]]", "bias": "[[A]]",
                "split": "[[A]]" if order == "model_first" else "[[C]]",
                "flaky": "Both answers have merit." if nth == 1 else f"[[{model}]]",
                "mute": "I would rather not say.", "torn": "[[A]], or perhaps [[B]]"}[plan]
        return 200, self.completion(f"Comparing the two answers. {text}")

    @staticmethod
    def completion(content: str) -> dict:
        return {"id": "j", "object": "chat.completion", "created": 0, "model": "scripted-judge",
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}}


def write_conversations(path, n_per_plan=2):
    rows = [{"messages": [{"role": "user", "content": f"P{i}-{plan} plan={plan} Tell me about tea."},
                          {"role": "assistant", "content": f"{REFERENCE} Tea is a drink."}]}
            for i, plan in enumerate(p for p in PLANS for _ in range(n_per_plan))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def eval_args(checkpoint, conversations, out_dir, url):
    return ["eval_chat.py", "--model", checkpoint, "--prompts", conversations, "--eval_size", "12", "--seed", "3",
            "--output_dir", out_dir, "--base_url", url, "--judge_model", "scripted", "--max_new_tokens", "6",
            "--batch_size", "4", "--concurrency", "4", "--timeout", str(CLIENT_TIMEOUT), "--backoff_base", "0.01",
            "--backoff_max", "0.05", "--max_attempts", "4", "--verdict_attempts", "2",
            "--price_per_m_input", "2", "--price_per_m_output", "10"]


@pytest.mark.slow
def test_faults_sigkill_and_resume_judge_every_prompt_in_both_orders_once(tiny_checkpoint, tmp_path, monkeypatch,
                                                                        capsys):
    conversations = write_conversations(tmp_path / "chats.jsonl")
    out = tmp_path / "eval"
    judge = ScriptedJudge(gate_after=6)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "0"}
    args = eval_args(tiny_checkpoint, conversations, out, judge.url)
    log = (tmp_path / "killed.log").open("w")  # a file, not a pipe nobody reads while the run goes on
    victim = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        # Kill while requests are held: some verdicts are written, the others still in flight.
        while not (judge.held and (out / "verdicts.jsonl").exists() and read_rows(out / "verdicts.jsonl")):
            assert victim.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the judging never reached the gate"
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        before_kill = {(r["prompt_id"], r["order"]) for r in read_rows(out / "verdicts.jsonl")}
        requests_before = Counter(judge.requests)
        judge.gate_after = None
        judge.gate.set()
        # The resumed run in this process (its answers are all on disk: no model to load), online for 127.0.0.1.
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        eval_chat.cli([str(a) for a in args[1:]])
        resumed = capsys.readouterr()
    finally:
        judge.gate.set()
        judge.server.shutdown()
        if victim.poll() is None:
            victim.kill()
        log.close()
    assert 0 < len(before_kill) < 24

    # The prompts are the 12 conversations sft.py held out with the same --eval_size and --seed.
    _, held_out = train_eval_split(load_conversations(str(conversations)), 12, seed=3)
    expected_questions = sorted(row["messages"][0]["content"] for row in held_out)
    answers = read_rows(out / "answers.jsonl")
    assert sorted(r["messages"][0]["content"] for r in answers if r["player"] == "model") == expected_questions
    assert all(REFERENCE in r["answer"] for r in answers if r["player"] == "baseline")
    assert Counter(r["player"] for r in answers) == {"model": 12, "baseline": 12}

    # Every prompt judged in both orders exactly once; what was written before the kill was not asked again.
    verdicts = read_rows(out / "verdicts.jsonl")
    keys = [(r["prompt_id"], r["order"]) for r in verdicts]
    assert len(keys) == len(set(keys)) == 24
    question_of = {r["prompt_id"]: r["messages"][0]["content"] for r in answers}
    game_of = {key: (question_of[key[0]].split()[0], key[1]) for key in keys}
    for key in before_kill:
        assert judge.requests[game_of[key]] == requests_before[game_of[key]], key
    assert read_rows(out / "verdicts.failed.jsonl") == []

    # Malformed verdicts: "flaky" asked again and counted, "mute" and "torn" recorded as invalid, never a win.
    plan_of = {key: question_of[key[0]].split("plan=")[1].split()[0] for key in keys}
    for row in verdicts:
        plan = plan_of[row["prompt_id"], row["order"]]
        if plan in ("mute", "torn"):
            assert row["verdict"] is None and row["winner"] == "invalid" and len(row["malformed_judgments"]) == 2
        if plan == "flaky":  # its first judgment may have been sent to the killed run: then one judgment here
            game = game_of[row["prompt_id"], row["order"]]
            assert row["winner"] == "model" and judge.answered[game] >= 2
            assert row["judge_answers"] == 2 or requests_before[game] > 0

    result = json.loads((out / "chat_eval.json").read_text())
    held_plans = [q.split("plan=")[1].split()[0] for q in expected_questions]
    expected = Counter(PLANS[p] for p in held_plans)
    assert {k: v for k, v in result["counts"].items() if v} == dict(expected)
    decided = sum(expected[o] for o in ("win", "tie", "loss"))
    assert result["rates"]["win"]["rate"] == pytest.approx(expected["win"] / decided)
    # Tokens: every judgment written is counted (100 + 10 each), at $2 / $10 per million.
    judgments = sum(r["judge_answers"] for r in verdicts)
    assert result["tokens"] == {"prompt_tokens": 100 * judgments, "completion_tokens": 10 * judgments}
    assert result["cost"] == pytest.approx((200 * judgments + 100 * judgments) / 1e6)
    assert result["examples"] and {"question", "model_answer", "baseline_answer", "outcome"} <= set(result["examples"][0])
    assert f"{len(before_kill)} judged before, {24 - len(before_kill)} to ask" in resumed.out
    assert "95% CI" in resumed.out and ("--- WIN" in resumed.out) == bool(expected["win"])


def test_prompts_without_reference_answers_need_a_baseline_model(tiny_checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is tea?\nWhy is the sky blue?\n")
    with pytest.raises(SystemExit) as exit_:
        eval_chat.cli(["--model", str(tiny_checkpoint), "--prompts", str(prompts), "--output_dir", str(tmp_path / "out")])
    assert exit_.value.code == f"eval_chat.py: error: --prompts {prompts} has no reference answers: pass --baseline_model"
    assert not (tmp_path / "out" / "answers.jsonl").exists()


def test_model_card_shows_the_judged_win_rate_and_side_by_side_examples(tiny_checkpoint, tmp_path):
    import shutil

    from gpt2custom.hub import write_model_card

    rows = [{"prompt_id": p, "order": o, "winner": w, "verdict": "A"}
            for p, w in (("a", "model"), ("b", "model"), ("c", "baseline")) for o in ("model_first", "baseline_first")]
    stats = summarize(rows, ["a", "b", "c"])
    stats.pop("outcomes")
    chat = {**stats, "model": "me/tiny", "baseline": "reference answers", "judge": {"model": "judge-405b"},
            "prompts": {"source": "chats.jsonl", "n": 3},
            "examples": [{"question": "Why is tea hot?", "model_answer": "Because kettles.",
                          "baseline_answer": "It is brewed with boiling water.", "outcome": "win"}]}
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model_dir)
    card = write_model_card(model_dir, model_id="me/tiny", chat_eval=chat)
    (entry, score) = card.data.eval_results
    assert entry.metric_type == "win_rate" and entry.metric_value == pytest.approx(2 / 3)
    assert "judge-405b" in entry.metric_name and score.metric_value == pytest.approx(2 / 3)
    text = (model_dir / "README.md").read_text()
    assert "| win | 2 | 0.667 |" in text and "| loss | 1 | 0.333 |" in text
    assert "**This model:** Because kettles." in text and "Not evaluated yet" in text  # no benchmark JSON given


def test_a_rerun_against_another_judge_server_is_refused(tmp_path):
    """Verdicts are the judge's: the same judge name behind another server, provider or token limit is another judge,
    so its verdicts must not be credited with the first one's (the old resume check compared the name only)."""
    first = eval_chat.ChatEvalOptions(model="m", prompts="p.jsonl", base_url="http://127.0.0.1:8080/v1")
    eval_chat.check_same_run(first, tmp_path)
    eval_chat.check_same_run(first, tmp_path)  # the same run resumes
    for change in ({"base_url": "http://127.0.0.1:9090/v1"}, {"base_url": None, "provider": "together"},
                   {"judge_max_tokens": 64}):
        other = eval_chat.ChatEvalOptions(**{"model": "m", "prompts": "p.jsonl", "base_url": first.base_url,
                                             **change})
        with pytest.raises(ValueError, match=f"{next(iter(change))}: .*use another --output_dir"):
            eval_chat.check_same_run(other, tmp_path)
