"""PNG plots of a run's metrics (read back from its metrics.jsonl)."""

import json
from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display on training nodes and CI), imported when a plot is made:
    every training process imports this module, few of them plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: "str | Path") -> list[dict]:
    """Rows of a metrics.jsonl; after a resume the later row for a (kind, step) wins, as it describes the run kept."""
    rows: dict[tuple, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[(row.get("kind"), row.get("step"))] = row
    return sorted(rows.values(), key=lambda r: r.get("step", 0))


def _save(fig, ax, ylabel: str, path: Path) -> Path:
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def plot_training(metrics_path: "str | Path", out_dir: "str | Path", baselines: dict[str, float] | None = None):
    """loss.png (train and val loss against step) and, when present, hellaswag.png. Returns the paths written."""
    rows = read_metrics(metrics_path)
    out_dir = Path(out_dir)
    written = []

    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for kind, key, label in (("train", "loss", "train loss"), ("eval", "val_loss", "val loss")):
        pts = [(r["step"], r[key]) for r in rows if r.get("kind") == kind and key in r]
        if pts:
            ax.plot(*zip(*pts), label=label, marker="o" if kind == "eval" else None, markersize=3)
    for name, value in (baselines or {}).items():
        ax.axhline(value, linestyle="--", linewidth=1, color="gray")
        ax.annotate(name, (0, value), textcoords="offset points", xytext=(4, 4), fontsize=8, color="gray")
    ax.set_title("GPT2Custom pretraining loss")
    written.append(_save(fig, ax, "cross-entropy (nats/token)", out_dir / "loss.png"))

    pts = [(r["step"], r["hellaswag_acc_norm"]) for r in rows if "hellaswag_acc_norm" in r]
    if pts:
        fig, ax = pyplot().subplots(figsize=(7, 4.5))
        ax.plot(*zip(*pts), marker="o", label="ours (acc_norm)")
        ax.axhline(0.2955, linestyle="--", color="gray", label="OpenAI GPT-2 124M (0.2955)")
        ax.axhline(0.25, linestyle=":", color="gray", label="chance (0.25)")
        written.append(_save(fig, ax, "HellaSwag accuracy (completion style)", out_dir / "hellaswag.png"))
    return written


def plot_sft(log_history: list[dict], path: "str | Path") -> Path:
    """sft_loss.png: the training loss on assistant tokens against the optimizer step (TRL's `log_history`, as in
    trainer_state.json), with the held-out loss where it was evaluated."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for key, label in (("loss", "train loss (assistant tokens)"), ("eval_loss", "held-out loss")):
        pts = [(r["step"], r[key]) for r in log_history if key in r and "step" in r]
        if pts:
            ax.plot(*zip(*pts), label=label, marker="o" if key == "eval_loss" else None, markersize=3)
    ax.set_title("GPT2Custom chat fine-tuning (SFT) loss")
    return _save(fig, ax, "cross-entropy (nats/token)", Path(path))
