"""What a pipeline run will cost before it runs: tokens, steps, seconds and dollars per stage, and the plan table that
shows them beside each stage's status.

Tokens and steps come from the stage's settings; time = tokens / (tokens/s per device x devices) + start-up;
dollars = time x devices x price per device-hour (gpt2custom/metrics.py GPU_SPECS, or the config's price). The
tokens/s come from THROUGHPUT: measured anchors for GPT-2 124M (the seed on an A100; a compiled GPT-2 on the lent
H100) turned into a FLOP rate, so other sizes scale by FLOPs per token (6N + 12LHQT); every figure says whether
it is measured or assumed.
"""

import math
import os
from dataclasses import dataclass

from .formatting import fmt_count, fmt_dollars, fmt_seconds
from .metrics import GPU_SPECS, flops_per_token
from .records import TO_RUN

SEED_TOTAL_DOLLARS = 53.25  # the seed's whole journey, from its report

# ---------------------------------------------------------------------------------------------------- throughput

FLOPS_124M = 855_383_040  # flops_per_token of the gpt2 preset at T=1024 (~855M, shared/docs/performance.md)


@dataclass(frozen=True)
class Anchor:
    tokens_per_s: float  # per device, GPT-2 124M at T=1024, training
    basis: str  # "measured" or "assumed"
    source: str

    @property
    def flop_rate(self) -> float:
        """The training FLOP/s per device this anchor stands for; other model sizes reuse it."""
        return self.tokens_per_s * FLOPS_124M


# Matched like GPU_SPECS (substring, first match wins). The A100 figure is the seed's own measurement; nobody has
# measured our model on a GPU yet, so the H100 figure is the closest measured stand-in (the same architecture in
# transformers, compiled) and says so.
THROUGHPUT = {
    "H200": Anchor(419e3, "assumed", "H100 figure (same bf16 peak): transformers GPT2LMHeadModel, torch.compile, "
                                     "B=64, measured on the lent H100 (shared/docs/performance.md); ours unmeasured"),
    "H100": Anchor(419e3, "assumed", "transformers GPT2LMHeadModel, torch.compile, B=64, measured on the lent H100 "
                                     "(shared/docs/performance.md); ours not measured on a GPU yet"),
    "A100": Anchor(185e3, "measured", "the seed's GPT-2 124M on one A100 (shared/docs/performance.md, README cost "
                                      "table)"),
}
ASSUMED_MFU = 0.40  # other GPUs: llm.c's 40 % on H100s, a fair compiled-PyTorch figure
# The CPU: the tiny preset's pretraining on the 2-core development box (pipeline-smoke, one process, fp32):
# ~1,000 tokens/s x 20.1 MFLOP/token.
CPU_FLOP_RATE = 2.0e10
CPU_SOURCE = "tiny preset pretraining on the 2-core development box (configs/pipeline-smoke.yaml), fp32"
STARTUP_S = 10.0  # per command: interpreter, torch/transformers imports, accelerate launch (measured ~5-10 s here)
COMPILE_S = 60.0  # torch.compile's first step on a GPU (assumed)
CORES_PER_GPU = 12  # a GPU node named in the config, not this machine: typical cloud 8-GPU nodes have 96+ vCPUs
TOKENIZE_PER_CPU_S = 3e6  # prepare_data.py's docstring: ~3M tokens per CPU-second (bench/bench_tokenize.py)
SOURCE_TOKENS = {"HuggingFaceFW/fineweb-edu": 10e9, "stdlib": 15.6e6}  # whole sources (prepare_data.py docstring)
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
        return Throughput(CPU_FLOP_RATE / flops_token, "measured", CPU_SOURCE + " (scaled by FLOPs per token)")
    anchor = next((a for key, a in THROUGHPUT.items() if key.lower() in hw.name.lower()), None)
    if anchor is not None:
        scaled = "" if math.isclose(flops_token, FLOPS_124M, rel_tol=0.01) else ", scaled by FLOPs per token"
        return Throughput(anchor.flop_rate / flops_token, anchor.basis, anchor.source + scaled)
    if hw.peak_flops:
        return Throughput(ASSUMED_MFU * hw.peak_flops / flops_token, "assumed",
                          f"{ASSUMED_MFU:.0%} MFU of {hw.name}'s {hw.peak_flops / 1e12:.0f} TFLOP/s bf16 peak")
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
        out[stage] = {"tokens": tokens, "steps": steps, "seconds": seconds,
                      "dollars": seconds / 3600 * rate if rate else None, "api_dollars": api_dollars,
                      "basis": basis, "note": note}

    # data: tokenizing on every core (the download of a Hub source is not counted)
    d = plan.data_settings
    tokens = d.get("max_tokens") or SOURCE_TOKENS.get(d.get("source"), None)
    if d.get("num_proc"):
        cores, which = int(d["num_proc"]), "num_proc"
    elif hw.source == "config" and not hw.is_cpu:
        cores, which = CORES_PER_GPU * hw.count, f"assumed {CORES_PER_GPU} per GPU"
    else:
        cores, which = os.cpu_count() or 1, "this machine's"
    put("data", STARTUP_S + (tokens or 0) / (TOKENIZE_PER_CPU_S * cores), tokens=tokens,
        note=f"tokenizing at {TOKENIZE_PER_CPU_S / 1e6:.0f}M tokens per CPU-second (measured) on {cores} cores "
             f"({which}); reading/downloading the source not included")

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
    ppl = int(e.get("perplexity_max_tokens") or d.get("val_tokens") or 0)
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
                 "(assumed); the devices are billed while they wait")
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
    return out



def plan_table(plan, estimates: dict, decisions: dict) -> str:
    """The plan as a fixed-width table (each stage's status, why, and its estimate) with a total line for the stages
    to run, then the hardware and the basis of each estimate."""
    rows = [("stage", "status", "tokens", "steps", "time", "device $", "API $", "why")]
    total_s = total_d = total_api = 0.0
    priced = True
    for name, e in estimates.items():
        d = decisions[name]
        rows.append((name, d.status, fmt_count(e["tokens"]), fmt_count(e["steps"]), fmt_seconds(e["seconds"]),
                     fmt_dollars(e["dollars"]), fmt_dollars(e["api_dollars"]), d.reason))
        if d.status == TO_RUN:
            total_s += e["seconds"]
            total_d += e["dollars"] or 0.0
            total_api += e["api_dollars"] or 0.0
            priced &= e["dollars"] is not None
    rows.append(("total (to run)", "", "", "", fmt_seconds(total_s), fmt_dollars(total_d) if priced else "-",
                 fmt_dollars(total_api), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    rule = "  ".join("-" * w for w in widths)
    lines.insert(1, rule)
    lines.insert(-1, rule)
    notes = [f"hardware: {plan.hardware.describe()}"]
    notes += [f"  {name}: {e['note']}" for name, e in estimates.items() if e["note"]]
    notes.append(f"estimated total: {fmt_seconds(total_s)}, "
                 f"{fmt_dollars(total_d + total_api) if priced else 'no device price'} (the seed's journey: "
                 f"${SEED_TOTAL_DOLLARS:.2f})")
    return "\n".join(lines + [""] + notes)
