"""The journey from raw text to a published chat model as stages: their commands, their outputs, when they are
complete, and what they will cost before they run. `pipeline.py` (the script) drives them; `gpt2custom/report.py`
writes the report card after.

Stages, in order (each is the script a user would run by hand; the pipeline only chooses paths and flags):

    data       prepare_data.py                    -> {run_dir}/data/manifest.json
    pretrain   accelerate launch pretrain.py      -> {run_dir}/pretrain/final/run_summary.json
    evaluate   accelerate launch eval_hellaswag.py -> {run_dir}/evaluate/eval_results.json
    chat_data  generate_synthetic.py | python -m gpt2custom.stdlib_chat | an existing data set
                                                  -> {run_dir}/chat_data/chat.jsonl
    sft        accelerate launch sft.py           -> {run_dir}/sft/trainer_state.json
    chat       chat.py, the prompts on its stdin  -> {run_dir}/chat/samples.json
    publish    publish.py (--dry_run folder unless `push`) -> {run_dir}/publish/README.md

A stage is complete when its final output exists (each script writes that file last, or atomically); a complete
stage is skipped. An incomplete one is run again and continues through the script's own resume: prepare_data.py and
generate_synthetic.py resume by themselves, pretrain.py gets `--resume true` when it has checkpoints, sft.py gets
`--resume_from_checkpoint` with its latest `checkpoint-N`.

Estimates: tokens and steps from the stage's settings; time = tokens / (tokens/s per device x devices) + start-up;
dollars = time x devices x price per device-hour (gpt2custom/metrics.py GPU_SPECS, or the config's price). The
tokens/s come from THROUGHPUT: measured anchors for GPT-2 124M (the seed on an A100; a compiled GPT-2 on the lent
H100) turned into a FLOP rate, so other sizes scale by FLOPs per token (6N + 12LHQT); every figure says whether
it is measured or assumed.
"""

import json
import math
import os
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from .metrics import GPU_SPECS, flops_per_token

ROOT = Path(__file__).resolve().parents[1]  # where the stage scripts live
STAGES = ("data", "pretrain", "evaluate", "chat_data", "sft", "chat", "publish")
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


# ---------------------------------------------------------------------------------------------------- options

SCRIPT_DEFAULTS = {
    # The defaults of the flags the estimates read, as the scripts define them (tests/test_pipeline.py checks).
    "pretrain": {"model_preset": "gpt2", "block_size": 1024, "total_batch_size": 524288, "max_steps": 19073,
                 "compile": True, "micro_batch_size": 64},
    "sft": {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 1, "max_length": 1024,
            "num_train_epochs": 1, "max_steps": -1},
    "data": {"source": "HuggingFaceFW/fineweb-edu", "max_tokens": None, "val_tokens": 10_000_000},
    "synthetic": {"max_tokens": 1024, "responses_per_prompt": 1, "concurrency": 8, "instructions_per_topic": 20,
                  "max_prompts": None, "prompts": None, "price_per_m_input": None, "price_per_m_output": None},
}


