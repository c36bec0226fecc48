"""Perplexity on token shards, a text file or a Hub dataset, and the model-comparison outputs (table, JSON, PNG).

Perplexity uses the sliding-window method for texts longer than the context (as in the transformers guide
"Perplexity of fixed-length models"): every token after the first is scored exactly once; windows of
``max_length`` inputs advance by ``stride`` tokens and score only the tokens no earlier window scored, so each of
them sees at least ``max_length - stride`` tokens of context. ``stride == max_length`` (the default) gives
non-overlapping windows, as the pretraining validation loss on windows of ``T + 1`` tokens does. Every window has the
same length: the last one ends at the last token and scores only what its predecessors left, so batches need no
padding.

The zero-shot suite runs through EleutherAI's lm-evaluation-harness (``lm-eval``, an optional dependency:
``pip install -r requirements-eval.txt``) on the loaded model object, so our remote-code model, our tokenizer and any
Hub causal LM go through the same code path as the numbers in papers and on model cards. Every number keeps its task,
metric and harness version. ``local_task_file`` points a stock task definition at local data files (offline runs,
tests), overriding only where the data comes from.
"""

import io
import json
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .files import DATA_BUILDERS, write_atomic, write_json_atomic
from .hellaswag import CONVENTIONS, inference_autocast, max_context

# -------------------------------------------------------------------------------------------------- perplexity


def sliding_windows(num_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(a, s, e)`` per window: the inputs are ``tokens[a : e - 1]`` (at most ``max_length``) and the scored targets
    ``tokens[s:e]``, the last ``e - s`` positions' next tokens. The spans ``[s, e)`` tile ``[1, num_tokens)``."""
    if not 0 < stride <= max_length:
        raise ValueError(f"stride={stride} must be in [1, max_length={max_length}]")
    if num_tokens < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {num_tokens}")
    windows, s, e = [], 1, min(num_tokens, max_length + 1)  # the first window scores all of its positions
    while True:
        windows.append((max(0, e - 1 - max_length), s, e))
        if e == num_tokens:
            return windows
        s, e = e, min(num_tokens, e + stride)


@torch.inference_mode()
def perplexity(model, tokens, max_length: int | None = None, stride: int | None = None, batch_size: int = 8,
               accelerator=None, show_progress: bool = True, dataset: str = "") -> dict:
    """``{"dataset", "loss", "ppl", "tokens"}``: mean next-token NLL (nats) over ``tokens`` (a 1-D array of ids) and
    its exp. ``max_length`` defaults to the model's context and ``stride`` to ``max_length``. With an
    ``accelerator`` the windows are split across ranks and the sums reduced (every rank gets the result)."""
    tokens = np.asarray(tokens)
    max_length = max_length or max_context(model)
    if tokens.size and int(tokens.max()) >= model.config.vocab_size:
        raise ValueError(f"{dataset or 'tokens'}: token id {int(tokens.max())} is outside the model's vocabulary "
                         f"of {model.config.vocab_size}; were these tokens made with another tokenizer?")
    windows = sliding_windows(len(tokens), max_length, stride or max_length)
    main = accelerator is None or accelerator.is_main_process
    if accelerator is not None:
        with accelerator.split_between_processes(windows) as part:
            windows = list(part)
    device = next(model.parameters()).device
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # NLL sum, scored tokens
    was_training = model.training
    model.eval()
    with inference_autocast(device), tqdm(total=len(windows), unit="win", desc="perplexity", disable=not (show_progress and main)) as bar:
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            keep = max(e - s for _, s, e in batch)
            inputs = torch.from_numpy(np.stack([tokens[a : e - 1] for a, _, e in batch]).astype(np.int64))
            targets = torch.from_numpy(np.stack([tokens[e - keep : e] for _, _, e in batch]).astype(np.int64))
            # all windows have the same length, so the scored positions are the last ones of every row
            logits = model(input_ids=inputs.to(device), logits_to_keep=keep).logits
            scored = torch.arange(keep, device=device)[None, :] >= torch.tensor(
                [keep - (e - s) for _, s, e in batch], device=device)[:, None]
            nll = F.cross_entropy(logits[scored].float(), targets.to(device)[scored], reduction="sum")
            sums += torch.stack([nll.double(), scored.sum().double()])
            bar.update(len(batch))
    model.train(was_training)
    if accelerator is not None:
        sums = accelerator.reduce(sums, reduction="sum")
    nll_sum, count = sums.tolist()
    loss = nll_sum / count
    return {"dataset": dataset, "loss": loss, "ppl": math.exp(loss), "tokens": int(count)}


def shard_tokens(data_dir: "str | Path", split: str = "val", max_tokens: int | None = None) -> np.ndarray:
    """The tokens of a prepared data folder's ``split`` shards, in order (documents joined by <|endoftext|>)."""
    from .data import list_shards, read_shard

    parts, total = [], 0
    for path in list_shards(data_dir, split):
        part = read_shard(path)
        if max_tokens is not None:
            part = part[: max_tokens - total]
        parts.append(np.asarray(part))
        total += len(part)
        if max_tokens is not None and total >= max_tokens:
            break
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def text_tokens(text: str, tokenizer, max_tokens: int | None = None) -> np.ndarray:
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return np.asarray(ids[:max_tokens] if max_tokens is not None else ids, dtype=np.int64)


def hub_dataset_text(name: str, config: str | None = None, split: str = "test", column: str = "text") -> str:
    """A dataset's ``column`` joined by blank lines, as the transformers perplexity guide does for wikitext.
    ``split`` takes slices (``"train[:1000]"``) for large corpora."""
    from datasets import load_dataset

    try:
        rows = load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ConnectionError)
        raise ValueError(f"cannot load dataset {name!r} (config {config!r}, split {split!r}): {e}") from e
    if column not in rows.column_names:
        raise ValueError(f"dataset {name!r} has no column {column!r}; its columns are {rows.column_names}")
    return "\n\n".join(rows[column])


