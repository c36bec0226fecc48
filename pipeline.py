"""One command from raw text to a published chat model: data -> pretrain -> evaluate -> chat data -> SFT -> chat
samples -> publish, from one YAML config, with a cost estimate before and a report card after.

Each stage is the script a user would run by hand (`accelerate launch` where it trains or evaluates), printed
before it runs; its output goes to the terminal and to {run_dir}/logs/<stage>.log. Stages whose final output exists
are skipped, so a second run does nothing and a killed run continues where it stopped through each script's own
resume (see gpt2custom/pipeline.py). `--from` / `--until` select stages. Before anything runs: the plan, with
tokens, steps, time and dollars per stage and in total for the GPUs this machine has (or `gpu` / `num_gpus` in the
config), and a confirmation prompt (`--yes` skips it). After: {run_dir}/report.md and report.json
(gpt2custom/report.py): every stage's inputs, outputs, time and dollars, the curves, the comparison, the chat data
counts and cost, three chat samples, the total next to the seed's $53.25; the published model card takes its
numbers from the same report.

    python pipeline.py --config configs/pipeline-smoke.yaml --yes      # offline, CPU, a few minutes
    python pipeline.py --config configs/pipeline-124m.yaml               # the seed's journey on one 8-GPU node
    python pipeline.py --config configs/pipeline-124m.yaml --plan_only true --gpu A100 --num_gpus 8
    python pipeline.py --config configs/pipeline-124m.yaml --from sft --until chat

The stage keys of the YAML (`data`, `pretrain`, `evaluate`, `chat_data`, `sft`, `chat`, `publish`) hold the flags
of that stage's script, passed through as `--key value` (a `config` key is that script's own `--config`); the
pipeline sets the paths that join the stages. Keys the pipeline reads itself: `evaluate.hellaswag` (false: no
HellaSwag), `evaluate.compare_models` (more `--models`), `chat_data.source` (`synthetic`: generate_synthetic.py,
`stdlib-docs`: gpt2custom/stdlib_chat.py, else a data set path or Hub id for sft.py), `chat.prompts`, `publish.push`
(false: a `--dry_run` folder). On the command line they take JSON: `--sft '{"max_steps": 50}'` (replaces the
YAML's whole `sft` mapping).
"""

import json
import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from trl import TrlParser

from gpt2custom.pipeline import (
    ROOT,
    STAGES,
    Plan,
    command_text,
    done_marker,
    plan_table,
    write_json_atomic,
)
from gpt2custom.report import prepare_publish, write_chat_samples, write_report
from gpt2custom.synthetic import OutputFiles, read_rows


class StageArgs(dict):
    """A stage's flags: a YAML mapping, or JSON on the command line."""

    def __init__(self, value=None):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"expected a JSON object of flags, got {value!r} ({e})") from None
            if not isinstance(value, dict):
                raise ValueError(f"expected a JSON object of flags, got {value!r}")
        super().__init__(value or {})


def stage_field(help_text: str):
    return field(default_factory=StageArgs, metadata={"help": help_text})


@dataclass
class PipelineOptions:
    run_dir: str = field(default="runs/pipeline", metadata={"help": "every stage's output, the logs and the report"})
    from_stage: str | None = field(default=None, metadata={"aliases": ["--from"], "help": f"first stage: {STAGES}"})
    until_stage: str | None = field(default=None, metadata={"aliases": ["--until"], "help": "last stage to run"})
    yes: bool = field(default=False, metadata={"help": "run without the confirmation prompt"})
    plan_only: bool = field(default=False, metadata={"help": "print the plan and the estimate, run nothing"})
    # where the stages run
    cpu: bool = field(default=False, metadata={"help": "everything on the CPU (accelerate launch --cpu)"})
    accelerate_config: str | None = field(default=None, metadata={"help": "accelerate launch --config_file"})
    num_processes: int | None = field(default=None, metadata={"help": "accelerate launch --num_processes"})
    # what the estimate assumes
    gpu: str | None = field(default=None, metadata={"help": "GPU name for the estimate (A100, H100, ...): default "
                                                             "the GPUs this machine has"})
    num_gpus: int | None = field(default=None, metadata={"help": "GPUs for the estimate (default: those seen)"})
    gpu_price_per_hour: float | None = field(default=None, metadata={"help": "$ per GPU-hour (default: "
                                                                             "gpt2custom/metrics.py GPU_SPECS)"})
    tokens_per_s_per_device: float | None = field(default=None, metadata={"help": "training throughput to assume "
                                                                                   "(default: THROUGHPUT table)"})
    # the stages' own flags
    data: StageArgs = stage_field("prepare_data.py flags")
    pretrain: StageArgs = stage_field("pretrain.py flags ('config': its YAML)")
    evaluate: StageArgs = stage_field("eval_hellaswag.py flags, plus hellaswag (bool) and compare_models (list)")
    chat_data: StageArgs = stage_field("source: synthetic | stdlib-docs | a data set; the rest: that tool's flags")
    sft: StageArgs = stage_field("sft.py flags ('config': its YAML)")
    chat: StageArgs = stage_field("chat.py flags, plus prompts (list of one-line prompts)")
    publish: StageArgs = stage_field("publish.py flags, plus push (bool; false = a dry-run folder)")

    def __post_init__(self):
        for name in ("data", "pretrain", "evaluate", "chat_data", "sft", "chat", "publish"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                raise ValueError(f"{name}: expected a mapping of the stage's flags, got {value!r}")
            setattr(self, name, StageArgs(value))


# ------------------------------------------------------------------------------------------------ running


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class State:
    """{run_dir}/pipeline_state.json: every command each stage ran, its wall time and exit status."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "pipeline_state.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}

    def attempt(self, stage: str, command: str) -> dict:
        record = {"command": command, "started": now(), "wall_s": None, "exit": None}
        self.data["stages"].setdefault(stage, {"attempts": []})["attempts"].append(record)
        self.save()
        return record

    def save(self):
        write_json_atomic(self.path, self.data)


def pump(source, sinks, keep: list | None):
    """Copy a child's stream to the terminal and the log as it arrives (tqdm's carriage returns intact)."""
    for chunk in iter(lambda: source.read1(65536), b""):
        for sink in sinks:
            sink.write(chunk)
            sink.flush()
        if keep is not None:
            keep.append(chunk)


def execute(cmd: list[str], log_path: Path, stdin_text: str | None = None) -> tuple[int, str]:
    """Run one command; its stdout and stderr go to the terminal and the log. Returns (exit status, stdout)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n$ {command_text(cmd)}\n".encode())
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        out: list[bytes] = []
        threads = [threading.Thread(target=pump, args=(proc.stdout, [sys.stdout.buffer, log], out), daemon=True),
                   threading.Thread(target=pump, args=(proc.stderr, [sys.stderr.buffer, log], None), daemon=True)]
        for t in threads:
            t.start()
        if stdin_text is not None:
            proc.stdin.write(stdin_text.encode())
            proc.stdin.close()
        rc = proc.wait()
        for t in threads:
            t.join()
    return rc, b"".join(out).decode("utf-8", errors="replace")


