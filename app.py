"""Gradio chat demo: talk to a published model, in-process from a checkpoint folder or Hub id, or through an
Inference Endpoint URL. Ready for a Hugging Face Space.

    python app.py --model out/publish                           # a local folder (or a Hub id) run with handler.py
    python app.py --endpoint_url https://xyz.endpoints.huggingface.cloud   # HF_TOKEN is sent as the Bearer token
    python app.py --model out/publish --host 127.0.0.1 --port 7860

Both ways send the same request, `{"inputs": messages, "parameters": {...}}`, to the same `handler.py`, so the demo
shows what the endpoint answers. On a Space, upload app.py and handler.py with a requirements.txt (gradio,
huggingface_hub, trl; plus torch and transformers for --model), and set the Space variable MODEL or ENDPOINT_URL
(and the secret HF_TOKEN for a private model or endpoint); the Space supplies host and port.
"""

import os
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from huggingface_hub import get_session
from huggingface_hub.utils import build_hf_headers
from trl import TrlParser

from gpt2custom.synthetic import RETRY_STATUS, RetryPolicy, retry_after_seconds


@dataclass
class AppArgs:
    model: str | None = field(
        default_factory=lambda: os.environ.get("MODEL"),
        metadata={"help": "model folder or Hub id, served in-process by handler.py (env MODEL)"},
    )
    endpoint_url: str | None = field(
        default_factory=lambda: os.environ.get("ENDPOINT_URL"),
        metadata={"help": "Inference Endpoint URL running handler.py (env ENDPOINT_URL); HF_TOKEN authenticates"},
    )
    system_prompt: str = "You are a helpful assistant."
    max_history_turns: int = field(default=6, metadata={"help": "past user/assistant pairs sent with each message"})
    timeout_s: float = field(default=120.0, metadata={"help": "per request to the endpoint (it may be scaled to zero)"})
    host: str | None = field(default=None, metadata={"help": "default: gradio's (GRADIO_SERVER_NAME or 127.0.0.1)"})
    port: int | None = field(default=None, metadata={"help": "default: gradio's (GRADIO_SERVER_PORT or 7860)"})
    title: str = "GPT2-Custom chat"


class ChatError(RuntimeError):
    """The model side refused or failed a request; the message is shown to the user."""


def answer_text(response) -> str:
    """The text of a handler.py response, or ChatError with the handler's reason."""
    if isinstance(response, dict) and "error" in response:
        raise ChatError(str(response["error"]))
    try:
        return response[0]["generated_text"]
    except (KeyError, IndexError, TypeError) as e:
        raise ChatError(f"unexpected answer from the model: {str(response)[:200]}") from e


class LocalBackend:
    """handler.py's EndpointHandler in this process, on a model folder or Hub id."""

    def __init__(self, model: str):
        # Imported here: the endpoint mode needs neither torch nor transformers, so a Space can run without them.
        from handler import EndpointHandler

        self.handler = EndpointHandler(model)

    def __call__(self, messages: list[dict], parameters: dict) -> str:
        return answer_text(self.handler({"inputs": messages, "parameters": parameters}))


class EndpointBackend:
    """POSTs to an Inference Endpoint running handler.py; retries 408/425/429/5xx (an endpoint scaled to zero
    answers 503 while it starts) with the project's one retry policy (gpt2custom.synthetic.RetryPolicy: exponential
    backoff with jitter, the server's Retry-After first)."""

    def __init__(self, url: str, timeout_s: float = 120.0, token: str | None = None,
                 policy: RetryPolicy | None = None):
        self.url, self.timeout_s = url, timeout_s
        self.headers = build_hf_headers(token=token)  # HF_TOKEN or the saved login, if any
        self.policy = policy or RetryPolicy(max_attempts=5, base_delay=1.0, max_delay=30.0)

    def __call__(self, messages: list[dict], parameters: dict) -> str:
        body = {"inputs": messages, "parameters": parameters}
        for attempt in range(1, self.policy.max_attempts + 1):
            try:
                response = get_session().post(self.url, json=body, headers=self.headers, timeout=self.timeout_s)
            except Exception as e:  # the transport's errors (refused, timeout, offline mode): all mean "no answer"
                raise ChatError(f"cannot reach {self.url}: {type(e).__name__}: {e}") from e
            busy = response.status_code in RETRY_STATUS or response.status_code >= 500
            if not busy or attempt == self.policy.max_attempts:
                break
            time.sleep(self.policy.delay(attempt, retry_after_seconds(SimpleNamespace(response=response))))
        try:
            body = response.json()
        except ValueError:
            raise ChatError(f"endpoint answered HTTP {response.status_code}: {response.text[:200]}") from None
        if response.status_code >= 400 and not (isinstance(body, dict) and "error" in body):
            raise ChatError(f"endpoint answered HTTP {response.status_code}: {str(body)[:200]}")
        return answer_text(body)


def _text(content) -> str:
    """A chat message's text: gradio gives a string, or a list of parts for multimodal messages."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p if isinstance(p, str) else p.get("text", "") for p in content if isinstance(p, (str, dict)))
    return ""


def build_messages(message: str, history: list[dict], system_prompt: str, max_history_turns: int) -> list[dict]:
    """System prompt, the last `max_history_turns` user/assistant pairs, then the new user message."""
    past = [
        {"role": m["role"], "content": _text(m.get("content"))}
        for m in history
        if m.get("role") in ("user", "assistant") and _text(m.get("content"))
    ]
    past = past[-2 * max_history_turns :] if max_history_turns > 0 else []
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, *past, {"role": "user", "content": message}]


def build_demo(backend, args: AppArgs):
    # Imported here so the backends above can be used (and tested) without loading the UI toolkit.
    import gradio as gr

    def chat(message, history, system_prompt, max_new_tokens, temperature, top_p):
        messages = build_messages(message, history, system_prompt, args.max_history_turns)
        parameters = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature), "top_p": float(top_p)}
        parameters["do_sample"] = temperature > 0
        try:
            return backend(messages, parameters)
        except ChatError as e:
            raise gr.Error(str(e)) from e

    return gr.ChatInterface(
        chat,
        title=args.title,
        description=f"Model: `{args.endpoint_url or args.model}`",
        additional_inputs=[
            gr.Textbox(args.system_prompt, label="System prompt"),
            gr.Slider(1, 512, value=128, step=1, label="Max new tokens"),
            gr.Slider(0.0, 1.5, value=0.8, step=0.05, label="Temperature (0 = greedy)"),
            gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p"),
        ],
        examples=[["Write a haiku about the sea."], ["What is a transformer, in one paragraph?"]],
        cache_examples=False,
        api_name="chat",
    )


def main(argv=None):
    (args,) = TrlParser((AppArgs,)).parse_args_and_config(argv)
    if bool(args.model) == bool(args.endpoint_url):
        raise SystemExit(
            "app.py: pass exactly one of --model (folder or Hub id) or --endpoint_url (or env MODEL/ENDPOINT_URL)"
        )
    backend = EndpointBackend(args.endpoint_url, args.timeout_s) if args.endpoint_url else LocalBackend(args.model)
    build_demo(backend, args).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