def load_perplexity_tokens(source: str, tokenizer, split: str | None = None, config: str | None = None,
                           column: str = "text", max_tokens: int | None = None) -> tuple[np.ndarray, str]:
    """(tokens, description) from a prepared shard folder (split default "val"), a text file, or a Hub dataset id
    (split default "test")."""
    path = Path(source)
    if path.is_dir() and ((path / "manifest.json").exists() or any(path.glob("*.bin"))):
        split = split or "val"
        return shard_tokens(path, split, max_tokens), f"{source} ({split} shards)"
    if path.is_file():
        return text_tokens(path.read_text(encoding="utf-8"), tokenizer, max_tokens), str(source)
    split = split or "test"
    text = hub_dataset_text(source, config, split, column)
    return text_tokens(text, tokenizer, max_tokens), f"{source}{'/' + config if config else ''} ({split})"


# ------------------------------------------------------------------------------------ lm-evaluation-harness suite

# The zero-shot suite of GPT-2-sized model cards (Pythia, OPT, SmolLM...), in lm-eval's task names.
DEFAULT_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "lambada_openai")


@dataclass(frozen=True)
class StockTask:
    """Where lm-eval keeps a default task's definition, which split it scores, what picking at random scores, and the
    columns of the Hub dataset its prompts read."""

    yaml: str  # relative to lm_eval/tasks
    split: str
    chance: float | None  # accuracy of a random pick; None for tasks without a fixed number of choices
    columns: tuple[str, ...]


