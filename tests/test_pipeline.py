"""pipeline.py: the estimate's arithmetic against hand-computed figures, the offline chat data against the docstrings
it quotes, and (slow) a tiny pipeline end to end: every stage's output, the report, the published folder answering
a chat message, a second run that skips everything, and a run killed in the middle of SFT that continues to the
same report."""

import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import yaml

from conftest import REPO, assert_png
from gpt2custom import pipeline as pl
from gpt2custom.estimate import estimate
from gpt2custom.report import sft_tokens
from gpt2custom.stdlib_chat import build_rows

# --------------------------------------------------------------------------------------------------- estimates


def options(**overrides):
    base = dict(run_dir="runs/x", cpu=False, accelerate_config=None, num_processes=None, gpu="A100", num_gpus=8,
                gpu_price_per_hour=None, tokens_per_s_per_device=None,
                data={"source": "stdlib", "max_tokens": 3_000_000, "num_proc": 4},
                pretrain={"model_preset": "gpt2", "block_size": 1024, "total_batch_size": 524288, "max_steps": 100},
                evaluate={"hellaswag": False, "perplexity_max_tokens": 300_000},
                chat_data={"source": "synthetic", "max_prompts": 100, "price_per_m_input": 3.0,
                           "price_per_m_output": 3.0, "concurrency": 10},
                sft={"max_steps": 20, "per_device_train_batch_size": 16, "max_length": 1024},
                chat={"prompts": ["hi"]}, publish={})
    base.update(overrides)
    return SimpleNamespace(**base)


def test_estimate_arithmetic_by_hand():
    est = estimate(pl.Plan(options()))
    # GPT-2 124M: N = 50304*768 + 12*(12*768^2 + 13*768) + 2*768 = 123,689,472 (counted from the model in
    # tests/test_metrics.py), so
    # 6N + 12*L*C*T = 742,136,832 + 113,246,208 = 855,383,040 FLOPs per token: the A100 anchor applies unscaled.
    pre = est["pretrain"]
    assert pre["tokens"] == 52_428_800 and pre["steps"] == 100
    # 52,428,800 / (8 x 185,000) = 35.4249 s, + 10 s start-up + 60 s compile; 8 x $1.79 per hour
    assert pre["seconds"] == pytest.approx(105.42486, rel=1e-6)
    assert pre["dollars"] == pytest.approx(105.42486 / 3600 * 14.32, rel=1e-6)
    # data (a local source: no download): 3M tokens at 2.6M tokens/s per core on num_proc=4 cores, + 6 MB of
    # shards at 500 MB/s, + start-up
    assert est["data"]["seconds"] == pytest.approx(10 + 3e6 / (2.6e6 * 4) + 6e6 / 500e6)
    # evaluation: 300k tokens forward at a third of the training cost
    assert est["evaluate"]["seconds"] == pytest.approx(10 + 300_000 / (3 * 185_000 * 8))
    # synthetic data: 100 user messages (60 in, 120 out) + 100 answers (150 in, 450 out) at $3/M both ways
    assert est["chat_data"]["tokens"] == 100 * (60 + 120 + 150 + 450)
    assert est["chat_data"]["api_dollars"] == pytest.approx(78_000 * 3 / 1e6)
    assert est["chat_data"]["seconds"] == pytest.approx(10 + 200 * 20 / 10)
    # SFT: 20 steps x 16 rows x 8 GPUs x 1024 tokens, same FLOPs per token at the same context
    assert est["sft"]["tokens"] == 20 * 16 * 8 * 1024
    assert est["sft"]["seconds"] == pytest.approx(10 + 2_621_440 / (185_000 * 8))


def test_estimate_scales_by_flops_and_uses_config_price():
    est = estimate(pl.Plan(options(gpu="H100", num_gpus=2, gpu_price_per_hour=2.0,
                                   pretrain={"model_preset": "gpt2-medium", "max_steps": 10, "compile": False})))
    # GPT-2 350M: N = 50304*1024 + 24*(12*1024^2 + 13*1024) + 2*1024 = 353,822,720;
    # 6N + 12*24*1024*1024 = 2,122,936,320 + 301,989,888 = 2,424,926,208 FLOPs per token
    tok_s = 0.40 * 989e12 / 2_424_926_208  # assumed 40 % MFU of the H100's dense bf16 peak
    seconds = 10 + 10 * 524_288 / (2 * tok_s)
    assert est["pretrain"]["seconds"] == pytest.approx(seconds, rel=1e-9)
    assert est["pretrain"]["dollars"] == pytest.approx(seconds / 3600 * 2 * 2.0, rel=1e-9)


