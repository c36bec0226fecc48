"""Evaluate and compare causal LMs: HellaSwag in two named conventions, plus perplexity, side by side.

Any number of models in one call: our checkpoint folders, a stock GPT2LMHeadModel export, or a Hub causal LM
(`openai-community/gpt2`). HellaSwag validation (10,042 examples, zero-shot) is downloaded once into the cache
(`$GPT2CUSTOM_CACHE/hellaswag`); `--hellaswag_path` takes a local jsonl/parquet instead.

Conventions (they give different numbers for the same model; every number says which one it is):
  completion  build-nanogpt / llm.c: raw ctx, " " + ending, acc by summed loss, acc_norm by mean loss per token
  harness     lm-evaluation-harness: preprocessed "activity_label: ctx_a Ctx_b", acc_norm by characters
Published, GPT-2 124M (openai-community/gpt2): completion acc 28.59 / acc_norm 29.55; harness 28.92 / 31.14.

Outputs in --out_dir: eval_results.json ({"hellaswag": {split, n, limit, source}, "results": [{"model",
"hellaswag_completion": {acc, acc_norm}, "hellaswag_harness": {...}, "perplexity": {dataset, loss, ppl, tokens}}]}),
eval_results.png (bar chart), and the table on stdout.

    python eval_hellaswag.py --models runs/gpt2-124m/final openai-community/gpt2 --limit 1000
    python eval_hellaswag.py --models runs/gpt2-124m/final --perplexity data/fineweb-edu-10B --perplexity_max_tokens 1000000
    python eval_hellaswag.py --models openai-community/gpt2 --perplexity wikitext --perplexity_config wikitext-2-raw-v1 --stride 512
    accelerate launch eval_hellaswag.py --models ...                   # examples split across the GPUs
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 eval_hellaswag.py --models ... --cpu true
"""

import gc
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from trl import TrlParser

from gpt2custom.checkpoints import load_model
from gpt2custom.evaluation import load_perplexity_tokens, perplexity, plot_comparison, results_table, write_json
from gpt2custom.hellaswag import CONVENTIONS, GITHUB_URLS, evaluate_hellaswag, load_hellaswag
from gpt2custom.tokenizer import load_tokenizer


@dataclass
class EvalArgs:
    models: list[str] = field(default_factory=list, metadata={"help": "model folders or Hub ids, any number"})
    conventions: list[str] = field(default_factory=lambda: list(CONVENTIONS), metadata={"help": "completion harness"})
    hellaswag_path: str | None = field(default=None, metadata={"help": "local .jsonl/.parquet or URL; default: download"})
    split: str = field(default="validation", metadata={"help": "HellaSwag split to download"})
    cache_dir: str | None = field(default=None, metadata={"help": "download cache; default $GPT2CUSTOM_CACHE/hellaswag"})
    limit: int | None = field(default=None, metadata={"help": "first N examples only, for quick looks"})
    batch_size: int = field(default=32, metadata={"help": "HellaSwag examples per forward (x4 endings)"})
    tokenizer: str | None = field(default=None, metadata={"help": "default: each model's own, else GPT-2's"})
    perplexity: str | None = field(default=None, metadata={"help": "shard folder, text file or Hub dataset id"})
    perplexity_split: str | None = field(default=None, metadata={"help": "shards: val; Hub: test (slices work)"})
    perplexity_config: str | None = field(default=None, metadata={"help": "Hub dataset config name"})
    perplexity_column: str = "text"
    perplexity_max_tokens: int | None = None
    perplexity_batch_size: int = field(default=8, metadata={"help": "windows per forward (each up to the context)"})
    stride: int | None = field(default=None, metadata={"help": "sliding-window stride; default = context length"})
    out_dir: str = "runs/eval"
    cpu: bool = field(default=False, metadata={"help": "Accelerator(cpu=True): gloo ranks on CPU"})

    def __post_init__(self):
        if not self.models:
            raise ValueError("pass at least one model: --models PATH_OR_HUB_ID [...]")
        unknown = [c for c in self.conventions if c not in CONVENTIONS]
        if unknown:
            raise ValueError(f"unknown convention(s) {unknown}; expected some of {list(CONVENTIONS)}")


def tokenizer_for(model_name: str, override: str | None):
    """The model folder's tokenizer; our offline GPT-2 tokenizer for a folder saved without one."""
    if override:
        return load_tokenizer(override)
    folder = Path(model_name)
    if folder.is_dir() and not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return load_tokenizer()
    return load_tokenizer(model_name)


def evaluate_model(name: str, args: EvalArgs, examples: list[dict], accelerator: Accelerator) -> dict:
    model = load_model(name).to(accelerator.device).eval()
    tokenizer = tokenizer_for(name, args.tokenizer)
    row = {"model": name}
    for convention in args.conventions:
        result = evaluate_hellaswag(model, tokenizer, examples, convention, args.batch_size, accelerator)
        row[f"hellaswag_{convention}"] = {"acc": result["acc"], "acc_norm": result["acc_norm"]}
        accelerator.print(f"{name}: hellaswag {convention} acc {result['acc']:.4f} acc_norm {result['acc_norm']:.4f}")
    if args.perplexity:
        tokens, description = load_perplexity_tokens(args.perplexity, tokenizer, args.perplexity_split,
                                                     args.perplexity_config, args.perplexity_column,
                                                     args.perplexity_max_tokens)
        row["perplexity"] = perplexity(model, tokens, stride=args.stride, batch_size=args.perplexity_batch_size,
                                       accelerator=accelerator, dataset=description)
        accelerator.print(f"{name}: {description} loss {row['perplexity']['loss']:.4f} ppl {row['perplexity']['ppl']:.2f}")
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def main(argv=None):
    try:
        (args,) = TrlParser((EvalArgs,)).parse_args_and_config(argv)
        accelerator = Accelerator(cpu=args.cpu)
        with accelerator.main_process_first():  # one download, then the other ranks read the cache
            examples = load_hellaswag(args.hellaswag_path, args.split, args.cache_dir)
        examples = examples[: args.limit] if args.limit else examples
        results = [evaluate_model(name, args, examples, accelerator) for name in args.models]
    except (ValueError, FileNotFoundError) as e:  # bad input: one line naming the file, key or model; no traceback
        raise SystemExit(f"eval_hellaswag.py: error: {e}") from None
    if accelerator.is_main_process:
        out_dir = Path(args.out_dir)
        source = args.hellaswag_path or GITHUB_URLS.get(args.split)
        write_json(out_dir / "eval_results.json", {
            "hellaswag": {"split": args.split, "n": len(examples), "limit": args.limit, "source": source},
            "results": results,
        })
        plot_comparison(results, out_dir / "eval_results.png")
        print(results_table(results))
        print(f"wrote {out_dir / 'eval_results.json'} and {out_dir / 'eval_results.png'}")
    accelerator.end_training()  # tears down the process group cleanly under accelerate launch


if __name__ == "__main__":
    main()
