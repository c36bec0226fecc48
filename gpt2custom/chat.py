"""The chat format for GPT-2 (which has none): role markers as special tokens in the padded vocabulary's spare ids.

GPT-2's tokenizer has 50257 ids and the model's vocabulary 50304, so the three role markers take ids 50257-50259
with no embedding resize. Assistant turns are wrapped in `{% generation %}` so TRL's `assistant_only_loss` trains on
them alone, and `<|endoftext|>` sits inside the assistant turn so the model learns to stop.

    <|system|>\nYou are helpful.\n<|user|>\nHi!\n<|assistant|>\nHello!<|endoftext|>\n
"""

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