def test_cpu_has_no_price_and_selection_checks_names():
    plan = pl.Plan(options(gpu=None, num_gpus=None, cpu=True))
    assert plan.hardware.is_cpu and estimate(plan)["pretrain"]["dollars"] is None
    assert plan.selected("sft", "chat") == ["sft", "chat"]
    with pytest.raises(ValueError, match="--from 'pretrian'"):
        plan.selected("pretrian", None)
    with pytest.raises(ValueError, match="comes after"):
        plan.selected("chat", "data")


def test_mirrored_defaults_are_the_scripts_own():
    sys.path.insert(0, str(REPO))
    import pretrain
    import sft

    defaults = pretrain.PretrainArgs()
    for key, value in pl.SCRIPT_DEFAULTS["pretrain"].items():
        assert getattr(defaults, key) == value, key
    for key in ("per_device_train_batch_size", "max_length", "num_train_epochs"):
        assert sft.RECIPE[key] == pl.SCRIPT_DEFAULTS["sft"][key], key


# --------------------------------------------------------------------------------------------------- chat data


def test_stdlib_chat_rows_quote_the_docstrings():
    import json as json_module

    rows = build_rows(["json"], max_answer_chars=400)
    by_question = {r["messages"][0]["content"]: r for r in rows}
    row = next(r for q, r in by_question.items() if "json.dumps" in q and q.split()[-2:] != ["in", "one"])
    expected = " ".join(inspect.getdoc(json_module.dumps).strip().split("\n\n")[0].split())
    assert row["messages"][1] == {"role": "assistant", "content": expected}
    assert row["rejection"] is None and row["messages"][0]["role"] == "user"
    assert all(">>>" not in r["messages"][1]["content"] for r in rows)
    assert build_rows(["json"], max_answer_chars=400) == rows  # same Python, same rows


def test_sft_tokens_across_a_resume():
    # TRL's num_tokens restarts at 0 in the resumed process: 4 steps of 73 tokens, then 2 more after the restart
    history = [{"num_tokens": 73.0 * i, "step": i} for i in range(1, 5)] + [{"num_tokens": 73.0, "step": 5},
                                                                           {"num_tokens": 146.0, "step": 6}]
    assert sft_tokens(history) == 6 * 73
    assert sft_tokens([{"loss": 1.0}]) is None


# --------------------------------------------------------------------------------------------------- end to end

STAGE_OUTPUTS = ["data/manifest.json", "pretrain/final/run_summary.json", "pretrain/loss.png",
                 "evaluate/eval_results.json", "chat_data/chat.jsonl", "sft/trainer_state.json", "sft_loss.png",
                 "chat/samples.json", "publish/README.md", "publish/model.safetensors", "report.md", "report.json"]


def tiny_config(run_dir) -> dict:
    """Smaller than configs/pipeline-smoke.yaml: a few steps of everything."""
    return {
        "run_dir": str(run_dir), "cpu": True,
        "data": {"source": "stdlib", "max_tokens": 60000, "val_tokens": 8000, "shard_size": 30000, "num_proc": 1},
        "pretrain": {"config": "configs/smoke.yaml", "total_batch_size": 512, "micro_batch_size": 4, "max_steps": 4,
                     "warmup_steps": 1, "eval_interval": 4, "eval_batches": 1, "checkpoint_interval": 4,
                     "sample_interval": 0, "unigram_baseline": False, "report_to": "none"},
        "evaluate": {"hellaswag": False, "perplexity_max_tokens": 2000},
        "chat_data": {"source": "stdlib-docs", "modules": ["json", "math"], "max_rows": 16},
        "sft": {"config": "configs/sft-smoke.yaml", "max_steps": 6, "per_device_train_batch_size": 1,
                "gradient_accumulation_steps": 1, "eval_size": 2, "eval_steps": 6, "logging_steps": 1,
                "save_strategy": "steps", "save_steps": 2, "report_to": "none"},
        # a 6-step model ends its turn at once or answers blanks, which fails the chat stage: sampling and
        # min_new_tokens keep the plumbing under test (configs/pipeline-smoke.yaml's model answers greedily)
        "chat": {"prompts": ["What does json.dumps do?", "What is json.loads for?", "Hello!"], "max_new_tokens": 8,
                 "min_new_tokens": 1, "temperature": 1.0, "seed": 0},
        "publish": {"repo_id": "test/tiny-chat"},
    }


