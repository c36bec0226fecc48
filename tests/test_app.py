"""app.py: the chat demo, in-process backends and the Gradio app as a separate process queried by gradio_client."""

import json
import os
import re
import subprocess
import sys
import time

import huggingface_hub.constants
import pytest

import app
from app import ChatError, EndpointBackend, LocalBackend, build_messages
from conftest import CHAT_STOP_IDS, REPO, chat_prompt_ids, greedy_reference, make_tiny_model, serve_json
from gpt2custom.checkpoints import load_model, save_model_folder
from gpt2custom.hub import build_upload_folder

FAKE_TOKEN = "hf_TESTSECRETappToken0123456789"
GREEDY = {"max_new_tokens": 10, "temperature": 0.0, "top_p": 0.95, "do_sample": False}
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("app")
    save_model_folder(make_tiny_model(seed=7), root / "ckpt", tokenizer)
    return build_upload_folder(root / "ckpt", root / "published", repo_id="me/tiny-chat")


class FakeEndpoint:
    """An Inference Endpoint on 127.0.0.1: POST / runs a handler.py EndpointHandler like the Inference Toolkit does (a raised
    exception becomes HTTP 400 {"error": ...}); every request's headers and body are kept."""

    def __init__(self, handler):
        self.handler = handler
        self.requests = []
        self.server = serve_json(self.respond)
        self.url = self.server.url + "/"

    def respond(self, method, path, headers, body):
        try:
            body = json.loads(body)
            self.requests.append((headers, body))
            return 200, self.handler(body)
        except Exception as e:
            return 400, {"error": str(e)}


@pytest.fixture(scope="module")
def local(folder):
    return LocalBackend(str(folder))


@pytest.fixture(scope="module")
def endpoint(local):
    fake = FakeEndpoint(local.handler)  # one model in memory serves both ways
    yield fake
    fake.server.shutdown()


@pytest.fixture
def hub_online(monkeypatch):
    # conftest puts the suite offline, and huggingface_hub's HTTP session then refuses every URL, even 127.0.0.1.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_build_messages_keeps_the_system_prompt_and_only_the_last_turns():
    history = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "1"},
        {"role": "user", "content": [{"type": "text", "text": "two"}]},  # gradio's multimodal form
        {"role": "assistant", "content": "2"},
    ]
    assert build_messages("three", history, "Be brief.", max_history_turns=1) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "three"},
    ]
    assert build_messages("x", history, "", max_history_turns=0) == [{"role": "user", "content": "x"}]


def expected_answer(folder, tokenizer) -> str:
    """GREEDY's answer to MESSAGES, from the published folder's weights and the chat format's spec, not the handler."""
    model = load_model(str(folder)).eval()
    new = greedy_reference(model, chat_prompt_ids(tokenizer, MESSAGES), GREEDY["max_new_tokens"], CHAT_STOP_IDS)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_endpoint_backend_posts_the_handler_request_with_the_token(endpoint, local, hub_online, folder, tokenizer):
    before = len(endpoint.requests)
    answer = EndpointBackend(endpoint.url, token=FAKE_TOKEN)(MESSAGES, GREEDY)
    headers, body = endpoint.requests[before]
    assert body == {"inputs": MESSAGES, "parameters": GREEDY}
    assert headers["authorization"] == f"Bearer {FAKE_TOKEN}"
    assert answer == expected_answer(folder, tokenizer)  # a plain argmax loop on the published weights
    assert local(MESSAGES, GREEDY) == answer  # in-process gives the endpoint's answer


def test_endpoint_refusal_reaches_the_user_as_a_chat_error(endpoint, hub_online):
    too_long = [{"role": "user", "content": "word " * 400}]  # > the tiny model's 256-token context
    with pytest.raises(ChatError, match="the last message does not fit in 246 tokens"):  # 256 - 10 for the answer
        EndpointBackend(endpoint.url)(too_long, GREEDY)


