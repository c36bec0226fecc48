"""The journey from raw text to a published chat model as stages: where each writes, what it reads, the command
that runs it, its effective settings and the check its output must pass. `pipeline.py` (the script) drives them;
gpt2custom/records.py decides which must run, gpt2custom/estimate.py what they will cost, gpt2custom/report.py
writes the report card after.

Stages, in order (data and chat_data need no GPU; gpt2custom/schedule.py runs stages that do not read each other's
output side by side; each is the script a user would run by hand; the pipeline only chooses paths and flags):

    stage      command                                  output                              reads
    data       prepare_data.py                          {run_dir}/data/                     -
    chat_data  generate_synthetic.py | python -m gpt2custom.stdlib_chat | an existing data set
                                                        {run_dir}/chat_data/chat.jsonl      -
    pretrain   accelerate launch pretrain.py            {run_dir}/pretrain/final/           data
    evaluate   accelerate launch eval_hellaswag.py      {run_dir}/evaluate/                 data, pretrain
    sft        accelerate launch sft.py                 {run_dir}/sft/                      pretrain, chat_data
    chat       chat.py, the prompts on its stdin        {run_dir}/chat/samples.json         sft, chat_data
    publish    publish.py (--dry_run folder unless `push`) {run_dir}/publish/              pretrain, evaluate, chat_data, sft

An interrupted stage continues through the script's own resume: prepare_data.py and generate_synthetic.py resume by
themselves, pretrain.py gets `--resume true` when it has checkpoints, sft.py gets `--resume_from_checkpoint` with its
latest `checkpoint-N`. A stage whose settings or inputs changed starts afresh (its `clear` folders are removed).
"""

import sys
from pathlib import Path

import yaml

from . import checks
from .commands import flag_args, launch, rel, script
from .estimate import hardware
from .records import Records, Stage, file_identity

# The journey's order: the stages that need no GPU first, so `--until chat_data` prepares both data sets on a machine
# without one (gpt2custom/schedule.py runs chat_data beside data + pretrain either way).
STAGES = ("data", "chat_data", "pretrain", "evaluate", "sft", "chat", "publish")

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
# Keys of a stage's mapping that the pipeline reads itself (never passed to the script).
PIPELINE_KEYS = {"evaluate": ("hellaswag", "compare_models"), "chat_data": ("source", "output", "min_rows"),
                 "chat": ("prompts",), "publish": ("push", "dry_run")}
DEFAULT_MIN_ROWS = 16  # chat data: fewer usable rows than this is a failed stage, not a data set
DEFAULT_PROMPTS = ("What does json.dumps do?", "Give me three tips for learning to cook.",
                   "Explain what a neural network is in one sentence.")