def pipeline_cmd(config_path, *extra):
    return [sys.executable, "pipeline.py", "--config", str(config_path), "--yes", *extra]


def env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_pipeline(config_path, *extra, timeout=900):  # a hang guard: a loaded 2-core machine is slow
    proc = subprocess.run(pipeline_cmd(config_path, *extra), cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def write_config(path, config):
    path.write_text(yaml.safe_dump(config))
    return path


def deterministic(report: dict, until_sft: bool = False) -> dict:
    """The report's figures that do not depend on timing."""
    s = {k: v["metrics"] for k, v in report["stages"].items()}
    figures = {
        "data": s["data"],
        "pretrain": {k: s["pretrain"][k] for k in ("tokens", "steps", "val_loss")},
        "evaluate": [r["perplexity"]["loss"] for r in s["evaluate"]["results"]],
        "chat_data": {k: s["chat_data"][k] for k in ("rows", "prompt_tokens", "completion_tokens")},
        "sft": {k: s["sft"][k] for k in ("steps", "tokens")},
        "sft_losses": (s["sft"]["final_loss"], s["sft"]["eval_loss"]),
    }
    if not until_sft:
        figures["chat"] = [(x["prompt"], x["answer"]) for x in s["chat"]["samples"]]
    return figures


def commands_run(stdout: str) -> list[str]:
    """The stages whose command a pipeline run printed (and so ran), in order."""
    return re.findall(r"^\[(\w+)\] \$ ", stdout, re.MULTILINE)


def plan_rows(stdout: str) -> dict[str, tuple[str, str]]:
    """{stage: (status, why)} from the printed plan table."""
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"^(\w+)\s+(done|to run|not selected|cannot run)\s+\S+\s+\S+\s+[\d.]+ (?:s|min|h)\s+\S+\s+\S+"
                     r"\s+(.*)$", line)
        if m and m.group(1) in pl.STAGES:
            rows[m.group(1)] = (m.group(2), m.group(3))
    return rows


