"""Muon against tuned AdamW on our GPT-2 (GPT2CustomForCausalLM): tokens to AdamW's loss, loss at equal tokens, time.

Every run is pretrain.py's step, called directly: `build_optimizers` / `build_schedulers` / `train_step` from
gpt2custom/training.py under an `Accelerator(cpu=True)` (fp32, eager, clip 1.0, warmup + cosine to 10 %), batches from
`ShardLoader` over prepare_data.py's shards. Only the optimizer and its peak LR differ between settings; for one seed
every setting starts from the same weights and sees the same batches in the same order (the seed sets both), for the
same number of tokens.

Two phases:
1. AdamW at each `--adamw_lrs` value, `--seeds` seeds each. The tuned AdamW LR is the one with the lowest mean final
   validation loss.
2. Muon (`--optimizer muon`: Muon on the 2-D block matrices, AdamW on embeddings, biases and norms) at each
   `--muon_lrs` value, with the AdamW half at the tuned AdamW LR, so the rest of the recipe stays fixed. Muon's LR is
   in AdamW units: torch.optim.Muon's `adjust_lr_fn="match_rms_adamw"` scales its update to AdamW's RMS.

Reported, for the tuned setting of each optimizer, per seed and then as the mean with the min-max over seeds:
- tokens to reach AdamW's final validation loss (the same seed's tuned AdamW run): the first crossing of that loss on
  the run's validation curve, linearly interpolated between evaluations, as a fraction of AdamW's tokens;
- the final validation loss at equal tokens (the difference from the same seed's AdamW run);
- wall time and process CPU time per step (medians; the machine is shared, so CPU time is the steadier figure).
Validation is the same `--eval_batches` windows at every evaluation (`iter_eval_batches`, manifest order).

Runs go to a pool of `--workers` processes with `--threads` threads each; each run's result is kept in
`<out_dir>/runs/*.json`, so a killed benchmark continues where it stopped (a run is redone if its settings changed).
Writes `<out_dir>/results.json`, the plot (`--plot`: validation loss against tokens, one line per setting, the
seeds' min-max shaded) and, with `--readme`, the Markdown table between this benchmark's markers in that file.

    python prepare_data.py --config configs/data-smoke.yaml --out_dir data/optim
    PYTHONPATH=. nice -n 19 python bench/bench_optimizers.py --workers 3 \
        --plot bench/optimizers.png --readme bench/README.md                 # the measured run (bench/README.md)
    PYTHONPATH=. python bench/bench_optimizers.py --steps 4 --eval_interval 2 \
        --adamw_lrs 4e-3 --muon_lrs 4e-3 --seeds 0 --out_dir runs/bench_optimizers_dry   # a dry run, about a minute
"""

import concurrent.futures as futures
import hashlib
import json
import multiprocessing
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

README_BEGIN = "<!-- bench_optimizers: begin (written by bench/bench_optimizers.py --readme) -->"
README_END = "<!-- bench_optimizers: end -->"