def load_yaml(path: str, where: str) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{where}: cannot read config {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: config {path} is not a YAML mapping")
    return data


def effective(stage_args: dict, defaults: dict, where: str) -> dict:
    """A script's settings as it will see them: its defaults, then its --config YAML, then the pipeline's keys."""
    from_file = load_yaml(stage_args["config"], where) if stage_args.get("config") else {}
    return {**defaults, **from_file, **{k: v for k, v in stage_args.items() if k != "config"}}


def flag_args(args: dict) -> list[str]:
    """`{"max_steps": 10, "cpu": True, "models": ["a", "b"], "x": None}` -> `--max_steps 10 --cpu true --models a b`."""
    out = []
    for key, value in args.items():
        if value is None:
            continue
        out.append(f"--{key}")
        if isinstance(value, bool):
            out.append("true" if value else "false")
        elif isinstance(value, list | tuple):
            out.extend(str(v) for v in value)
        else:
            out.append(str(value))
    return out


def rel(path: "str | Path") -> str:
    """A path as the user would type it from the current folder."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------------- stages


@dataclass
class Stage:
    name: str
    commands: list[list[str]]  # run in order; the stage is complete after the last one
    output: Path  # the file whose existence means "complete"
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    capture_stdin: str | None = None  # text for the last command's stdin (chat prompts)
    note: str | None = None  # why the stage looks the way it does (substitutions, skips)
    skip_reason: str | None = None  # set: the stage cannot run in this configuration

    def complete(self) -> bool:
        if not self.commands and not self.skip_reason:  # nothing to run (an existing data set)
            return True
        return self.output.exists()


class Plan:
    """Paths, commands and estimates of one pipeline run, from the options of pipeline.py (any object with its
    attributes: run_dir, cpu, accelerate_config, num_processes, data, pretrain, evaluate, chat_data, sft, chat,
    publish, gpu, num_gpus, gpu_price_per_hour, tokens_per_s_per_device)."""

    def __init__(self, options):
        self.o = options
        self.run_dir = Path(options.run_dir)
        self.python = sys.executable
        self.data_dir = Path(options.data.get("out_dir") or self.run_dir / "data")
        self.pretrain_dir = Path(options.pretrain.get("output_dir") or self.run_dir / "pretrain")
        self.final_dir = self.pretrain_dir / "final"
        self.eval_dir = Path(options.evaluate.get("out_dir") or self.run_dir / "evaluate")
        self.chat_data_kind, self.chat_data_path = self._chat_data_source()
        self.sft_dir = Path(options.sft.get("output_dir") or self.run_dir / "sft")
        self.chat_dir = self.run_dir / "chat"
        self.publish_dir = Path(options.publish.get("dry_run") or self.run_dir / "publish")
        self.logs = self.run_dir / "logs"
        self.pretrain_settings = effective(options.pretrain, SCRIPT_DEFAULTS["pretrain"], "pretrain")
        self.sft_settings = effective(options.sft, SCRIPT_DEFAULTS["sft"], "sft")
        self.data_settings = {**SCRIPT_DEFAULTS["data"], **options.data}
        self.hardware = hardware(options.gpu, options.num_gpus or options.num_processes, options.gpu_price_per_hour,
                                 cpu=options.cpu)

    # ------------------------------------------------------------------ launch
    def launch(self, script: str) -> list[str]:
        """`accelerate launch` for the stages that train or evaluate."""
        cmd = ["accelerate", "launch"]
        if self.o.cpu:
            cmd += ["--cpu", "--num_processes", str(self.o.num_processes or 1), "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no"]
        else:
            if self.o.accelerate_config:
                cmd += ["--config_file", self.o.accelerate_config]
            if self.o.num_processes:
                cmd += ["--num_processes", str(self.o.num_processes)]
        return cmd + [rel(ROOT / script)]

    def script(self, script: str) -> list[str]:
        return [self.python, rel(ROOT / script)]

    # ------------------------------------------------------------------ sources
    def _chat_data_source(self) -> tuple[str, Path]:
        source = self.o.chat_data.get("source", "synthetic")
        if source in ("stdlib-docs", "synthetic"):
            return source, Path(self.o.chat_data.get("output") or self.run_dir / "chat_data" / "chat.jsonl")
        return "dataset", Path(source)

    def hellaswag_on(self) -> bool:
        return bool(self.o.evaluate.get("hellaswag", True))

    def compare_models(self) -> list[str]:
        return list(self.o.evaluate.get("compare_models") or [])

    # ------------------------------------------------------------------ the stages
    def stages(self) -> list[Stage]:
        return [self.stage_data(), self.stage_pretrain(), self.stage_evaluate(), self.stage_chat_data(),
                self.stage_sft(), self.stage_chat(), self.stage_publish()]

    def stage_data(self) -> Stage:
        args = {**self.o.data, "out_dir": str(self.data_dir)}
        return Stage("data", [self.script("prepare_data.py") + flag_args(args)], self.data_dir / "manifest.json",
                     inputs=[str(args.get("source", SCRIPT_DEFAULTS["data"]["source"]))],
                     outputs=[rel(self.data_dir)])

    def stage_pretrain(self) -> Stage:
        args = dict(self.o.pretrain)
        args.update(data_dir=str(self.data_dir), output_dir=str(self.pretrain_dir))
        if self.o.cpu:
            args["cpu"] = True
        if any((self.pretrain_dir / "checkpoints").glob("step_*")):
            args["resume"] = True
        return Stage("pretrain", [self.launch("pretrain.py") + flag_args(args)], self.final_dir / "run_summary.json",
                     inputs=[rel(self.data_dir)], outputs=[rel(self.final_dir), rel(self.pretrain_dir / "loss.png")])

    def stage_evaluate(self) -> Stage:
        reserved = ("hellaswag", "compare_models")
        args = {k: v for k, v in self.o.evaluate.items() if k not in reserved}
        args.setdefault("perplexity", str(self.data_dir))
        args["models"] = [str(self.final_dir), *self.compare_models()]
        args["out_dir"] = str(self.eval_dir)
        if self.o.cpu:
            args["cpu"] = True
        if not self.hellaswag_on():
            args["conventions"] = "none"  # perplexity (and --tasks, if given) only: no HellaSwag download
        return Stage("evaluate", [self.launch("eval_hellaswag.py") + flag_args(args)], self.eval_dir / "eval_results.json",
                     inputs=[rel(self.final_dir), *self.compare_models()],
                     outputs=[rel(self.eval_dir / "eval_results.json"), rel(self.eval_dir / "eval_results.png")])

    def stage_chat_data(self) -> Stage:
        kind, path = self.chat_data_kind, self.chat_data_path
        args = {k: v for k, v in self.o.chat_data.items() if k not in ("source", "output")}
        if kind == "stdlib-docs":
            cmd = [self.python, "-m", "gpt2custom.stdlib_chat", "--out", str(path), *flag_args(args)]
            return Stage("chat_data", [cmd], path, inputs=["Python's standard-library docstrings"],
                         outputs=[rel(path)])
        if kind == "synthetic":
            cmd = self.script("generate_synthetic.py") + flag_args({**args, "output": str(path)})
            # generate_synthetic.py resumes by itself; it is complete when it has run to the end (a marker the
            # pipeline writes beside its output, since its JSONL grows row by row).
            return Stage("chat_data", [cmd], done_marker(path), inputs=[args.get("model", "Llama-3.1-405B-Instruct")],
                         outputs=[rel(path)])
        return Stage("chat_data", [], path, inputs=[str(path)], outputs=[str(path)],
                     note="an existing data set: nothing to generate")

    def stage_sft(self) -> Stage:
        args = dict(self.o.sft)
        args.update(model_name_or_path=str(self.final_dir), dataset_name=str(self.chat_data_path),
                    output_dir=str(self.sft_dir))
        if self.o.cpu:
            args.update(use_cpu=True, bf16=False)
        latest = latest_sft_checkpoint(self.sft_dir)
        if latest is not None:
            args["resume_from_checkpoint"] = str(latest)
        return Stage("sft", [self.launch("sft.py") + flag_args(args)], self.sft_dir / "trainer_state.json",
                     inputs=[rel(self.final_dir), str(self.chat_data_path)], outputs=[rel(self.sft_dir)])

    def chat_prompts(self) -> list[str]:
        prompts = list(self.o.chat.get("prompts") or DEFAULT_PROMPTS)
        bad = [p for p in prompts if "\n" in p or not p.strip()]
        if bad:
            raise ValueError(f"chat.prompts: {bad[0]!r}: expected one non-empty line per prompt")
        return prompts

    def chat_settings(self) -> dict:
        args = {k: v for k, v in self.o.chat.items() if k != "prompts"}
        return {"temperature": 0, "max_new_tokens": 64, "seed": 0, **args}

    def stage_chat(self) -> Stage:
        args = {**self.chat_settings(), "model_name_or_path": str(self.sft_dir)}
        prompts = self.chat_prompts()
        return Stage("chat", [self.script("chat.py") + flag_args(args)], self.chat_dir / "samples.json",
                     inputs=[rel(self.sft_dir), f"{len(prompts)} prompts"], outputs=[rel(self.chat_dir / "samples.json")],
                     capture_stdin="\n".join(prompts) + "\n")

    def publish_args(self) -> dict:
        args = {k: v for k, v in self.o.publish.items() if k not in ("push", "dry_run")}
        args.setdefault("repo_id", "your-name/gpt2custom-chat")
        args["model_dir"] = str(self.sft_dir)
        args["eval_json"] = str(self.run_dir / "card_eval.json")
        if not self.o.publish.get("push"):
            args["dry_run"] = str(self.publish_dir)
        return args

    def stage_publish(self) -> Stage:
        args = self.publish_args()
        push = bool(self.o.publish.get("push"))
        output = done_marker(self.run_dir / "publish.json") if push else self.publish_dir / "README.md"
        return Stage("publish", [self.script("publish.py") + flag_args(args)], output,
                     inputs=[rel(self.sft_dir), rel(self.run_dir / "card_eval.json")],
                     outputs=[f"https://huggingface.co/{args['repo_id']}" if push else rel(self.publish_dir)])

    # ------------------------------------------------------------------ estimates
    def model_flops(self) -> tuple[float, float]:
        """(training FLOPs per token at the pretraining context, at the SFT context) of the configured model."""
        from configuration_gpt2custom import GPT2CustomConfig

        s = self.pretrain_settings
        config = GPT2CustomConfig.from_preset(s["model_preset"], block_size=int(s["block_size"]))
        sft_len = min(int(self.sft_settings.get("max_length") or config.block_size), config.block_size)
        return flops_per_token(config, config.block_size), flops_per_token(config, sft_len)

    def estimates(self) -> dict[str, dict]:
        """Per stage: tokens, steps, seconds, dollars (device time) and api_dollars, each with its basis."""
        hw = self.hardware
        pre_flops, sft_flops = self.model_flops()
        tp = throughput(hw, pre_flops, self.o.tokens_per_s_per_device)
        rate = hw.count * hw.price_per_hour if hw.price_per_hour else None
        out = {}

        def put(stage, seconds, tokens=None, steps=None, api_dollars=None, basis="estimated", note=""):
            out[stage] = {"tokens": tokens, "steps": steps, "seconds": seconds,
                          "dollars": seconds / 3600 * rate if rate else None, "api_dollars": api_dollars,
                          "basis": basis, "note": note}

        # data: tokenizing on every core (the download of a Hub source is not counted)
        d = self.data_settings
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
        p = self.pretrain_settings
        steps, batch = int(p["max_steps"]), int(p["total_batch_size"])
        compile_s = COMPILE_S if (p.get("compile") and not hw.is_cpu) else 0.0
        tokens = steps * batch
        put("pretrain", STARTUP_S + compile_s + tokens / (tp.tokens_per_s * hw.count), tokens=tokens, steps=steps,
            note=f"{tp.tokens_per_s:,.0f} tokens/s per device ({tp.basis}: {tp.source}); {pre_flops / 1e6:,.1f} "
                 "MFLOP/token; evaluations during training not counted")

        # evaluation: forward passes cost about a third of a training step's FLOPs per token
        e = self.o.evaluate
        models = 1 + len(self.compare_models())
        hs = 0
        if self.hellaswag_on():
            examples = min(int(e.get("limit") or HELLASWAG_EXAMPLES), HELLASWAG_EXAMPLES)
            hs = examples * HELLASWAG_TOKENS_PER_EXAMPLE * len(e.get("conventions") or (1, 2))
        ppl = int(e.get("perplexity_max_tokens") or d.get("val_tokens") or 0)
        tokens = models * (hs + ppl)
        put("evaluate", models * STARTUP_S + tokens / (3 * tp.tokens_per_s * hw.count), tokens=tokens,
            note="forward only (1/3 of a training token's FLOPs); compared models counted as the same size")

        # chat data
        c = {**SCRIPT_DEFAULTS["synthetic"], **self.o.chat_data}
        if self.chat_data_kind == "synthetic":
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
        elif self.chat_data_kind == "stdlib-docs":
            rows = int(self.o.chat_data.get("max_rows") or 1577)
            put("chat_data", STARTUP_S, tokens=rows * CHAT_ROW_TOKENS["stdlib-docs"], api_dollars=0.0,
                note="offline: questions about standard-library functions answered by their docstrings")
        else:
            rows = None
            put("chat_data", 0.0, api_dollars=0.0, note="an existing data set")

        # SFT: packed rows of max_length tokens
        s = self.sft_settings
        world = hw.count
        per_step = int(s["per_device_train_batch_size"]) * int(s["gradient_accumulation_steps"]) * world
        per_step_tokens = per_step * int(s["max_length"])
        if int(s.get("max_steps") or -1) > 0:
            steps = int(s["max_steps"])
            note = "max_steps x packed rows per step"
        else:
            row_tokens = CHAT_ROW_TOKENS[self.chat_data_kind]
            data_tokens = (rows or int(s.get("max_samples") or 100_000)) * row_tokens * float(s["num_train_epochs"])
            steps = max(1, math.ceil(data_tokens / per_step_tokens))
            note = f"{rows or 'assumed 100,000'} conversations x {row_tokens} tokens (assumed) x epochs, packed"
        tokens = steps * per_step_tokens
        sft_tp = throughput(hw, sft_flops, self.o.tokens_per_s_per_device)
        put("sft", STARTUP_S + tokens / (sft_tp.tokens_per_s * world), tokens=tokens, steps=steps,
            note=f"{note}; {sft_tp.tokens_per_s:,.0f} tokens/s per device ({sft_tp.basis}, as pretraining)")

        # chat samples and publishing: start-up dominated
        n_prompts = len(self.chat_prompts())
        put("chat", STARTUP_S, tokens=n_prompts * int(self.chat_settings()["max_new_tokens"]),
            note="start-up; generation is a few hundred tokens")
        params_bytes = pre_flops / 6 * 4  # fp32 weights, ~N parameters
        upload = params_bytes / UPLOAD_BYTES_PER_S if self.o.publish.get("push") else 0.0
        put("publish", STARTUP_S + upload, note="start-up" + (" + upload at 50 MB/s (assumed)" if upload else ""))
        return out

    def selected(self, from_stage: str | None, until_stage: str | None) -> list[str]:
        for name, value in (("--from", from_stage), ("--until", until_stage)):
            if value is not None and value not in STAGES:
                raise ValueError(f"{name} {value!r}: expected one of {', '.join(STAGES)}")
        first = STAGES.index(from_stage) if from_stage else 0
        last = STAGES.index(until_stage) if until_stage else len(STAGES) - 1
        if first > last:
            raise ValueError(f"--from {from_stage} comes after --until {until_stage}")
        return list(STAGES[first : last + 1])


DEFAULT_PROMPTS = ("What does json.dumps do?", "Give me three tips for learning to cook.",
                   "Explain what a neural network is in one sentence.")


def done_marker(path: Path) -> Path:
    return path.with_name(path.name + ".done")


def latest_sft_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete `checkpoint-N` of a Trainer output folder (one with trainer_state.json written)."""
    done = [p for p in output_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[-1])) if done else None


