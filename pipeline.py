"""One command from raw text to a published chat model: data (and chat data beside it) -> pretrain -> evaluate -> SFT
-> chat samples -> publish, from one YAML config, with a cost estimate before and a report card after.

    python pipeline.py --config configs/pipeline-smoke.yaml --yes      # offline, CPU, a few minutes
    python pipeline.py --config configs/pipeline-124m.yaml               # the seed's journey on one 8-GPU node
    python pipeline.py --config configs/pipeline-124m.yaml --plan_only true --gpu A100 --num_gpus 8
    python pipeline.py --config configs/pipeline-124m.yaml --from sft --until chat
    python pipeline.py --config configs/pipeline-smoke.yaml --force sft   # sft again, and what read its output

The journey, top to bottom (`main`):
1. The options: the YAML, then the command line. A stage's mapping on the command line is JSON and merges into the
   YAML's (`--sft '{"max_steps": 50}'` changes max_steps and keeps the rest).
2. The plan (gpt2custom/pipeline.py): each stage's command, effective settings (its flags with its own config file
   merged) and the stages whose output it reads.
3. The decision (gpt2custom/records.py): each stage is "done" when its completion record matches the settings and
   inputs it would run with now, else "to run" with the reason (not run yet, settings changed: key old -> new, input
   changed: an upstream output, forced); a change redoes that stage and every later stage that read its output.
4. The estimate (gpt2custom/estimate.py): tokens, steps, time and dollars per stage, printed with the decision as
   the plan table; `--plan_only true` stops here, otherwise a confirmation prompt (`--yes` skips it).
5. Each stage to run, as soon as the stages it reads are done (gpt2custom/schedule.py: those on the devices
   take turns, data and chat_data run beside them; a failure or a stop signal stops them all): a stale output
   (other settings or inputs) is removed, the command is printed and run (its output to the terminal and
   {run_dir}/logs/<stage>.log), the output is checked (gpt2custom/checks.py: enough
   usable chat rows, an SFT folder that loads and generates, non-empty answers), and only then the completion record
   is written. An interrupted stage continues through the script's own resume when the same command runs again.
6. The report card (gpt2custom/report.py): {run_dir}/report.md and report.json, written whether the run succeeded
   or stopped, with every stage's inputs, outputs, time and dollars, the curves, the chat data counts, the samples.

The stage keys of the YAML (`data`, `pretrain`, `evaluate`, `chat_data`, `sft`, `chat`, `publish`) hold the flags
of that stage's script, passed through as `--key value` (a `config` key is that script's own `--config`); the
pipeline sets the paths that join the stages. Keys the pipeline reads itself: `evaluate.hellaswag` (false: no
HellaSwag), `evaluate.compare_models` (more `--models`), `chat_data.source` (`synthetic`: generate_synthetic.py,
`stdlib-docs`: gpt2custom/stdlib_chat.py, else a data set path or Hub id for sft.py), `chat_data.min_rows` (fewer
usable rows fail the stage), `chat.prompts`, `publish.push` (false: a `--dry_run` folder).
"""

import contextlib
import json
import resource
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from trl import TrlParser

from gpt2custom.commands import command_text, execute, stop_on_sigterm
from gpt2custom.estimate import estimate, plan_table
from gpt2custom.files import write_json_atomic
from gpt2custom.pipeline import STAGES, Plan
from gpt2custom.records import TO_RUN, CheckFailed, current_inputs, decide, now
from gpt2custom.report import prepare_publish, record_push, write_chat_samples, write_report
from gpt2custom.schedule import run_graph


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
    force: list[str] = field(default_factory=list, metadata={"help": "stages to run again even if done (and every "
                                                                      "later stage that reads their output)"})
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
    rates_from: str | None = field(default=None, metadata={"help": "a previous run's folder: its report.json's "
                                                                   "measured stage times calibrate this estimate"})
    download_mb_per_s: float | None = field(default=None, metadata={"help": "download rate of a Hub data source "
                                                                            "(default: 100 MB/s, assumed)"})
    spot_price_per_hour: float | None = field(default=None, metadata={"help": "$ per GPU-hour on spot/preemptible "
                                                                              "GPUs: the plan adds a spot figure"})
    preemption_overhead: float | None = field(default=None, metadata={"help": "extra device time lost to "
                                                                              "preemptions on spot (default 0.10)"})
    # the stages' own flags
    data: StageArgs = stage_field("prepare_data.py flags")
    pretrain: StageArgs = stage_field("pretrain.py flags ('config': its YAML)")
    evaluate: StageArgs = stage_field("eval_hellaswag.py flags, plus hellaswag (bool) and compare_models (list)")
    chat_data: StageArgs = stage_field("source: synthetic | stdlib-docs | a data set; the rest: that tool's flags")
    sft: StageArgs = stage_field("sft.py flags ('config': its YAML)")
    chat: StageArgs = stage_field("chat.py flags, plus prompts (list of one-line prompts)")
    publish: StageArgs = stage_field("publish.py flags, plus push (bool; false = a dry-run folder)")

    def __post_init__(self):
        for name in STAGES:
            value = getattr(self, name)
            if not isinstance(value, dict):
                raise ValueError(f"{name}: expected a mapping of the stage's flags, got {value!r}")
            setattr(self, name, StageArgs(value))



