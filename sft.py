"""Supervised fine-tuning: turn a pretrained GPT2-Custom checkpoint into a chat model with TRL's SFTTrainer.

Data: answers of Llama-3.1-405B-Instruct, by default `argilla/magpie-ultra-v1.0` (multi-turn, filtered on its
quality and difficulty labels), or what `generate_synthetic.py` wrote (a local JSONL or its Hub dataset); see
`gpt2custom/sft_data.py`. The GPT-2 tokenizer gets the chat format of `gpt2custom/chat.py` (role tokens in the
padded vocabulary's spare ids, so no resize), the loss covers the assistant tokens only (`assistant_only_loss`, the
closing `<|endoftext|>` included, so the model learns to stop), conversations are packed best-fit without attending
across each other, and a held-out split gives `eval_loss`.

Base model: a `pretrain.py` output folder (e.g. `runs/gpt2-124m/final`) or a Hub repo (loaded with
`trust_remote_code=True`). Output: `output_dir` is an HF model folder (weights, config with `auto_map`, the two model
files, tokenizer with `chat_template.jinja`, generation config) that loads with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`, plus `trainer_state.json` (the logged losses) and
`eval_results.json`, and `sft_split.json`: how the train / held-out split was made (dataset, filters, eval_size,
seed, held-out rows, a hash of the training rows) and what was dropped (no assistant turn, unsafe, filters, longer
than max_length), which `eval_chat.py --model <folder>` reads to judge only held-out prompts, and `run_summary.json`
(steps, tokens, time, data, settings): the card's training section, which `publish.py --model_dir <folder>` shows.
`--push_to_hub true --hub_model_id org/name` uploads it and replaces TRL's README with our card.

    accelerate launch sft.py --config configs/sft-124m.yaml                      # GPUs, bf16
    accelerate launch sft.py --config configs/sft-124m.yaml --dataset_name data/synthetic/llama405b.jsonl \\
        --push_to_hub true --hub_model_id org/gpt2custom-124m-sft
    python sft.py --config configs/sft-smoke.yaml                               # the tiny model on a CPU
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 sft.py --config configs/sft-smoke.yaml
    python chat.py --model_name_or_path runs/sft-124m                            # talk to the result

Every field of `SFTScriptArgs` below, of TRL's `SFTConfig` and of its `ModelConfig` is a YAML key and a CLI flag;
RECIPE holds our defaults where they differ from TRL's. Reference numbers: not measured yet.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import IntervalStrategy, TrainerState
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser

from gpt2custom.chat import load_chat_tokenizer, stop_token_ids
from gpt2custom.checkpoints import load_model
from gpt2custom.distributed import shutdown
from gpt2custom.files import write_json_atomic
from gpt2custom.hub import write_model_card
from gpt2custom.sft_data import (
    DEFAULT_DATASET,
    LONG_CONVERSATIONS,
    fit_to_max_length,
    select_conversations,
    split_record,
    train_eval_split,
    write_split_record,
)

# Our defaults for a GPT-2 sized model where TRL's (tuned for 1-8B models) do not fit; YAML and CLI override them.
RECIPE = dict(
    # TRL's 2e-5 barely moves a 124M model. Pretraining peaked at 6e-4 (build-nanogpt); a sixth of that adapts the
    # model, and the three role-token embeddings it never saw, without wiping what pretraining taught.
    learning_rate=1e-4,
    lr_scheduler_type="cosine",
    warmup_steps=0.03,  # a float < 1 is a fraction of the steps
    num_train_epochs=1,  # magpie-ultra is large; for a few thousand generate_synthetic.py rows use 3
    per_device_train_batch_size=16,  # packed rows of max_length tokens each
    per_device_eval_batch_size=16,
    max_length=1024,  # the model's context: the length of a packed row
    packing=True,  # best-fit decreasing, no attention across conversations; longer ones: see long_conversations
    assistant_only_loss=True,  # train on the answers, not on the prompts
    activation_checkpointing=False,  # TRL turns it on; a 124M model fits without it and runs ~20 % faster
    ddp_find_unused_parameters=False,  # every parameter gets a gradient: skip DDP's extra graph traversal
    eval_strategy="steps",
    eval_steps=0.1,  # ten evaluations per run
    save_strategy="steps",
    save_steps=0.25,
    save_total_limit=2,
    logging_steps=10,
    report_to="tensorboard",  # loss curves in output_dir/runs
    trust_remote_code=True,
    output_dir="runs/sft",
)


@dataclass
class SFTScriptArgs:
    dataset_name: str = field(
        default=DEFAULT_DATASET,
        metadata={"help": "Hub dataset id, or a local .jsonl/.json/.parquet file or folder (generate_synthetic.py)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "The split to read; eval rows are held out of it."})
    messages_column: str | None = field(
        default=None, metadata={"help": "Column with the conversations (default: 'messages', else 'conversation')."}
    )
    min_quality: str | None = field(
        default=None,
        metadata={"help": "Keep rows whose 'quality' label is at least this ('very poor' .. 'excellent'; magpie)."},
    )
    max_difficulty: str | None = field(
        default=None,
        metadata={"help": "Keep rows whose 'difficulty' label is at most this ('very easy' .. 'very hard'; magpie)."},
    )
    max_samples: int | None = field(default=None, metadata={"help": "Train on a random subset of this many rows."})
    keep_unsafe: bool = field(
        default=False, metadata={"help": "Keep rows whose 'guard' column (Llama Guard, magpie) says unsafe."}
    )
    long_conversations: str = field(
        default="drop",
        metadata={"help": "Conversations longer than max_length: 'drop' them (counted; the rest stay whole) or "
                  "'truncate' them at max_length (TRL's packing does; counted, with the tokens cut)."},
    )
    eval_size: float = field(
        default=0.01, metadata={"help": "Held-out rows: a fraction when < 1, a count otherwise; 0 = no evaluation."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Default: the model's own tokenizer, else GPT-2's (offline)."}
    )
    eval_json: str | None = field(
        default=None, metadata={"help": "eval_hellaswag.py's JSON for the model card's results (with --push_to_hub)."}
    )


def device_defaults() -> dict:
    """bf16 where the GPU has it; on a machine without a GPU, train on the CPU in fp32 (TRL would refuse bf16)."""
    cuda = torch.cuda.is_available()
    return dict(use_cpu=not cuda, bf16=cuda and torch.cuda.is_bf16_supported())


def split_settings(script_args: SFTScriptArgs, seed: int) -> dict:
    """What decides which rows train and which are held out (the split record's settings)."""
    return {"dataset": script_args.dataset_name, "config": script_args.dataset_config,
            "split": script_args.dataset_split, "messages_column": script_args.messages_column,
            "min_quality": script_args.min_quality, "max_difficulty": script_args.max_difficulty,
            "keep_unsafe": script_args.keep_unsafe, "max_samples": script_args.max_samples,
            "eval_size": script_args.eval_size, "seed": seed}


def load_data(script_args: SFTScriptArgs, seed: int):
    """(train rows, held-out rows or None, the split record): conversations without an assistant turn, flagged
    unsafe or filtered out are dropped and counted in the record."""
    settings = split_settings(script_args, seed)
    selection = select_conversations(
        settings["dataset"], config=settings["config"], split=settings["split"],
        messages_column=settings["messages_column"], min_quality=settings["min_quality"],
        max_difficulty=settings["max_difficulty"], keep_unsafe=settings["keep_unsafe"],
        max_samples=settings["max_samples"], seed=seed)
    train, held_out = train_eval_split(selection.dataset, script_args.eval_size, seed=seed)
    return train, held_out, split_record(settings, selection, train, held_out)


def fit_lengths(train_set, eval_set, tokenizer, script_args: SFTScriptArgs, args: SFTConfig):
    """Both sets with the long_conversations policy applied; the counts per set."""
    stats = {}
    if args.max_length is None:
        return train_set, eval_set, stats
    train_set, stats["train"] = fit_to_max_length(train_set, tokenizer, args.max_length,
                                                  script_args.long_conversations, args.dataset_num_proc)
    if eval_set is not None:
        eval_set, stats["eval"] = fit_to_max_length(eval_set, tokenizer, args.max_length,
                                                    script_args.long_conversations, args.dataset_num_proc)
    return train_set, eval_set, stats


def describe_data(record: dict, lengths: dict) -> str:
    """One line of what the run trains on and what it dropped or truncated."""
    counts = record["counts"]
    dropped = ", ".join(f"{n:,} {reason}" for reason, n in counts["dropped"].items()) or "none"
    line = f"{counts['source_rows']:,} rows in {record['dataset']}; dropped: {dropped}"
    for name, s in lengths.items():
        if s["dropped"]:
            line += f"; {name}: {s['dropped']:,} conversations longer than {s['max_length']} tokens dropped"
        if s["truncated"]:
            line += (f"; {name}: {s['truncated']:,} conversations truncated at {s['max_length']} tokens "
                     f"({s['tokens_cut']:,} tokens cut)")
    return line


def run_summary(
    args: SFTConfig, state: TrainerState, script_args: SFTScriptArgs, model_args: ModelConfig, eval_metrics: dict,
    data: str | None = None,
) -> dict:
    """What the model card shows about this run (`write_model_card`'s `training`), written to the output folder as
    run_summary.json; `data`: what it trained on, the rows dropped and the conversations dropped or truncated for
    length (`describe_data`)."""
    train_log = next((log for log in reversed(state.log_history) if "train_runtime" in log), {})
    tokens = next((log["num_tokens"] for log in reversed(state.log_history) if "num_tokens" in log), None)
    losses = [log["loss"] for log in state.log_history if "loss" in log]
    return {
        "SFT": (f"{state.global_step} steps from {model_args.model_name_or_path}"
                + (f", final train loss {losses[-1]:.4f}" if losses else "")),
        "steps": state.global_step,
        "tokens": int(tokens) if tokens else None,
        "wall_time_s": train_log.get("train_runtime"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "num_processes": args.world_size,
        "val_loss": eval_metrics.get("eval_loss"),
        "SFT data": data,
        "config": {
            "base_model": model_args.model_name_or_path,
            "dataset": script_args.dataset_name,
            "min_quality": script_args.min_quality,
            "max_difficulty": script_args.max_difficulty,
            "keep_unsafe": script_args.keep_unsafe,
            "long_conversations": script_args.long_conversations,
            "learning_rate": args.learning_rate,
            "lr_scheduler_type": str(args.lr_scheduler_type),
            "warmup_steps": args.warmup_steps,
            "num_train_epochs": args.num_train_epochs,
            "max_steps": args.max_steps,
            "sequences_per_step": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
            "max_length": args.max_length,
            "packing": args.packing,
            "assistant_only_loss": args.assistant_only_loss,
            "bf16": args.bf16,
        },
    }


def is_hub_id(name: str) -> bool:
    return not Path(name).exists() and name.count("/") == 1


def load_inputs(script_args: SFTScriptArgs, training_args: SFTConfig, model_args: ModelConfig):
    """The base model, its tokenizer with the chat format, and the train / held-out conversations."""
    if model_args.model_name_or_path is None:
        raise ValueError("--model_name_or_path is required (a pretrain.py output folder or a Hub repo)")
    if script_args.long_conversations not in LONG_CONVERSATIONS:
        raise ValueError(f"--long_conversations {script_args.long_conversations!r}: expected one of "
                         f"{list(LONG_CONVERSATIONS)}")
    with training_args.main_process_first(desc="loading the dataset"):  # rank 0 downloads and caches
        train_set, eval_set, record = load_data(script_args, training_args.seed)
    # Mixed precision keeps fp32 master weights; a bf16 checkpoint would otherwise train in pure bf16.
    model = load_model(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        dtype=model_args.dtype or torch.float32,
        attn_implementation=model_args.attn_implementation,
    )
    tokenizer = load_chat_tokenizer(
        script_args.tokenizer_name_or_path or model_args.model_name_or_path,
        model.config.vocab_size,
        revision=model_args.model_revision,
        trust_remote_code=True,
    )
    if (training_args.max_length or 0) > model.config.max_position_embeddings:
        raise ValueError(
            f"max_length={training_args.max_length} is longer than the model's context "
            f"({model.config.max_position_embeddings} tokens)"
        )
    with training_args.main_process_first(desc="counting tokens"):
        train_set, eval_set, record["lengths"] = fit_lengths(train_set, eval_set, tokenizer, script_args,
                                                             training_args)
    # TRL's tokenization keeps the extra column and its packing drops it; the record has the row numbers.
    train_set = train_set.remove_columns("row")
    eval_set = eval_set.remove_columns("row") if eval_set is not None else None
    return model, tokenizer, train_set, eval_set, record


def main(script_args: SFTScriptArgs, training_args: SFTConfig, model_args: ModelConfig):
    state = PartialState()
    state.print(
        f"SFT of {model_args.model_name_or_path} on {script_args.dataset_name}: {state.num_processes} "
        f"process(es), {state.distributed_type}"
    )
    try:
        model, tokenizer, train_set, eval_set, record = load_inputs(script_args, training_args, model_args)
    except (ValueError, OSError) as e:  # bad or unreachable model or data: one line, not a traceback
        sys.exit(f"sft.py: {e}")
    if eval_set is None:
        training_args.eval_strategy = IntervalStrategy.NO
    state.print(describe_data(record, record["lengths"]))
    state.print(f"{len(train_set):,} training conversations, {len(eval_set) if eval_set else 0:,} held out")
    if state.is_main_process:  # before training: eval_chat.py can tell held-out prompts even from a killed run
        write_split_record(training_args.output_dir, record)

    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    # The folder's own generate() and pipeline() then stop where a chat answer ends, as the published folder does.
    trainer.model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    trainer.save_model(training_args.output_dir)  # also the tokenizer with its chat template
    trainer.save_state()  # trainer_state.json: the log history
    # With step-wise evaluation the Trainer has just evaluated the final model itself: no second pass over eval_set.
    eval_metrics = next((log for log in reversed(trainer.state.log_history) if "eval_loss" in log), {})
    if eval_set is not None and eval_metrics.get("step") != trainer.state.global_step:
        eval_metrics = trainer.evaluate()
    if eval_metrics:
        trainer.save_metrics("eval", eval_metrics)
        state.print(f"held-out loss on assistant tokens: {eval_metrics['eval_loss']:.4f}")
    summary = run_summary(training_args, trainer.state, script_args, model_args, eval_metrics,
                          describe_data(record, record["lengths"]))
    if state.is_main_process:  # the card's training section, for publish.py and the push below
        write_json_atomic(Path(training_args.output_dir) / "run_summary.json", summary)
    state.print(f"saved {training_args.output_dir}")

    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        if trainer.is_world_process_zero():  # TRL's README out, our card (data, recipe, eval results) in
            card = write_model_card(
                training_args.output_dir,
                model_id=trainer.hub_model_id,
                base_model=model_args.model_name_or_path if is_hub_id(model_args.model_name_or_path) else None,
                datasets=[script_args.dataset_name] if is_hub_id(script_args.dataset_name) else [],
                training=summary,
                eval_json=script_args.eval_json,
                tags=("trl", "sft", "chat"),
            )
            card.push_to_hub(trainer.hub_model_id, token=training_args.hub_token)
            state.print(f"pushed to https://huggingface.co/{trainer.hub_model_id}")
    shutdown(trainer)  # trackers, then the DDP wrapper and the process group, in order: no rank hangs at exit


def parse_args(argv=None) -> tuple[SFTScriptArgs, SFTConfig, ModelConfig]:
    parser = TrlParser((SFTScriptArgs, SFTConfig, ModelConfig))
    parser.set_defaults_with_config(**RECIPE, **device_defaults())  # a --config YAML then overrides these
    return parser.parse_args_and_config(argv)


if __name__ == "__main__":
    main(*parse_args())
