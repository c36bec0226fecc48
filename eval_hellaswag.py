"""Evaluate and compare causal LMs: HellaSwag in two named conventions, perplexity, and the standard zero-shot suite
through lm-evaluation-harness, side by side.

Any number of models in one call: our checkpoint folders, a stock GPT2LMHeadModel export, or a Hub causal LM
(`openai-community/gpt2`). HellaSwag validation (10,042 examples, zero-shot) is downloaded once into the cache
(`$GPT2CUSTOM_CACHE/hellaswag`) from the Hub's Parquet export of Rowan/hellaswag (revision refs/convert/parquet,
which lm-eval's hellaswag task reads too); `--hellaswag_path` takes a local jsonl/parquet instead.

Conventions (they give different numbers for the same model; every number says which one it is):
  completion  build-nanogpt / llm.c: raw ctx, " " + ending, acc by summed loss, acc_norm by mean loss per token
  harness     lm-evaluation-harness: preprocessed "activity_label: ctx_a Ctx_b", acc_norm by characters
Published, GPT-2 124M (openai-community/gpt2): completion acc 28.59 / acc_norm 29.55; harness 28.92 / 31.14.

Zero-shot suite (`--tasks suite` = hellaswag arc_easy arc_challenge piqa winogrande lambada_openai, or any lm-eval
task names): EleutherAI's lm-evaluation-harness (`pip install -r requirements-eval.txt`) runs on the model object this
script loaded (`HFLM(pretrained=model, tokenizer=...)`), so our checkpoints, stock GPT-2 and Hub causal LMs go through
one code path; the numbers are comparable with those in papers and on model cards. `--task_data TASK=FILE` scores a
default task's own definition on a local copy of its data (Hub format, .jsonl/.parquet); `--include_path DIR` adds
task YAMLs. Our fast HellaSwag scorer stays for in-loop evaluation and agrees with lm-eval's pick on every example
(tests/test_lmeval.py); `--conventions none` skips it. GPT-2 124M with lm-eval 0.4, 0-shot, as commonly reported
(not re-measured here: run `--models openai-community/gpt2 --tasks suite` to check): hellaswag acc_norm 31.1,
arc_easy acc 43.8, arc_challenge acc_norm 22.7, piqa acc 62.9, winogrande acc 51.6, lambada_openai acc 32.6 / ppl 40.1.

Outputs in --out_dir: eval_results.json ({"hellaswag": {split, n, limit, source}, "lm_eval": {version, num_fewshot,
limit, tasks: {task: {dataset, dataset_name, split, n, task_version}}}, "results": [{"model",
"hellaswag_completion": {acc, acc_norm}, "hellaswag_harness": {...}, "lm_eval": {task: {acc, acc_stderr, ...}},
"perplexity": {dataset, loss, ppl, tokens}}]}), eval_results.png (accuracy bars beside perplexity bars), and the table on stdout.

    python eval_hellaswag.py --models runs/gpt2-124m/final openai-community/gpt2 --limit 1000
    python eval_hellaswag.py --models runs/gpt2-124m/final --perplexity data/fineweb-edu-10B --perplexity_max_tokens 1000000
    python eval_hellaswag.py --models openai-community/gpt2 --perplexity wikitext --perplexity_config wikitext-2-raw-v1 --stride 512
    python eval_hellaswag.py --models runs/gpt2-124m/final openai-community/gpt2 --tasks suite --conventions none
    python eval_hellaswag.py --models runs/gpt2-124m/final --tasks hellaswag arc_easy --task_data hellaswag=hs.jsonl
    accelerate launch eval_hellaswag.py --models ...                   # examples split across the GPUs (not --tasks)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 eval_hellaswag.py --models ... --cpu true
"""

import gc
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from trl import TrlParser

from gpt2custom.checkpoints import load_model
from gpt2custom.distributed import shutdown
from gpt2custom.evaluation import (
    DEFAULT_TASKS,
    lm_eval_version,
    load_perplexity_tokens,
    local_task_file,
    perplexity,
    plot_comparison,
    results_table,
    run_lm_eval,
    write_json,
)
from gpt2custom.files import model_tokenizer
from gpt2custom.hellaswag import (
    CONVENTIONS,
    HUB_DATASET,
    HUB_REVISION,
    evaluate_hellaswag,
    lm_eval_hub_task,
    load_hellaswag,
)
from gpt2custom.tokenizer import load_tokenizer


@dataclass
class EvalArgs:
    models: list[str] = field(default_factory=list, metadata={"help": "model folders or Hub ids, any number"})
    conventions: list[str] = field(default_factory=lambda: list(CONVENTIONS),
                                   metadata={"help": "our HellaSwag scorer: completion harness, or none"})
    tasks: list[str] = field(default_factory=list, metadata={"help": "lm-eval tasks; suite = the 6 default ones"})
    task_data: list[str] = field(default_factory=list, metadata={"help": "TASK=FILE: a default task on local data"})
    include_path: str | None = field(default=None, metadata={"help": "folder of extra lm-eval task YAMLs"})
    num_fewshot: int = field(default=0, metadata={"help": "lm-eval few-shot examples (0 = zero-shot)"})
    lm_eval_batch_size: int = field(default=16, metadata={"help": "lm-eval requests per forward"})
    bootstrap_iters: int = field(default=100_000, metadata={"help": "lm-eval's bootstrap for non-mean stderrs"})
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
        if self.conventions == ["none"]:
            self.conventions = []
        unknown = [c for c in self.conventions if c not in CONVENTIONS]
        if unknown:
            raise ValueError(f"unknown convention(s) {unknown}; expected some of {list(CONVENTIONS)}, or none")
        self.tasks = list(dict.fromkeys(t for name in self.tasks for t in (DEFAULT_TASKS if name == "suite" else [name])))
        bad = [item for item in self.task_data if item.count("=") != 1 or item.split("=")[0] not in self.tasks]
        if bad:
            raise ValueError(f"--task_data {bad}: expected TASK=FILE with TASK one of --tasks {self.tasks}")
        if not self.conventions and not self.tasks and not self.perplexity:
            raise ValueError("nothing to evaluate: --conventions none without --tasks or --perplexity")


