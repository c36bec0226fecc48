"""Preemption on two real gloo ranks: a SIGTERM or SIGUSR1 lands at a seeded moment (mid-step, in validation,
HellaSwag, sampling, a periodic save, finish()), sent to the launcher or to one rank; every process exits within
60 s with the documented code, a complete checkpoint is on disk, and the next start ends bitwise where an
uninterrupted run ends. Also: two preemptions in one run, a second signal during the save, a deadline that leaves no
time to save, and --max_time. The shipped recipes parse and key on the exit codes pretrain.py and its launcher use.

Each 2-rank case launches twice (~40 s on 2 cores), so they are opt-in: GPT2CUSTOM_TEST_PREEMPT=1. The cheapest
notice cases run in CI in one process (tests/test_pretrain.py).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, text_shards

RUN_2_RANKS = os.environ.get("GPT2CUSTOM_TEST_PREEMPT") == "1"
two_ranks = pytest.mark.skipif(not RUN_2_RANKS, reason="2-rank preemption cases: set GPT2CUSTOM_TEST_PREEMPT=1")

# The training script each rank runs: it wraps callables so that, just before the n-th call of one, this rank sends
# a signal (to its launcher or to itself) and waits until its own handler has it, so the notice lands at that moment
# however loaded the machine is. It logs "RANK TIME send ..." and "RANK TIME exit CODE" to $PREEMPT_TEST_LOG.
SIGNAL_AT = r'''
import importlib, json, os, runpy, signal, sys, threading, time

actions = json.loads(os.environ.get("PREEMPT_TEST_ACTIONS", "[]"))
rank = int(os.environ.get("RANK", "0"))


def note(text):
    with open(os.environ["PREEMPT_TEST_LOG"], "a") as f:
        f.write(f"{rank} {time.time():.3f} {text}\n")


import gpt2custom.preemption as preemption

received = threading.Event()
on_signal = preemption.Notice._on_signal


def noted_on_signal(self, signum, frame):
    received.set()
    return on_signal(self, signum, frame)


preemption.Notice._on_signal = noted_on_signal
real_exit = os._exit
os._exit = lambda code: (note(f"exit {code}"), real_exit(code))

for action in actions:
    if action.get("rank", 0) not in ("all", rank):
        continue
    module, path = action["at"].split(":")
    owner = importlib.import_module(module)
    *parents, name = path.split(".")
    for part in parents:
        owner = getattr(owner, part)

    def gated(*args, _original=getattr(owner, name), _action=action, _calls=[0], **kwargs):
        _calls[0] += 1
        if _calls[0] == _action.get("call", 1):
            time.sleep(_action.get("delay", 0))
            received.clear()
            note(f"send {_action['signal']} to {_action.get('to', 'self')} before {_action['at']} #{_calls[0]}")
            os.kill(os.getppid() if _action.get("to") == "launcher" else os.getpid(), signal.Signals[_action["signal"]])
            deadline = time.monotonic() + (30 if _action.get("wait", True) else 0)
            while not received.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(_action.get("hold", 0))
        return _original(*args, **kwargs)

    setattr(owner, name, gated)

sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    note(f"exit {e.code if isinstance(e.code, int) else int(bool(e.code))}")
    raise
note("exit 0")
'''

STEPS = 8
# 2 ranks x 4 sequences x 32 tokens x 2 micro-steps; validation, HellaSwag and samples at steps 4 and 8; the only
# periodic checkpoint is the last step's.
RUN = [
    "--model_preset", "tiny", "--block_size", "32", "--micro_batch_size", "4", "--total_batch_size", "512",
    "--max_steps", str(STEPS), "--warmup_steps", "2", "--learning_rate", "1e-2", "--precision", "fp32",
    "--compile", "false", "--cpu", "true", "--eval_interval", "4", "--eval_batches", "2", "--hellaswag_interval", "4",
    "--sample_interval", "4", "--num_samples", "1", "--sample_tokens", "4", "--checkpoint_interval", "1000",
    "--report_to", "none", "--seed", "7",
]  # fmt: skip
SIGTERM_CODE, SIGUSR1_CODE = 128 + signal.SIGTERM, 128 + signal.SIGUSR1  # what accelerate launch exits with


@pytest.fixture(scope="module")
def data(tmp_path_factory, real_text):
    root = tmp_path_factory.mktemp("preempt")
    text_shards(root, real_text[:200_000])
    # short lines: a context and its longest ending fit the 32-token block with room to spare
    lines = [ln.strip() for ln in real_text.splitlines() if 4 <= len(ln.split()) <= 6 and len(ln) < 40][:60]
    rows = [{"ind": i, "activity_label": "Reading", "ctx_a": lines[i], "ctx_b": "", "ctx": lines[i],
             "endings": lines[20 + i : 24 + i], "label": i % 4, "split": "val", "split_type": "indomain",
             "source_id": f"r~{i}"} for i in range(7)]  # fmt: skip  (odd: the ranks score 4 and 3)
    (root / "hellaswag.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "signal_at.py").write_text(SIGNAL_AT)
    return root


DDP = ("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
FSDP = ("--config_file", "accelerate_configs/fsdp2_cpu_2proc.yaml")


def launch(data, out, actions=(), *extra, env=None, timeout=240, launcher=DDP):
    """Two gloo ranks under `accelerate launch`, each running SIGNAL_AT with `actions`. Returns (launcher exit code,
    log lines, stdout + stderr)."""
    log = out.parent / f"{out.name}.log"
    log.unlink(missing_ok=True)
    log.touch()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--main_process_port", "0",
           str(data / "signal_at.py"), "pretrain.py", "--data_dir", str(data / "shards"), "--hellaswag_path",
           str(data / "hellaswag.jsonl"), "--output_dir", str(out), *RUN, *map(str, extra)]  # fmt: skip
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
                "PREEMPT_TEST_LOG": str(log), "PREEMPT_TEST_ACTIONS": json.dumps(list(actions)), **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, log.read_text().splitlines(), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    code, lines, stderr = launch(data, out)
    assert code == 0, stderr[-3000:]
    return out


def train_losses(out) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}  # a step trained again: the later row


def complete_checkpoints(out) -> list[int]:
    """Steps whose checkpoint.json lists files that all exist with those sizes (checked here, independently)."""
    steps = []
    for folder in sorted((out / "checkpoints").glob("step_*")):
        info = json.loads((folder / "checkpoint.json").read_text())
        if all((folder / n).exists() and (folder / n).stat().st_size == size for n, size in info["files"].items()):
            steps.append(info["step"])
    return steps


def assert_same_as_reference(out, reference):
    assert train_losses(out) == train_losses(reference)
    a, b = load_file(out / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def seconds_to_exit(lines) -> float:
    """From the first signal sent to the last process's exit line."""
    times = [(float(t), text) for _, t, text in (line.split(" ", 2) for line in lines)]
    sent = min(t for t, text in times if text.startswith("send"))
    return max(t for t, text in times if text.startswith("exit")) - sent


