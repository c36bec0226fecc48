"""generate_synthetic.py and serve_openai.py, for real: the tiny checkpoint served over HTTP on 127.0.0.1, the
generator run as a process against it, directly or through a fault-injecting proxy (429 with Retry-After, 5xx,
timeouts, bad bodies), SIGKILLed mid-run and resumed, with a fake HF token that must never leak."""

import functools
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import DatasetCard
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import hf_raise_for_status

from conftest import REPO, run_script, serve_json
from gpt2custom.files import exclusive_lock
from gpt2custom.synthetic import (
    Answer,
    FatalError,
    JsonlStore,
    OutputFiles,
    RetryPolicy,
    dataset_card,
    describe_error,
    file_counts,
    is_retryable,
    load_prompts,
    read_rows,
    rejection,
    retry_after_seconds,
    rows_to_dataset,
    stable_id,
)

SECRET = "hf_TESTSECRET123"
PROMPTS = [f"Question {i}: what should I know about subject number {i}?" for i in range(20)]
FAST = ["--max_tokens", "8", "--reject_truncated", "false", "--reject_refusals", "false", "--backoff_base", "0.01"]


# -- real servers --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_server(tiny_checkpoint, tmp_path_factory):
    """serve_openai.py on a free port with the tiny random model; its logs land in files checked for the token."""
    logs = tmp_path_factory.mktemp("server_logs")
    # One torch thread: on a shared 2-core machine, 2 threads made each tiny forward pass 30x slower (measured).
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "serve_openai.py", "--model", str(tiny_checkpoint), "--port", "0",
                                 "--served_model_name", "tiny"], cwd=REPO, env=env, stdout=out, stderr=err)
    deadline = time.monotonic() + 600  # a hang guard: loading took 8 s alone, 55 s beside two busy processes
    while not (match := re.search(r"listening on (http://\S+)", (logs / "stdout").read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server did not start:\n{(logs / 'stderr').read_text()[-3000:]}")
        time.sleep(0.1)
    yield {"url": match.group(1) + "/v1", "logs": logs}
    proc.terminate()
    proc.wait(timeout=30)


FAULT_KINDS = ["429", "500", "timeout", "bad_json", "429", "no_finish_reason", "timeout", "503"]
HANG_GUARD = 120.0  # seconds; only a hung process or thread ever waits this long


def answer_request(prompt: str) -> dict:
    """The exact body generate_synthetic.py (run with FAST) sends for `prompt`, as huggingface_hub builds it."""
    from generate_synthetic import SyntheticOptions

    o = SyntheticOptions(max_tokens=8)
    return {"model": o.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": o.max_tokens,
            "seed": o.seed, "temperature": o.temperature, "top_p": o.top_p, "stream": False}


@functools.cache
def model_answer(upstream: str, prompt: str) -> bytes:
    """The model server's answer (the raw body) to that request, sent with the token as the client would send it."""
    request = urllib.request.Request(upstream + "/chat/completions", data=json.dumps(answer_request(prompt)).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {SECRET}"})
    with urllib.request.urlopen(request, timeout=HANG_GUARD) as response:
        return response.read()


class FaultyProxy:
    """A real HTTP server in front of the model server. Requests number 2, 5, 8 of every 10 fail (30 %), cycling
    through FAULT_KINDS; a prompt containing POISON always gets a 500 whose body echoes the Authorization header.
    It logs (time, prompt, kind) per request and counts the answers it delivered (what a provider bills).

    The model server's answer to every prompt is fetched before the client starts (the very request the client
    will send, with the same bearer token), and served at once: how fast the model runs on a busy machine cannot
    make a real answer race the client's timeout. Only an injected "timeout" times out: it holds the connection,
    answering nothing, until the client gives up and closes it.

    With `hold_after=N` (the gate), the first N requests are answered and later ones are held, unanswered, until
    `gate` is set; then they are closed without an answer (kind "held") and later requests are answered again."""

    def __init__(self, upstream: str, prompts: list[str], inject: bool = True, hold_after: int | None = None):
        self.inject, self.hold_after, self.gate = inject, hold_after, threading.Event()
        self.answers = {prompt: model_answer(upstream, prompt) for prompt in prompts}
        self.lock = threading.Lock()
        self.requests = self.faults = self.answered = self.delivered = 0
        self.events, self.auth_headers, self.problems = [], set(), []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def decide(self, prompt: str) -> str:
        with self.lock:
            if "POISON" in prompt:
                kind = "poison"
            else:
                self.requests += 1
                kind = "ok"
                if self.inject and self.requests % 10 in (2, 5, 8):
                    kind = FAULT_KINDS[self.faults % len(FAULT_KINDS)]
                    self.faults += 1
                elif self.hold_after is not None and self.answered >= self.hold_after and not self.gate.is_set():
                    kind = "held"
                else:
                    self.answered += 1
            self.events.append((time.monotonic(), prompt, kind))
            return kind

    def kinds(self) -> Counter:
        with self.lock:
            return Counter(kind for _, _, kind in self.events)

    def problem(self, text: str):
        with self.lock:
            self.problems.append(text)

    def handler(proxy):  # noqa: N805 - the handler class closes over the proxy
        class Handler(BaseHTTPRequestHandler):
            def reply(self, status: int, body: bytes, headers=()):
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def wait_for_disconnect(self) -> bool:
                """Block until the client closes this connection (EOF or reset); False after HANG_GUARD."""
                deadline = time.monotonic() + HANG_GUARD
                while (left := deadline - time.monotonic()) > 0:
                    if select.select([self.connection], [], [], left)[0]:
                        try:
                            if not self.connection.recv(4096):
                                return True
                        except OSError:  # reset by the client: gone too
                            return True
                return False

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                auth = self.headers.get("Authorization", "")
                with proxy.lock:
                    proxy.auth_headers.add(auth)
                prompt = json.loads(body)["messages"][-1]["content"]
                kind = proxy.decide(prompt)
                try:
                    if kind == "poison":
                        return self.reply(500, json.dumps({"error": f"upstream refused credentials {auth}"}).encode())
                    if prompt not in proxy.answers or json.loads(body) != answer_request(prompt):
                        proxy.problem(f"a request no answer was fetched for: {body[:300]!r}")
                        return self.reply(400, b'{"error": "the test proxy has no answer for this request"}')
                    if kind == "429":
                        return self.reply(429, b'{"error": "rate limited"}', [("Retry-After", "1")])
                    if kind in ("500", "503"):
                        return self.reply(int(kind), b'{"error": "overloaded"}')
                    if kind == "timeout":
                        if not self.wait_for_disconnect():
                            proxy.problem(f"the client never gave up on a request held for {HANG_GUARD} s")
                        return  # the client gave up; close without an answer
                    if kind == "held":
                        if not proxy.gate.wait(HANG_GUARD):
                            proxy.problem(f"the gate stayed shut for {HANG_GUARD} s")
                        return  # the client that sent it was killed meanwhile
                    if kind == "bad_json":
                        return self.reply(200, b'{"choices": [{"index": 0, "message": {"role": "assis')
                    answer = proxy.answers[prompt]
                    if kind == "no_finish_reason":  # like a stream cut before its last event
                        data = json.loads(answer)
                        data["choices"][0]["finish_reason"] = None
                        return self.reply(200, json.dumps(data).encode())
                    self.reply(200, answer)
                    with proxy.lock:
                        proxy.delivered += 1
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client was killed

            def log_message(self, format, *args):
                pass

        return Handler

    def close(self):
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


def generate(url: str, output: Path, *args, check=True):
    # HF_HUB_OFFLINE=1 (set by conftest) blocks every huggingface_hub request, even to 127.0.0.1.
    return run_script("generate_synthetic.py", "--base_url", url, "--output", output, *FAST, *args,
                      env={"HF_TOKEN": SECRET, "HF_HUB_OFFLINE": "0"}, check=check, timeout=120)


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return path


def assert_secret_absent(*texts: str, folders: tuple[Path, ...]):
    for text in texts:
        assert SECRET not in text
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/chat/completions", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# -- the server ----------------------------------------------------------------------------------------------------

def test_server_answers_with_usage_and_length_or_stop_finish(model_server, tokenizer):
    url, hi = model_server["url"], {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
    status, out = post(url, hi)
    assert status == 200 and out["model"] == "tiny" and out["choices"][0]["finish_reason"] == "length"
    # The chat format written out by hand: <|user|>\nhi\n<|assistant|>\n, role tokens at 50257-50259.
    expected_prompt = [50258, *tokenizer.encode("\nhi\n"), 50259, *tokenizer.encode("\n")]
    assert out["usage"] == {"prompt_tokens": len(expected_prompt), "completion_tokens": 6,
                            "total_tokens": len(expected_prompt) + 6}
    text = out["choices"][0]["message"]["content"]
    assert text and post(url, hi)[1]["choices"][0]["message"]["content"] == text  # greedy: deterministic

    stop = text[len(text) // 2:][:2]
    _, stopped = post(url, {**hi, "stop": [stop]})
    assert stopped["choices"][0] == {"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": text[: text.index(stop)]}}


@pytest.mark.parametrize("payload, message", [
    ({"messages": [{"role": "user", "content": "hi"}], "stream": True}, "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "'n'"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role robot"),
    ({"messages": [{"role": "user", "content": "word " * 300}]}, "context is 256"),
    ({"messages": []}, "non-empty list"),
])
def test_server_refuses_what_it_cannot_do_with_400(model_server, payload, message):
    status, out = post(model_server["url"], payload)
    assert status == 400 and message in out["error"]["message"]


# -- end to end ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def topics_run(model_server, tmp_path_factory):
    """The default path: user turns written from seed topics (stage 1), then answered (stage 2)."""
    out = tmp_path_factory.mktemp("topics")
    topics = write_prompts(out / "topics.txt", ["tea", "bicycles", "volcanoes", "chess"])
    proc = generate(model_server["url"], out / "data.jsonl", "--topics_file", topics, "--instructions_per_topic", "2",
                    "--instruction_max_tokens", "8", "--system_prompt", "Answer briefly.", "--concurrency", "4")
    return out, proc


@pytest.mark.slow
def test_every_seed_topic_prompt_gets_one_valid_row(topics_run, model_server):
    out, proc = topics_run
    files = OutputFiles.for_output(out / "data.jsonl")
    rows, instructions = read_rows(files.answers), {r["prompt_id"]: r for r in read_rows(files.instructions)}
    expected_ids = {stable_id(f"topic:{t}#{j}") for t in ("tea", "bicycles", "volcanoes", "chess") for j in range(2)}
    assert sorted(r["prompt_id"] for r in rows) == sorted(expected_ids) == sorted(instructions)
    assert sorted(r["topic"] for r in instructions.values()) == sorted(["tea", "bicycles", "volcanoes", "chess"] * 2)
    for row in rows:
        system, user, assistant = row["messages"]
        assert system == {"role": "system", "content": "Answer briefly."}
        assert user == {"role": "user", "content": instructions[row["prompt_id"]]["instruction"]} and user["content"]
        assert assistant["role"] == "assistant" and assistant["content"].strip()
        assert row["model"] == "tiny" and row["finish_reason"] in ("stop", "length") and row["rejection"] is None
        usage = row["usage"]
        assert usage["completion_tokens"] <= 8 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert read_rows(files.failed) == [] and read_rows(files.rejected) == []
    assert "8 accepted, 0 rejected, 0 failed" in proc.stdout
    assert_secret_absent(proc.stdout, proc.stderr, folders=(out, model_server["logs"]))


@pytest.mark.slow
def test_dataset_and_card_built_from_the_generated_jsonl(topics_run):
    out, _ = topics_run
    files = OutputFiles.for_output(out / "data.jsonl")
    rows = read_rows(files.answers)
    dataset = rows_to_dataset(rows)
    assert len(dataset) == 8 and dataset["messages"] == [r["messages"] for r in rows]
    assert {"messages", "model", "prompt_id", "usage", "rejection"} <= set(dataset.column_names)

    counts = file_counts(files, price_per_m_input=3.0, price_per_m_output=15.0)
    every_request = rows + read_rows(files.instructions)
    prompt_tokens = sum(r["usage"]["prompt_tokens"] for r in every_request)
    completion_tokens = sum(r["usage"]["completion_tokens"] for r in every_request)
    assert counts["cost"] == pytest.approx((prompt_tokens * 3 + completion_tokens * 15) / 1e6)
    from generate_synthetic import SyntheticOptions, card_parameters

    parameters = card_parameters(SyntheticOptions(max_tokens=8, reject_refusals=False))
    card = dataset_card(source_model="meta-llama/Llama-3.1-405B-Instruct", license="llama3.1",
                        prompt_source="seed topics", parameters=parameters,
                        counts={**counts, "rejected": {"truncated": 3}}, invalid_policy="drop", pretty_name="demo")
    loaded = DatasetCard(str(card))  # what the Hub would parse
    assert loaded.data.license == "llama3.1" and loaded.data.task_categories == ["text-generation"]
    assert loaded.data.size_categories == "n<1K" and "synthetic" in loaded.data.tags
    text = loaded.text
    assert "meta-llama/Llama-3.1-405B-Instruct" in text and "| temperature | 0.7 |" in text
    assert "| max_tokens | 8 |" in text and "| instructions_per_topic | 20 |" in text
    assert "| in this dataset | 8 |" in text and "| rejected: truncated | 3 |" in text
    validation = text.split("Validation:")[1].split("\n\n")[0]
    assert "truncated by the token" in validation and "refusal" not in validation
    assert f"{prompt_tokens} prompt, {completion_tokens} completion" in text


@pytest.mark.slow
def test_with_30_percent_faults_every_prompt_finishes_exactly_once(model_server, tmp_path):
    prompts = [*PROMPTS, "POISON: this one always fails"]
    proxy = FaultyProxy(model_server["url"], PROMPTS)  # the model's answers, fetched before the client starts
    try:
        # --timeout 5: real answers come from memory at once, so only the injected "timeout"s time out (a real
        # answer timing out would be paid and asked again). Each of those costs 5 s: the proxy holds the request
        # until the client's own timeout closes it, whatever that timeout is.
        prompts_file = write_prompts(tmp_path / "prompts.txt", prompts)
        proc = generate(proxy.url, tmp_path / "data.jsonl", "--prompts", prompts_file, "--concurrency", "4",
                        "--timeout", "5", "--max_attempts", "8")
    finally:
        proxy.close()
    assert proxy.problems == []
    files = OutputFiles.for_output(tmp_path / "data.jsonl")
    rows = read_rows(files.answers)
    assert sorted(r["messages"][0]["content"] for r in rows) == sorted(PROMPTS)  # each once, none lost
    assert all(json.loads(proxy.answers[r["messages"][0]["content"]])["choices"][0]["message"]["content"]
               == r["messages"][1]["content"] for r in rows)  # the model's answer, kept as it came
    assert proxy.delivered == len(rows)  # every answer the "provider" delivered was kept: none paid twice
    # Every request is a fault or the one answer that finishes its prompt, and the proxy's cycle fixes which: the
    # 20 answers need 29 requests, 9 of them faults (requests 2, 5, 8, 12, ... 28), every kind at least once.
    kinds = proxy.kinds()
    assert kinds["ok"] == len(PROMPTS) and kinds.total() - kinds["poison"] == 29
    assert set(FAULT_KINDS) <= set(kinds) and kinds["timeout"] == 2 and kinds["429"] == 3

    (failed,) = read_rows(files.failed)  # bounded retries, then recorded; the run went on
    assert failed["messages"][-1]["content"].startswith("POISON") and failed["attempts"] == 8 == kinds["poison"]
    assert "HTTP 500" in failed["error"] and "***" in failed["error"]  # the echoed token, redacted
    assert "1 failed" in proc.stdout and "rerun" in proc.stdout

    # Retry-After: 1 was honoured. A lower bound on time, so a slow machine cannot break it (it only waits longer):
    # the proxy logs the 429 before replying, and the client may send the retry only a second after reading it.
    for t, prompt, kind in proxy.events:
        if kind == "429":
            retry = next(t2 for t2, p2, _ in proxy.events if p2 == prompt and t2 > t)
            assert retry - t >= 0.99  # (1 s, less a timer's rounding)
    assert f"Bearer {SECRET}" in proxy.auth_headers  # the token was really in play...
    assert_secret_absent(proc.stdout, proc.stderr, folders=(tmp_path, model_server["logs"]))  # ...and never leaked


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_no_duplicate_no_loss_no_corrupt_line(model_server, tmp_path):
    # The gate: the proxy answers 4 requests, then holds the next ones unanswered until the generator is killed.
    # So the kill lands mid-run, after exactly 4 rows, with both --concurrency slots in flight, however slow the box.
    proxy = FaultyProxy(model_server["url"], PROMPTS[:12], inject=False, hold_after=4)
    output = tmp_path / "data.jsonl"
    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS[:12])
    args = [sys.executable, "generate_synthetic.py", "--base_url", proxy.url, "--output", str(output), *FAST,
            "--prompts", str(prompts), "--concurrency", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_TOKEN": SECRET, "HF_HUB_OFFLINE": "0"}
    try:
        with open(tmp_path / "killed.log", "w") as log:
            victim = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=log)
            deadline = time.monotonic() + HANG_GUARD
            while not (output.exists() and output.read_bytes().count(b"\n") >= 4 and proxy.kinds()["held"] >= 2):
                log_tail = (tmp_path / "killed.log").read_text()[-3000:]
                assert victim.poll() is None, f"the generator ended behind a shut gate:\n{log_tail}"
                assert time.monotonic() < deadline, f"not 4 rows and 2 held requests in {HANG_GUARD} s: {proxy.kinds()}"
                time.sleep(0.05)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
        first_run = proxy.kinds()  # final: the process is dead
        proxy.gate.set()
        written = output.read_bytes()
        # 4 answers got through the gate, each written whole; 2 requests (--concurrency) were in flight at the kill.
        assert written.count(b"\n") == 4 and written.endswith(b"\n") and first_run == {"ok": 4, "held": 2}
        done_before = {json.loads(line)["messages"][0]["content"] for line in written.splitlines()}
        with open(output, "ab") as f:  # as if killed in the middle of a write
            f.write(b'{"messages": [{"role": "user", "content": "Question 1')
        resumed = generate(proxy.url, output, "--prompts", prompts, "--concurrency", "2")
    finally:
        proxy.close()
    assert proxy.problems == []
    after = output.read_bytes()
    assert after.startswith(written)  # rows written before the kill are untouched
    rows = [json.loads(line) for line in after.splitlines()]  # every line parses
    assert sorted(r["messages"][0]["content"] for r in rows) == sorted(PROMPTS[:12])  # no duplicate, none lost
    assert "4 done before" in resumed.stdout and "1 torn" in resumed.stderr
    # The resumed run asked each missing prompt once and nothing already written: only the 2 requests in flight at
    # the kill were sent twice (a provider would bill them twice; this proxy never answered them).
    held = [p for _, p, kind in proxy.events if kind == "held"]
    asked_again = [p for _, p, kind in proxy.events[6:]]
    assert sorted(asked_again) == sorted(set(PROMPTS[:12]) - done_before) and set(held) <= set(asked_again)
    assert proxy.kinds() == {"ok": 12, "held": 2} and proxy.delivered == len(rows) == 12
    assert_secret_absent(resumed.stdout, resumed.stderr, folders=(tmp_path,))


# -- the pieces ----------------------------------------------------------------------------------------------------

def test_store_repair_cuts_torn_tail_and_drops_duplicates_and_garbage(tmp_path):
    path = tmp_path / "rows.jsonl"
    a, b = {"prompt_id": "a", "x": 1}, {"prompt_id": "b", "x": 2}
    path.write_text(json.dumps(a) + "\n" + json.dumps(b) + "\n" + json.dumps({**a, "x": 3}) + "\n" + "not json\n"
                    + '{"prompt_id": "c", "x"', encoding="utf-8")
    store = JsonlStore(path)
    assert store.rows == [a, b] and store.repairs == {"torn": 1, "unparsable": 1, "duplicates": 1}
    assert path.read_text() == json.dumps(a) + "\n" + json.dumps(b) + "\n"
    store.append({"prompt_id": "c", "x": 4})
    store.close()
    again = JsonlStore(path)
    assert [r["prompt_id"] for r in again.rows] == ["a", "b", "c"] and not any(again.repairs.values())
    assert ("c", 0) in again and ("d", 0) not in again
    again.close()
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_a_second_run_on_the_same_output_is_refused_until_the_first_ends(tmp_path):
    files = OutputFiles.for_output(tmp_path / "data.jsonl")
    first = exclusive_lock(files.lock)
    with pytest.raises(ValueError, match="another run holds .*data.lock"):
        exclusive_lock(files.lock)
    first.close()
    exclusive_lock(files.lock).close()


def test_backoff_grows_exponentially_with_bounded_jitter_and_honours_retry_after():
    policy = RetryPolicy(max_attempts=8, base_delay=1.0, max_delay=10.0)
    for attempt in range(1, 8):
        step = min(2.0 ** (attempt - 1), 10.0)
        delays = [policy.delay(attempt) for _ in range(200)]
        assert step / 2 <= min(delays) and max(delays) <= step and max(delays) - min(delays) > step / 4
    assert all(7.0 <= policy.delay(1, retry_after=7.0) <= 8.0 for _ in range(50))
    assert policy.delay(1, retry_after=3600.0) == 10.0


def http_error(status: int, headers=None, body=None) -> HfHubHTTPError:
    """The exception huggingface_hub raises for this response."""
    request = httpx2.Request("POST", "http://127.0.0.1:1/v1/chat/completions")
    with pytest.raises(HfHubHTTPError) as info:
        hf_raise_for_status(httpx2.Response(status, headers=headers, json=body or {"error": "x"}, request=request))
    return info.value


def test_retry_classification_and_retry_after_header():
    for status in (408, 429, 500, 502, 503, 504):
        assert is_retryable(http_error(status))
    assert not is_retryable(http_error(400)) and not is_retryable(http_error(422))
    for status in (401, 403, 404):
        with pytest.raises(FatalError):
            is_retryable(http_error(status))
    assert is_retryable(httpx2.ReadTimeout("slow")) and is_retryable(httpx2.RemoteProtocolError("dropped"))
    assert is_retryable(json.JSONDecodeError("x", "{", 1))
    with pytest.raises(FatalError, match="cannot connect to the server"):  # nothing listening: stop, do not retry
        is_retryable(httpx2.ConnectError("[Errno 111] Connection refused"))
    assert retry_after_seconds(http_error(429, {"Retry-After": "3"})) == 3.0
    # An HTTP date is wall-clock time to the second: 30 s ahead, then cut to the second (up to 1 s less), less
    # however long this took (measured, so that a stalled machine cannot fail it).
    start = time.time()
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(start + 30))
    seconds = retry_after_seconds(http_error(503, {"Retry-After": date}))
    assert 29 - (time.time() - start) <= seconds <= 30
    assert retry_after_seconds(http_error(500)) is None


def test_error_descriptions_never_carry_the_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    text = describe_error(http_error(500, body={"error": f"bad credentials Bearer {SECRET}"}))
    assert text.startswith("HfHubHTTPError (HTTP 500)") and "Bearer ***" in text and SECRET not in text


@pytest.mark.parametrize("content, finish_reason, reason", [
    ("", "stop", "empty"),
    ("  \n", "stop", "empty"),
    ("Paris is the capital of France.", "length", "truncated"),
    ("I'm sorry, but I can't help with that.", "stop", "refusal"),
    ("I cannot assist with this request.", "stop", "refusal"),
    ("As an AI, I do not have opinions.", "stop", "refusal"),
    ("Sorry, that is not something I can do.", "stop", "refusal"),
    ("Sorry to hear that! Here are three things to try.", "stop", None),
    ("I can help with that: first, preheat the oven.", "stop", None),
    ("Paris is the capital of France.", "stop", None),
])
def test_rejection_rule(content, finish_reason, reason):
    assert rejection(Answer(content, finish_reason, {}, None)) == reason


def test_rejection_checks_can_be_switched_off():
    answer = Answer("I can't say; the text was cut", "length", {}, None)
    assert rejection(answer, reject_truncated=False, reject_refusals=False) is None
    assert rejection(Answer("", "length", {}, None), reject_truncated=False, reject_refusals=False) == "empty"


def test_prompts_from_txt_and_from_a_messages_column(tmp_path):
    txt = write_prompts(tmp_path / "p.txt", ["What is tea?", "", "What is tea?", "  Why is the sky blue?  "])
    assert [(p.prompt_id, p.user) for p in load_prompts(str(txt))] == [
        (stable_id("What is tea?"), "What is tea?"), (stable_id("Why is the sky blue?"), "Why is the sky blue?")]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({"conversation": c}) for c in [
        [{"role": "system", "content": "s"}, {"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi"}],
        [{"role": "user", "content": "Bye?"}],
    ]) + "\n")
    assert [p.user for p in load_prompts(str(jsonl), column="conversation")] == ["Hello?", "Bye?"]
    with pytest.raises(ValueError, match=r"no column 'prompt'.*conversation"):
        load_prompts(str(jsonl))
    with pytest.raises(ValueError, match="no such file"):
        load_prompts(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("bad, message", [
    ({"invalid": "keep"}, "invalid='keep': expected 'drop' or 'flag'"),
    ({"concurrency": 0}, "concurrency=0: expected >= 1"),
    ({"base_url": "localhost:8080"}, "expected http"),
    ({"base_url": "http://h/v1", "provider": "together"}, "not both"),
    ({"push_to_hub": "just-a-name"}, "expected org/name"),
])
def test_bad_options_fail_with_one_clear_message(bad, message):
    from generate_synthetic import SyntheticOptions

    with pytest.raises(ValueError, match=re.escape(message)):
        SyntheticOptions(**bad)


# -- seed topics against a scripted server ---------------------------------------------------------------------------

# What the scripted server writes as the user turn for each topic: usable, empty, only quotes (empty once cleaned),
# a refusal; "flaky" gets HTTP 400 (this prompt refused, not retried) until the server is told otherwise.
STAGE_ONE = {"tea": "How long should green tea steep?", "void": "", "quotes": '""',
             "secrets": "I'm sorry, but I can't help with that."}
EXPECTED_REJECTION = {"void": "empty", "quotes": "empty", "secrets": "refusal"}


class ScriptedServer:
    """An OpenAI-compatible /chat/completions on 127.0.0.1 (conftest's serve_json) that answers stage 1 by the topic
    named in the request and every stage-2 question with a fixed answer; it counts stage-1 requests per topic."""

    def __init__(self):
        self.lock = threading.Lock()
        self.stage_one, self.flaky_fails = Counter(), True
        self.server = serve_json(self.respond)
        self.url = self.server.url + "/v1"

    def respond(self, method, path, headers, body):
        prompt = json.loads(body)["messages"][-1]["content"]
        topic = re.search(r"an AI assistant about (\w+)\.", prompt)
        if topic:
            with self.lock:
                self.stage_one[topic.group(1)] += 1
            if topic.group(1) == "flaky":
                if self.flaky_fails:
                    return 400, {"error": {"message": "this prompt is not allowed"}}
                content = "Why do some tests fail only sometimes?"
            else:
                content = STAGE_ONE[topic.group(1)]
        else:
            content = f"An answer to: {prompt}"
        return 200, {"id": "x", "object": "chat.completion", "created": 0, "model": "scripted",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": content}}],
                     "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


@pytest.mark.slow
def test_seed_topics_with_empty_refused_and_failed_user_turns_complete_and_resume(tmp_path):
    topics = [*STAGE_ONE, "flaky"]
    server = ScriptedServer()
    output = tmp_path / "data.jsonl"
    args = ("generate_synthetic.py", "--base_url", server.url, "--output", output, "--topics_file",
            write_prompts(tmp_path / "topics.txt", topics), "--instructions_per_topic", "2", "--concurrency", "2",
            "--backoff_base", "0.01")
    env = {"HF_TOKEN": SECRET, "HF_HUB_OFFLINE": "0"}
    files = OutputFiles.for_output(output)
    ids = {stable_id(f"topic:{t}#{j}"): t for t in topics for j in range(2)}
    try:
        first = run_script(*args, env=env, timeout=120)
        answered = [r["prompt_id"] for r in read_rows(files.answers)]
        rejected = [r["prompt_id"] for r in read_rows(files.instructions) if r["rejection"]]
        failed = [r["prompt_id"] for r in read_rows(files.failed)]
        # Every topic prompt is accounted for exactly once: answered, its user turn rejected, or failed.
        assert sorted(answered + rejected + failed) == sorted(ids)
        assert {ids[i] for i in answered} == {"tea"} and {ids[i] for i in failed} == {"flaky"}
        assert {(ids[r["prompt_id"]], r["rejection"]) for r in read_rows(files.instructions) if r["rejection"]} == \
            set(EXPECTED_REJECTION.items())
        assert read_rows(files.rejected) == []  # no answer was asked for a rejected user turn
        assert all(r["messages"][0]["content"] == STAGE_ONE["tea"] for r in read_rows(files.answers))
        assert "2 accepted, 0 rejected, 2 failed" in first.stdout and "rerun the same command to retry" in first.stdout
        assert "6 of them not sent" in first.stdout and "final" in first.stdout

        server.flaky_fails = False
        before = Counter(server.stage_one)
        second = run_script(*args, env=env, timeout=120)
    finally:
        server.server.shutdown()
    # What the first run said: failed prompts were asked again, rejected user turns were not.
    assert server.stage_one - before == Counter({"flaky": 2})
    assert "2 done before, 6 not asked (their user turn was rejected before: final), 2 to ask" in second.stdout
    assert "2 accepted, 0 rejected, 0 failed" in second.stdout and "rerun" not in second.stdout
    assert sorted(ids[r["prompt_id"]] for r in read_rows(files.answers)) == ["flaky", "flaky", "tea", "tea"]
    assert read_rows(files.failed) == []
    instructions = read_rows(files.instructions)
    assert sorted(r["prompt_id"] for r in instructions) == sorted(ids)  # each user turn recorded once
    counts = file_counts(files)
    assert counts["rejected_instructions"] == {"empty": 4, "refusal": 2} and counts["rows"] == 4
    assert_secret_absent(first.stdout, first.stderr, second.stdout, second.stderr, folders=(tmp_path,))
