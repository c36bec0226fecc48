"""The pipeline's report card: report.json and report.md in the run folder, gathered from what each stage wrote.

Sources: data/manifest.json (prepare_data.py), pretrain/final/run_summary.json, metrics.jsonl, loss.png and
hellaswag.png (pretrain.py), evaluate/eval_results.json and .png (eval_hellaswag.py), the chat JSONL and its side
files (`gpt2custom.synthetic.file_counts`), sft/trainer_state.json (TRL; its log_history becomes sft_loss.png),
chat/samples.json (chat.py's answers, parsed by the pipeline), the publish folder, and pipeline_state.json (each
command's wall time). Every figure carries its basis: "measured" (read from a run), "estimated" (the plan's
arithmetic) or "list price" (measured time x a typical price).

The model card takes its numbers from the same collection (`prepare_publish`): the evaluation rows go to
{run_dir}/card_eval.json (eval_hellaswag.py's format, which publish.py --eval_json reads) and the journey's
figures to {run_dir}/card_training.json (publish.py --training_json: the card's training section).
"""

import json
import math
from pathlib import Path

from .estimate import SEED_TOTAL_DOLLARS
from .files import write_atomic, write_json_atomic
from .formatting import fmt_count, fmt_dollars, fmt_number, fmt_seconds
from .pipeline import STAGES
from .records import CANNOT_RUN, DONE, decide

MEASURED, ESTIMATED = "measured", "estimated"


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def attempt_wall_s(attempt: dict) -> float:
    """A command's wall seconds; for one whose pipeline was killed outright (no end recorded), up to the last
    heartbeat its pipeline wrote (pipeline.py's HEARTBEAT_S)."""
    if attempt.get("wall_s") is not None:
        return attempt["wall_s"]
    return max(0.0, attempt.get("last_seen_unix", attempt["start_unix"]) - attempt["start_unix"])


def stage_times(state: dict) -> dict[str, dict]:
    """Per stage: wall seconds over its commands (an interrupted one counts up to where it stopped; a killed one up
    to its last heartbeat), and how many were cut off (stopped or killed pipelines)."""
    out = {}
    for name, record in (state.get("stages") or {}).items():
        attempts = record.get("attempts", [])
        out[name] = {
            "wall_s": sum(attempt_wall_s(a) for a in attempts),
            "cpu_s": sum(a.get("cpu_s") or 0 for a in attempts),
            "commands": len(attempts),
            "interrupted": sum(a.get("wall_s") is None or a.get("exit") == "interrupted" for a in attempts),
            "last_command": attempts[-1]["command"] if attempts else None,
        }
    return out


# ------------------------------------------------------------------------------------------------ per stage


def data_metrics(plan) -> dict:
    manifest = read_json(plan.data_dir / "manifest.json") or {}
    splits = manifest.get("splits") or {}
    return {
        "source": (manifest.get("source") or {}).get("name") if isinstance(manifest.get("source"), dict)
        else manifest.get("source"),
        "train_tokens": (splits.get("train") or {}).get("tokens"),
        "val_tokens": (splits.get("val") or {}).get("tokens"),
        "documents": sum((s or {}).get("documents", 0) for s in splits.values()) or None,
    }


def pretrain_metrics(plan) -> dict:
    summary = read_json(plan.final_dir / "run_summary.json") or {}
    keys = ("tokens", "steps", "wall_time_s", "tokens_per_s", "mfu", "flops_per_token", "gpu", "num_processes",
            "dollars", "val_loss", "unigram_val_loss", "hellaswag_acc_norm")
    out = {k: summary.get(k) for k in keys}
    out["val_tokens_scored"] = pretrain_perplexity(plan, {"val_loss": 0.0}).get("tokens")
    out["plots"] = [rel_to(plan.run_dir, plan.pretrain_dir / f) for f in ("loss.png", "hellaswag.png")
                    if (plan.pretrain_dir / f).exists()]
    return out


