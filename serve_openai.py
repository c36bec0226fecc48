"""An OpenAI-compatible chat-completions server for this project's checkpoints (stdlib http.server, one request at a
time).

It lets the whole synthetic-data path run locally: point `generate_synthetic.py --base_url` (or any OpenAI client)
at it. The prompt is rendered with the tokenizer's chat template, or with `gpt2custom.chat`'s format when the
tokenizer has none (a pretrained-only checkpoint).

    POST /v1/chat/completions  {"messages": [...], "max_tokens", "temperature", "top_p", "seed", "stop"}
         -> {"choices": [{"message": {...}, "finish_reason": "stop" | "length"}], "usage": {...}, ...}
    GET  /v1/models, GET /health

Not supported (answered with HTTP 400): "stream": true, "n" > 1, tools.

Run:
    python serve_openai.py --model out/sft-124m --port 8080        # --port 0 picks a free port
    python generate_synthetic.py --base_url http://127.0.0.1:8080/v1 --model gpt2custom ...

The first line on stdout is `listening on http://HOST:PORT` once the model is loaded.

Why not `transformers serve`: it needs the `openai` package (transformers[serving]), and, checked with transformers
5 on one of our SFT folders with `--trust-remote-code`, it looks the model class up as an attribute of the
`transformers` module (`getattr(transformers, config.architectures[0])` in cli/serving/model_manager.py), so a
remote-code checkpoint fails: "module transformers has no attribute GPT2CustomForCausalLM".
"""

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from trl import TrlParser

from gpt2custom.chat import add_chat_format
from gpt2custom.checkpoints import load_model
from gpt2custom.tokenizer import load_tokenizer

DEFAULT_MAX_TOKENS = 256


@dataclass
class ServeOptions:
    model: str = field(metadata={"help": "checkpoint folder or Hub id (ours, or any causal LM)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder or Hub id; None: that of --model"})
    served_model_name: str | None = field(default=None, metadata={"help": "the `model` the API reports; None: the folder name"})
    host: str = field(default="127.0.0.1", metadata={"help": "0.0.0.0 exposes it to the network: there is no auth"})
    port: int = field(default=8080, metadata={"help": "0 picks a free port (printed on the first stdout line)"})
    device: str | None = field(default=None, metadata={"help": "cuda / cpu / mps; None: cuda when available"})
    dtype: str = field(default="auto", metadata={"help": "auto / float32 / bfloat16 / float16"})
    quiet: bool = field(default=False, metadata={"help": "no per-request log lines on stderr"})


class BadRequest(ValueError):
    """A client error, answered with HTTP 400 and this message."""


class ChatModel:
    """A causal LM plus a tokenizer with a chat template; `complete` answers one OpenAI chat request."""

    def __init__(self, options: ServeOptions):
        dtype = options.dtype if options.dtype == "auto" else getattr(torch, options.dtype)
        self.device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(options.model, dtype=dtype).to(self.device).eval()
        # trust_remote_code: AutoTokenizer reads our config's auto_map and would otherwise prompt on stdin.
        self.tokenizer = load_tokenizer(options.tokenizer or options.model, trust_remote_code=True)
        if self.tokenizer.chat_template is None:
            add_chat_format(self.tokenizer, self.model.config.vocab_size)
        self.name = options.served_model_name or Path(options.model.rstrip("/")).name
        self.context = self.model.config.max_position_embeddings
        # One generation at a time: the model is not shared across threads, and `seed` reseeds the global RNG.
        self.lock = threading.Lock()

    def complete(self, request: dict) -> dict:
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list of {role, content}")
        if request.get("stream"):
            raise BadRequest("'stream': true is not supported by this server")
        if (request.get("n") or 1) != 1:
            raise BadRequest("'n' > 1 is not supported by this server: send several requests")
        if request.get("tools"):
            raise BadRequest("'tools' are not supported by this server")
        max_tokens = request.get("max_tokens") or request.get("max_completion_tokens") or DEFAULT_MAX_TOKENS
        temperature = 1.0 if request.get("temperature") is None else float(request["temperature"])
        top_p = 1.0 if request.get("top_p") is None else float(request["top_p"])
        stop = request.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest(f"'max_tokens' must be a positive integer, got {max_tokens!r}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise BadRequest(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")

        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja raises its own types for unknown roles or a missing 'content'
            raise BadRequest(f"cannot apply the chat template to 'messages': {e}") from e
        input_ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(self.device)
        prompt_tokens = input_ids.shape[1]
        room = self.context - prompt_tokens
        if room < 1:
            raise BadRequest(f"the prompt has {prompt_tokens} tokens; the model's context is {self.context}")

        # top_k=0: OpenAI's API samples from the whole top-p nucleus; transformers would default to top_k=50.
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else dict(do_sample=False)
        if stop:
            sampling.update(stop_strings=stop, tokenizer=self.tokenizer)
        eos = self.tokenizer.eos_token_id
        with self.lock, torch.inference_mode():
            if request.get("seed") is not None:
                torch.manual_seed(int(request["seed"]))
            output = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=min(max_tokens, room),
                                         eos_token_id=eos, pad_token_id=eos, **sampling)
        new_ids = output[0, prompt_tokens:].tolist()
        content = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        finish_reason = "stop" if new_ids and new_ids[-1] == eos else "length"
        for s in stop:
            if s in content:
                content, finish_reason = content[: content.index(s)], "stop"
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "system_fingerprint": "gpt2custom",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(new_ids),
                      "total_tokens": prompt_tokens + len(new_ids)},
        }


def make_handler(chat: ChatModel, quiet: bool):
    class Handler(BaseHTTPRequestHandler):
        def send_json(self, status: int, payload: dict):
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def send_error_json(self, status: int, message: str):
            self.send_json(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

        def do_GET(self):
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self.send_json(200, {"object": "list", "data": [{"id": chat.name, "object": "model", "owned_by": "gpt2custom"}]})
            elif self.path == "/health":
                self.send_json(200, {"status": "ok"})
            else:
                self.send_error_json(404, f"no route {self.path}")

        def do_POST(self):
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                return self.send_error_json(404, f"no route {self.path}: POST /v1/chat/completions")
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if not isinstance(request, dict):
                    raise BadRequest("the body must be a JSON object")
                self.send_json(200, chat.complete(request))
            except (json.JSONDecodeError, BadRequest) as e:
                self.send_error_json(HTTPStatus.BAD_REQUEST, str(e))

        def log_message(self, format, *args):  # the default also logs nothing but the request line
            if not quiet:
                super().log_message(format, *args)

    return Handler


def main(options: ServeOptions):
    chat = ChatModel(options)
    server = ThreadingHTTPServer((options.host, options.port), make_handler(chat, options.quiet))
    host, port = server.server_address[:2]
    print(f"listening on http://{host}:{port}  (model {chat.name!r}, {chat.device}, context {chat.context})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    (serve_options,) = TrlParser(ServeOptions).parse_args_and_config()
    main(serve_options)
