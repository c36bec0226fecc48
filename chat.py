"""Talk to a chat checkpoint in the terminal: the answer streams token by token, the conversation carries over.

Loads any folder or Hub repo that `sft.py` wrote (AutoModelForCausalLM and AutoTokenizer with
`trust_remote_code=True`), renders the conversation with the tokenizer's chat template, and prints the reply as
`generate` produces it (transformers' `TextStreamer`). The oldest turns are dropped when the conversation outgrows
the context window; the system prompt stays. Type `/reset` to start over, `/exit` or Ctrl-D to quit. Reading from a
pipe works too: `printf 'Hi!\\nAnd you?\\n' | python chat.py --model_name_or_path runs/sft-124m` answers both lines.

    python chat.py --model_name_or_path runs/sft-124m
    python chat.py --model_name_or_path org/gpt2custom-124m-sft --system "You answer in one sentence." --temperature 0
"""

import sys
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer
from trl import TrlParser

from gpt2custom.chat import fit_to_context
from gpt2custom.files import write_json_atomic


@dataclass
class ChatArgs:
    model_name_or_path: str = field(default="runs/sft-124m", metadata={"help": "sft.py output folder or Hub repo."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (pin it to run reviewed code)."})
    system: str | None = field(default=None, metadata={"help": "System prompt, kept for the whole conversation."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest answer, in tokens."})
    min_new_tokens: int = field(default=0, metadata={"help": "No end token before this many (0: the model decides)."})
    temperature: float = field(default=0.7, metadata={"help": "0 = greedy decoding."})
    top_p: float = 0.95
    top_k: int = 50
    repetition_penalty: float = field(default=1.1, metadata={"help": "Small models loop without it."})
    seed: int | None = field(default=None, metadata={"help": "Fix it to get the same answers again."})
    device: str | None = field(default=None, metadata={"help": "Default: cuda when available, else cpu."})
    transcript_json: str | None = field(default=None, metadata={
        "help": "Also write every turn here (user text, answer, new tokens, what ended it: the end token or "
                "max_new_tokens; or the error instead of an answer), rewritten after each turn."})


def load(args: ChatArgs):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, revision=args.revision, trust_remote_code=True)
    if not tokenizer.chat_template:
        raise ValueError(f"{args.model_name_or_path} has no chat template: fine-tune it with sft.py first")
    model = AutoModelForCausalLM.from_pretrained(
        args.model_name_or_path,
        revision=args.revision,
        trust_remote_code=True,
        dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32,
    )
    return tokenizer, model.to(device).eval()


def main(args: ChatArgs):
    try:
        tokenizer, model = load(args)
    except (OSError, ValueError) as e:
        sys.exit(f"chat.py: {e}")
    context = model.config.max_position_embeddings
    reserve = min(args.max_new_tokens, context // 2)  # room kept for the answer when old turns are dropped
    if args.seed is not None:
        torch.manual_seed(args.seed)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k) if args.temperature > 0 else {}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    turns = []
    eos = model.generation_config.eos_token_id  # sft.py saves <|endoftext|> and the role markers
    stop_ids = set(eos if isinstance(eos, list) else [eos])

    def record(turn: dict):
        if args.transcript_json:
            turns.append(turn)
            write_json_atomic(args.transcript_json, turns)

    print(f"{args.model_name_or_path}: /reset starts over, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            text = input(">>> ").strip()
        except EOFError:
            break
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(start)
            continue
        if not text:
            continue
        try:
            messages = fit_to_context(tokenizer, [*history, {"role": "user", "content": text}], context - reserve)
        except ValueError as e:
            print(f"[{e}: not sent]")
            record({"user": text, "answer": None, "error": f"{e}: not sent"})
            continue
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        ).to(model.device)
        prompt_length = inputs["input_ids"].shape[1]
        output = model.generate(
            **inputs,
            streamer=streamer,
            max_new_tokens=min(args.max_new_tokens, context - prompt_length),
            min_new_tokens=min(args.min_new_tokens, context - prompt_length) or None,
            do_sample=args.temperature > 0,
            repetition_penalty=args.repetition_penalty,
            **sampling,
        )
        new = output[0, prompt_length:].tolist()
        ended = bool(new) and new[-1] in stop_ids
        answer = tokenizer.decode(new, skip_special_tokens=True)
        history = [*messages, {"role": "assistant", "content": answer}]
        record({"user": text, "answer": answer, "error": None, "new_tokens": len(new) - ended,
                "ended_by": "end token" if ended else "max_new_tokens"})


if __name__ == "__main__":
    main(*TrlParser((ChatArgs,)).parse_args_and_config())