def eval_metrics(plan, pretrain: dict) -> dict:
    data = read_json(plan.eval_dir / "eval_results.json")
    if data:
        from .evaluation import results_table

        chart = plan.eval_dir / "eval_results.png"
        return {"hellaswag": data.get("hellaswag"), "results": data["results"], "table": results_table(data["results"]),
                "chart": rel_to(plan.run_dir, chart) if chart.exists() else None, "basis": MEASURED}
    if pretrain.get("val_loss") is not None:  # evaluation could not run: pretraining's own validation loss stands in
        row = {"model": str(plan.final_dir), "perplexity": pretrain_perplexity(plan, pretrain)}
        from .evaluation import results_table

        return {"hellaswag": None, "results": [row], "table": results_table([row]), "chart": None,
                "basis": f"{MEASURED} by pretrain.py (validation loss), not by eval_hellaswag.py"}
    return {}


def pretrain_perplexity_tokens(stages: dict) -> int | None:
    """The tokens behind pretrain.py's validation loss, as the report collected them."""
    return stages["pretrain"]["metrics"].get("val_tokens_scored")


def pretrain_perplexity(plan, pretrain: dict) -> dict:
    s = plan.pretrain_settings
    batches = int(s.get("eval_batches", 20) or 0)
    val = data_metrics(plan).get("val_tokens")
    tokens = batches * int(s.get("micro_batch_size", 64)) * int(s.get("block_size", 1024)) if batches else val
    tokens = min(tokens, val) if (tokens and val) else tokens
    return {"dataset": f"{plan.data_dir} (val shards; pretrain.py's validation loss)", "loss": pretrain["val_loss"],
            "ppl": math.exp(pretrain["val_loss"]), **({"tokens": tokens} if tokens else {})}


def chat_data_metrics(plan) -> dict:
    kind, path = plan.chat_data_kind, plan.chat_data_path
    out = {"kind": kind, "path": str(path)}
    if kind == "dataset" or not path.exists():
        return out
    from .synthetic import OutputFiles, file_counts

    c = plan.o.chat_data
    counts = file_counts(OutputFiles.for_output(path), c.get("price_per_m_input"), c.get("price_per_m_output"))
    if kind == "stdlib-docs":
        counts["cost"] = 0.0  # offline: nothing was billed
    out.update(counts)
    out["cost_basis"] = ("nothing billed (offline)" if kind == "stdlib-docs" else
                         "estimated: counted tokens x the configured prices" if counts.get("cost") is not None else
                         "no prices configured (price_per_m_input / price_per_m_output)")
    return out


def sft_tokens(history: list[dict]) -> int | None:
    """Training tokens from TRL's logged `num_tokens`, which restarts from 0 when a run resumes from a checkpoint
    (the count is not saved with it): the last value before each restart plus the final one."""
    values = [r["num_tokens"] for r in history if "num_tokens" in r]
    if not values:
        return None
    return int(sum(a for a, b in zip(values, values[1:]) if b < a) + values[-1])


def sft_metrics(plan) -> dict:
    state = read_json(plan.sft_dir / "trainer_state.json")
    if not state:
        return {}
    history = state.get("log_history", [])
    losses = [r for r in history if "loss" in r]
    evals = [r for r in history if "eval_loss" in r]
    end = next((r for r in reversed(history) if "train_runtime" in r), {})
    tokens = sft_tokens(history)
    plot = plan.run_dir / "sft_loss.png"
    if losses or evals:
        from .plots import plot_sft

        plot_sft(history, plot)
    return {
        "steps": state.get("global_step"),
        "tokens": int(tokens) if tokens else None,
        "train_runtime_s": end.get("train_runtime"),
        "first_loss": losses[0]["loss"] if losses else None,
        "final_loss": losses[-1]["loss"] if losses else None,
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "plot": rel_to(plan.run_dir, plot) if plot.exists() else None,
    }


def record_push(plan, stdout: str) -> dict:
    """publish.py's upload, from its `uploaded to <commit URL>` line, into {run_dir}/publish.json (which the report
    and the publish stage's record read)."""
    url = next((line.split()[-1] for line in stdout.splitlines() if line.startswith("uploaded to")), None)
    record = {"repo_id": plan.publish_args()["repo_id"], "commit_url": url}
    write_json_atomic(plan.publish_record, record)
    return record


