"""Perplexity on token shards, a text file or a Hub dataset, and the model-comparison outputs (table, JSON, PNG).

Perplexity uses the sliding-window method for texts longer than the context (as in the transformers guide
"Perplexity of fixed-length models"): every token after the first is scored exactly once; windows of
``max_length`` inputs advance by ``stride`` tokens and score only the tokens no earlier window scored, so each of
them sees at least ``max_length - stride`` tokens of context. ``stride == max_length`` (the default) gives
non-overlapping windows, as the pretraining validation loss on windows of ``T + 1`` tokens does. Every window has the
same length: the last one ends at the last token and scores only what its predecessors left, so batches need no
padding.
"""

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

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


# -------------------------------------------------------------------------------------------------- comparison

METRIC_COLUMNS = [(f"hellaswag_{c}", m) for c in CONVENTIONS for m in ("acc", "acc_norm")]


def write_json(path: "str | Path", payload: dict):
    """Write through a temporary file and rename, so a crash never leaves a truncated results file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def results_table(results: list[dict]) -> str:
    """A fixed-width table: one row per model, HellaSwag accuracies in %, perplexity when measured."""
    columns = [(key, metric) for key, metric in METRIC_COLUMNS if any(key in r for r in results)]
    headers = ["model"] + [f"{key.removeprefix('hellaswag_')} {metric}" for key, metric in columns]
    with_ppl = any("perplexity" in r for r in results)
    headers += ["loss", "ppl"] if with_ppl else []
    rows = []
    for r in results:
        row = [r["model"]] + [f"{100 * r[key][metric]:.2f}" if key in r else "-" for key, metric in columns]
        if with_ppl:
            p = r.get("perplexity")
            row += [f"{p['loss']:.4f}", f"{p['ppl']:.2f}"] if p else ["-", "-"]
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = [" | ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [headers, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_comparison(results: list[dict], path: "str | Path"):
    """A grouped bar chart of the HellaSwag accuracies, one bar per model in each metric group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [(key, metric) for key, metric in METRIC_COLUMNS if any(key in r for r in results)]
    width = 0.8 / max(1, len(results))
    fig, ax = plt.subplots(figsize=(2 + 1.8 * len(columns), 4.5))
    for i, r in enumerate(results):
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(columns))]
        ys = [100 * r[key][metric] if key in r else 0.0 for key, metric in columns]
        bars = ax.bar(xs, ys, width, label=r["model"])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.axhline(25.0, linestyle="--", linewidth=1, color="gray", label="chance (25%)")
    ax.set_xticks(range(len(columns)), [f"{key.removeprefix('hellaswag_')}\n{metric}" for key, metric in columns])
    ax.set_ylabel("HellaSwag accuracy (%)")
    ax.set_title("HellaSwag (zero-shot), by convention")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
