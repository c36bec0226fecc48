"""What a pipeline run will cost before it runs: tokens, steps, seconds and dollars per stage, and the plan table that
shows them beside each stage's status.

Tokens and steps come from the stage's settings; time = tokens / (tokens/s per device x devices) + start-up. The
tokens/s: the seed's own GPT-2 124M figure on one A100 (README "Cost"), else an assumed MFU of the GPU's dense bf16
peak (NVIDIA's data sheets, gpt2custom/metrics.py GPU_SPECS), turned into a FLOP rate so other sizes scale by FLOPs
per token (6N + 12LHQT). Every figure says what it is: measured (by whom, on what), assumed (with its basis), or
calibrated (`--rates_from`: a previous run's measured stage times over this formula's for that run).

Dollars are device time only. The stages run as a graph (gpt2custom/schedule.py): `chat_data` beside `data` +
`pretrain`, the device stages one after another. `schedule` lays the estimates on that clock: the critical path
sets the wall time, and a GPU node is billed from the moment this invocation starts on it until its last device
stage ends. Stages that need no GPU (data, chat_data) can instead run first on a machine without one
(`--until chat_data`): the plan says what that saves. Spot prices add an assumed overhead for restarts.
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .formatting import fmt_count, fmt_dollars, fmt_seconds
from .metrics import GPU_SPECS, flops_per_token
from .records import TO_RUN
from .schedule import DEVICE_STAGES, critical_path, simulate

SEED_TOTAL_DOLLARS = 53.25  # the seed's whole journey, from its report

# ---------------------------------------------------------------------------------------------------- throughput

FLOPS_124M = 855_383_040  # flops_per_token of the gpt2 preset at T=1024 (6N + 12LHQT, README "Cost")


@dataclass(frozen=True)
class Anchor:
    tokens_per_s: float  # per device, GPT-2 124M at T=1024, training
    basis: str  # "measured" or "assumed"
    source: str

    @property
    def flop_rate(self) -> float:
        """The training FLOP/s per device this anchor stands for; other model sizes reuse it."""
        return self.tokens_per_s * FLOPS_124M


# Matched like GPU_SPECS (substring, first match wins). This project's model has not been timed on a GPU yet: the
# only measured GPU figure is the seed's (its own GPT-2 124M, one A100, README "Cost"); other GPUs get ASSUMED_MFU.
THROUGHPUT = {
    "A100": Anchor(185e3, "measured by the seed", "the seed's GPT-2 124M, training, one A100 (README \"Cost\"); "
                                                  "not this project's model"),
}
ASSUMED_MFU = 0.40  # assumed: a compiled PyTorch GPT-2 of this size; not measured by this project
# The CPU: the tiny preset's pretraining on the 2-core development box (pipeline-smoke, one process, fp32, 2
# threads): ~3,000 tokens/s x 20.1 MFLOP/token while the box was quiet (pretrain.py's progress bar, 2026-12-04;
# the old 1,000 tokens/s was a busy box's figure and predicted 3.6 min for a 97 s stage).
CPU_FLOP_RATE = 6.0e10
CPU_SOURCE = ("pretrain.py's progress bar: tiny preset, fp32, 2 threads, on a quiet 2-core VM "
              "(configs/pipeline-smoke.yaml); a busy machine is slower")
STARTUP_S = 10.0  # per command: interpreter, torch/transformers imports, accelerate launch (measured ~5-10 s here)
COMPILE_S = 60.0  # torch.compile's first step on a GPU (assumed)
CORES_PER_GPU = 12  # a GPU node named in the config, not this machine: typical cloud 8-GPU nodes have 96+ vCPUs
SOURCE_TOKENS = {"HuggingFaceFW/fineweb-edu": 10e9, "stdlib": 15.6e6}  # whole sources (prepare_data.py docstring)
# Data preparation = max(download, decode + tokenize) (prepare_data.py streams) + writing the shards.
# Tokenizing: bench/bench_tokenize.py, our encoder in 1 process on 2 MB of Python's stdlib text: 2.61M tokens/s on a
# shared 2-core AMD EPYC VM (load 9.5; 2026-12-04). Per core; a quiet machine is faster.
TOKENIZE_PER_CORE_S = 2.6e6
TOKENIZE_SOURCE = "bench/bench_tokenize.py, 1 process, Python's stdlib text, a busy 2-core AMD EPYC VM"
# Downloading a Hub source: its size (assumed: Parquet at ~2.5 bytes per GPT-2 token, zstd-compressed English text
# of ~4.5 bytes per token) at `download_mb_per_s` (a setting; default assumed). Local and offline sources: nothing.
PARQUET_BYTES_PER_TOKEN = 2.5
DEFAULT_DOWNLOAD_MB_PER_S = 100.0  # assumed: a cloud VM's sustained Hub download
PARQUET_DECODE_BYTES_PER_CORE_S = 100e6  # assumed: Arrow reading zstd Parquet, per core
SHARD_WRITE_BYTES_PER_S = 500e6  # assumed: local SSD; uint16 tokens, 2 bytes each, plus their sha256
DEFAULT_PREEMPTION_OVERHEAD = 0.10  # assumed: spot time lost to notices (work since the last checkpoint, restarts)
# Synthetic chat data through an API: assumed, per request (Llama-3.1-405B answers run to a few hundred tokens).
API_LATENCY_S = 20.0
API_PROMPT_TOKENS = 150
API_ANSWER_TOKENS = 450
INSTRUCTION_TOKENS = 120
CHAT_ROW_TOKENS = {"stdlib-docs": 35, "synthetic": 600, "dataset": 600}  # per conversation; stdlib-docs measured
HELLASWAG_EXAMPLES = 10042
HELLASWAG_TOKENS_PER_EXAMPLE = 5 * 40  # context once + 4 endings (the scorer reuses the context's cache): assumed
UPLOAD_BYTES_PER_S = 50e6  # assumed


@dataclass
class Hardware:
    """The devices a run uses and what they cost. `name` is "cpu" or a GPU name (matched against GPU_SPECS)."""

    name: str
    count: int
    price_per_hour: float | None  # per device
    peak_flops: float | None
    source: str  # "detected" or "config"

    @property
    def is_cpu(self) -> bool:
        return self.name.lower() == "cpu"

    def describe(self) -> str:
        price = f" at ${self.price_per_hour:.2f}/h each" if self.price_per_hour else " (no price)"
        return f"{self.count} x {self.name}{price} ({self.source})"


@dataclass
class Throughput:
    tokens_per_s: float  # per device, training, for the model at hand
    basis: str
    source: str


def gpu_spec(name: str):
    return next((spec for spec in GPU_SPECS if spec.name.lower() in name.lower()), None)


def hardware(gpu: str | None = None, num_gpus: int | None = None, price_per_hour: float | None = None,
             cpu: bool = False) -> Hardware:
    """The devices named in the config (`gpu`, `num_gpus`), else those this machine has (CUDA), else one CPU."""
    if gpu:
        spec = gpu_spec(gpu)
        return Hardware(gpu, num_gpus or 1, price_per_hour or (spec.dollars_per_hour if spec else None),
                        spec.peak_bf16_flops if spec else None, "config")
    import torch

    if not cpu and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        spec = gpu_spec(name)
        count = num_gpus or torch.cuda.device_count()
        return Hardware(name, count, price_per_hour or (spec.dollars_per_hour if spec else None),
                        spec.peak_bf16_flops if spec else None, "detected")
    return Hardware("cpu", 1, price_per_hour, None, "detected")


def throughput(hw: Hardware, flops_token: float, override: float | None = None) -> Throughput:
    """Training tokens/s per device for a model of `flops_token` FLOPs per token on `hw`."""
    if override:
        return Throughput(override, "given", "tokens_per_s_per_device in the config")
    if hw.is_cpu:
        return Throughput(CPU_FLOP_RATE / flops_token, "measured", CPU_SOURCE + ", scaled by FLOPs per token")
    anchor = next((a for key, a in THROUGHPUT.items() if key.lower() in hw.name.lower()), None)
    if anchor is not None:
        scaled = "" if math.isclose(flops_token, FLOPS_124M, rel_tol=0.01) else ", scaled by FLOPs per token"
        return Throughput(anchor.flop_rate / flops_token, anchor.basis, anchor.source + scaled)
    if hw.peak_flops:
        return Throughput(ASSUMED_MFU * hw.peak_flops / flops_token, "assumed",
                          f"{ASSUMED_MFU:.0%} MFU of {hw.name}'s {hw.peak_flops / 1e12:.0f} TFLOP/s dense bf16 "
                          f"(NVIDIA data sheet) at {flops_token / 1e6:,.0f} MFLOP/token")
    raise ValueError(f"no throughput known for {hw.name!r}: set tokens_per_s_per_device in the config")



def model_flops(plan) -> tuple[float, float]:
    """(training FLOPs per token at the pretraining context, at the SFT context) of the configured model."""
    from configuration_gpt2custom import GPT2CustomConfig

    s = plan.pretrain_settings
    config = GPT2CustomConfig.from_preset(s["model_preset"], block_size=int(s["block_size"]))
    sft_len = int(plan.sft_settings.get("max_length") or config.block_size)
    if sft_len > config.block_size:  # sft.py would refuse it after loading the model: say so before anything runs
        raise ValueError(f"sft: max_length={sft_len} is longer than the pretrained model's context "
                         f"(pretrain block_size {config.block_size})")
    return flops_per_token(config, config.block_size), flops_per_token(config, sft_len)

def estimate(plan) -> dict[str, dict]:
    """Per stage: tokens, steps, seconds, dollars (device time) and api_dollars, each with its basis."""
    hw = plan.hardware
    pre_flops, sft_flops = model_flops(plan)
    tp = throughput(hw, pre_flops, plan.o.tokens_per_s_per_device)
    rate = hw.count * hw.price_per_hour if hw.price_per_hour else None
    out = {}

    def put(stage, seconds, tokens=None, steps=None, api_dollars=None, basis="estimated", note=""):
        device = stage in DEVICE_STAGES
        out[stage] = {"tokens": tokens, "steps": steps, "seconds": seconds, "raw_seconds": seconds,
                      "device": device, "dollars": (seconds / 3600 * rate if device else 0.0) if rate else None,
                      "api_dollars": api_dollars, "basis": basis, "note": note}

    seconds, tokens, note = data_seconds(plan, hw)
    put("data", seconds, tokens=tokens, note=note)

    # pretraining
    p = plan.pretrain_settings
    steps, batch = int(p["max_steps"]), int(p["total_batch_size"])
    compile_s = COMPILE_S if (p.get("compile") and not hw.is_cpu) else 0.0
    tokens = steps * batch
    put("pretrain", STARTUP_S + compile_s + tokens / (tp.tokens_per_s * hw.count), tokens=tokens, steps=steps,
        note=f"{tp.tokens_per_s:,.0f} tokens/s per device ({tp.basis}: {tp.source}); {pre_flops / 1e6:,.1f} "
             "MFLOP/token; evaluations during training not counted")

    # evaluation: forward passes cost about a third of a training step's FLOPs per token
    e = plan.o.evaluate
    models = 1 + len(plan.compare_models())
    hs = 0
    if plan.hellaswag_on():
        examples = min(int(e.get("limit") or HELLASWAG_EXAMPLES), HELLASWAG_EXAMPLES)
        hs = examples * HELLASWAG_TOKENS_PER_EXAMPLE * len(e.get("conventions") or (1, 2))
    ppl = int(e.get("perplexity_max_tokens") or plan.data_settings.get("val_tokens") or 0)
    tokens = models * (hs + ppl)
    put("evaluate", models * STARTUP_S + tokens / (3 * tp.tokens_per_s * hw.count), tokens=tokens,
        note="forward only (1/3 of a training token's FLOPs); compared models counted as the same size")

    # chat data
    c = plan.synthetic_settings
    if plan.chat_data_kind == "synthetic":
        prompts = c.get("max_prompts") or 0
        if not prompts:
            from .synthetic import SEED_TOPICS

            prompts = len(SEED_TOPICS) * int(c["instructions_per_topic"])
        answers = prompts * int(c["responses_per_prompt"])
        answer_tokens = min(int(c["max_tokens"]), API_ANSWER_TOKENS)
        stage1 = 0 if c.get("prompts") else prompts  # seed topics: a user message is written first
        prompt_tok = answers * API_PROMPT_TOKENS + stage1 * 60
        completion_tok = answers * answer_tokens + stage1 * INSTRUCTION_TOKENS
        api = None
        if c.get("price_per_m_input") is not None or c.get("price_per_m_output") is not None:
            api = (prompt_tok * (c.get("price_per_m_input") or 0)
                   + completion_tok * (c.get("price_per_m_output") or 0)) / 1e6
        seconds = STARTUP_S + (answers + stage1) * API_LATENCY_S / int(c["concurrency"])
        put("chat_data", seconds, tokens=prompt_tok + completion_tok, api_dollars=api,
            note=f"{answers:,} answers (+{stage1:,} user messages) at {API_LATENCY_S:.0f} s each, "
                 f"{c['concurrency']} in flight (assumed); {API_PROMPT_TOKENS}+{answer_tokens} tokens per answer "
                 "(assumed); needs no GPU: runs beside data + pretraining, or first on a machine without one")
        rows = answers
    elif plan.chat_data_kind == "stdlib-docs":
        rows = int(plan.o.chat_data.get("max_rows") or 1577)
        put("chat_data", STARTUP_S, tokens=rows * CHAT_ROW_TOKENS["stdlib-docs"], api_dollars=0.0,
            note="offline: questions about standard-library functions answered by their docstrings")
    else:
        rows = None
        put("chat_data", 0.0, api_dollars=0.0, note="an existing data set")

    # SFT: packed rows of max_length tokens
    s = plan.sft_settings
    world = hw.count
    per_step = int(s["per_device_train_batch_size"]) * int(s["gradient_accumulation_steps"]) * world
    per_step_tokens = per_step * int(s["max_length"])
    if int(s.get("max_steps") or -1) > 0:
        steps = int(s["max_steps"])
        note = "max_steps x packed rows per step"
    else:
        row_tokens = CHAT_ROW_TOKENS[plan.chat_data_kind]
        data_tokens = (rows or int(s.get("max_samples") or 100_000)) * row_tokens * float(s["num_train_epochs"])
        steps = max(1, math.ceil(data_tokens / per_step_tokens))
        note = f"{rows or 'assumed 100,000'} conversations x {row_tokens} tokens (assumed) x epochs, packed"
    tokens = steps * per_step_tokens
    sft_tp = throughput(hw, sft_flops, plan.o.tokens_per_s_per_device)
    put("sft", STARTUP_S + tokens / (sft_tp.tokens_per_s * world), tokens=tokens, steps=steps,
        note=f"{note}; {sft_tp.tokens_per_s:,.0f} tokens/s per device ({sft_tp.basis}, as pretraining)")

    # chat samples and publishing: start-up dominated
    n_prompts = len(plan.chat_prompts())
    put("chat", STARTUP_S, tokens=n_prompts * int(plan.chat_settings()["max_new_tokens"]),
        note="start-up; generation is a few hundred tokens")
    params_bytes = pre_flops / 6 * 4  # fp32 weights, ~N parameters
    upload = params_bytes / UPLOAD_BYTES_PER_S if plan.o.publish.get("push") else 0.0
    put("publish", STARTUP_S + upload, note="start-up" + (" + upload at 50 MB/s (assumed)" if upload else ""))
    from .pipeline import STAGES

    out = {name: out[name] for name in STAGES}
    calibrate(out, plan, rate)
    return out


def calibrate(estimates: dict, plan, rate: float | None):
    """`--rates_from RUN_DIR`: each stage's seconds times (that run's measured wall time / this formula's seconds
    for that run), from RUN_DIR/report.json, for the stages it ran to the end on the same hardware. The measured
    time sums every attempt in that folder: calibrate from a run that did each stage once."""
    source = getattr(plan.o, "rates_from", None)
    if not source:
        return
    path = Path(source) / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--rates_from {source}: cannot read {path} ({e}); expected a previous pipeline run's "
                         "folder") from None
    hw, ours = report.get("hardware") or {}, plan.hardware
    if (hw.get("name"), hw.get("count")) != (ours.name, ours.count):
        raise ValueError(f"--rates_from {source}: that run used {hw.get('count')} x {hw.get('name')}, this plan "
                         f"{ours.count} x {ours.name}: expected a run on the same hardware")
    for name, e in estimates.items():
        stage = (report.get("stages") or {}).get(name) or {}
        before = stage.get("estimate") or {}
        wall, raw = stage.get("wall_s"), before.get("raw_seconds")
        if stage.get("status") != "done" or not wall or not raw:
            continue
        factor = wall / raw
        e["seconds"] = e["raw_seconds"] * factor
        if rate and e["device"]:
            e["dollars"] = e["seconds"] / 3600 * rate
        e["basis"] = "calibrated"
        e["note"] += (f"; calibrated x{factor:.2f}: {source} measured {fmt_seconds(wall)} where this formula said "
                      f"{fmt_seconds(raw)}")


def schedule(plan, estimates: dict, decisions: dict) -> dict:
    """The stages to run on the estimate's clock (gpt2custom/schedule.py's policy), and what the GPU node costs.

    Adds to each stage's estimate its `start` and `end` and, for a stage that needs no GPU, the node time it adds
    (`dollars`: what the node bills while waiting on it; zero beside the critical path). Returns the wall time
    (critical path), the node's time and dollars if this invocation starts on it, the same if `--until chat_data`
    ran first on a machine without a GPU, and the spot figure when `spot_price_per_hour` is set."""
    hw = plan.hardware
    rate = hw.count * hw.price_per_hour if hw.price_per_hour else None
    reads = {s.name: tuple(s.reads) for s in plan.stages()}
    todo = [n for n in estimates if decisions[n].status == TO_RUN]
    seconds = {n: estimates[n]["seconds"] for n in todo}
    device = [n for n in todo if estimates[n]["device"]]

    def node_end(secs, order):
        times = simulate(order, secs, reads)
        return max([times[n][1] for n in device] + [0.0]), times

    node_s, times = node_end(seconds, todo)
    for n in todo:
        estimates[n]["start"], estimates[n]["end"] = times[n]
        if not estimates[n]["device"]:
            added = node_s - node_end({**seconds, n: 0.0}, todo)[0] if device else 0.0
            estimates[n]["dollars"] = added / 3600 * rate if rate else None
    first = [n for n in todo if n in ("data", "chat_data")]  # what `--until chat_data` runs
    split_s = node_end(seconds, [n for n in todo if n not in first])[0] if device else 0.0
    out = {"times": times, "path": critical_path(times, reads), "wall_s": max([t[1] for t in times.values()] + [0.0]),
           "sum_s": sum(seconds.values()), "node_s": node_s, "split_node_s": split_s, "first": first,
           "rate": rate, "gpu": bool(device) and not hw.is_cpu}
    out["node_dollars"] = node_s / 3600 * rate if rate else None
    out["split_dollars"] = split_s / 3600 * rate if rate else None
    spot = getattr(plan.o, "spot_price_per_hour", None)
    if spot:
        overhead = getattr(plan.o, "preemption_overhead", None)
        overhead = DEFAULT_PREEMPTION_OVERHEAD if overhead is None else float(overhead)
        out["spot"] = {"price_per_hour": float(spot), "overhead": overhead,
                       "dollars": node_s * (1 + overhead) / 3600 * float(spot) * hw.count,
                       "split_dollars": split_s * (1 + overhead) / 3600 * float(spot) * hw.count}
    return out



def data_seconds(plan, hw: Hardware) -> tuple[float, float | None]:
    """(seconds, tokens, note) of data preparation: max(download, decode + tokenize) (prepare_data.py streams) +
    writing the shards + start-up, the note giving each part and its basis."""
    d = plan.data_settings
    tokens = d.get("max_tokens") or SOURCE_TOKENS.get(d.get("source"), None)
    if d.get("num_proc"):
        cores, which = int(d["num_proc"]), "num_proc"
    elif hw.source == "config" and not hw.is_cpu:
        cores, which = CORES_PER_GPU * hw.count, f"assumed {CORES_PER_GPU} per GPU of the node"
    else:
        cores, which = os.cpu_count() or 1, "this machine's"
    tokens_n = tokens or 0
    hub = "/" in str(d.get("source")) and not Path(str(d.get("source"))).exists()
    given = getattr(plan.o, "download_mb_per_s", None)
    mb_s = float(given or DEFAULT_DOWNLOAD_MB_PER_S)
    download_bytes = tokens_n * PARQUET_BYTES_PER_TOKEN if hub else 0.0
    download = download_bytes / (mb_s * 1e6)
    decode = download_bytes / (PARQUET_DECODE_BYTES_PER_CORE_S * cores)
    tokenize = tokens_n / (TOKENIZE_PER_CORE_S * cores)
    write = tokens_n * 2 / SHARD_WRITE_BYTES_PER_S
    parts = [f"tokenize {fmt_seconds(tokenize)} at {TOKENIZE_PER_CORE_S / 1e6:.1f}M tokens/s per core (measured: "
             f"{TOKENIZE_SOURCE}) on {cores} cores ({which})"]
    if hub:
        parts.insert(0, f"download {download_bytes / 1e9:,.1f} GB (assumed {PARQUET_BYTES_PER_TOKEN} bytes of "
                        f"Parquet per token) at {mb_s:,.0f} MB/s ({'download_mb_per_s' if given else 'assumed; set download_mb_per_s'}) "
                        f"= {fmt_seconds(download)}, overlapping decode {fmt_seconds(decode)} (assumed "
                        f"{PARQUET_DECODE_BYTES_PER_CORE_S / 1e6:.0f} MB/s per core) and")
    parts.append(f"write {tokens_n * 2 / 1e9:,.2f} GB of shards {fmt_seconds(write)} (assumed "
                 f"{SHARD_WRITE_BYTES_PER_S / 1e6:.0f} MB/s); needs no GPU")
    seconds = STARTUP_S + max(download, decode + tokenize) + write
    return seconds, tokens, " ".join(parts[:-1]) + "; " + parts[-1]


def plan_table(plan, estimates: dict, decisions: dict) -> str:
    """The plan as a fixed-width table (each stage's status, why, and its estimate) with a total line for the stages
    to run, then the hardware and the basis of each estimate."""
    sched = schedule(plan, estimates, decisions)
    rows = [("stage", "status", "tokens", "steps", "time", "device $", "API $", "why")]
    total_api = 0.0
    for name, e in estimates.items():
        d = decisions[name]
        rows.append((name, d.status, fmt_count(e["tokens"]), fmt_count(e["steps"]), fmt_seconds(e["seconds"]),
                     fmt_dollars(e["dollars"]), fmt_dollars(e["api_dollars"]), d.reason))
        if d.status == TO_RUN:
            total_api += e["api_dollars"] or 0.0
    total_s, total_d, priced = sched["wall_s"], sched["node_dollars"] or 0.0, sched["rate"] is not None
    rows.append(("total (to run)", "", "", "", fmt_seconds(total_s), fmt_dollars(total_d) if priced else "-",
                 fmt_dollars(total_api), "wall time on the critical path; device $: the node's time"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    rule = "  ".join("-" * w for w in widths)
    lines.insert(1, rule)
    lines.insert(-1, rule)
    notes = schedule_lines(sched, estimates) + ["", f"hardware: {plan.hardware.describe()}"]
    notes += [f"  {name}: {e['note']}" for name, e in estimates.items() if e["note"]]
    notes.append(f"estimated total: {fmt_seconds(total_s)} of wall time ({fmt_seconds(sched['sum_s'])} of stages), "
                 f"{fmt_dollars(total_d + total_api) if priced else 'no device price'} (the seed's journey: "
                 f"${SEED_TOTAL_DOLLARS:.2f})")
    return "\n".join(lines + [""] + notes)


def schedule_lines(sched: dict, estimates: dict) -> list[str]:
    """The timeline under the plan table: where each stage runs, when, beside which, the critical path (*), and
    what the GPU node costs with and without the no-GPU stages run first elsewhere."""
    times, path = sched["times"], sched["path"]
    if not times:
        return []
    rows = [("when (estimated)", "runs on", "start", "end", "beside")]
    for n, (a, b) in times.items():
        beside = [m for m, (c, d) in times.items() if m != n and c < b and a < d]
        rows.append((n + (" *" if n in path else ""), "devices" if estimates[n]["device"] else "no GPU needed",
                     fmt_seconds(a), fmt_seconds(b), ", ".join(beside) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"* critical path: {' -> '.join(path)}: {fmt_seconds(sched['wall_s'])} of wall time for "
                 f"{fmt_seconds(sched['sum_s'])} of stages")
    if sched["gpu"] and sched["rate"]:
        line = (f"GPU node: {fmt_seconds(sched['node_s'])}, {fmt_dollars(sched['node_dollars'])}, when this command "
                "runs on it")
        if sched["first"] and sched["split_node_s"] < sched["node_s"] - 1:
            line += (f"; run `pipeline.py ... --until chat_data` first on a machine without GPUs "
                     f"({', '.join(sched['first'])}), then the rest on the node: {fmt_seconds(sched['split_node_s'])}, "
                     f"{fmt_dollars(sched['split_dollars'])}, saving "
                     f"{fmt_dollars(sched['node_dollars'] - sched['split_dollars'])}")
        lines.append(line)
        spot = sched.get("spot")
        if spot:
            lines.append(f"spot at ${spot['price_per_hour']:.2f} per GPU-hour, +{spot['overhead']:.0%} time for "
                         f"preemptions (assumed unless preemption_overhead is set; pretrain.py checkpoints on a notice "
                         f"and resumes, README \"Preemption\"): {fmt_dollars(spot['dollars'])} "
                         f"({fmt_dollars(spot['split_dollars'])} with the no-GPU stages first)")
    return lines