def load_yaml(path: str, where: str) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{where}: cannot read config {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: config {path} is not a YAML mapping")
    return data


def with_config_file(stage_args: dict, where: str) -> dict:
    """A stage's flags with its own `config` YAML merged underneath: what the script will see (before its defaults).
    The `config` key stays, so the command still names the file."""
    from_file = load_yaml(stage_args["config"], where) if stage_args.get("config") else {}
    return {**from_file, **stage_args}


def latest_sft_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete `checkpoint-N` of a Trainer output folder (one with trainer_state.json written)."""
    done = [p for p in output_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[-1])) if done else None


class Plan:
    """Paths, settings and stages of one pipeline run, from the options of pipeline.py (any object with its
    attributes: run_dir, cpu, accelerate_config, num_processes, data, pretrain, evaluate, chat_data, sft, chat,
    publish, gpu, num_gpus, gpu_price_per_hour, tokens_per_s_per_device)."""

    def __init__(self, options):
        self.o = options
        self.run_dir = Path(options.run_dir)
        self.records = Records(self.run_dir)
        # ---- where each stage writes
        self.data_dir = Path(options.data.get("out_dir") or self.run_dir / "data")
        self.pretrain_dir = Path(options.pretrain.get("output_dir") or self.run_dir / "pretrain")
        self.final_dir = self.pretrain_dir / "final"
        self.eval_dir = Path(options.evaluate.get("out_dir") or self.run_dir / "evaluate")
        self.chat_data_kind, self.chat_data_path = self._chat_data_source()
        self.sft_dir = Path(options.sft.get("output_dir") or self.run_dir / "sft")
        self.chat_dir = self.run_dir / "chat"
        self.publish_dir = Path(options.publish.get("dry_run") or self.run_dir / "publish")
        self.publish_record = self.run_dir / "publish.json"  # a push's repo and commit URL
        self.card_eval = self.run_dir / "card_eval.json"
        self.card_training = self.run_dir / "card_training.json"
        self.logs = self.run_dir / "logs"
        # ---- the settings the estimates read (the scripts' defaults, their config files, the pipeline's keys)
        self.pretrain_settings = {**SCRIPT_DEFAULTS["pretrain"], **with_config_file(options.pretrain, "pretrain")}
        self.sft_settings = {**SCRIPT_DEFAULTS["sft"], **with_config_file(options.sft, "sft")}
        self.data_settings = {**SCRIPT_DEFAULTS["data"], **options.data}
        self.synthetic_settings = {**SCRIPT_DEFAULTS["synthetic"], **options.chat_data}
        self.hardware = hardware(options.gpu, options.num_gpus or options.num_processes, options.gpu_price_per_hour,
                                 cpu=options.cpu)

    def portable(self, settings: dict) -> dict:
        """Settings with the run folder written as `{run_dir}`: a copied or moved run folder is still done."""
        root = str(self.run_dir)

        def swap(value):
            if isinstance(value, str) and (value == root or value.startswith(root + "/")):
                return "{run_dir}" + value[len(root):]
            return [swap(v) for v in value] if isinstance(value, list | tuple) else value

        return {k: swap(v) for k, v in settings.items()}

    def launch(self, name: str) -> list[str]:
        return launch(name, self.o.cpu, self.o.num_processes, self.o.accelerate_config)

    # ------------------------------------------------------------------ sources and pipeline keys
    def _chat_data_source(self) -> tuple[str, Path]:
        source = self.o.chat_data.get("source", "synthetic")
        if source in ("stdlib-docs", "synthetic"):
            return source, Path(self.o.chat_data.get("output") or self.run_dir / "chat_data" / "chat.jsonl")
        return "dataset", Path(source)

    def hellaswag_on(self) -> bool:
        return bool(self.o.evaluate.get("hellaswag", True))

    def compare_models(self) -> list[str]:
        return list(self.o.evaluate.get("compare_models") or [])

    def min_rows(self) -> int:
        return int(self.o.chat_data.get("min_rows", DEFAULT_MIN_ROWS))

    def chat_prompts(self) -> list[str]:
        prompts = list(self.o.chat.get("prompts") or DEFAULT_PROMPTS)
        bad = [p for p in prompts if "\n" in p or not p.strip()]
        if bad:
            raise ValueError(f"chat.prompts: {bad[0]!r}: expected one non-empty line per prompt")
        return prompts

    def chat_settings(self) -> dict:
        args = {k: v for k, v in self.o.chat.items() if k not in PIPELINE_KEYS["chat"]}
        return {"temperature": 0, "max_new_tokens": 64, "seed": 0, **args}

    def publish_args(self) -> dict:
        args = {k: v for k, v in self.o.publish.items() if k not in PIPELINE_KEYS["publish"]}
        args.setdefault("repo_id", "your-name/gpt2custom-chat")
        args["model_dir"] = str(self.sft_dir)
        args["eval_json"] = str(self.card_eval)
        args["training_json"] = str(self.card_training)
        if not self.o.publish.get("push"):
            args["dry_run"] = str(self.publish_dir)
        return args

    # ------------------------------------------------------------------ the stages
    def stages(self) -> list[Stage]:
        stages = [self.stage_data(), self.stage_chat_data(), self.stage_pretrain(), self.stage_evaluate(),
                  self.stage_sft(), self.stage_chat(), self.stage_publish()]
        for stage, output in zip(stages, (self.data_dir, self.chat_data_path, self.final_dir, self.eval_dir,
                                          self.sft_dir, self.chat_dir, self.publish_dir)):
            stage.where = self.short(output) + ("/" if output.suffix == "" else "")
        return stages

    def short(self, path: Path) -> str:
        """A path inside the run folder relative to it ("sft"), any other as given."""
        try:
            return str(path.resolve().relative_to(self.run_dir.resolve()))
        except ValueError:
            return str(path)

    def stage_data(self) -> Stage:
        args = {**self.o.data, "out_dir": str(self.data_dir)}
        return Stage("data", [script("prepare_data.py") + flag_args(args)], self.data_dir / "manifest.json",
                     settings=self.portable(args),
                     inputs=[str(args.get("source", SCRIPT_DEFAULTS["data"]["source"]))],
                     outputs=[rel(self.data_dir)], clear=[self.data_dir],
                     check=lambda: checks.check_data(self.data_dir))

    def stage_pretrain(self) -> Stage:
        args = dict(self.o.pretrain)
        args.update(data_dir=str(self.data_dir), output_dir=str(self.pretrain_dir))
        if self.o.cpu:
            args["cpu"] = True
        settings = with_config_file(args, "pretrain")
        if any((self.pretrain_dir / "checkpoints").glob("step_*")):
            args["resume"] = True  # not a setting: the same run, continued
        return Stage("pretrain", [self.launch("pretrain.py") + flag_args(args)], self.final_dir / "run_summary.json",
                     settings=self.portable(settings), reads=("data",), inputs=[rel(self.data_dir)],
                     outputs=[rel(self.final_dir), rel(self.pretrain_dir / "loss.png")],
                     clear=[self.pretrain_dir],
                     check=lambda: checks.check_files(self.final_dir / "config.json", self.final_dir / "run_summary.json"))

    def stage_evaluate(self) -> Stage:
        args = {k: v for k, v in self.o.evaluate.items() if k not in PIPELINE_KEYS["evaluate"]}
        args.setdefault("perplexity", str(self.data_dir))
        args["models"] = [str(self.final_dir), *self.compare_models()]
        args["out_dir"] = str(self.eval_dir)
        if self.o.cpu:
            args["cpu"] = True
        if not self.hellaswag_on():
            args["conventions"] = "none"  # perplexity (and --tasks, if given) only: no HellaSwag download
        return Stage("evaluate", [self.launch("eval_hellaswag.py") + flag_args(args)],
                     self.eval_dir / "eval_results.json", settings=self.portable(args), reads=("data", "pretrain"),
                     inputs=[rel(self.final_dir), *self.compare_models()],
                     outputs=[rel(self.eval_dir / "eval_results.json"), rel(self.eval_dir / "eval_results.png")],
                     clear=[self.eval_dir],
                     check=lambda: checks.check_files(self.eval_dir / "eval_results.json"))

    def stage_chat_data(self) -> Stage:
        kind, path = self.chat_data_kind, self.chat_data_path
        args = {k: v for k, v in self.o.chat_data.items() if k not in PIPELINE_KEYS["chat_data"]}
        settings = {**args, "source": kind, "output": str(path), "min_rows": self.min_rows()}
        if kind == "dataset":
            return Stage("chat_data", [], path, settings=self.portable(settings), inputs=[str(path)],
                         outputs=[str(path)],
                         identity=lambda: file_identity(path), note="an existing data set: nothing to generate")
        from .synthetic import OutputFiles

        files = OutputFiles.for_output(path)
        side_files = [files.answers, files.rejected, files.failed, files.instructions]
        check = lambda: checks.check_chat_data(path, self.min_rows(), failed_is_error=kind == "synthetic")  # noqa: E731
        if kind == "stdlib-docs":
            cmd = [sys.executable, "-m", "gpt2custom.stdlib_chat", "--out", str(path), *flag_args(args)]
            return Stage("chat_data", [cmd], path, settings=self.portable(settings),
                         inputs=["Python's standard-library docstrings"],
                         outputs=[rel(path)], clear=side_files, check=check)
        cmd = script("generate_synthetic.py") + flag_args({**args, "output": str(path)})
        return Stage("chat_data", [cmd], path, settings=self.portable(settings),
                     inputs=[args.get("model", "Llama-3.1-405B-Instruct")],
                     outputs=[rel(path)], clear=side_files, check=check)

    def stage_sft(self) -> Stage:
        args = dict(self.o.sft)
        args.update(model_name_or_path=str(self.final_dir), dataset_name=str(self.chat_data_path),
                    output_dir=str(self.sft_dir))
        if self.o.cpu:
            args.update(use_cpu=True, bf16=False)
        settings = with_config_file(args, "sft")
        latest = latest_sft_checkpoint(self.sft_dir)
        if latest is not None:
            args["resume_from_checkpoint"] = str(latest)  # not a setting: the same run, continued
        return Stage("sft", [self.launch("sft.py") + flag_args(args)], self.sft_dir / "trainer_state.json",
                     settings=self.portable(settings), reads=("pretrain", "chat_data"),
                     inputs=[rel(self.final_dir), str(self.chat_data_path)], outputs=[rel(self.sft_dir)],
                     clear=[self.sft_dir], check=lambda: checks.check_model_generates(self.sft_dir))

    def stage_chat(self) -> Stage:
        args = {**self.chat_settings(), "model_name_or_path": str(self.sft_dir),
                "transcript_json": str(self.chat_dir / "turns.json")}
        prompts = self.chat_prompts()
        samples = self.chat_dir / "samples.json"
        return Stage("chat", [script("chat.py") + flag_args(args)], samples,
                     settings=self.portable({**args, "prompts": prompts}),
                     reads=("sft",), inputs=[rel(self.sft_dir), f"{len(prompts)} prompts"],
                     outputs=[rel(samples)], clear=[self.chat_dir],
                     capture_stdin="\n/reset\n".join(prompts) + "\n",  # each prompt a new conversation
                     check=lambda: checks.check_chat_samples(samples, prompts))

    def stage_publish(self) -> Stage:
        args = self.publish_args()
        push = bool(self.o.publish.get("push"))
        output = self.publish_record if push else self.publish_dir / "README.md"
        return Stage("publish", [script("publish.py") + flag_args(args)], output,
                     settings=self.portable({**args, "push": push}),
                     reads=("pretrain", "evaluate", "chat_data", "sft"),
                     inputs=[rel(self.sft_dir), rel(self.card_eval), rel(self.card_training)],
                     outputs=[f"https://huggingface.co/{args['repo_id']}" if push else rel(self.publish_dir)],
                     clear=[self.publish_record] if push else [self.publish_dir],
                     check=lambda: checks.check_files(output))

    def selected(self, from_stage: str | None, until_stage: str | None) -> list[str]:
        for name, value in (("--from", from_stage), ("--until", until_stage)):
            if value is not None and value not in STAGES:
                raise ValueError(f"{name} {value!r}: expected one of {', '.join(STAGES)}")
        first = STAGES.index(from_stage) if from_stage else 0
        last = STAGES.index(until_stage) if until_stage else len(STAGES) - 1
        if first > last:
            raise ValueError(f"--from {from_stage} comes after --until {until_stage}")
        return list(STAGES[first : last + 1])