def test_endpoint_busy_is_retried_by_the_project_policy(local, hub_online, folder, tokenizer):
    """An endpoint scaled to zero answers 503 while it starts: the backend waits (RetryPolicy's backoff) and asks
    again, then answers; one that stays busy is one ChatError after max_attempts."""
    from gpt2custom.synthetic import RetryPolicy

    calls = []

    def respond(method, path, headers, body):
        calls.append(path)
        if len(calls) <= 2:
            return 503, {"error": "starting"}
        return 200, local.handler(json.loads(body))

    policy = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.01)
    with serve_json(respond) as server:
        assert EndpointBackend(server.url + "/", policy=policy)(MESSAGES, GREEDY) == expected_answer(folder, tokenizer)
        assert len(calls) == 3
        calls.clear()
        with pytest.raises(ChatError, match="starting"):  # the endpoint's own reason
            EndpointBackend(server.url + "/", policy=RetryPolicy(max_attempts=2, base_delay=0.01))(MESSAGES, GREEDY)
        assert len(calls) == 2


@pytest.mark.parametrize("argv", [[], ["--model", "x", "--endpoint_url", "http://127.0.0.1:1/"]])
def test_app_needs_exactly_one_of_model_or_endpoint(argv, monkeypatch):
    monkeypatch.delenv("MODEL", raising=False)
    monkeypatch.delenv("ENDPOINT_URL", raising=False)
    with pytest.raises(SystemExit, match="exactly one of --model"):
        app.main(argv)


@pytest.mark.slow
def test_demo_process_answers_a_gradio_client_request_through_the_endpoint(endpoint, tmp_path, folder, tokenizer):
    from gradio_client import Client

    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_TOKEN": FAKE_TOKEN,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf_home"),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "PYTHONUNBUFFERED": "1",  # the URL line reaches the log at once
    }
    args = [
        "--endpoint_url",
        endpoint.url,
        "--host",
        "127.0.0.1",
        "--system_prompt",
        "You are terse.",
    ]
    with open(tmp_path / "app.log", "w") as log:
        demo = subprocess.Popen([sys.executable, REPO / "app.py", *args], cwd=tmp_path, env=env, stdout=log, stderr=log)
    try:
        # No --port: gradio takes a free one itself and prints its URL (what a user on their laptop reads too).
        client, deadline = None, time.monotonic() + 120
        while client is None:
            log = (tmp_path / "app.log").read_text()
            assert demo.poll() is None, f"app.py exited:\n{log[-3000:]}"
            assert time.monotonic() < deadline, f"app.py did not start serving within 120 s:\n{log[-3000:]}"
            if url := re.search(r"Running on local URL:\s+(http://\S+)", log):
                client = Client(url.group(1), verbose=False)
            else:
                time.sleep(0.5)
        before = len(endpoint.requests)
        reply = client.predict("Say hello.", "You are terse.", 10, 0.0, 0.95, api_name="/chat")
    finally:
        demo.terminate()
        demo.wait(timeout=30)
    headers, body = endpoint.requests[before]
    assert body == {"inputs": MESSAGES, "parameters": GREEDY}
    assert headers["authorization"] == f"Bearer {FAKE_TOKEN}"
    assert reply == expected_answer(folder, tokenizer)
    assert FAKE_TOKEN not in (tmp_path / "app.log").read_text()


def test_a_long_conversation_is_fitted_to_the_context_by_the_same_rule_as_chat_py(folder):
    """The demo sends the whole history; on a 256-token model the 4th long turn used to be refused. The handler now
    drops the oldest turns (system prompt kept), and keeps exactly what gpt2custom.chat.fit_to_context keeps."""
    from gpt2custom.chat import fit_to_context
    from handler import EndpointHandler

    handler = EndpointHandler(str(folder))
    turn = "tell me more about the quick brown fox and the lazy dog " * 3  # ~40 tokens a message
    history = [m for i in range(4) for m in ({"role": "user", "content": f"{i}: {turn}"},
                                             {"role": "assistant", "content": turn})]
    messages = build_messages("last question", history, "Be brief.", max_history_turns=10)
    parameters = {"max_new_tokens": 8, "do_sample": False, "details": True}
    (answer,) = handler({"inputs": messages, "parameters": parameters})
    kept = fit_to_context(handler.tokenizer, messages, handler.context - 8)
    assert kept[0]["role"] == "system" and kept[-1]["content"] == "last question" and len(kept) < len(messages)
    prompt = handler.tokenizer.apply_chat_template(kept, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert answer["details"]["prompt_tokens"] == len(prompt)
    too_long = [{"role": "user", "content": turn * 10}]
    assert "does not fit" in handler({"inputs": too_long, "parameters": parameters})["error"]
