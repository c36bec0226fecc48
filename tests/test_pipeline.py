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

from conftest import REPO
from gpt2custom import pipeline as pl
from gpt2custom.report import parse_transcript, sft_tokens
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
    est = pl.Plan(options()).estimates()
    # GPT-2 124M: N = 50304*768 + 12*(12*768^2 + 13*768) + 2*768 = 123,689,472 (shared/docs/performance.md), so
    # 6N + 12*L*C*T = 742,136,832 + 113,246,208 = 855,383,040 FLOPs per token: the A100 anchor applies unscaled.
    pre = est["pretrain"]
    assert pre["tokens"] == 52_428_800 and pre["steps"] == 100
    # 52,428,800 / (8 x 185,000) = 35.4249 s, + 10 s start-up + 60 s compile; 8 x $1.79 per hour
    assert pre["seconds"] == pytest.approx(105.42486, rel=1e-6)
    assert pre["dollars"] == pytest.approx(105.42486 / 3600 * 14.32, rel=1e-6)
    # data: 3M tokens at 3M tokens per CPU-second on num_proc=4 cores, + start-up
    assert est["data"]["seconds"] == pytest.approx(10.25)
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
    est = pl.Plan(options(gpu="H100", num_gpus=2, gpu_price_per_hour=2.0,
                          pretrain={"model_preset": "gpt2-medium", "max_steps": 10, "compile": False})).estimates()
    # GPT-2 350M: N = 50304*1024 + 24*(12*1024^2 + 13*1024) + 2*1024 = 353,822,720;
    # 6N + 12*24*1024*1024 = 2,122,936,320 + 301,989,888 = 2,424,926,208 FLOPs per token
    tok_s = 419_000 * 855_383_040 / 2_424_926_208
    seconds = 10 + 10 * 524_288 / (2 * tok_s)
    assert est["pretrain"]["seconds"] == pytest.approx(seconds, rel=1e-9)
    assert est["pretrain"]["dollars"] == pytest.approx(seconds / 3600 * 2 * 2.0, rel=1e-9)


def test_cpu_has_no_price_and_selection_checks_names():
    plan = pl.Plan(options(gpu=None, num_gpus=None, cpu=True))
    assert plan.hardware.is_cpu and plan.estimates()["pretrain"]["dollars"] is None
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


def test_transcript_parsing():
    assert parse_transcript(">>> a b\n>>> \n>>> c\n>>> ", 3) == ["a b", "", "c"]
    assert parse_transcript(">>> a\n>>> b\n>>> ", 3) is None  # not one answer per prompt: ambiguous
    assert parse_transcript(">>> x\n>>> y\n>>> z\n>>> ", 2) is None


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
        "chat": {"prompts": ["What does json.dumps do?", "What is json.loads for?", "Hello!"], "max_new_tokens": 8},
        "publish": {"repo_id": "test/tiny-chat"},
    }


def pipeline_cmd(config_path, *extra):
    return [sys.executable, "pipeline.py", "--config", str(config_path), "--yes", *extra]


def env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_pipeline(config_path, *extra, timeout=300):
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


@pytest.mark.slow
def test_pipeline_end_to_end_skip_and_resume(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = tmp_path / "a"
    config_a = write_config(tmp_path / "a.yaml", tiny_config(a))
    first = run_pipeline(config_a)
    for stage in pl.STAGES:
        assert f"[{stage}] $ " in first.stdout, stage  # every command is printed before it runs
    for rel_path in STAGE_OUTPUTS:
        assert (a / rel_path).exists(), rel_path
    report = json.loads((a / "report.json").read_text())
    assert {k: v["status"] for k, v in report["stages"].items()} == dict.fromkeys(pl.STAGES, "done")

    # report.md: a measured wall time in every stage's row
    md = (a / "report.md").read_text()
    for stage in pl.STAGES:
        row = next(line for line in md.splitlines() if line.startswith(f"| {stage} |"))
        assert re.search(r"\d+ s|\d+\.\d+ min", row.split("|")[5]), row
    assert "instead of FineWeb-Edu" in md and "dry-run folder" in md

    # the card takes the report's numbers: SFT held-out perplexity, pretraining tokens
    card = (a / "publish" / "README.md").read_text()
    sft = report["stages"]["sft"]["metrics"]
    assert f"{math.exp(sft['eval_loss']):.2f}" in card
    assert f"{report['stages']['pretrain']['metrics']['tokens']:,}" in card

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
    assert all(f"[{stage}] complete" in second.stdout for stage in pl.STAGES), second.stdout
    assert not re.search(r"^\[\w+\] \$ ", second.stdout, re.MULTILINE)  # no command ran
    assert json.loads((a / "pipeline_state.json").read_text())["stages"] == json.loads(state_before)["stages"]

    # killed in the middle of SFT (after a seeded checkpoint), then the same command: the same report up to SFT
    # (chat and publish only read SFT's output folder; the first run covers them)
    b = tmp_path / "b"
    shutil.copytree(a, b, ignore=shutil.ignore_patterns("sft", "chat", "publish", "report.*", "card_eval.json",
                                                        "sft_loss.png"))
    state = json.loads((b / "pipeline_state.json").read_text())
    for stage in ("sft", "chat", "publish"):
        state["stages"].pop(stage)
    (b / "pipeline_state.json").write_text(json.dumps(state))
    config_b = write_config(tmp_path / "b.yaml", tiny_config(b))
    kill_after = random.Random(0).choice([2, 4])
    proc = subprocess.Popen(pipeline_cmd(config_b, "--until", "sft"), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (b / "sft" / f"checkpoint-{kill_after}" / "trainer_state.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "SFT never reached the checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (b / "sft" / "trainer_state.json").exists()  # killed before SFT finished
    resumed = run_pipeline(config_b, "--until", "sft")
    assert "--resume_from_checkpoint" in resumed.stdout
    for stage in ("data", "pretrain", "evaluate", "chat_data"):
        assert f"[{stage}] complete" in resumed.stdout
    report_b = json.loads((b / "report.json").read_text())
    assert report_b["stages"]["sft"]["interrupted_commands"] == 1
    got, want = deterministic(report_b, until_sft=True), deterministic(report, until_sft=True)
    assert got.pop("sft_losses") == pytest.approx(want.pop("sft_losses"), rel=1e-5)
    assert got == want