# ------------------------------------------------------------------------------------------------ 1. the options


def parse_options(argv: list[str] | None) -> PipelineOptions:
    """The options; a stage mapping given on the command line merges into the YAML's (item by item)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    (options,) = TrlParser((PipelineOptions,)).parse_args_and_config(argv)
    given = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    if "config" in given and given & set(STAGES):
        i = next(i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config="))
        path = argv[i].split("=", 1)[1] if "=" in argv[i] else argv[i + 1]
        from_file = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        for name in given & set(STAGES):
            setattr(options, name, StageArgs({**(from_file.get(name) or {}), **getattr(options, name)}))
    unknown = [s for s in options.force if s not in STAGES]
    if unknown:
        raise ValueError(f"--force {unknown[0]!r}: expected stage names out of {', '.join(STAGES)}")
    return options


# ------------------------------------------------------------------------------------------------ 5. running


HEARTBEAT_S = 2.0  # how often a running command's record notes that it still runs


class State:
    """{run_dir}/pipeline_state.json: every command each stage ran, its wall and CPU time and exit status (the
    report's measured times; interrupted attempts count as attempts). While a command runs its record's
    `last_seen_unix` moves every HEARTBEAT_S, so a pipeline killed outright (SIGKILL, a lost machine) still leaves
    the time its stage ran, to within that."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "pipeline_state.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}
        self.lock = threading.Lock()  # stages running side by side record their attempts in one file

    def attempt(self, stage: str, command: str) -> dict:
        # every key present from the start: another stage's thread may be saving the file meanwhile
        start = time.time()
        record = {"command": command, "started": now(), "start_unix": start, "last_seen_unix": start, "wall_s": None,
                  "cpu_s": None, "exit": None}
        with self.lock:
            self.data["stages"].setdefault(stage, {"attempts": []})["attempts"].append(record)
        self.save()
        return record

    @contextlib.contextmanager
    def beating(self, record: dict):
        """While the block runs, `record["last_seen_unix"]` is brought up to date every HEARTBEAT_S."""
        done = threading.Event()

        def beat():
            while not done.wait(HEARTBEAT_S):
                record["last_seen_unix"] = time.time()
                self.save()

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def attempts(self, stage: str) -> list[dict]:
        return self.data["stages"].get(stage, {}).get("attempts", [])

    def save(self):
        with self.lock:
            write_json_atomic(self.path, self.data)


class StageFailed(RuntimeError):
    pass