STOCK_TASKS = {
    "hellaswag": StockTask("hellaswag/hellaswag.yaml", "validation", 0.25,
                           ("activity_label", "ctx_a", "ctx_b", "endings", "label")),
    # a few ARC questions have 3 or 5 choices
    "arc_easy": StockTask("arc/arc_easy.yaml", "test", 0.25, ("question", "choices", "answerKey")),
    "arc_challenge": StockTask("arc/arc_challenge.yaml", "test", 0.25, ("question", "choices", "answerKey")),
    "piqa": StockTask("piqa/piqa.yaml", "validation", 0.5, ("goal", "sol1", "sol2", "label")),
    "winogrande": StockTask("winogrande/default.yaml", "validation", 0.5, ("sentence", "option1", "option2", "answer")),
    "lambada_openai": StockTask("lambada/lambada_openai.yaml", "test", None, ("text",)),
}
ACCURACY_METRICS = ("acc", "acc_norm")


def lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        raise ValueError("--tasks needs lm-evaluation-harness: pip install -r requirements-eval.txt") from None


def local_task_file(folder: "str | Path", task: str, data_file: "str | Path") -> Path:
    """Write ``folder/<task>.yaml``: lm-eval's own definition of ``task`` (``include``d, so prompts, choices and
    metrics stay the harness's) reading the split it scores from a local JSON Lines / JSON / CSV / Parquet file in the
    Hub dataset's format. Pass ``folder`` as the TaskManager's include path; the task keeps its name."""
    import lm_eval.tasks

    if task not in STOCK_TASKS:
        raise ValueError(f"local data for task {task!r}: known for {sorted(STOCK_TASKS)}; for another task write a "
                         "YAML that includes lm-eval's own and pass its folder as --include_path")
    data_file = Path(data_file).resolve()
    builders = {s: DATA_BUILDERS[s] for s in (".jsonl", ".json", ".csv", ".parquet")}
    if not data_file.is_file() or data_file.suffix not in builders:
        raise ValueError(f"local data for task {task!r}: {data_file} is not a {'/'.join(builders)} file")
    stock = STOCK_TASKS[task]
    check_task_columns(task, data_file, builders[data_file.suffix], stock.columns)
    config = {
        "include": str(Path(lm_eval.tasks.__file__).parent / stock.yaml),
        "task": task,
        "dataset_path": builders[data_file.suffix],
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {stock.split: str(data_file)}},
        # only the scored split exists locally: no few-shot pool (0-shot, as the default suite is)
        "training_split": None,
        "validation_split": stock.split if stock.split == "validation" else None,
        "test_split": stock.split if stock.split == "test" else None,
        "fewshot_split": None,
    }
    path = Path(folder) / f"{task}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")  # JSON is YAML
    return path


def check_task_columns(task: str, data_file: Path, builder: str, columns: tuple[str, ...]):
    """The first row of ``data_file`` has every column lm-eval's ``task`` reads (streamed: one row is read), so a file
    in another layout is one line now, not a template error once the model has loaded."""
    from datasets import load_dataset

    if data_file.stat().st_size == 0:
        raise ValueError(f"local data for task {task!r}: {data_file} has no rows")
    try:
        first = next(iter(load_dataset(builder, data_files=str(data_file), split="train", streaming=True)), None)
    except Exception as e:  # the builder's own parse error, whatever its type
        raise ValueError(f"local data for task {task!r}: {data_file} cannot be read as {builder}: "
                         f"{type(e).__name__}: {e}") from None
    if first is None:
        raise ValueError(f"local data for task {task!r}: {data_file} has no rows")
    missing = [c for c in columns if c not in first]
    if missing:
        raise ValueError(f"local data for task {task!r}: {data_file} lacks the column(s) {missing} that lm-eval's "
                         f"{task} reads (expected {list(columns)}, the Hub dataset's; it has {sorted(first)})")


