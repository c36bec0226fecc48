"""Inference Endpoints custom handler: chat or plain-text generation with validated, capped parameters.

`publish.py` copies this file into every published model folder. The Inference Toolkit imports it by file from the
model folder (mounted at /repository) and calls `EndpointHandler(path)` once, then `handler(body)` per request, so it
imports only torch, transformers and the standard library.

Request body (POST to the endpoint URL):

    {"inputs": "Once upon a time",                        # a prompt, continued as plain text
     "parameters": {"max_new_tokens": 64, "temperature": 0.8}}
    {"inputs": [{"role": "user", "content": "Hi!"}],      # messages, rendered with the chat template
     "parameters": {"max_new_tokens": 128}}

Response: `[{"generated_text": "..."}]` (only the new text unless `return_full_text`), plus
`"details": {"prompt_tokens", "generated_tokens", "finish_reason"}` when `parameters.details` is true.
A bad request never raises: the answer is `{"error": "..."}` naming the key, the value and what was expected.

Limits: `max_new_tokens` is capped at GPT2CUSTOM_MAX_NEW_TOKENS (env, default 512) and at the room left in the
context window. A conversation (messages) that outgrows the context loses its oldest turns, the system prompt kept,
until it leaves room for the answer (`fit_messages`, the rule chat.py follows; a demo's long chat keeps working); a
text longer than the context is refused unless `parameters.truncate` asks to keep only its last N tokens (TGI's
convention). Inputs over GPT2CUSTOM_MAX_INPUT_CHARS characters (default 100000) are refused before
tokenizing.
"""

import math
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_MAX_NEW_TOKENS = 128