def tokenizer_for(model_name: str, override: str | None):
    """The model folder's tokenizer; our offline GPT-2 tokenizer for a folder saved without one."""
    if override:
        return load_tokenizer(override)
    return model_tokenizer(model_name)  # GPT-2's for a folder saved without tokenizer files


def lm_eval_include_paths(args: EvalArgs) -> list[str]:
    """--include_path, plus a folder of task files (written into --out_dir, a record of what was scored) pointing
    the --task_data tasks at their local files, and hellaswag without one at the Hub's Parquet export."""
    paths = [args.include_path] if args.include_path else []
    local = dict(item.split("=") for item in args.task_data)
    if local or "hellaswag" in args.tasks:
        folder = Path(args.out_dir) / "lm_eval_tasks"
        for task, data_file in local.items():
            local_task_file(folder, task, data_file)
        if "hellaswag" in args.tasks and "hellaswag" not in local and not args.include_path:
            lm_eval_hub_task(folder)
        paths.append(str(folder))
    return paths


def dataset_error(error: BaseException) -> str | None:
    """One line for an lm-eval task whose Hub dataset cannot be loaded (a loading script that datasets 4+ refuses,
    a missing repo, no network), naming the dataset and the fix; None for any other error."""
    from datasets.exceptions import DatasetNotFoundError

    script = isinstance(error, RuntimeError) and "Dataset scripts are no longer supported" in str(error)
    if not (script or isinstance(error, (DatasetNotFoundError, ConnectionError))):
        return None
    dataset, frame = None, error.__traceback__
    while frame is not None:  # the innermost load_dataset call names the dataset
        if frame.tb_frame.f_code.co_name in ("load_dataset", "load_dataset_builder"):
            dataset = frame.tb_frame.f_locals.get("path", dataset)
        frame = frame.tb_next
    return (f"lm-eval cannot load the Hub dataset {dataset or '(unknown)'} for --tasks: {error}. Pass a local copy "
            "in the Hub dataset's format with --task_data TASK=FILE, or leave that task out of --tasks")


def evaluate_model(name: str, args: EvalArgs, examples: list[dict], accelerator: Accelerator,
                   lm_eval_info: dict, include_paths: list[str]) -> dict:
    """One model's results row; lm-eval's run description (version, tasks' data) goes into `lm_eval_info`."""
    model = load_model(name).to(accelerator.device).eval()
    tokenizer = tokenizer_for(name, args.tokenizer)
    row = {"model": name}
    for convention in args.conventions:
        result = evaluate_hellaswag(model, tokenizer, examples, convention, args.batch_size, accelerator)
        row[f"hellaswag_{convention}"] = {"acc": result["acc"], "acc_norm": result["acc_norm"]}
        accelerator.print(f"{name}: hellaswag {convention} acc {result['acc']:.4f} acc_norm {result['acc_norm']:.4f}")
    if args.tasks:
        try:
            summary = run_lm_eval(model, tokenizer, args.tasks, include_path=include_paths,
                                  limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.lm_eval_batch_size,
                                  bootstrap_iters=args.bootstrap_iters)
        except (RuntimeError, ConnectionError, FileNotFoundError) as e:
            if (line := dataset_error(e)) is None:
                raise
            raise ValueError(line) from e
        row["lm_eval"] = summary.pop("scores")
        lm_eval_info.update(summary)
        for task, scores in row["lm_eval"].items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if not k.endswith("_stderr"))
            accelerator.print(f"{name}: lm-eval {summary['version']} {task}: {shown}")
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
        include_paths = []
        if args.tasks:
            lm_eval_version()  # installed? (one clear line if not)
            include_paths = lm_eval_include_paths(args)  # bad --task_data fails here, before any model loads
            if accelerator.num_processes > 1:
                raise ValueError("--tasks runs lm-eval in one process: launch without accelerate for it (lm-eval's "
                                 "own `accelerate launch -m lm_eval --model hf` splits one model across GPUs)")
        examples = []
        if args.conventions:
            with accelerator.main_process_first():  # one download, then the other ranks read the cache
                examples = load_hellaswag(args.hellaswag_path, args.split, args.cache_dir)
            examples = examples[: args.limit] if args.limit else examples
        lm_eval_info = {}
        results = [evaluate_model(name, args, examples, accelerator, lm_eval_info, include_paths)
                   for name in args.models]
    except (ValueError, FileNotFoundError) as e:  # bad input: one line naming the file, key or model; no traceback
        raise SystemExit(f"eval_hellaswag.py: error: {e}") from None
    if accelerator.is_main_process:
        out_dir = Path(args.out_dir)
        source = args.hellaswag_path or f"{HUB_DATASET} ({HUB_REVISION})"
        hellaswag = {"split": args.split, "n": len(examples), "limit": args.limit, "source": source}
        write_json(out_dir / "eval_results.json", {
            **({"hellaswag": hellaswag} if args.conventions else {}),
            **({"lm_eval": lm_eval_info} if args.tasks else {}),
            "results": results,
        })
        charted = plot_comparison(results, out_dir / "eval_results.png")
        print(results_table(results))
        print(f"wrote {out_dir / 'eval_results.json'}" + (f" and {out_dir / 'eval_results.png'}" if charted else ""))
    shutdown(accelerator)  # every rank ends its process group in order: none can hang at exit


if __name__ == "__main__":
    main()