@pytest.mark.slow
def test_pipeline_end_to_end_skip_change_and_resume(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = tmp_path / "a"
    config_a = write_config(tmp_path / "a.yaml", tiny_config(a))
    first = run_pipeline(config_a)
    assert commands_run(first.stdout) == list(pl.STAGES)  # every command is printed before it runs
    for rel_path in STAGE_OUTPUTS:
        assert (a / rel_path).exists(), rel_path
    assert_png(a / "evaluate/eval_results.png", min_width=700)  # no HellaSwag here: the perplexity bar, not an empty box
    report = json.loads((a / "report.json").read_text())
    assert {k: v["status"] for k, v in report["stages"].items()} == dict.fromkeys(pl.STAGES, "done")
    # chat_data ran beside data (gpt2custom/schedule.py): both timelines in the report, overlapping
    timeline = {r["stage"]: r for r in report["estimate_vs_measured"]["rows"]}
    assert timeline["chat_data"]["start_s"] < timeline["data"]["end_s"]
    assert timeline["pretrain"]["start_s"] >= timeline["data"]["end_s"]  # pretraining reads the data
    # each record holds the effective settings: the stage's own config file merged under the pipeline's keys
    sft_file = yaml.safe_load((REPO / "configs/sft-smoke.yaml").read_text())
    sft_record = json.loads((a / "records" / "sft.json").read_text())
    assert sft_record["settings"]["learning_rate"] == sft_file["learning_rate"]
    assert sft_record["settings"]["max_steps"] == 6 and sft_record["settings"]["output_dir"] == "{run_dir}/sft"
    assert set(sft_record["inputs"]) == {"pretrain", "chat_data"} and all(sft_record["inputs"].values())

    # report.md: a measured wall time in every stage's row
    md = (a / "report.md").read_text()
    for stage in pl.STAGES:
        row = next(line for line in md.splitlines() if line.startswith(f"| {stage} |"))
        assert re.search(r"\d+ s|\d+\.\d+ min", row.split("|")[5]), row
    assert "instead of FineWeb-Edu" in md and "dry-run folder" in md
    # every file the project writes is readable by others (0644), as a plain open() makes it: no mkstemp 0600
    hidden = [str(p.relative_to(a)) for p in a.rglob("*") if p.suffix in (".json", ".jsonl", ".png", ".md")
              and p.stat().st_mode & 0o044 != 0o044]
    assert not hidden, hidden
    # the samples: model answers beside the chat data's reference, and whether SFT trained on the prompt
    samples = json.loads((a / "chat" / "samples.json").read_text())["samples"]
    rows = [json.loads(line) for line in (a / "chat_data" / "chat.jsonl").read_text().splitlines()]
    reference = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in rows}
    assert [x["reference"] for x in samples] == [reference.get(x["prompt"]) for x in samples]
    assert samples[2]["in_training_set"] is False  # "Hello!" is not in the chat data
    assert {x["in_training_set"] for x in samples[:2]} <= {True, False}

    # the card takes the report's numbers: SFT held-out perplexity, pretraining tokens
    card = (a / "publish" / "README.md").read_text()
    sft = report["stages"]["sft"]["metrics"]
    assert f"{math.exp(sft['eval_loss']):.2f}" in card
    assert f"{report['stages']['pretrain']['metrics']['tokens']:,}" in card
    # ... and SFT's part from sft.py's own run_summary.json, which the pipeline leaves as sft.py wrote it
    own = json.loads((a / "sft" / "run_summary.json").read_text())
    assert own["steps"] == sft["steps"] and own["SFT"].startswith(f"{sft['steps']} steps from ")
    assert f"| SFT data | {own['SFT data']} |" in card
    assert f"| `sft.learning_rate` | `{own['config']['learning_rate']}` |" in card

    # the published folder is a chat model
    tokenizer = AutoTokenizer.from_pretrained(a / "publish", trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(a / "publish", trust_remote_code=True)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What does json.dumps do?"}],
                                           add_generation_prompt=True, return_dict=True, return_tensors="pt")
    assert tokenizer.decode(inputs["input_ids"][0]).endswith("<|assistant|>\n")
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]

    # a second run skips every stage and runs nothing
    state_before = (a / "pipeline_state.json").read_text()
    second = run_pipeline(config_a)
    assert all(f"[{stage}] done: " in second.stdout for stage in pl.STAGES), second.stdout
    assert commands_run(second.stdout) == []
    assert json.loads((a / "pipeline_state.json").read_text())["stages"] == json.loads(state_before)["stages"]

    # SFT's learning rate changed on the command line (merged into the YAML's sft mapping): the plan says why sft,
    # chat and publish run again and that the earlier stages are done; the run redoes exactly those three
    new_lr = ["--sft", json.dumps({"learning_rate": 0.005})]
    plan = run_pipeline(config_a, "--plan_only", "true", *new_lr)
    rows = plan_rows(plan.stdout)
    assert {k: v[0] for k, v in rows.items()} == {**dict.fromkeys(["data", "pretrain", "evaluate", "chat_data"], "done"),
                                                  **dict.fromkeys(["sft", "chat", "publish"], "to run")}, plan.stdout
    assert rows["sft"][1] == f"settings changed: learning_rate {sft_file['learning_rate']} → 0.005"
    assert rows["chat"][1].startswith("input changed: ") and "sft" in rows["chat"][1]
    assert commands_run(plan.stdout) == []
    changed = run_pipeline(config_a, *new_lr)
    assert commands_run(changed.stdout) == ["sft", "chat", "publish"]
    assert "--max_steps 6" in changed.stdout  # the rest of the YAML's sft mapping is kept
    assert "--resume_from_checkpoint" not in changed.stdout  # a fresh start, not the old run's checkpoints
    report = json.loads((a / "report.json").read_text())
    assert json.loads((a / "records" / "sft.json").read_text())["settings"]["learning_rate"] == 0.005

    # killed in the middle of SFT (after a seeded checkpoint), then the same command: the same report up to SFT
    # (chat and publish only read SFT's output folder; the runs above cover them)
    b = tmp_path / "b"
    shutil.copytree(a, b, ignore=shutil.ignore_patterns("sft", "chat", "publish", "report.*", "card_*.json",
                                                        "sft_loss.png", "sft.json", "chat.json", "publish.json"))
    state = json.loads((b / "pipeline_state.json").read_text())
    for stage in ("sft", "chat", "publish"):
        state["stages"].pop(stage)
    (b / "pipeline_state.json").write_text(json.dumps(state))
    config = tiny_config(b)
    config["sft"]["learning_rate"] = 0.005
    config_b = write_config(tmp_path / "b.yaml", config)
    kill_after = random.Random(0).choice([2, 4])
    proc = subprocess.Popen(pipeline_cmd(config_b, "--until", "sft"), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (b / "sft" / f"checkpoint-{kill_after}" / "trainer_state.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "SFT never reached the checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    killed_at = time.time()
    proc.wait()
    assert not (b / "sft" / "trainer_state.json").exists()  # killed before SFT finished
    resumed = run_pipeline(config_b, "--until", "sft")
    assert "--resume_from_checkpoint" in resumed.stdout
    assert commands_run(resumed.stdout) == ["sft"]  # the copied records of the earlier stages still hold
    report_b = json.loads((b / "report.json").read_text())
    assert report_b["stages"]["sft"]["interrupted_commands"] == 1
    # the killed attempt's time still counts, up to its pipeline's last heartbeat (every 2 s; 2 s more for a busy box)
    killed, finished = json.loads((b / "pipeline_state.json").read_text())["stages"]["sft"]["attempts"]
    assert killed["wall_s"] is None and finished["wall_s"] is not None
    ran_s = killed_at - killed["start_unix"]
    counted_s = killed["last_seen_unix"] - killed["start_unix"]
    assert ran_s - 4.0 <= counted_s <= ran_s, (ran_s, counted_s)
    assert report_b["stages"]["sft"]["wall_s"] == pytest.approx(finished["wall_s"] + counted_s, abs=1e-6)
    got, want = deterministic(report_b, until_sft=True), deterministic(report, until_sft=True)
    assert got.pop("sft_losses") == pytest.approx(want.pop("sft_losses"), rel=1e-5)
    assert got == want


# --------------------------------------------------------------------------------------------------- records


def test_decisions_follow_settings_inputs_and_force(tmp_path):
    """A hand-made chain a -> b -> c plus d (reads nothing) against hand-written expectations: a settings change
    redoes that stage and the later ones that read it, never the earlier ones or the independent one."""
    from gpt2custom.records import Records, Stage, decide

    out = {n: tmp_path / n for n in "abcd"}
    for path in out.values():
        path.mkdir()

    def stages(lr=0.01):
        return [Stage("a", [["x"]], out["a"], {"n": 1}), Stage("b", [["x"]], out["b"], {"lr": lr}, reads=("a",),
                                                                 outputs=["b/"]),
                Stage("c", [["x"]], out["c"], {"k": [1, 2]}, reads=("b",)), Stage("d", [["x"]], out["d"], {})]

    records = Records(tmp_path)
    names = list("abcd")
    first = decide(stages(), records, names)
    assert {n: (d.status, d.reason) for n, d in first.items()} == dict.fromkeys(names, ("to run", "not run yet"))
    by_name = {s.name: s for s in stages()}
    for stage in stages():  # what the pipeline does for each stage, in order
        inputs = {r: records.identity(by_name[r]) for r in stage.reads}
        records.start(stage, inputs, resume=False)
        if stage.name != "d":  # d is interrupted: started, never finished
            records.finish(stage)
    now = decide(stages(), records, names)
    assert [now[n].status for n in names] == ["done", "done", "done", "to run"]
    assert now["d"].reason.startswith("interrupted") and now["d"].resume and not now["d"].stale
    records.fail(stages()[3], "2 usable rows, expected at least 16")
    assert decide(stages(), records, names)["d"].reason == "its output failed the check: 2 usable rows, expected at least 16"

    changed = decide(stages(lr=0.005), records, names)
    assert [changed[n].status for n in names] == ["done", "to run", "to run", "to run"]
    assert changed["b"].reason == "settings changed: lr 0.01 → 0.005" and changed["b"].stale
    assert changed["c"].reason == "input changed: b/ (runs again)"

    forced = decide(stages(), records, names, force=("a",))
    assert [forced[n].status for n in names] == ["to run", "to run", "to run", "to run"]
    assert forced["a"].reason == "forced (--force)"
    assert decide(stages(), records, ["c"])["b"].status == "not selected"

    # b redone (same settings, a new record): c read the old b, so c runs again; a stays done
    b = stages()[1]
    records.start(b, {"a": records.identity(stages()[0])}, resume=False)
    records.finish(b)
    again = decide(stages(), records, names)
    assert [again[n].status for n in "abc"] == ["done", "done", "to run"] and again["c"].reason == "input changed: b/"
    (tmp_path / "a").rmdir()
    assert decide(stages(), records, names)["a"].reason == f"output missing: {tmp_path / 'a'}"


# --------------------------------------------------------------------------------------------------- stage checks


def chat_row(question, answer, rejection=None):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "rejection": rejection}


def test_chat_data_with_too_few_usable_rows_fails_with_its_reasons(tmp_path):
    from gpt2custom.checks import check_chat_data
    from gpt2custom.records import CheckFailed

    path = tmp_path / "chat.jsonl"
    rows = [chat_row(f"q{i}", "", "empty answer") for i in range(3)] + [chat_row("q", "a", "refusal")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(CheckFailed, match=r"0 usable rows, expected at least 1 .*rejected: 3 empty answer, 1 refusal"):
        check_chat_data(path, min_rows=1, failed_is_error=True)
    rows.append(chat_row("q", "a"))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    check_chat_data(path, min_rows=1, failed_is_error=True)


def test_chat_samples_keep_chat_py_errors_apart_from_answers(tmp_path, tiny_checkpoint, monkeypatch):
    """chat.py's own line for a message that does not fit ("[...: not sent]") is an error, not the model's answer;
    each answer's end is what generate() did (the end token or the limit), as chat.py saw it."""
    import io

    from trl import TrlParser

    import chat
    from conftest import run_main_here
    from gpt2custom.chat import load_chat_tokenizer
    from gpt2custom.checks import check_chat_samples
    from gpt2custom.records import CheckFailed
    from gpt2custom.report import write_chat_samples

    model_dir = tmp_path / "sft"
    shutil.copytree(tiny_checkpoint, model_dir)
    load_chat_tokenizer(str(model_dir)).save_pretrained(model_dir)  # a chat model: the chat template added
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(chat_row("What is x?", "The x.")) + "\n")
    long = " ".join(["word"] * 300)  # over the tiny model's 256-token context
    plan = pl.Plan(options(run_dir=str(tmp_path), chat={"prompts": ["What is x?", long], "max_new_tokens": 4},
                           chat_data={"source": str(data)}, sft={"output_dir": str(model_dir), "eval_size": 0}))
    stage = plan.stage_chat()
    (args,) = TrlParser((chat.ChatArgs,)).parse_args_and_config(stage.commands[0][2:])  # the stage's own flags
    monkeypatch.setattr("sys.stdin", io.StringIO(stage.capture_stdin))
    stdout = run_main_here(chat.main, args)
    assert "not sent]" in stdout
    first, second = json.loads(write_chat_samples(plan, stdout).read_text())["samples"]
    assert (first["reference"], first["in_training_set"]) == ("The x.", True)
    assert first["ended_by"] in ("end token", "max_new_tokens") and first["answer_tokens"] <= 4
    assert second["answer"] == "" and "does not fit" in second["error"] and second["ended_by"] is None
    with pytest.raises(CheckFailed, match=f"did not answer {long[:20]!r}"[:-1]):
        check_chat_samples(plan.chat_dir / "samples.json", plan.chat_prompts())
    assert oct((plan.chat_dir / "samples.json").stat().st_mode & 0o777) == "0o644"  # not mkstemp's 0600


def test_push_url_reaches_the_report(tmp_path):
    from gpt2custom.report import publish_metrics, record_push

    plan = pl.Plan(options(run_dir=str(tmp_path), publish={"repo_id": "me/x", "push": True}))
    record_push(plan, "wrote files\nuploaded to https://huggingface.co/me/x/commit/abc\n")
    assert publish_metrics(plan)["commit_url"] == "https://huggingface.co/me/x/commit/abc"
    assert plan.stage_publish().output == plan.publish_record  # the stage is done when the push was recorded


def test_sft_context_longer_than_the_model_is_refused_by_the_plan():
    with pytest.raises(ValueError, match=r"sft: max_length=2048 is longer than the pretrained model's context "
                                         r"\(pretrain block_size 1024\)"):
        estimate(pl.Plan(options(sft={"max_steps": 2, "max_length": 2048})))


def test_cpu_launch_with_two_processes_starts_two_ranks():
    """The command the pipeline builds, read by accelerate's own launch parser: two CPU ranks, this interpreter."""
    from accelerate.commands.launch import launch_command_parser

    cmd = pl.Plan(options(cpu=True, num_processes=2, gpu=None, num_gpus=None)).launch("sft.py")
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    args = launch_command_parser().parse_args(cmd[3:])
    assert args.cpu and args.multi_gpu and args.num_processes == 2 and args.training_script.endswith("sft.py")


def test_sigterm_to_the_pipeline_stops_the_stage_under_it(tmp_path):
    """The pipeline's runner, stopped by SIGTERM while a stage runs: the stage and its own child are gone too."""
    pid_file = tmp_path / "grandchild.pid"
    stage = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
             f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    runner = ("import sys; from pathlib import Path; from gpt2custom.commands import execute, stop_on_sigterm; "
              f"stop_on_sigterm(); execute([sys.executable, '-c', {stage!r}], Path({str(tmp_path / 'log')!r}))")
    proc = subprocess.Popen([sys.executable, "-c", runner], cwd=REPO, env=env())
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) != 0
    deadline = time.monotonic() + 15
    while os.path.exists(f"/proc/{grandchild}") and "Z" not in open(f"/proc/{grandchild}/stat").read().split()[2]:
        assert time.monotonic() < deadline, "the stage's own child survived the pipeline"
        time.sleep(0.05)