def exits(lines) -> dict:
    return {int(r): int(text.split()[1]) for r, _, text in (line.split(" ", 2) for line in lines)
            if text.startswith("exit")}  # fmt: skip


def preempted(data, out, actions, *extra, launcher_code=SIGTERM_CODE, env=None):
    """One interrupted launch: the launcher's and both ranks' codes, a complete checkpoint at or past the last
    logged step, all within 60 s of the signal. Returns seconds from signal to the last exit."""
    code, lines, stderr = launch(data, out, actions, *extra, env=env)
    assert code == launcher_code, (code, lines, stderr[-4000:])
    assert exits(lines) == {0: 75, 1: 75}, (lines, stderr[-4000:])
    seconds = seconds_to_exit(lines)
    assert seconds < 60
    logged = max(train_losses(out), default=0)
    if not (out / "run_summary.json").exists():  # a notice during finish() lets the run end complete
        assert max(complete_checkpoints(out)) >= logged, (complete_checkpoints(out), logged)
    return seconds


def mid_step(sig="SIGTERM", to="launcher", rank=0):
    # next_batch calls 1-2 are step 1's micro-steps: call 5 is step 3's first, so the check before the second stops.
    # Validation reads through the same method: at step 4 calls 9-10 are its batches, so call 13 is step 6's first.
    return {"at": "gpt2custom.data:ShardLoader.next_batch", "call": 5, "signal": sig, "to": to, "rank": rank}