def publish_metrics(plan) -> dict:
    if plan.o.publish.get("push"):
        return {"push": True, **(read_json(plan.publish_record) or {})}
    folder = plan.publish_dir
    return {"push": False, "folder": str(folder), "repo_id": plan.publish_args()["repo_id"],
            "files": sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []}


def rel_to(base: Path, path: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


def substitutions(plan) -> list[str]:
    """How this run differs from the seed's journey (FineWeb-Edu, HellaSwag, Llama-3.1-405B, GPUs, the Hub)."""
    out = []
    source = plan.data_settings.get("source")
    if source != "HuggingFaceFW/fineweb-edu":
        what = "Python's own docs and standard-library sources (offline)" if source == "stdlib" else source
        out.append(f"pretraining text: {what} instead of FineWeb-Edu sample-10BT")
    if not plan.hellaswag_on():
        out.append("HellaSwag: not evaluated (no local HellaSwag file given, and offline); perplexity on the "
                   "held-out shards only")
    if not int(plan.pretrain_settings.get("hellaswag_interval", 250) or 0):
        out.append("no HellaSwag curve during pretraining (hellaswag_interval 0)")
    if not plan.compare_models():
        out.append("no pre-trained models to compare with (none configured; offline)")
    c = plan.o.chat_data
    if plan.chat_data_kind == "stdlib-docs":
        out.append("chat data: questions about standard-library functions answered by the first paragraph of their "
                   "docstrings (gpt2custom/stdlib_chat.py) instead of Llama-3.1-405B-Instruct's answers")
    elif plan.chat_data_kind == "synthetic" and c.get("base_url"):
        out.append(f"chat data from the OpenAI-compatible server {c['base_url']} instead of the HF Inference API")
    elif plan.chat_data_kind == "dataset":
        out.append(f"chat data: the existing data set {plan.chat_data_path} (nothing generated)")
    if not plan.o.publish.get("push"):
        out.append(f"publish: the dry-run folder {plan.publish_dir} instead of a Hub upload")
    if plan.hardware.is_cpu:
        out.append("hardware: the CPU instead of GPUs (no device price: dollars are not counted)")
    return out


# ------------------------------------------------------------------------------------------------ collect


def estimated_dollars(estimates) -> float | None:
    """Device plus API dollars of the estimates; None when nothing has a price."""
    values = [v for e in estimates for v in (e["dollars"], e["api_dollars"]) if v is not None]
    return sum(values) if any(values) or any(e["dollars"] is not None for e in estimates) else None


def collect(plan, state: dict, estimates: dict) -> dict:
    """report.json's content: per stage status, inputs, outputs, wall time, dollars, estimate and metrics."""
    hw = plan.hardware
    rate = hw.count * hw.price_per_hour if hw.price_per_hour else None
    times = stage_times(state)
    pretrain = pretrain_metrics(plan)
    metrics = {
        "data": data_metrics(plan),
        "pretrain": pretrain,
        "evaluate": eval_metrics(plan, pretrain),
        "chat_data": chat_data_metrics(plan),
        "sft": sft_metrics(plan),
        "chat": read_json(plan.chat_dir / "samples.json") or {},
        "publish": publish_metrics(plan),
    }
    stages = {}
    all_stages = plan.stages()
    decisions = decide(all_stages, plan.records, list(STAGES))
    for stage in all_stages:
        t = times.get(stage.name)
        wall = t["wall_s"] if t and t["commands"] else None
        d = decisions[stage.name]
        if d.status in (DONE, CANNOT_RUN):
            status = d.status
        else:
            status = "interrupted" if d.resume else f"not done ({d.reason})"
        api = metrics["chat_data"].get("cost") if stage.name == "chat_data" else None
        stages[stage.name] = {
            "status": status,
            "inputs": stage.inputs,
            "reads": list(stage.reads),
            "record": plan.records.read(stage.name),
            "outputs": stage.outputs,
            "command": t["last_command"] if t else None,
            "wall_s": wall,
            "wall_basis": MEASURED if wall is not None else None,
            "cpu_s": t["cpu_s"] if t and t["commands"] else None,
            "interrupted_commands": t["interrupted"] if t else 0,
            "device_dollars": wall / 3600 * rate if (wall is not None and rate) else None,
            "dollars_basis": f"measured time x ${rate:.2f}/h ({hw.describe()})" if rate else "no device price",
            "api_dollars": api,
            "estimate": estimates.get(stage.name),
            "note": stage.skip_reason or stage.note,
            "metrics": metrics[stage.name],
        }
    wall = sum(s["wall_s"] or 0 for s in stages.values())
    cpu = sum(s["cpu_s"] or 0 for s in stages.values())
    device = sum(s["device_dollars"] or 0 for s in stages.values()) if rate else None
    api = sum(s["api_dollars"] or 0 for s in stages.values())
    return {
        "run_dir": str(plan.run_dir),
        "hardware": {"name": hw.name, "count": hw.count, "price_per_hour": hw.price_per_hour, "source": hw.source},
        "stages": stages,
        "totals": {
            "wall_s": wall, "cpu_s": cpu, "wall_basis": MEASURED,
            "device_dollars": device, "api_dollars": api,
            "dollars": (device or 0) + api if (device is not None or api) else None,
            "dollars_basis": "measured time x list price, plus API tokens x configured prices",
            "estimated_seconds": sum(e["seconds"] for e in estimates.values()),
            "estimated_dollars": estimated_dollars(estimates.values()),
            "seed_dollars": SEED_TOTAL_DOLLARS,
        },
        "substitutions": substitutions(plan),
        "plan_table": state.get("plan_table"),
    }


# ------------------------------------------------------------------------------------------------ chat samples


def chat_references(plan) -> tuple[dict[str, str], set[str] | None]:
    """From the chat data: the first reference answer for each user prompt, and the prompts SFT trained on (its
    own loader and held-out split, with the stage's eval_size and seed), or None when that cannot be told."""
    from .sft_data import load_conversations, train_eval_split

    s = plan.sft_settings
    try:
        dataset = load_conversations(str(plan.chat_data_path), max_samples=s.get("max_samples"),
                                     seed=int(s.get("seed", 42)))
    except Exception:  # a Hub data set offline, or rows sft.py would refuse: the report says "unknown"
        return {}, None
    references = {}
    for messages in dataset["messages"]:
        user = next((m["content"] for m in messages if m["role"] == "user"), None)
        answer = next((m["content"] for m in messages if m["role"] == "assistant"), None)
        references.setdefault(user, answer)
    try:
        train, _ = train_eval_split(dataset, float(s.get("eval_size", 0.01)), seed=int(s.get("seed", 42)))
    except ValueError:
        return references, None
    return references, {next((m["content"] for m in msgs if m["role"] == "user"), None) for msgs in train["messages"]}


def write_chat_samples(plan, stdout: str) -> Path:
    """{run_dir}/chat/samples.json from chat.py's --transcript_json: each prompt, the model's answer (or the error
    chat.py gave instead), its new tokens, what ended it (the end token, or max_new_tokens), the chat data's
    reference answer and whether SFT trained on that prompt. chat.py's stdout is kept as it was printed."""
    prompts = plan.chat_prompts()
    turns = read_json(plan.chat_dir / "turns.json") or []
    references, trained = chat_references(plan)
    samples = [{"prompt": t["user"], "answer": t["answer"] or "", "error": t.get("error"),
                "answer_tokens": t.get("new_tokens", 0), "ended_by": t.get("ended_by"),
                "reference": references.get(t["user"]),
                "in_training_set": None if trained is None else t["user"] in trained} for t in turns]
    if [x["prompt"] for x in samples] != prompts:
        samples = []  # not one turn per prompt: the check says so
    path = plan.chat_dir / "samples.json"
    write_json_atomic(path, {"model": str(plan.sft_dir), "settings": plan.chat_settings(), "samples": samples,
                             "transcript": stdout})
    return path


# ------------------------------------------------------------------------------------------------ the model card


PATH_KEYS = {"config", "model_name_or_path", "dataset_name", "output_dir", "data_dir", "resume_from_checkpoint"}


def card_hyperparameters(plan) -> dict:
    """Both trainings' settings for the card, `pretrain.<key>` and `sft.<key>`, each script's resolved settings from
    its own run_summary.json, without the run's paths."""
    pretrain = (read_json(plan.final_dir / "run_summary.json") or {}).get("config") or {}
    sft = (read_json(plan.sft_dir / "run_summary.json") or {}).get("config") or {}
    out = {f"pretrain.{k}": v for k, v in pretrain.items() if k not in PATH_KEYS}
    out.update({f"sft.{k}": v for k, v in sft.items() if k not in PATH_KEYS})
    return {k: v for k, v in out.items() if v is not None and not isinstance(v, dict | list)}


def prepare_publish(plan, state: dict):
    """The card's inputs, from the report's figures: {run_dir}/card_eval.json (this model's row first: its held-out
    chat loss; then the base model and the compared models) and {run_dir}/card_training.json (the journey: the
    pretraining figures, the whole run's time and dollars, and what sft.py's own run_summary.json says of its data
    and settings)."""
    report = collect(plan, state, {})
    m = {name: s["metrics"] for name, s in report["stages"].items()}
    rows = []
    ours = {"model": str(plan.sft_dir)}
    if m["sft"].get("eval_loss") is not None:
        loss = m["sft"]["eval_loss"]
        ours["perplexity"] = {"dataset": f"held-out conversations of {plan.chat_data_path} (assistant tokens)",
                              "loss": loss, "ppl": math.exp(loss)}
    rows.append(ours)
    rows += (m["evaluate"] or {}).get("results", [])
    hellaswag = (m["evaluate"] or {}).get("hellaswag") or {"split": "validation", "n": 0, "limit": None}
    write_json_atomic(plan.run_dir / "card_eval.json", {"hellaswag": hellaswag, "results": rows})

    p, sft, cd, totals = m["pretrain"], m["sft"], m["chat_data"], report["totals"]
    training_s = (p.get("wall_time_s") or 0) + (sft.get("train_runtime_s") or 0)
    summary = {
        "tokens": p.get("tokens"),
        "steps": p.get("steps"),
        "wall_time_s": training_s or None,
        "tokens_per_s": p.get("tokens_per_s"),
        "mfu": p.get("mfu"),
        "gpu": p.get("gpu"),
        "num_processes": p.get("num_processes"),
        "dollars": totals["dollars"],
        "val_loss": p.get("val_loss"),
        "hellaswag_acc_norm": p.get("hellaswag_acc_norm"),
        "Chat data": f"{cd.get('rows', '?')} conversations ({cd.get('kind')}: {cd.get('path')})",
        "SFT data": (read_json(plan.sft_dir / "run_summary.json") or {}).get("SFT data"),
        "SFT": f"{sft.get('steps')} steps, {fmt_count(sft.get('tokens'))} tokens, final train loss "
               f"{sft.get('final_loss'):.4f}" if sft.get("final_loss") is not None else None,
        "Pipeline wall time, all stages so far": fmt_seconds(totals["wall_s"]),
        "Cost basis": "measured time x list price per device-hour, plus API tokens x configured prices "
                      "(pipeline report.json)",
        "config": card_hyperparameters(plan),
    }
    write_json_atomic(plan.card_training, summary)


# ------------------------------------------------------------------------------------------------ estimate vs measured


def estimate_vs_measured(report: dict, state: dict) -> dict:
    """Each stage's estimate beside what it measured, and this invocation's timeline: when each stage it ran started
    and ended (seconds from the first start; pipeline_state.json), the wall time from the first start to the last
    end against the sum of the stages, and the plan's critical path against that wall time."""
    since = state.get("started_unix") or 0.0
    spans = {}
    for name, record in (state.get("stages") or {}).items():
        runs = [(a["start_unix"], a["start_unix"] + attempt_wall_s(a)) for a in record.get("attempts", [])
                if a.get("start_unix") and a["start_unix"] >= since]
        if runs:
            spans[name] = (min(r[0] for r in runs), max(r[1] for r in runs))
    origin = min((a for a, _ in spans.values()), default=0.0)
    rows = []
    for name, s in report["stages"].items():
        e = s.get("estimate") or {}
        start, end = spans.get(name, (None, None))
        measured, estimated = s.get("wall_s"), e.get("seconds")
        rows.append({"stage": name, "device": e.get("device"), "basis": e.get("basis"),
                     "start_s": None if start is None else start - origin, "end_s": None if end is None else end - origin,
                     "measured_s": measured, "estimated_s": estimated,
                     "ratio": measured / estimated if (measured and estimated) else None,
                     "measured_dollars": s.get("device_dollars"), "estimated_dollars": e.get("dollars")})
    ran = [r for r in rows if r["start_s"] is not None]
    ends = [(e or {}).get("end") for e in (state.get("estimates") or {}).values()]
    return {"rows": rows,
            "wall_s": max(r["end_s"] for r in ran) if ran else None,
            "stages_s": sum(r["end_s"] - r["start_s"] for r in ran) if ran else None,
            "estimated_wall_s": max((x for x in ends if x is not None), default=None),
            "calibrated": any(r["basis"] == "calibrated" for r in rows)}


def estimate_vs_measured_md(data: dict | None) -> list[str]:
    if not data:
        return []
    lines = ["## Estimate vs measured", "",
             "| stage | runs on | this run: start - end | measured wall | estimated (basis) | measured / estimated | "
             "device $ measured | device $ estimated |", "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        when = "-" if r["start_s"] is None else f"{fmt_seconds(r['start_s'])} - {fmt_seconds(r['end_s'])}"
        on = {True: "devices", False: "no GPU needed", None: "-"}[r["device"]]
        lines.append(f"| {r['stage']} | {on} | {when} | {fmt_seconds(r['measured_s'])} | "
                     f"{fmt_seconds(r['estimated_s'])} ({r['basis'] or '-'}) | {fmt_number(r['ratio'], '.2f')} | "
                     f"{fmt_dollars(r['measured_dollars'])} | {fmt_dollars(r['estimated_dollars'])} |")
    lines.append("")
    if data["wall_s"] is not None:
        est = data["estimated_wall_s"]
        off = f" ({(est - data['wall_s']) / data['wall_s']:+.0%})" if est and data["wall_s"] else ""
        lines += [f"This invocation: {fmt_seconds(data['wall_s'])} of wall time from the first stage's start to the "
                  f"last stage's end, for {fmt_seconds(data['stages_s'])} of stages (stages that read nothing of each "
                  f"other run side by side). The plan's critical path: {fmt_seconds(est)}{off}"
                  f"{', calibrated by --rates_from' if data['calibrated'] else ''}. To estimate the next run on this "
                  "machine from these times: `pipeline.py --rates_from <this run folder>`.", ""]
    return lines


# ------------------------------------------------------------------------------------------------ report.md


def sample_summary(samples: list[dict]) -> str:
    """What the samples show the model can do, counted: answers at all, stopping by itself, the reference's words."""
    n = len(samples)
    answered = sum(bool(x["answer"].strip()) for x in samples)
    ended = sum(x.get("ended_by") == "end token" for x in samples)
    exact = sum(x.get("reference") is not None and x["answer"].strip() == x["reference"].strip() for x in samples)
    with_ref = [x for x in samples if x.get("reference")]
    overlap = [len(set(x["answer"].lower().split()) & set(x["reference"].lower().split()))
               / max(1, len(set(x["reference"].lower().split()))) for x in with_ref]
    words = f"; on average {sum(overlap) / len(overlap):.0%} of a reference answer's words appear in the model's" \
        if overlap else ""
    return (f"In all: {answered} of {n} answers non-empty, {ended} ended by the model's own end token, {exact} equal "
            f"to the chat data's reference answer{words} (measured on these samples).")


def render(report: dict) -> str:
    st, totals = report["stages"], report["totals"]
    hw = report["hardware"]
    lines = [f"# Pipeline report: `{report['run_dir']}`", ""]
    total_d = totals["dollars"]
    lines.append(f"**Total: {fmt_seconds(totals['wall_s'])} of wall time ({fmt_seconds(totals['cpu_s'])} of CPU time; "
                 "measured), "
                 f"{fmt_dollars(total_d) if total_d is not None else 'no dollars (no device price)'}"
                 f"{' (measured time x list price + API estimate)' if total_d is not None else ''}**, next to the "
                 f"seed's ${totals['seed_dollars']:.2f} for its journey. The plan estimated "
                 f"{fmt_seconds(totals['estimated_seconds'])} and {fmt_dollars(totals['estimated_dollars'])} "
                 f"(estimated). Hardware: {hw['count']} x {hw['name']} ({hw['source']}).")
    lines += ["", "## Stages", "",
              "| stage | status | inputs | outputs | wall time (measured) | CPU time (measured) | device $ | API $ | "
              "estimate: time / $ |", "|---|---|---|---|---|---|---|---|---|"]
    for name in STAGES:
        s = st[name]
        e = s["estimate"] or {}
        est = f"{fmt_seconds(e.get('seconds'))} / {fmt_dollars(estimated_dollars([e]) if e else None)}"
        status = s["status"] + (f" ({s['interrupted_commands']} interrupted)" if s["interrupted_commands"] else "")
        lines.append(f"| {name} | {status} | {', '.join(s['inputs'])} | {', '.join(s['outputs'])} | "
                     f"{fmt_seconds(s['wall_s'])} | {fmt_seconds(s['cpu_s'])} | {fmt_dollars(s['device_dollars'])} | "
                     f"{fmt_dollars(s['api_dollars'])} | {est} |")
    lines += ["", f"Device dollars: {st['data']['dollars_basis']}. Wall times include each command's start-up.", ""]
    if report["substitutions"]:
        lines += ["## Differences from the seed's journey (offline substitutions)", ""]
        lines += [f"- {x}" for x in report["substitutions"]] + [""]
    notes = [f"- {n}: {s['note']}" for n, s in st.items() if s["note"]]
    if notes:
        lines += ["Notes:", ""] + notes + [""]

    d = st["data"]["metrics"]
    lines += ["## Data (measured)", "",
              f"{fmt_count(d.get('train_tokens'))} training and {fmt_count(d.get('val_tokens'))} validation tokens "
              f"from {d.get('documents') or '-'} documents (source: {d.get('source')}).", ""]

    p = st["pretrain"]["metrics"]
    lines += ["## Pretraining (measured)", "",
              "| tokens | steps | training time | tokens/s | MFU | val loss | unigram baseline | HellaSwag acc_norm | $ "
              "(pretrain.py) |", "|---|---|---|---|---|---|---|---|---|",
              f"| {fmt_count(p.get('tokens'))} | {p.get('steps') or '-'} | {fmt_seconds(p.get('wall_time_s'))} | "
              f"{fmt_number(p.get('tokens_per_s'), ',.0f')} | {fmt_number(p.get('mfu'), '.1%')} | {fmt_number(p.get('val_loss'))} | "
              f"{fmt_number(p.get('unigram_val_loss'))} | {fmt_number(p.get('hellaswag_acc_norm'))} | "
              f"{fmt_dollars(p.get('dollars'))} |", ""]
    lines += [f"![{Path(x).stem}]({x})" for x in p.get("plots", [])] + [""]

    e = st["evaluate"]["metrics"]
    lines += [f"## Evaluation ({e.get('basis', 'not run')})", ""]
    if e.get("table"):
        hs = e.get("hellaswag")
        if hs:
            lines += [f"HellaSwag {hs.get('split')}, {hs.get('n')} examples, both conventions (completion = "
                      "build-nanogpt/llm.c, harness = lm-evaluation-harness); accuracies in %.", ""]
        lines += ["```", e["table"], "```", ""]
        ours = next((r.get("perplexity") for r in e.get("results") or [] if r.get("perplexity")), None)
        if ours and p.get("val_loss") is not None and e.get("basis") == MEASURED:
            lines += [f"Two validation losses of the same model: pretrain.py's {p['val_loss']:.4f} is the mean over "
                      f"its first {fmt_count(pretrain_perplexity_tokens(st))} validation tokens in non-overlapping "
                      f"blocks; eval_hellaswag.py's {ours['loss']:.4f} is over {fmt_count(ours.get('tokens'))} tokens "
                      "(its own windows over the same shards). Different tokens, so the figures differ a little.", ""]
        if e.get("chart"):
            lines += [f"![comparison]({e['chart']})", ""]
    c = st["chat_data"]["metrics"]
    lines += ["## Chat data (measured counts)", ""]
    if "rows" in c:
        rejected = ", ".join(f"{n} {r}" for r, n in (c.get("rejected") or {}).items()) or "none"
        lines += [f"{c['rows']} rows ({c['accepted']} accepted), rejected: {rejected}, failed: {c['failed']}; "
                  f"{c['prompt_tokens']:,} prompt + {c['completion_tokens']:,} completion tokens; API cost "
                  f"{fmt_dollars(c.get('cost'))} ({c['cost_basis']}). Source: {c['kind']}, `{c['path']}`.", ""]
    else:
        lines += [f"Source: {c.get('kind')}, `{c.get('path')}`.", ""]
    s = st["sft"]["metrics"]
    lines += ["## Chat fine-tuning (measured)", ""]
    if s:
        lines += [f"{s['steps']} steps, {fmt_count(s.get('tokens'))} tokens, {fmt_seconds(s.get('train_runtime_s'))} of "
                  f"training; loss on assistant tokens {fmt_number(s.get('first_loss'))} (first log) -> "
                  f"{fmt_number(s.get('final_loss'))} (last); held-out loss {fmt_number(s.get('eval_loss'))}.", ""]
        if s.get("plot"):
            lines += [f"![SFT loss]({s['plot']})", ""]
    ch = st["chat"]["metrics"]
    lines += ["## Chat samples from the final model (measured)", ""]
    if ch.get("samples"):
        settings = ", ".join(f"{k}={v}" for k, v in ch["settings"].items())
        lines += [f"`chat.py` ({settings}):", ""]
        for x in ch["samples"]:
            lines += [f"> **user:** {x['prompt']}", ">", f"> **assistant:** {x['answer'] or '(empty)'}", ""]
            seen = {True: "in the SFT training set", False: "held out from SFT / not in the chat data",
                    None: "training-set membership unknown"}[x.get("in_training_set")]
            if x.get("error"):
                lines += [f"Not answered: chat.py printed `{x['error']}`.", ""]
            elif not x["answer"]:
                lines += ["**Failed: an empty answer** (the model ended its turn at once).", ""]
            else:
                lines += [f"{x['answer_tokens']} tokens, ended by {x['ended_by']}; the prompt is {seen}.", ""]
            if x.get("reference"):
                lines += [f"Reference answer (chat data): {x['reference']}", ""]
        lines += [sample_summary(ch["samples"]), ""]
    elif ch.get("transcript"):
        lines += ["The answers could not be told apart in chat.py's output; the transcript:", "", "```",
                  ch["transcript"], "```", ""]
    pb = st["publish"]["metrics"]
    lines += ["## Publish", ""]
    if pb.get("push"):
        lines += [f"Uploaded: {pb.get('commit_url') or '-'}", ""]
    elif pb.get("files"):
        lines += [f"Dry run: `{pb['folder']}` ({len(pb['files'])} files: {', '.join(pb['files'])}), what "
                  f"`publish.py` would upload to `{pb['repo_id']}`; its model card takes these figures "
                  "(card_eval.json, card_training.json).", ""]
    lines += estimate_vs_measured_md(report.get("estimate_vs_measured"))
    if report.get("plan_table"):
        lines += ["## The plan, as the latest invocation printed it (estimated)", "", "```", report["plan_table"], "```", ""]
    return "\n".join(lines)


def write_report(plan, state: dict, estimates: dict) -> Path:
    report = collect(plan, state, estimates)
    report["estimate_vs_measured"] = estimate_vs_measured(report, state)
    write_json_atomic(plan.run_dir / "report.json", report)
    return write_atomic(plan.run_dir / "report.md", render(report))
