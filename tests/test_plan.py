"""The journey as a graph (gpt2custom/schedule.py) and the plan's arithmetic (gpt2custom/estimate.py): the simulated
schedule against one worked by hand, stages run side by side for real (trivial commands, separate processes),
a failure or SIGTERM stopping every running stage and the completion records continuing both, and the estimate's
device billing, data preparation, calibration and spot pricing against figures computed here."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from conftest import REPO
from gpt2custom import pipeline as pl
from gpt2custom.schedule import critical_path, simulate

READS = {"data": (), "chat_data": (), "pretrain": ("data",), "evaluate": ("data", "pretrain"),
         "sft": ("pretrain", "chat_data"), "chat": ("sft",), "publish": ("pretrain", "evaluate", "chat_data", "sft")}
ORDER = list(pl.STAGES)


def test_reads_match_the_plan_stages():
    stages = pl.Plan(SimpleNamespace(**_options())).stages()
    assert [s.name for s in stages] == ORDER
    assert {s.name: tuple(s.reads) for s in stages} == {k: READS[k] for k in ORDER}


# --------------------------------------------------------------------------------------------------- the schedule


def test_simulated_schedule_by_hand():
    seconds = {"data": 10, "chat_data": 30, "pretrain": 100, "evaluate": 5, "sft": 20, "chat": 2, "publish": 1}
    t = simulate(ORDER, seconds, READS)
    # chat_data beside data + pretrain; evaluate and sft both wait for pretrain and take turns on the devices;
    # publish reads SFT's folder, not the chat samples, so it runs beside chat
    assert t == {"data": (0, 10), "chat_data": (0, 30), "pretrain": (10, 110), "evaluate": (110, 115),
                 "sft": (115, 135), "chat": (135, 137), "publish": (135, 136)}
    assert critical_path(t, READS) == ["data", "pretrain", "evaluate", "sft", "chat"]
    # a slow teacher: sft waits for the chat data, which is then on the critical path
    t = simulate(ORDER, {**seconds, "chat_data": 200}, READS)
    assert t["sft"] == (200, 220) and t["chat"] == (220, 222)
    assert critical_path(t, READS) == ["chat_data", "sft", "chat"]
    # stages already done are not in the order: what reads them starts at once
    t = simulate(["pretrain", "evaluate"], seconds, READS)
    assert t == {"pretrain": (0, 100), "evaluate": (100, 105)}


RUNNER = """
import json, subprocess, sys, time
from pathlib import Path
from gpt2custom.records import Records, Stage
from gpt2custom.commands import stop_on_sigterm
from gpt2custom.schedule import run_graph

stop_on_sigterm()  # as pipeline.py does: SIGTERM becomes SystemExit in the main thread
spec = json.loads(sys.argv[1])
folder = Path(spec["folder"])
records = Records(folder)
times = {}

def run(name):
    stage = Stage(name, [["sleep"]], folder / name, settings={"s": name})
    records.start(stage, {}, resume=False)
    times[name] = [time.time(), None]
    code = f"import os, time; open({str(folder / name)!r} + '.pid', 'w').write(str(os.getpid())); " + spec["code"][name]
    proc = subprocess.run([sys.executable, "-c", code])
    times[name][1] = time.time()
    (folder / "times.json").write_text(json.dumps(times))
    if proc.returncode:
        raise ValueError(f"stage {name} failed (exit {proc.returncode})")
    records.finish(stage)

out = run_graph(spec["order"], spec["reads"], run, grace_s=5, device=frozenset(spec["device"]))
(folder / "outcome.json").write_text(json.dumps({"finished": out.finished, "failed": out.failed,
                                                  "stopped": out.stopped, "failure": out.failure()}))