@dataclass
class BenchArgs:
    data_dir: str = field(default="data/optim", metadata={"help": "prepare_data.py output"})
    out_dir: str = "runs/bench_optimizers"
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 2
    block_size: int = 256
    micro_batch_size: int = 4
    grad_accum: int = 1
    steps: int = 64
    warmup_steps: int = 6
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    adamw_lrs: str = field(default="4e-3,8e-3,1.6e-2", metadata={"help": "comma-separated peak LRs"})
    muon_lrs: str = field(default="4e-3,8e-3,1.6e-2,3.2e-2", metadata={"help": "Muon's peak LRs (AdamW units)"})
    muon_momentum: float = 0.95
    seeds: str = "0,1,2"
    eval_interval: int = 8
    eval_batches: int = 4
    workers: int = 2
    threads: int = 1
    plot: str | None = field(default=None, metadata={"help": "PNG path for the loss-vs-tokens plot"})
    readme: str | None = field(default=None, metadata={"help": "Markdown file whose marked section gets the table"})


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def run_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def train_one(spec: dict) -> dict:
    """One run in this (worker) process: the model, optimizers and step exactly as pretrain.py builds them."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from configuration_gpt2custom import GPT2CustomConfig
    from gpt2custom.data import ShardLoader, iter_eval_batches
    from gpt2custom.training import build_optimizers, build_schedulers, device_batches, train_step
    from modeling_gpt2custom import GPT2CustomForCausalLM

    torch.set_num_threads(spec["threads"])
    accelerator = Accelerator(cpu=True)
    set_seed(spec["seed"])
    config = GPT2CustomConfig.from_preset("tiny", n_layer=spec["n_layer"], n_embd=spec["n_embd"],
                                          n_head=spec["n_head"], block_size=spec["block_size"])  # fmt: skip
    model = GPT2CustomForCausalLM(config).float().train()
    optimizers = build_optimizers(model, optimizer=spec["optimizer"], lr=spec["lr"], muon_lr=spec["muon_lr"],
                                  weight_decay=spec["weight_decay"], muon_momentum=spec["muon_momentum"], fused=False)  # fmt: skip
    schedulers = build_schedulers(optimizers, warmup_steps=spec["warmup_steps"], max_steps=spec["steps"],
                                  min_lr_ratio=spec["min_lr_ratio"])  # fmt: skip
    train_model, *rest = accelerator.prepare(model, *optimizers, *schedulers)
    optimizers, schedulers = rest[: len(optimizers)], rest[len(optimizers) :]
    B, T = spec["micro_batch_size"], spec["block_size"]
    loader = ShardLoader(spec["data_dir"], "train", B, T, seed=spec["seed"])
    next_batch = device_batches(loader, accelerator.device)
    tokens_per_step = B * T * spec["grad_accum"]

    @torch.no_grad()
    def validate() -> float:
        model.eval()
        losses = [model(input_ids=x, shift_labels=y, use_cache=False, skip_logits=True).loss.item()
                  for x, y in iter_eval_batches(spec["data_dir"], "val", B, T, max_batches=spec["eval_batches"])]  # fmt: skip
        model.train()
        return sum(losses) / len(losses)

    evals = [{"step": 0, "tokens": 0, "val_loss": validate()}]
    train_losses, wall, cpu = [], [], []
    for step in range(1, spec["steps"] + 1):
        w0, c0 = time.perf_counter(), time.process_time()
        loss, _, _ = train_step(train_model, next_batch, optimizers, schedulers, accelerator,
                                grad_accum=spec["grad_accum"], grad_clip=spec["grad_clip"])  # fmt: skip
        train_losses.append(loss.item())  # CPU: the step is already done, this reads a number
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
        if not torch.isfinite(loss):
            break  # a diverged setting: its curve ends here and it cannot be the tuned one
        if step % spec["eval_interval"] == 0 or step == spec["steps"]:
            evals.append({"step": step, "tokens": step * tokens_per_step, "val_loss": validate()})
    final = evals[-1]["val_loss"] if evals[-1]["step"] == spec["steps"] else float("inf")
    return {"spec": spec, "evals": evals, "train_losses": train_losses, "final_val_loss": final,
            "wall_s_per_step": statistics.median(wall[1:] or wall), "cpu_s_per_step": statistics.median(cpu[1:] or cpu),
            "tokens": spec["steps"] * tokens_per_step}  # fmt: skip


def run_all(specs: list[dict], runs_dir: Path, workers: int, progress) -> list[dict]:
    """Each spec's result, from `runs_dir` if an earlier invocation finished it, otherwise trained in the pool."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    results, todo = {}, []
    for spec in specs:
        path = runs_dir / f"{spec['optimizer']}_lr{spec['lr']:g}_muonlr{spec['muon_lr'] or 0:g}_s{spec['seed']}.json"
        if path.exists() and json.loads(path.read_text())["key"] == run_key(spec):
            results[run_key(spec)] = json.loads(path.read_text())["result"]
            progress.update(1)
        else:
            todo.append((spec, path))
    context = multiprocessing.get_context("spawn")  # a clean process per run: no state from the previous run
    with futures.ProcessPoolExecutor(workers, mp_context=context, max_tasks_per_child=1) as pool:
        running = {pool.submit(train_one, spec): (spec, path) for spec, path in todo}
        for done in futures.as_completed(running):
            spec, path = running[done]
            result = done.result()
            path.write_text(json.dumps({"key": run_key(spec), "result": result}))
            results[run_key(spec)] = result
            progress.update(1)
            progress.set_postfix_str(f"{spec['optimizer']} lr {spec['lr']:g} seed {spec['seed']}: "
                                     f"val {result['final_val_loss']:.3f}")  # fmt: skip
    return [results[run_key(spec)] for spec in specs]