def children_cpu_s() -> float:
    """CPU seconds (user + system) of the finished child processes and their own children: on a shared machine a
    steadier figure than the wall time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def fresh_start(plan: Plan, stage):
    """Remove the output of other settings or inputs, so the script starts afresh instead of resuming it. Only what
    lies inside the run folder is removed; anything else stops the run with one line."""
    run_dir = plan.run_dir.resolve()
    for path in stage.clear:
        if not path.exists():
            continue
        if run_dir not in path.resolve().parents:
            raise StageFailed(f"stage {stage.name}: {path} was made with other settings or inputs and lies outside "
                              f"{plan.run_dir}: remove it yourself, or give the stage another output folder")
        print(f"[{stage.name}] removing {path} (made with other settings or inputs)", flush=True)
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def run_stage(plan: Plan, stage, decision, state: State, stages_by_name: dict):
    if decision.stale:
        fresh_start(plan, stage)
        stage = getattr(plan, f"stage_{stage.name}")()  # no resume flags for what was removed
    plan.records.start(stage, current_inputs(stage, stages_by_name, plan.records), resume=decision.resume)
    if stage.name == "publish":
        prepare_publish(plan, state.data)  # the card's numbers: the same figures as the report
    stdout = ""
    for i, cmd in enumerate(stage.commands):
        text = command_text(cmd)
        print(f"\n[{stage.name}] $ {text}", flush=True)
        record = state.attempt(stage.name, text)
        start, cpu, rc = time.perf_counter(), children_cpu_s(), None
        last = i == len(stage.commands) - 1
        try:
            with state.beating(record):
                rc, stdout = execute(cmd, plan.logs / f"{stage.name}.log", stage.capture_stdin if last else None)
        except BaseException:  # stopped (Ctrl-C, SIGTERM): the time it ran still counts in the report
            rc = "interrupted"
            raise
        finally:
            record["wall_s"], record["cpu_s"], record["exit"] = (time.perf_counter() - start,
                                                                 children_cpu_s() - cpu, rc)
            state.save()
        if rc != 0:
            raise StageFailed(f"stage {stage.name} failed (exit {rc}); its log: {plan.logs / f'{stage.name}.log'}. "
                              "Rerun the same command to continue from there.")
    extra = {}
    if stage.name == "chat":
        write_chat_samples(plan, stdout)
    elif stage.name == "publish" and plan.o.publish.get("push"):
        extra = record_push(plan, stdout)
    try:
        stage.check()
    except CheckFailed as e:
        plan.records.fail(stage, str(e))
        raise StageFailed(f"stage {stage.name}: {e}") from None
    plan.records.finish(stage, extra)


def run_stages(plan: Plan, todo: list, decisions: dict, state: State, by_name: dict) -> str | None:
    """The stages to run as a graph (gpt2custom/schedule.py): each starts when the stages it reads are done, those
    on the devices take turns, the others (data, chat_data) run beside them; each has its own log and resume. A
    failure, Ctrl-C or SIGTERM stops every running stage (marked interrupted: the same command continues them).
    Returns the failure's one line, or None."""
    before = {s.name: len(state.attempts(s.name)) for s in todo}

    def run(name):
        print(f"\n[{name}] to run: {decisions[name].reason}", flush=True)
        run_stage(plan, by_name[name], decisions[name], state, by_name)

    outcome = run_graph([s.name for s in todo], {s.name: s.reads for s in todo}, run,
                        started=lambda name: len(state.attempts(name)) > before[name],
                        failures=(StageFailed, ValueError, OSError))
    for name in outcome.stopped:  # stopped from outside, not failed: the report counts it as interrupted
        if state.attempts(name):
            state.attempts(name)[-1]["exit"] = "interrupted"
    state.save()
    return outcome.failure()


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
        options = parse_options(argv)  # 1
        plan = Plan(options)  # 2
        selected = plan.selected(options.from_stage, options.until_stage)
        stages = plan.stages()
        decisions = decide(stages, plan.records, selected, tuple(options.force))  # 3
        estimates = estimate(plan)  # 4
    except (ValueError, FileNotFoundError) as e:  # a bad key, value or file: one line, no traceback
        sys.exit(f"pipeline.py: {e}")
    table = plan_table(plan, estimates, decisions)
    print(f"Pipeline {plan.run_dir}: {', '.join(selected)}\n\n{table}\n", flush=True)
    if options.plan_only:
        return
    todo = [s for s in stages if decisions[s.name].status == TO_RUN]
    if todo and not confirm(options):
        sys.exit("pipeline.py: nothing run")
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    stop_on_sigterm()
    state = State(plan.run_dir)
    state.data.update(plan_table=table, estimates=estimates, started_unix=time.time())  # the report's timeline
    state.save()
    for stage in stages:  # 5
        decision = decisions[stage.name]
        if decision.status != TO_RUN and stage.name in selected:
            print(f"\n[{stage.name}] {decision.status}: {decision.reason}", flush=True)
    failure = run_stages(plan, todo, decisions, state, {s.name: s for s in stages})
    report_md = write_report(plan, state.data, estimates)  # 6
    print(f"\nreport: {report_md} and {report_md.with_suffix('.json')}")
    if failure:
        sys.exit(f"pipeline.py: {failure}")


if __name__ == "__main__":
    main()