# ---------------------------------------------------------------------------------------------------- printing


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"


def fmt_dollars(value: float | None) -> str:
    return "-" if value is None else f"${value:,.2f}"


def fmt_count(value) -> str:
    if value is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:,.0f}"


def plan_table(plan: Plan, estimates: dict, selected: list[str], stages: list[Stage]) -> str:
    """The plan as a fixed-width table with a total line, and the hardware and throughput it assumed."""
    rows = [("stage", "status", "tokens", "steps", "time", "device $", "API $")]
    total_s = total_d = total_api = 0.0
    priced = True
    for stage in stages:
        e = estimates[stage.name]
        if stage.name not in selected:
            status = "not selected"
        elif stage.skip_reason:
            status = "cannot run"
        elif stage.complete():
            status = "done: skip"
        else:
            status = "to run"
        counts = status == "to run"
        rows.append((stage.name, status, fmt_count(e["tokens"]), fmt_count(e["steps"]), fmt_seconds(e["seconds"]),
                     fmt_dollars(e["dollars"]), fmt_dollars(e["api_dollars"])))
        if counts:
            total_s += e["seconds"]
            total_d += e["dollars"] or 0.0
            total_api += e["api_dollars"] or 0.0
            priced &= e["dollars"] is not None
    rows.append(("total (to run)", "", "", "", fmt_seconds(total_s), fmt_dollars(total_d) if priced else "-",
                 fmt_dollars(total_api)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(-1, lines[1])
    notes = [f"hardware: {plan.hardware.describe()}"]
    notes += [f"  {name}: {estimates[name]['note']}" for name in STAGES if estimates[name]["note"]]
    notes += [f"  {s.name}: {s.skip_reason}" for s in stages if s.skip_reason]
    total_all = total_d + total_api
    notes.append(f"estimated total: {fmt_seconds(total_s)}, {fmt_dollars(total_all) if priced else 'no device price'}"
                 f" (the seed's journey: ${SEED_TOTAL_DOLLARS:.2f})")
    return "\n".join(lines + [""] + notes)


def command_text(cmd: list[str]) -> str:
    return shlex.join(cmd)


def estimates_json(estimates: dict) -> dict:
    return {k: dict(v) for k, v in estimates.items()}


def hardware_json(hw: Hardware) -> dict:
    return asdict(hw)


def write_json_atomic(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