def tokens_to_reach(evals: list[dict], target: float) -> float | None:
    """The first point where the validation curve reaches `target`, linearly interpolated in tokens; None if never."""
    for before, after in zip(evals, evals[1:]):
        if after["val_loss"] <= target:
            drop = before["val_loss"] - after["val_loss"]
            frac = (before["val_loss"] - target) / drop if drop > 0 else 1.0
            return before["tokens"] + frac * (after["tokens"] - before["tokens"])
    return None


def setting_name(r: dict) -> str:
    spec = r["spec"]
    if spec["optimizer"] == "adamw":
        return f"AdamW lr {spec['lr']:g}"
    return f"Muon lr {spec['muon_lr']:g} (+AdamW lr {spec['lr']:g})"


def group_by_setting(results: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(setting_name(r), []).append(r)
    return groups


def best_setting(groups: dict[str, list[dict]], optimizer: str) -> str:
    mine = {k: v for k, v in groups.items() if v[0]["spec"]["optimizer"] == optimizer}
    return min(mine, key=lambda k: statistics.fmean(r["final_val_loss"] for r in mine[k]))


def spread(values: list[float], fmt: str) -> str:
    """mean (min-max)"""
    if not values:
        return "—"
    return f"{format(statistics.fmean(values), fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def summarize(results: list[dict], args: BenchArgs) -> dict:
    groups = group_by_setting(results)
    adamw, muon = best_setting(groups, "adamw"), best_setting(groups, "muon")
    by_seed_adamw = {r["spec"]["seed"]: r for r in groups[adamw]}
    rows = []
    for name, runs in groups.items():
        ratios, deltas, reached = [], [], 0
        for r in runs:
            ref = by_seed_adamw[r["spec"]["seed"]]
            t = tokens_to_reach(r["evals"], ref["final_val_loss"])
            if t is not None:
                reached += 1
                ratios.append(t / ref["tokens"])
            deltas.append(r["final_val_loss"] - ref["final_val_loss"])
        rows.append({
            "setting": name, "tuned": name in (adamw, muon), "seeds": len(runs),
            "final_val_loss": [r["final_val_loss"] for r in runs],
            "delta_vs_tuned_adamw": deltas, "tokens_ratio": ratios, "reached": reached,
            "steps_to_target": [x * args.steps for x in ratios],
            "wall_s_per_step": statistics.median(r["wall_s_per_step"] for r in runs),
            "cpu_s_per_step": statistics.median(r["cpu_s_per_step"] for r in runs),
        })  # fmt: skip
    return {"tuned_adamw": adamw, "tuned_muon": muon, "rows": rows}


def markdown_table(summary: dict, args: BenchArgs) -> str:
    tokens = args.steps * args.micro_batch_size * args.block_size * args.grad_accum
    lines = [
        f"| setting | seeds | final val loss | Δ vs tuned AdamW (same seed) | tokens to tuned AdamW's final loss "
        f"(× its {tokens:,}) | steps to it (of {args.steps}) | wall s/step | CPU s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        name = f"**{row['setting']}** (tuned)" if row["tuned"] else row["setting"]
        reached = "" if row["reached"] == row["seeds"] else f"; reached in {row['reached']}/{row['seeds']} seeds"
        lines.append(
            f"| {name} | {row['seeds']} | {spread(row['final_val_loss'], '.3f')} | "
            f"{spread(row['delta_vs_tuned_adamw'], '+.3f')} | {spread(row['tokens_ratio'], '.2f')}{reached} | "
            f"{spread(row['steps_to_target'], '.0f')} | {row['wall_s_per_step']:.2f} | {row['cpu_s_per_step']:.2f} |"
        )
    return "\n".join(lines)


def verdict(summary: dict) -> str:
    """One sentence: how many of tuned AdamW's tokens tuned Muon needs to reach AdamW's final loss, or that it does not."""
    muon = next(r for r in summary["rows"] if r["setting"] == summary["tuned_muon"])
    if muon["reached"] < muon["seeds"]:
        return (f"Tuned Muon ({summary['tuned_muon']}) does not reach the final validation loss of tuned AdamW "
                f"({summary['tuned_adamw']}) in {muon['seeds'] - muon['reached']} of {muon['seeds']} seeds; its final "
                f"loss differs by {spread(muon['delta_vs_tuned_adamw'], '+.3f')} (mean, min–max over seeds).")  # fmt: skip
    return (f"Tuned Muon ({summary['tuned_muon']}) reaches the final validation loss of tuned AdamW "
            f"({summary['tuned_adamw']}) in {spread(muon['tokens_ratio'], '.2f')} × the tokens (mean, min–max over "
            f"{muon['seeds']} seeds), and ends {spread(muon['delta_vs_tuned_adamw'], '+.3f')} from it at equal "
            f"tokens.")  # fmt: skip


def plot(results: list[dict], summary: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = group_by_setting(results)
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=80)
    for optimizer, cmap in (("adamw", plt.cm.Blues), ("muon", plt.cm.Reds)):
        names = sorted((k for k, v in groups.items() if v[0]["spec"]["optimizer"] == optimizer),
                       key=lambda k: groups[k][0]["spec"]["muon_lr" if optimizer == "muon" else "lr"])  # fmt: skip
        for i, name in enumerate(names):
            runs = groups[name]
            steps = min(len(r["evals"]) for r in runs)  # a diverged seed ends early
            tokens = np.array([e["tokens"] for e in runs[0]["evals"][1:steps]])
            losses = np.array([[e["val_loss"] for e in r["evals"][1:steps]] for r in runs])
            tuned = name in (summary["tuned_adamw"], summary["tuned_muon"])
            color = cmap(0.45 + 0.5 * i / max(1, len(names) - 1))
            ax.plot(tokens, losses.mean(0), color=color, lw=2.4 if tuned else 1.0,
                    label=name + (" (tuned)" if tuned else ""))  # fmt: skip
            ax.fill_between(tokens, losses.min(0), losses.max(0), color=color, alpha=0.25 if tuned else 0.1, lw=0)
    target = statistics.fmean(r["final_val_loss"] for r in groups[summary["tuned_adamw"]])
    ax.axhline(target, color="0.3", ls="--", lw=0.8, label=f"tuned AdamW's final loss ({target:.3f})")
    finals = [r["final_val_loss"] for r in results if np.isfinite(r["final_val_loss"])]
    ax.set_ylim(min(finals) - 0.1, min(finals) + 2.0)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.set_title("Muon vs AdamW: mean over seeds, min–max shaded", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_readme_section(path: str, text: str):
    """Replace the text between this benchmark's markers (or append the markers and text)."""
    readme = Path(path)
    body = readme.read_text() if readme.exists() else ""
    block = f"{README_BEGIN}\n{text}\n{README_END}"
    if README_BEGIN in body and README_END in body:
        head, rest = body.split(README_BEGIN, 1)
        body = head + block + rest.split(README_END, 1)[1]
    else:
        body = body.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(body)


def main(argv=None):
    (args,) = HfArgumentParser(BenchArgs).parse_args_into_dataclasses(args=argv)
    from tqdm.auto import tqdm

    base = {k: v for k, v in asdict(args).items() if k not in ("adamw_lrs", "muon_lrs", "seeds", "out_dir", "workers",
                                                                 "plot", "readme")}  # fmt: skip
    base["data_dir"] = str(Path(args.data_dir).resolve())
    seeds = [int(s) for s in args.seeds.split(",")]
    adamw_lrs, muon_lrs = floats(args.adamw_lrs), floats(args.muon_lrs)
    runs_dir = Path(args.out_dir) / "runs"
    start = time.time()
    with tqdm(total=len(seeds) * (len(adamw_lrs) + len(muon_lrs)), desc="runs", unit="run") as progress:
        adamw = run_all([{**base, "optimizer": "adamw", "lr": lr, "muon_lr": None, "seed": s}
                         for lr in adamw_lrs for s in seeds], runs_dir, args.workers, progress)  # fmt: skip
        tuned_lr = group_by_setting(adamw)[best_setting(group_by_setting(adamw), "adamw")][0]["spec"]["lr"]
        muon = run_all([{**base, "optimizer": "muon", "lr": tuned_lr, "muon_lr": lr, "seed": s}
                        for lr in muon_lrs for s in seeds], runs_dir, args.workers, progress)  # fmt: skip
    results = adamw + muon
    summary = summarize(results, args)
    table = markdown_table(summary, args) + "\n\n" + verdict(summary)
    print(table)
    Path(args.out_dir, "results.json").write_text(json.dumps({"args": asdict(args), "summary": summary,
                                                              "results": results}, indent=1))  # fmt: skip
    if args.plot:
        plot(results, summary, args.plot)
    if args.readme:
        write_readme_section(args.readme, table)
    print(f"{len(results)} runs in {(time.time() - start) / 60:.1f} min (the ones kept from an earlier call count 0)",
          file=sys.stderr)  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