def task_manager(tasks: list[str], include_path=None):
    """lm-eval's TaskManager for ``tasks``, with the task folder(s) ``include_path`` (a path or a list) first.
    Indexing the stock tasks takes ~12 s, so it is skipped when ``include_path`` defines every task asked for."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in ([include_path] if isinstance(include_path, (str, Path)) else include_path or [])]
    if paths:
        manager = TaskManager(include_path=paths, include_defaults=False)
        if set(tasks) <= set(manager.all_tasks):
            return manager
    manager = TaskManager(include_path=paths or None)
    unknown = sorted(set(tasks) - set(manager.all_tasks))
    if unknown:
        raise ValueError(f"--tasks {unknown}: not lm-eval tasks (`lm-eval ls tasks` lists them)")
    return manager


def run_lm_eval(model, tokenizer, tasks: list[str], *, include_path=None,
                limit: int | None = None, num_fewshot: int = 0, batch_size: int = 16, bootstrap_iters: int = 100_000,
                log_samples: bool = False) -> dict:
    """lm-eval's ``simple_evaluate`` on a loaded causal LM (``HFLM(pretrained=model, tokenizer=tokenizer)``).

    Returns ``{"version", "num_fewshot", "limit", "tasks": {task: {"dataset", "dataset_name", "split", "n",
    "task_version"}}, "scores": {task: {metric: value, metric + "_stderr": value}}}``, plus lm-eval's per-example
    records under ``"samples"`` with ``log_samples``. Metrics of the default filter keep their plain names."""
    version = lm_eval_version()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    device = next(model.parameters()).device
    # bf16 autocast on GPUs, as our own scorer does (inference_autocast); full precision on CPU
    mixed = inference_autocast(device).fast_dtype if device.type == "cuda" else None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, mixed_precision_dtype=mixed)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager(tasks, include_path),
                                  num_fewshot=num_fewshot, limit=limit, bootstrap_iters=bootstrap_iters,
                                  log_samples=log_samples)
    return lm_eval_summary(out, tasks, version, num_fewshot, limit, log_samples)


def lm_eval_summary(out: dict, tasks: list[str], version: str, num_fewshot: int, limit: int | None,
                    log_samples: bool = False) -> dict:
    """The parts of simple_evaluate's output that we publish, named by task and metric."""
    summary = {"version": version, "num_fewshot": num_fewshot, "limit": limit, "tasks": {}, "scores": {}}
    for task in tasks:
        config = out["configs"][task]
        data_files = (config.get("dataset_kwargs") or {}).get("data_files")
        split = config.get("test_split") or config.get("validation_split")
        summary["tasks"][task] = {
            "dataset": config.get("dataset_path") if not data_files else str(next(iter(data_files.values()))),
            "dataset_name": config.get("dataset_name"),
            "split": split,
            "n": out["n-samples"][task]["effective"],
            "task_version": out["versions"].get(task),
        }
        scores = {}
        for key, value in out["results"][task].items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or not isinstance(value, (int, float)):
                continue  # "alias", "name", "sample_len"
            scores[metric if filter_name == "none" else f"{metric} ({filter_name})"] = float(value)
        summary["scores"][task] = scores
    if log_samples:
        summary["samples"] = out["samples"]
    return summary


# -------------------------------------------------------------------------------------------------- comparison

METRIC_COLUMNS = [(f"hellaswag_{c}", m) for c in CONVENTIONS for m in ("acc", "acc_norm")]


def write_json(path: "str | Path", payload: dict):
    """Write through a temporary file and rename, so a crash never leaves a truncated results file."""
    write_json_atomic(path, payload)


def score_columns(results: list[dict]) -> list[tuple[str, str, str]]:
    """``(label, row key, metric)`` of every score some row has: our HellaSwag conventions, then lm-eval's tasks
    (row ``"lm_eval"`` dict) in the order run; stderrs are left out."""
    columns = [(f"{key.removeprefix('hellaswag_')} {metric}", key, metric)
               for key, metric in METRIC_COLUMNS if any(key in r for r in results)]
    seen = {}
    for r in results:
        for task, scores in (r.get("lm_eval") or {}).items():
            for metric in scores:
                if not metric.endswith("_stderr"):
                    seen.setdefault((task, metric), None)
    return columns + [(f"{task} {metric}", task, metric) for task, metric in seen]


