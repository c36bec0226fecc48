"""`--optimizer muon` through pretrain.py on the CPU (fp32, tiny model): two gloo ranks train as one process with
twice the accumulation, a run killed with SIGKILL and resumed ends bitwise where the uninterrupted run ends (Muon's
momentum buffers travel in the checkpoint), and an FSDP launch is refused at start-up (accelerate's FSDP checkpoints
pair each optimizer with one model, and Muon + AdamW are two: it crashed at the first checkpoint).
Muon's update itself is checked against an SVD in tests/test_train_step.py."""

import random

import pytest
import torch
from safetensors.torch import load_file

from conftest import kill_when_frozen, run_main_here, run_script, start_then_freeze, text_shards
from gpt2custom.plots import read_metrics

pytestmark = pytest.mark.slow  # pretrain.py runs, one of them on two launched ranks

B, T, STEPS = 4, 32, 10
MUON_RUN = [
    "--optimizer", "muon", "--model_preset", "tiny", "--block_size", str(T), "--micro_batch_size", str(B),
    "--total_batch_size", str(2 * B * T), "--max_steps", str(STEPS), "--warmup_steps", "3", "--learning_rate", "3e-3",
    "--muon_learning_rate", "1e-2", "--grad_clip", "1.0", "--precision", "fp32", "--cpu", "true", "--compile", "false",
    "--seed", "5", "--eval_interval", "0", "--hellaswag_interval", "0", "--sample_interval", "0",
    "--checkpoint_interval", "5", "--keep_checkpoints", "2", "--report_to", "none",
]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory, real_text):
    return text_shards(tmp_path_factory.mktemp("muon_data"), real_text[:100_000])


def argv(shards, out, *extra):
    return [str(a) for a in ("--data_dir", shards, "--output_dir", out, *MUON_RUN, *extra)]


@pytest.fixture(scope="module")
def one_process(shards, tmp_path_factory):
    """The uninterrupted run in this process: 2 accumulated micro-batches per step."""
    import pretrain

    out = tmp_path_factory.mktemp("one")
    run_main_here(pretrain.main, argv(shards, out))
    return out


def train_losses(out):
    by_step = {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"}
    return [by_step[s] for s in sorted(by_step)]


def final_weights(out):
    return load_file(out / "final" / "model.safetensors")


def test_two_gloo_ranks_under_muon_equal_one_process(shards, one_process, tmp_path):
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    two = tmp_path / "two"
    run_script(*launch, "pretrain.py", *argv(shards, two), env={"ACCELERATE_USE_CPU": "1"})
    a, b = train_losses(two), train_losses(one_process)
    assert len(a) == len(b) == STEPS
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    assert b[-1] < b[0] - 1.0  # it trained: the comparison is not between two untouched models
    wa, wb = final_weights(two), final_weights(one_process)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_muon_run_killed_and_resumed_is_bitwise_the_uninterrupted_run(shards, one_process, tmp_path):
    import pretrain

    killed = tmp_path / "killed"
    rng = random.Random(25)  # seeded: a failure names the step it was killed after
    kill_after, delay = rng.randint(6, 9), rng.uniform(0, 0.05)  # after the checkpoint at step 5, before the end
    proc = start_then_freeze(["pretrain.py", *argv(shards, killed)], after="gpt2custom.runlog:RunLogger.step",
                             calls=kill_after, delay=delay)  # fmt: skip
    kill_when_frozen(proc)
    assert not (killed / "final").exists()
    printed = run_main_here(pretrain.main, argv(shards, killed, "--resume", "true"))
    assert "resumed from" in printed and "step_000005" in printed
    a, b = final_weights(killed), final_weights(one_process)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after a kill at step ~{kill_after} and resume"


def test_muon_under_an_fsdp_launch_is_refused_at_start_up(shards, tmp_path, monkeypatch):
    import pretrain

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    with pytest.raises(SystemExit, match="optimizer=muon with an FSDP launch is not supported"):
        pretrain.main(argv(shards, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_model_card_names_the_optimizer_and_the_measured_muon_verdict_in_its_training_section(tiny_checkpoint, tmp_path):
    import shutil

    from gpt2custom.hub import write_model_card
    from gpt2custom.training import MUON_VERDICT

    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, folder)
    card = str(write_model_card(folder, model_id="me/tiny", training={"tokens": 65536, "config": {"optimizer": "muon"}}))
    training = card.split("\n## Training\n", 1)[1].split("\n## ", 1)[0]
    assert f"Optimizer: muon. {MUON_VERDICT}" in training