def children_cpu_s() -> float:
    """CPU seconds (user + system) of the finished child processes and their own children: on a shared machine a
    steadier figure than the wall time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_stage(plan: Plan, stage, state: State):
    stdout = ""
    if stage.name == "publish":
        prepare_publish(plan, state.data)  # the card's numbers: the same figures as the report
    for i, cmd in enumerate(stage.commands):
        text = command_text(cmd)
        print(f"\n[{stage.name}] $ {text}", flush=True)
        record = state.attempt(stage.name, text)
        start, cpu = time.perf_counter(), children_cpu_s()
        last = i == len(stage.commands) - 1
        rc, stdout = execute(cmd, plan.logs / f"{stage.name}.log", stage.capture_stdin if last else None)
        record["wall_s"], record["cpu_s"], record["exit"] = time.perf_counter() - start, children_cpu_s() - cpu, rc
        state.save()
        if rc != 0:
            raise StageFailed(f"stage {stage.name} failed (exit {rc}); its log: {plan.logs / f'{stage.name}.log'}. "
                              "Rerun the same command to continue from there.")
    if stage.name == "chat":
        write_chat_samples(plan, stdout)
    elif stage.name == "chat_data" and plan.chat_data_kind == "synthetic":
        failed = OutputFiles.for_output(plan.chat_data_path).failed
        if read_rows(failed):  # generate_synthetic.py retries these on its next run
            raise StageFailed(f"stage chat_data: prompts still failed after every retry ({failed}); rerun the same "
                              "command to ask them again")
        done_marker(plan.chat_data_path).write_text(now() + "\n")
    elif stage.name == "publish" and plan.o.publish.get("push"):
        url = next((line.split()[-1] for line in stdout.splitlines() if line.startswith("uploaded to")), None)
        write_json_atomic(stage.output, {"repo_id": plan.publish_args()["repo_id"], "commit_url": url})


class StageFailed(RuntimeError):
    pass


def confirm(options: PipelineOptions) -> bool:
    if options.yes:
        return True
    if not sys.stdin.isatty():
        sys.exit("pipeline.py: no terminal to confirm on: pass --yes to run the plan above")
    try:
        return input("Run the stages marked 'to run'? [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def main(argv: list[str] | None = None):
    try:
        (options,) = TrlParser((PipelineOptions,)).parse_args_and_config(argv)
        plan = Plan(options)
        selected = plan.selected(options.from_stage, options.until_stage)
        stages = plan.stages()
        estimates = plan.estimates()
    except (ValueError, FileNotFoundError) as e:  # a bad key, value or file: one line, no traceback
        sys.exit(f"pipeline.py: {e}")
    table = plan_table(plan, estimates, selected, stages)
    print(f"Pipeline {plan.run_dir}: {', '.join(selected)}\n\n{table}\n", flush=True)
    if options.plan_only:
        return
    todo = [s for s in stages if s.name in selected and not s.complete() and not s.skip_reason]
    if todo and not confirm(options):
        sys.exit("pipeline.py: nothing run")
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    state = State(plan.run_dir)
    state.data.update(plan_table=table, estimates=estimates)
    state.save()
    failure = None
    for stage in stages:
        if stage.name not in selected:
            continue
        if stage.skip_reason:
            print(f"\n[{stage.name}] cannot run: {stage.skip_reason}", flush=True)
        elif stage.complete():
            print(f"\n[{stage.name}] complete ({stage.output} exists): skipped", flush=True)
        else:
            try:
                run_stage(plan, stage, state)
            except (StageFailed, ValueError, OSError) as e:
                failure = str(e)
                break
    report_md = write_report(plan, state.data, estimates)
    print(f"\nreport: {report_md} and {report_md.with_suffix('.json')}")
    if failure:
        sys.exit(f"pipeline.py: {failure}")


if __name__ == "__main__":
    main()