def score_of(row: dict, key: str, metric: str) -> float | None:
    scores = row.get(key) if key.startswith("hellaswag_") else (row.get("lm_eval") or {}).get(key)
    return (scores or {}).get(metric)


def results_table(results: list[dict]) -> str:
    """A fixed-width table: one row per model, accuracies in %, lm-eval's other metrics (LAMBADA perplexity) and
    our perplexity as they are."""
    columns = score_columns(results)
    headers = ["model"] + [label for label, _, _ in columns]
    with_ppl = any("perplexity" in r for r in results)
    headers += ["loss", "ppl"] if with_ppl else []
    rows = []
    for r in results:
        row = [r["model"]]
        for _, key, metric in columns:
            value = score_of(r, key, metric)
            row.append("-" if value is None else f"{100 * value:.2f}" if metric in ACCURACY_METRICS else f"{value:.2f}")
        if with_ppl:
            p = r.get("perplexity")
            row += [f"{p['loss']:.4f}", f"{p['ppl']:.2f}"] if p else ["-", "-"]
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = [" | ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [headers, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_comparison(results: list[dict], path: "str | Path") -> bool:
    """The comparison chart: every accuracy (HellaSwag by convention, lm-eval's tasks) as grouped bars, one bar per
    model with each group's chance level drawn across it, and beside it each model's perplexity on the held-out
    tokens. A panel is drawn only for scores some model has; with neither, no file is written and False returned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in score_columns(results) if c[2] in ACCURACY_METRICS]
    scored = [r for r in results if r.get("perplexity")]
    if not columns and not scored:
        return False
    widths = ([max(4.0, 1.2 + 1.8 * len(columns))] if columns else []) + ([3.0 + 0.9 * len(results)] if scored else [])
    fig, axes = plt.subplots(1, len(widths), figsize=(max(6.5, sum(widths)), 4.5), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    axes = list(axes[0])
    colours = {r["model"]: f"C{i}" for i, r in enumerate(results)}  # one colour per model in both panels
    if columns:
        plot_accuracy(axes.pop(0), results, columns, colours)
    if scored:
        plot_perplexity(axes.pop(0), scored, colours)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, png.getvalue())
    return True


def plot_accuracy(ax, results: list[dict], columns: list[tuple[str, str, str]], colours: dict):
    width = 0.8 / max(1, len(results))
    for i, r in enumerate(results):
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(columns))]
        ys = [100 * (score_of(r, key, metric) or 0.0) for _, key, metric in columns]
        bars = ax.bar(xs, ys, width, label=r["model"], color=colours[r["model"]])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    labelled = False
    for j, (_, key, _) in enumerate(columns):
        level = STOCK_TASKS[key].chance if key in STOCK_TASKS else 0.25 if key.startswith("hellaswag_") else None
        if level is not None:
            ax.hlines(100 * level, j - 0.45, j + 0.45, linestyles="--", linewidth=1, color="gray",
                      label=None if labelled else "chance")
            labelled = True
    ax.set_xticks(range(len(columns)), [label.replace(" ", "\n") for label, _, _ in columns])
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Zero-shot accuracy\n(HellaSwag by convention; lm-evaluation-harness tasks)", fontsize=10)
    ax.legend(fontsize=8)


def plot_perplexity(ax, scored: list[dict], colours: dict):
    ppl = [r["perplexity"]["ppl"] for r in scored]
    bars = ax.bar(range(len(scored)), ppl, 0.6, color=[colours[r["model"]] for r in scored])
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(scored)), ["/".join(Path(r["model"]).parts[-2:]) for r in scored], fontsize=8,
                  rotation=15)
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_xlim(-0.9, len(scored) - 0.1)  # one model's bar stays a bar, not a wall
    first = scored[0]["perplexity"]
    where = textwrap.shorten(str(first.get("dataset") or "held-out tokens"), 60, placeholder="...")
    ax.set_title(f"Perplexity on {where}\n({first.get('tokens', 0):,} tokens)", fontsize=10)