# name -> (expected type, check on the value, what the check means); TGI's names where TGI has the parameter.
PARAMETERS = {
    "max_new_tokens": (int, lambda v: v >= 1, "an integer >= 1"),
    "do_sample": (bool, None, "true or false"),
    "temperature": (float, lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
    "top_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (int, lambda v: v >= 0, "an integer >= 0"),
    "repetition_penalty": (float, lambda v: v > 0, "a number > 0"),
    "seed": (int, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)"),
    "truncate": (int, lambda v: v >= 1, "an integer >= 1 (keep the last N input tokens)"),
    "return_full_text": (bool, None, "true or false"),
    "details": (bool, None, "true or false"),
}
TOP_LEVEL_KEYS = {"inputs", "parameters", "stream"}


class RequestError(ValueError):
    """A request the handler refuses; the message goes back to the client."""


def _check_type(name: str, value, expected: type, meaning: str):
    # bool is a subclass of int in Python, and JSON true must not pass as 1.
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise RequestError(f"parameters.{name}={value!r}: expected {meaning}")


def validate_parameters(parameters) -> dict:
    """The request's parameters, type-checked and range-checked; unknown names are refused."""
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise RequestError(f"parameters={parameters!r}: expected an object")
    unknown = sorted(set(parameters) - set(PARAMETERS))
    if unknown:
        raise RequestError(f"unknown parameter(s) {unknown}; allowed: {sorted(PARAMETERS)}")
    for name, value in parameters.items():
        expected, check, meaning = PARAMETERS[name]
        _check_type(name, value, expected, meaning)
        if check is not None and not check(value):
            raise RequestError(f"parameters.{name}={value!r}: expected {meaning}")
    return dict(parameters)


def fit_messages(tokenizer, messages: list[dict], max_tokens: int) -> list[dict]:
    """The conversation with its oldest turns dropped (a system prompt is kept) until the prompt for the next answer
    fits in `max_tokens`; RequestError when even the last user turn does not. (This file travels alone into the
    published folder, so it cannot import gpt2custom.chat.fit_to_context, which follows the same rule for chat.py;
    tests/test_app.py checks that the two agree.)"""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    while turns:
        ids = tokenizer.apply_chat_template(system + turns, add_generation_prompt=True, return_dict=True)["input_ids"]
        if len(ids) <= max_tokens:
            return system + turns
        turns = turns[1:]
        while turns and turns[0]["role"] != "user":  # a conversation restarts at a user turn
            turns = turns[1:]
    raise RequestError(f"the last message does not fit in {max_tokens} tokens with the system prompt")


def validate_messages(messages: list) -> list:
    if not messages:
        raise RequestError("inputs is an empty list: expected a string or a non-empty list of messages")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise RequestError(f"inputs[{i}]={m!r}: expected {{'role': str, 'content': str}}")
    return messages


class EndpointHandler:
    def __init__(self, path: str = ""):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        # trust_remote_code also for the tokenizer: AutoTokenizer resolves AutoConfig through auto_map and would
        # otherwise stop at an interactive [y/N] prompt.
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        # trust_remote_code loads our GPT2CustomForCausalLM; a stock GPT2LMHeadModel export loads without it.
        self.model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype)
        self.model.to(self.device).eval()
        self.context = self.model.config.max_position_embeddings
        self.max_new_tokens_cap = int(os.environ.get("GPT2CUSTOM_MAX_NEW_TOKENS", 512))
        self.max_input_chars = int(os.environ.get("GPT2CUSTOM_MAX_INPUT_CHARS", 100_000))
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos]) - {None}

    def __call__(self, data: dict):
        try:
            return self._generate(*self._parse(data))
        except RequestError as e:
            return {"error": str(e)}
        except Exception as e:  # an endpoint answers every request: the client sees why this one failed
            return {"error": f"generation failed: {type(e).__name__}: {e}"}

    def _parse(self, data) -> tuple[list[int], dict]:
        if not isinstance(data, dict) or "inputs" not in data:
            raise RequestError('the body must be a JSON object with "inputs" (and optionally "parameters")')
        unknown = sorted(set(data) - TOP_LEVEL_KEYS)
        if unknown:
            raise RequestError(f"unknown key(s) {unknown} in the body; allowed: {sorted(TOP_LEVEL_KEYS)}")
        if data.get("stream"):
            raise RequestError("stream=true is not supported by this handler")
        params = validate_parameters(data.get("parameters"))
        inputs = data["inputs"]
        if isinstance(inputs, str):
            if len(inputs) > self.max_input_chars:
                raise RequestError(f"inputs has {len(inputs)} characters; the limit is {self.max_input_chars}")
            ids = self.tokenizer(inputs)["input_ids"]
        elif isinstance(inputs, list):
            messages = validate_messages(inputs)
            chars = sum(len(m["content"]) for m in messages)
            if chars > self.max_input_chars:
                raise RequestError(f"the messages have {chars} characters; the limit is {self.max_input_chars}")
            if not self.tokenizer.chat_template:
                raise RequestError("this model has no chat template: send inputs as a string")
            requested = params.get("max_new_tokens",
                                   self.model.generation_config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
            room = self.context - min(requested, self.max_new_tokens_cap, self.context // 2)  # kept for the answer
            try:
                messages = fit_messages(self.tokenizer, messages, room) if "truncate" not in params else messages
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)[
                    "input_ids"
                ]
            except RequestError:
                raise
            except Exception as e:  # the template raises on an unknown role
                raise RequestError(f"cannot apply the chat template: {e}") from e
        else:
            raise RequestError(f"inputs={inputs!r}: expected a string or a list of messages")
        if not ids:  # GPT-2 starts unconditional text after <|endoftext|>
            ids = [self.tokenizer.eos_token_id]
        if "truncate" in params:
            ids = ids[-params["truncate"] :]
        if len(ids) >= self.context:
            raise RequestError(
                f"the input is {len(ids)} tokens; this model's context is {self.context} tokens including the answer. "
                "Shorten it, or pass parameters.truncate to keep only the last N tokens"
            )
        return ids, params

    def _generate(self, ids: list[int], params: dict):
        defaults = self.model.generation_config
        requested = params.get("max_new_tokens", defaults.max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
        gen = {
            "max_new_tokens": min(requested, self.max_new_tokens_cap, self.context - len(ids)),
            "do_sample": params.get("do_sample", defaults.do_sample) and params.get("temperature") != 0,
        }
        # temperature 0 means greedy (the OpenAI/TGI habit); sampling knobs only matter when sampling.
        names = ("temperature", "top_p", "top_k", "repetition_penalty") if gen["do_sample"] else ("repetition_penalty",)
        gen.update({k: params[k] for k in names if k in params})
        if "seed" in params:
            torch.manual_seed(params["seed"])
        input_ids = torch.tensor([ids], device=self.device)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.inference_mode():
            out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), pad_token_id=pad_id, **gen)
        new = out[0, len(ids) :].tolist()
        stopped = bool(new) and new[-1] in self.stop_ids
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        if params.get("return_full_text"):
            text = self.tokenizer.decode(ids, skip_special_tokens=True) + text
        answer = {"generated_text": text}
        if params.get("details"):
            answer["details"] = {
                "prompt_tokens": len(ids),
                "generated_tokens": len(new),
                "finish_reason": "eos_token" if stopped else "length",
            }
        return [answer]