"""


def start_runner(tmp_path, order, reads, code, device=()):
    spec = {"folder": str(tmp_path), "order": order, "reads": reads, "code": code, "device": list(device)}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(spec)], cwd=REPO, env=env)


def wait_for(paths, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while not all(p.exists() and p.read_text() for p in paths):
        assert time.monotonic() < deadline and proc.poll() is None, "the stages never started"
        time.sleep(0.05)
    return [int(p.read_text()) for p in paths]


def gone(pid: int) -> bool:
    try:
        return "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return True


def test_independent_stages_overlap_and_device_stages_take_turns(tmp_path):
    nap = "time.sleep(0.5)"
    proc = start_runner(tmp_path, ["a", "b", "c", "d"], {"c": ["a"], "d": ["a"]},
                        dict.fromkeys("abcd", nap), device=("c", "d"))
    assert proc.wait(timeout=60) == 0
    t = json.loads((tmp_path / "times.json").read_text())
    outcome = json.loads((tmp_path / "outcome.json").read_text())
    assert sorted(outcome["finished"]) == ["a", "b", "c", "d"] and outcome["failure"] is None
    assert t["b"][0] < t["a"][1] and t["a"][0] < t["b"][1]  # a and b ran side by side
    assert t["c"][0] >= t["a"][1] and t["d"][0] >= t["a"][1]  # c and d read a
    assert t["d"][0] >= t["c"][1]  # two device stages never at once (c first: the order)


def test_a_failure_stops_the_stage_beside_it(tmp_path):
    proc = start_runner(tmp_path, ["slow", "bad", "after"], {"after": ["slow"]},
                        {"slow": "time.sleep(60)", "bad": "time.sleep(0.3); raise SystemExit(3)", "after": ""})
    assert proc.wait(timeout=60) == 0
    outcome = json.loads((tmp_path / "outcome.json").read_text())
    assert outcome["failed"][0] == "bad" and outcome["stopped"] == ["slow"] and outcome["finished"] == []
    assert outcome["failure"] == "stage bad failed (exit 3) (stopped slow too)"
    assert gone(int((tmp_path / "slow.pid").read_text()))
    assert not (tmp_path / "after.pid").exists()  # never started


def test_sigterm_stops_both_running_stages_and_both_continue(tmp_path):
    from gpt2custom.records import TO_RUN, Records, Stage, decide

    proc = start_runner(tmp_path, ["x", "y"], {}, {"x": "time.sleep(60)", "y": "time.sleep(60)"})
    pids = wait_for([tmp_path / "x.pid", tmp_path / "y.pid"], proc)
    proc.send_signal(signal.SIGTERM)  # as `kill PID` does to the pipeline
    assert proc.wait(timeout=30) == 0  # run_graph turned the signal into an orderly stop
    assert all(gone(pid) for pid in pids)
    outcome = json.loads((tmp_path / "outcome.json").read_text())
    assert sorted(outcome["stopped"]) == ["x", "y"]
    assert outcome["failure"].startswith("stopped during stages ") and "rerun the same command" in outcome["failure"]
    # the next run: both stages are "to run", continuing where they stopped (their scripts' own resume)
    stages = [Stage(n, [["sleep"]], tmp_path / n, settings={"s": n}) for n in ("x", "y")]
    decisions = decide(stages, Records(tmp_path), ["x", "y"])
    assert {n: (d.status, d.resume) for n, d in decisions.items()} == {"x": (TO_RUN, True), "y": (TO_RUN, True)}


# --------------------------------------------------------------------------------------------------- the estimate


def _options(**overrides):
    base = dict(run_dir="runs/x", cpu=False, accelerate_config=None, num_processes=None, gpu="H100", num_gpus=8,
                gpu_price_per_hour=None, tokens_per_s_per_device=None,
                data={"source": "stdlib", "max_tokens": 3_000_000, "num_proc": 4},
                pretrain={"model_preset": "gpt2", "block_size": 1024, "total_batch_size": 524288, "max_steps": 100},
                evaluate={"hellaswag": False, "perplexity_max_tokens": 300_000},
                chat_data={"source": "synthetic", "max_prompts": 100, "concurrency": 10},
                sft={"max_steps": 20, "per_device_train_batch_size": 16, "max_length": 1024},
                chat={"prompts": ["hi"]}, publish={})
    base.update(overrides)
    return base
