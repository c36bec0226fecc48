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

import pytest

from conftest import REPO
from gpt2custom import pipeline as pl
from gpt2custom.estimate import estimate
from gpt2custom.schedule import critical_path, simulate

READS = {"data": (), "chat_data": (), "pretrain": ("data",), "evaluate": ("data", "pretrain"),
         "sft": ("pretrain", "chat_data"), "chat": ("sft",), "publish": ("pretrain", "evaluate", "chat_data", "sft")}
ORDER = list(pl.STAGES)


def test_reads_match_the_plan_stages():
    plan = pl.Plan(SimpleNamespace(**_options()))
    stages = plan.stages()
    assert [s.name for s in stages] == ORDER
    assert plan.selected(None, "chat_data") == ["data", "chat_data"]  # the no-GPU part, on a machine without one
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


def plan_and_decisions(tmp_path, **overrides):
    from gpt2custom.records import decide

    plan = pl.Plan(SimpleNamespace(**_options(run_dir=str(tmp_path / "run"), **overrides)))
    return plan, decide(plan.stages(), plan.records, list(pl.STAGES))


def test_device_time_only_for_device_stages_and_what_running_no_gpu_stages_first_saves(tmp_path):
    from gpt2custom.estimate import plan_table, schedule

    plan, decisions = plan_and_decisions(tmp_path, chat_data={"source": "synthetic", "max_prompts": 2000,
                                                              "concurrency": 64}, spot_price_per_hour=1.0,
                                         preemption_overhead=0.2, pretrain={"max_steps": 19073})  # the seed's run
    est = estimate(plan)
    s = {n: e["seconds"] for n, e in est.items()}
    assert s["chat_data"] < s["data"] + s["pretrain"]  # the teacher finishes while pretraining runs
    sched = schedule(plan, est, decisions)
    rate = 8 * 2.49  # H100 list price per GPU-hour (gpt2custom/metrics.py), 8 GPUs
    # by hand: data, then the device stages one after another; publish beside chat; chat_data beside data + pretrain
    node = s["data"] + s["pretrain"] + s["evaluate"] + s["sft"] + s["chat"]
    assert sched["node_s"] == pytest.approx(node) and sched["wall_s"] == pytest.approx(node)
    assert est["chat_data"]["dollars"] == 0.0 and est["publish"]["dollars"] == 0.0
    assert est["data"]["dollars"] == pytest.approx(s["data"] / 3600 * rate)  # the node waits for the data
    assert est["pretrain"]["dollars"] == pytest.approx(s["pretrain"] / 3600 * rate)
    assert sched["split_node_s"] == pytest.approx(node - s["data"])  # `--until chat_data` first, elsewhere
    assert sched["node_dollars"] - sched["split_dollars"] == pytest.approx(s["data"] / 3600 * rate)
    assert sched["spot"]["dollars"] == pytest.approx(node * 1.2 / 3600 * 1.0 * 8)
    assert sched["path"] == ["data", "pretrain", "evaluate", "sft", "chat"]
    table = plan_table(plan, est, decisions)
    assert "critical path: data -> pretrain -> evaluate -> sft -> chat" in table and "saving $" in table
    assert "shared/" not in table and "lent" not in table
    # a slow teacher (one request at a time): SFT waits for it, and the node bills the wait
    plan, decisions = plan_and_decisions(tmp_path, chat_data={"source": "synthetic", "max_prompts": 2000,
                                                              "concurrency": 1},
                                         pretrain={"max_steps": 19073})
    est = estimate(plan)
    sched = schedule(plan, est, decisions)
    wait = est["chat_data"]["seconds"] - est["data"]["seconds"] - est["pretrain"]["seconds"] - est["evaluate"]["seconds"]
    assert est["chat_data"]["dollars"] == pytest.approx(wait / 3600 * rate)


def test_data_preparation_estimate_by_hand(tmp_path):
    plan, _ = plan_and_decisions(tmp_path, data={"source": "HuggingFaceFW/fineweb-edu", "max_tokens": 10**9,
                                                 "num_proc": 8}, download_mb_per_s=50)
    e = estimate(plan)["data"]
    download = 10**9 * 2.5 / 50e6  # 2.5 GB of Parquet at 50 MB/s = 50 s
    work = 2.5e9 / (100e6 * 8) + 10**9 / (2.6e6 * 8)  # decode + tokenize on 8 cores = 51.2 s
    assert e["seconds"] == pytest.approx(10 + max(download, work) + 2e9 / 500e6)
    assert "download_mb_per_s" in e["note"] and "measured: bench/bench_tokenize.py" in e["note"]


def test_rates_from_a_previous_run_calibrates_each_stage(tmp_path):
    plan, _ = plan_and_decisions(tmp_path, gpu=None, num_gpus=None, cpu=True)
    raw = estimate(plan)
    previous = tmp_path / "previous"
    previous.mkdir()
    report = {"hardware": {"name": "cpu", "count": 1},
              "stages": {"pretrain": {"status": "done", "wall_s": 90.0, "estimate": {"raw_seconds": 30.0}},
                         "sft": {"status": "interrupted", "wall_s": 5.0, "estimate": {"raw_seconds": 50.0}}}}
    (previous / "report.json").write_text(json.dumps(report))
    plan, _ = plan_and_decisions(tmp_path, gpu=None, num_gpus=None, cpu=True, rates_from=str(previous))
    est = estimate(plan)
    assert est["pretrain"]["seconds"] == pytest.approx(raw["pretrain"]["seconds"] * 3.0)
    assert est["pretrain"]["basis"] == "calibrated" and "x3.00" in est["pretrain"]["note"]
    assert est["sft"]["seconds"] == raw["sft"]["seconds"]  # not finished there: no rate from it
    report["hardware"] = {"name": "H100", "count": 8}
    (previous / "report.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match=r"--rates_from .*previous: that run used 8 x H100, this plan 1 x cpu"):
        estimate(plan)
    with pytest.raises(ValueError, match="cannot read .*report.json"):
        estimate(pl.Plan(SimpleNamespace(**_options(cpu=True, gpu=None, num_gpus=None,
                                                    rates_from=str(tmp_path / "nothing")))))
