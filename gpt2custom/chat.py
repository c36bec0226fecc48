"""The chat format for GPT-2 (which has none): role markers as special tokens in the padded vocabulary's spare ids.

GPT-2's tokenizer has 50257 ids and the model's vocabulary 50304, so the three role markers take ids 50257-50259
with no embedding resize. Assistant turns are wrapped in `{% generation %}` so TRL's `assistant_only_loss` trains on
them alone, and `<|endoftext|>` sits inside the assistant turn so the model learns to stop.

    <|system|>\nYou are helpful.\n<|user|>\nHi!\n<|assistant|>\nHello!<|endoftext|>\n
"""


from .files import model_tokenizer

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = [f"<|{role}|>" for role in ROLES]

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('unknown role ' + message['role'] + ': expected system, user or assistant') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|assistant|>\n' }}{% generation %}{{- message['content'] + eos_token }}{% endgeneration %}{{- '\n' }}"
    "{%- else %}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
)


def add_chat_format(tokenizer, model_vocab_size: int = 50304):
    """Give a GPT-2 tokenizer the role tokens and the chat template (in place; returns it)."""
    tokenizer.add_special_tokens({"additional_special_tokens": ROLE_TOKENS})
    if len(tokenizer) > model_vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} ids with the role tokens; the model has {model_vocab_size}")
    tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def stop_token_ids(tokenizer) -> list[int]:
    """Where a chat answer ends: `<|endoftext|>`, or a role marker (the model began the next turn itself). A
    tokenizer without the chat format has no role markers (they map to its unknown token): `<|endoftext|>` only."""
    role_ids = [tid for tid in tokenizer.convert_tokens_to_ids(ROLE_TOKENS) if tid != tokenizer.unk_token_id]
    return [tokenizer.eos_token_id, *role_ids]


def load_chat_tokenizer(name_or_path: str | None = None, model_vocab_size: int = 50304, **kwargs):
    """The tokenizer of a model folder or Hub repo with the chat format added; GPT-2's own (offline) when
    `name_or_path` is None or a local folder without tokenizer files (a bare weights folder)."""
    try:
        tokenizer = model_tokenizer(name_or_path, **kwargs)
    except OSError as e:
        raise ValueError(f"no tokenizer in {name_or_path!r} ({e}); pass a tokenizer folder or Hub id") from e
    return add_chat_format(tokenizer, model_vocab_size)


def fit_to_context(tokenizer, messages: list[dict], max_tokens: int) -> list[dict]:
    """The conversation with its oldest turns dropped (a system prompt is kept) until the prompt for the next answer
    fits in `max_tokens`."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    while turns:
        prompt = tokenizer.apply_chat_template(system + turns, add_generation_prompt=True, return_dict=True)
        if len(prompt["input_ids"]) <= max_tokens:
            return system + turns
        turns = turns[1:]
        while turns and turns[0]["role"] != "user":  # a conversation restarts at a user turn
            turns = turns[1:]
    raise ValueError(f"the last message does not fit in {max_tokens} tokens with the system prompt")