MOMENTS = {
    "mid-step": mid_step(),
    "validation": {"at": "gpt2custom.data:iter_eval_batches", "signal": "SIGTERM", "to": "launcher"},
    "hellaswag": {"at": "gpt2custom.hellaswag:evaluate_hellaswag", "signal": "SIGTERM", "to": "launcher"},
    "sampling": {"at": "transformers.generation.utils:GenerationMixin.generate", "signal": "SIGTERM",
                 "to": "launcher"},
    "periodic save": {"at": "accelerate:Accelerator.save_state", "signal": "SIGTERM", "to": "launcher"},
    "finish": {"at": "gpt2custom.checkpoints:save_model_folder", "signal": "SIGTERM", "to": "launcher"},
}  # fmt: skip
FORWARD_SIGUSR1 = {"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}  # as the recipes set it

CASES = [
    *[(f"SIGTERM to the launcher, {name}", [action], [], SIGTERM_CODE, None) for name, action in MOMENTS.items()],
    ("SIGUSR1 to the launcher, mid-step", [mid_step("SIGUSR1")], [], SIGUSR1_CODE, FORWARD_SIGUSR1),
    ("SIGUSR1 to the launcher, HellaSwag", [{**MOMENTS["hellaswag"], "signal": "SIGUSR1"}], [], SIGUSR1_CODE,
     FORWARD_SIGUSR1),
    ("SIGTERM to rank 1 only, mid-step", [mid_step(to="self", rank=1)], [], SIGTERM_CODE, None),
    ("SIGUSR1 to rank 1 only, validation", [{**MOMENTS["validation"], "signal": "SIGUSR1", "to": "self", "rank": 1}],
     [], SIGTERM_CODE, None),
    ("SIGUSR1 to rank 0 only, sampling", [{**MOMENTS["sampling"], "signal": "SIGUSR1", "to": "self"}], [],
     SIGTERM_CODE, None),
]  # fmt: skip


@two_ranks
@pytest.mark.slow
@pytest.mark.parametrize(("name", "actions", "extra", "launcher_code", "env"), CASES, ids=[c[0] for c in CASES])
def test_notice_saves_every_rank_and_the_next_start_ends_bitwise_equal(data, reference, tmp_path, name, actions,
                                                                      extra, launcher_code, env):  # fmt: skip
    out = tmp_path / "run"
    extra = ["--checkpoint_interval", "4"] if name.endswith("periodic save") else extra
    seconds = preempted(data, out, actions, *extra, launcher_code=launcher_code, env=env)
    print(f"{name}: {seconds:.1f} s from signal to the last exit")
    code, lines, stderr = launch(data, out, (), *extra)  # the same command again
    assert code == 0, stderr[-4000:]
    assert_same_as_reference(out, reference)


@two_ranks
@pytest.mark.slow
def test_two_preemptions_in_one_run_then_the_end_is_bitwise_equal(data, reference, tmp_path):
    out = tmp_path / "run"
    preempted(data, out, [{**mid_step(), "call": 3}])  # step 2, first micro-step
    # the second start resumes at step 1 and is stopped in HellaSwag at step 4 by a SIGUSR1 to rank 1
    preempted(data, out, [{**MOMENTS["hellaswag"], "signal": "SIGUSR1", "to": "self", "rank": 1}])
    code, lines, stderr = launch(data, out)
    assert code == 0, stderr[-4000:]
    assert_same_as_reference(out, reference)


@two_ranks
@pytest.mark.slow
def test_a_second_signal_during_the_save_ends_at_once_and_the_previous_checkpoint_stays(data, reference, tmp_path):
    """Checkpoints at steps 2 and 4; the notice at step 6's first micro-step (its save: step 5); 2.5 s later (not a
    duplicate) a second SIGTERM to both ranks as the notice's save writes its first custom state: they die of it at
    once."""
    out = tmp_path / "run"
    actions = [mid_step() | {"call": 13},
               {"at": "accelerate.accelerator:save_custom_state", "call": 5, "signal": "SIGTERM", "to": "self",
                "rank": "all", "delay": 2.5}]  # fmt: skip
    code, lines, stderr = launch(data, out, actions, "--checkpoint_interval", "2")
    assert code == SIGTERM_CODE, (lines, stderr[-3000:])
    assert exits(lines) == {}, lines  # neither rank got to exit on its own: the second signal killed them
    assert seconds_to_exit([*lines, f"0 {time.time():.3f} exit"]) < 60
    assert complete_checkpoints(out) == [2, 4] and list((out / "checkpoints").glob(".step_000005.tmp"))
    code, lines, stderr = launch(data, out, (), "--checkpoint_interval", "2")
    assert code == 0, stderr[-3000:]
    assert_same_as_reference(out, reference)


@two_ranks
@pytest.mark.slow
def test_a_save_past_the_deadline_is_skipped_and_the_previous_checkpoint_stays(data, reference, tmp_path):
    """preempt_deadline_s=1: the notice is held 1.5 s before the ranks see it, so no save fits; they exit 75 at once
    and the checkpoint of step 4 stays the latest."""
    out = tmp_path / "run"
    action = mid_step() | {"call": 13, "hold": 1.5}
    code, lines, output = launch(data, out, [action], "--checkpoint_interval", "4", "--preempt_deadline_s", "1")
    assert code == SIGTERM_CODE and exits(lines) == {0: 75, 1: 75}, (code, lines, output[-3000:])
    assert seconds_to_exit(lines) < 60
    assert max(train_losses(out)) == 5 and complete_checkpoints(out) == [4]  # step 5's save did not fit
    assert "past preempt_deadline_s=1, so none" in output or "preempt_deadline_s=1 reached" in output
    code, lines, stderr = launch(data, out, (), "--checkpoint_interval", "4")
    assert code == 0, stderr[-3000:]
    assert_same_as_reference(out, reference)


@two_ranks
@pytest.mark.slow
def test_fsdp2_notice_in_hellaswag_then_the_next_start_ends_bitwise_equal(data, tmp_path):
    """FSDP2 (sharded weights and checkpoints, float64): the notice in HellaSwag's first forward at step 3 (no
    validation there); the next start scores that step's HellaSwag before training on, so HellaSwag (under
    inference mode) makes the sharded model's first forward."""
    extra = ["--precision", "fp64", "--hellaswag_interval", "3"]
    reference = tmp_path / "reference"
    code, lines, output = launch(data, reference, (), *extra, launcher=FSDP)
    assert code == 0, output[-3000:]
    out = tmp_path / "run"
    code, lines, output = launch(data, out, [MOMENTS["hellaswag"]], *extra, launcher=FSDP)
    assert code == SIGTERM_CODE and exits(lines) == {0: 75, 1: 75}, (code, lines, output[-3000:])
    assert max(complete_checkpoints(out)) == 3
    code, lines, output = launch(data, out, (), *extra, launcher=FSDP)
    assert code == 0, output[-3000:]
    assert_same_as_reference(out, reference)
    eval_rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 3 in {r["step"] for r in eval_rows if "hellaswag_acc" in r}


@two_ranks
@pytest.mark.slow
def test_ranks_whose_launcher_is_killed_stop_like_on_a_notice(data, reference, tmp_path):
    """SIGKILL to the launcher (torchrun gives its ranks no parent-death signal): the orphaned ranks see it at their
    next check, save and exit 75 instead of training on alone."""
    out = tmp_path / "run"
    action = mid_step("SIGKILL") | {"wait": False}
    code, lines, output = launch(data, out, [action])
    assert code == -signal.SIGKILL and exits(lines) == {0: 75, 1: 75}, (code, lines, output[-3000:])
    assert seconds_to_exit(lines) < 60
    assert max(complete_checkpoints(out)) >= max(train_losses(out))
    code, lines, output = launch(data, out)
    assert code == 0, output[-3000:]
    assert_same_as_reference(out, reference)


@two_ranks
@pytest.mark.slow
def test_max_time_checkpoints_and_stops_like_a_notice(data, reference, tmp_path):
    """No rank gets a signal: the first local rank tells the launcher, which then exits 143 too."""
    out = tmp_path / "run"
    code, lines, output = launch(data, out, [], "--max_time", "2")
    assert code == SIGTERM_CODE, (lines, output[-3000:])
    assert exits(lines) == {0: 75, 1: 75}, lines
    assert "max_time=2 s reached: stopping at step" in output
    assert max(complete_checkpoints(out)) >= max(train_losses(out), default=0)
    code, lines, stderr = launch(data, out)
    assert code == 0, stderr[-3000:]
    assert_same_as_reference(out, reference)


# --------------------------------------------------------------------------- recipes (CI)

RECIPES = REPO / "recipes"


def test_recipes_parse_and_requeue_on_the_codes_pretrain_and_its_launcher_exit_with():
    from gpt2custom.preemption import EXIT_PREEMPTED

    shell = sorted(RECIPES.glob("*.sh")) + sorted(RECIPES.glob("*.sbatch"))
    assert {p.name for p in shell} >= {"spot_vm_loop.sh", "slurm_multinode.sbatch"}
    for path in shell:
        subprocess.run(["bash", "-n", str(path)], check=True)
        text = path.read_text()
        codes = set(map(int, re.findall(r"\b(\d{2,3})\b", text.split("REQUEUE_CODES=", 1)[1].splitlines()[0])))
        assert codes == {EXIT_PREEMPTED, SIGTERM_CODE, SIGUSR1_CODE}, (path, codes)
        assert "PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in text, path
    slurm = (RECIPES / "slurm_multinode.sbatch").read_text()
    for needed in ("--signal=B:USR1@", "--requeue", "--machine_rank $SLURM_NODEID", "scontrol requeue"):
        assert needed in slurm, needed
    job = yaml.safe_load((RECIPES / "kubernetes_job.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 60 and pod["restartPolicy"] == "Never"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    ignored = {code for rule in rules if rule["action"] == "Ignore" for code in rule.get("onExitCodes", {}).get("values", [])}
    assert ignored == {EXIT_PREEMPTED, SIGTERM_CODE}
    command = " ".join(pod["containers"][0]["command"])
    assert "pretrain.py" in command and "exec " in command  # the launcher is the container's first process


def test_the_spot_loop_restarts_on_a_notice_code_and_stops_on_success_or_a_crash(tmp_path):
    """The loop itself, with a stand-in for the launch that exits with a scripted sequence of codes."""
    script = (RECIPES / "spot_vm_loop.sh").read_text()
    for codes, runs, final in (([75, 143, 0], 3, 0), ([138, 1], 2, 1), ([0], 1, 0)):
        counter = tmp_path / "n"
        counter.write_text("0")
        fake = tmp_path / "fake_launch.sh"
        fake.write_text(f"n=$(cat {counter}); echo $((n + 1)) > {counter}; codes=({' '.join(map(str, codes))}); "
                        f"exit ${{codes[$n]}}\n")  # fmt: skip
        proc = subprocess.run(["bash", "-c", script], env={**os.environ, "LAUNCH": f"bash {fake}",
                                                           "RESTART_PAUSE_S": "0"},
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert (proc.returncode, int(counter.read_text())) == (final, runs), (codes, proc.stdout, proc.stderr)


def test_signal_names_are_checked_and_a_repeat_within_the_window_is_the_same_notice():
    from gpt2custom.preemption import DUPLICATE_WINDOW_S, parse_signals

    assert parse_signals("SIGTERM, usr1") == [signal.SIGTERM, signal.SIGUSR1]
    with pytest.raises(ValueError, match="SIGKILL is not a signal a process can catch"):
        parse_signals("SIGTERM,SIGKILL")
    assert DUPLICATE_WINDOW_S <= 5  # a hard stop must stay possible well within a 30 s notice