def test_sample_summary_counts_by_hand():
    from gpt2custom.report import sample_summary

    samples = [{"answer": "Return the x.", "ended_by": "end token", "reference": "Return the x."},
               {"answer": "the cat", "ended_by": "max_new_tokens", "reference": "The dog sat"},  # 1 of 3 words
               {"answer": "", "ended_by": "end token", "reference": None}]
    assert sample_summary(samples) == ("In all: 2 of 3 answers non-empty, 2 ended by the model's own end token, 1 "
                                       "equal to the chat data's reference answer; on average 67% of a reference "
                                       "answer's words appear in the model's (measured on these samples).")


def test_one_tokenizer_fallback_for_bare_and_full_folders(tmp_path, tokenizer):
    """gpt2custom.files.model_tokenizer: a weights-only folder gets GPT-2's tokenizer, a folder with tokenizer files
    its own (here one with the chat format), None GPT-2's; the publish and chat paths use it."""
    from gpt2custom.chat import add_chat_format
    from gpt2custom.files import model_tokenizer

    bare, full = tmp_path / "bare", tmp_path / "full"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    add_chat_format(model_tokenizer(None)).save_pretrained(full)
    assert model_tokenizer(bare).get_vocab() == tokenizer.get_vocab() and not model_tokenizer(bare).chat_template
    assert model_tokenizer(full).chat_template and len(model_tokenizer(full)) == len(tokenizer) + 3
