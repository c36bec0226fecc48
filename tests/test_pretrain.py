"""pretrain.py end to end on the CPU with a tiny model: learning, kill-and-resume, every failure a user can cause.
(Two gloo ranks against one process, compile and world-size changes: tests/test_recipe.py.)"""

import json
import os
import random
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_png, kill_when_frozen, run_script, start_then_freeze, text_shards

pytestmark = pytest.mark.slow  # every test here runs pretrain.py on shards that prepare_data.py makes first

# A run small enough for 2 cores: 4 sequences of 32 tokens per micro-step.
TINY_RUN = [
    "--model_preset", "tiny", "--block_size", "32", "--micro_batch_size", "4", "--total_batch_size", "128",
    "--warmup_steps", "2", "--learning_rate", "1e-2", "--precision", "fp32", "--compile", "false", "--cpu", "true",
    "--eval_interval", "1000", "--eval_batches", "2", "--hellaswag_interval", "0", "--sample_interval", "0",
    "--report_to", "none", "--seed", "7",
]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory, real_text):
    """Token shards of real text, made by prepare_data.py from a local .txt file."""
    return text_shards(tmp_path_factory.mktemp("corpus"), real_text[:300_000], val_tokens=4000)


def pretrain(shards, out, *extra, check=True, env=None):
    return run_script("pretrain.py", "--data_dir", shards, "--output_dir", out, *TINY_RUN, *map(str, extra),
                      check=check, env=env)


def train_losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}
    return [by_step[s] for s in sorted(by_step)]


# samples at the end: 32 new tokens asked of a 32-token context (the prompt's tokens must leave room)
STEPS = ["--max_steps", "16", "--checkpoint_interval", "4", "--keep_checkpoints", "2", "--sample_interval", "16"]


@pytest.fixture(scope="module")
def straight_run(shards, tmp_path_factory):
    """One uninterrupted run, shared by the learning test and the resume test."""
    out = tmp_path_factory.mktemp("straight")
    proc = pretrain(shards, out, *STEPS, "--unigram_baseline", "true")
    return out, proc


def test_loss_falls_on_real_text_and_final_folder_loads(straight_run):
    out, proc = straight_run
    losses = train_losses(out)
    assert len(losses) == 16
    assert sum(losses[-3:]) / 3 < losses[0] - 1.5, losses  # from ~10.8 (uniform over 50k ids) well down
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["tokens"] == 16 * 128 and summary["steps"] == 16 and summary["tokens_per_s"] > 0
    assert summary["val_loss"] < losses[0]
    assert f"unigram baseline {summary['unigram_val_loss']:.4f}" in proc.stdout
    assert_png(out / "loss.png")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(out / "final", trust_remote_code=True)
    assert tokenizer("Hello world").input_ids == [15496, 995]
    ids = torch.tensor([[15496, 995]])
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 6)


def test_resume_after_sigkill_is_bitwise_identical(shards, straight_run, tmp_path):
    killed = tmp_path / "killed"
    rng = random.Random(14)  # seeded: a failure names the step it was killed after
    kill_after, delay = rng.randint(5, 14), rng.uniform(0, 0.05)  # the delay lands the kill inside the next step
    proc = start_then_freeze(["pretrain.py", "--data_dir", shards, "--output_dir", killed, *TINY_RUN, *STEPS],
                             after="gpt2custom.runlog:RunLogger.step", calls=kill_after, delay=delay)
    kill_when_frozen(proc)
    assert not (killed / "final").exists()

    proc = pretrain(shards, killed, *STEPS, "--resume", "true")
    assert "resumed from" in proc.stdout
    a = load_file(straight_run[0] / "final" / "model.safetensors")
    b = load_file(killed / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after kill at step ~{kill_after} and resume"
    assert len(list((killed / "checkpoints").glob("step_*"))) == 2  # keep_checkpoints


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    # An absurd learning rate, reached during warmup, blows the weights up; the checkpoints before stay intact.
    proc = pretrain(shards, out, "--max_steps", "30", "--checkpoint_interval", "1", "--warmup_steps", "5",
                    "--learning_rate", "1e12", "--grad_clip", "0", check=False)
    assert proc.returncode != 0
    assert "loss is nan" in proc.stderr or "loss is inf" in proc.stderr, proc.stderr[-2000:]
    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    assert checkpoints, "no checkpoint was kept"
    state = load_file(checkpoints[-1] / "model.safetensors")
    # the last checkpoint may already hold huge weights, but never non-finite ones: the run stops before saving them
    assert all(torch.isfinite(t).all() for t in state.values())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--total_batch_size", "100"], "total_batch_size=100 is not divisible by micro_batch_size × block_size"),
        (["--data_dir", "/nonexistent/shards"], "/nonexistent/shards has no manifest.json"),
        (["--model_preset", "gpt5"], "unknown preset 'gpt5'"),
        (["--precision", "fp8"], "precision='fp8'"),
        (["--preempt_signals", "SIGTERM,SIGFOO"], "preempt_signals='SIGTERM,SIGFOO': SIGFOO is not a signal"),
        (["--resume", "maybe"], "resume='maybe': expected auto, true or false"),
        (["--max_time", "0"], "max_time=0.0: expected a number of seconds > 0"),
    ],
)
def test_bad_input_gives_one_clear_error(shards, tmp_path, extra, message):
    import pretrain as script  # in-process: the error comes before any training

    argv = ["--data_dir", str(shards), "--output_dir", str(tmp_path / "run"), *TINY_RUN, "--max_steps", "1", *extra]
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert message in str(exit_info.value)


@pytest.mark.parametrize("where", ["cli", "yaml"])
def test_unknown_option_is_rejected(shards, tmp_path, where, capsys):
    import pretrain as script

    config = tmp_path / "run.yaml"
    config.write_text("model_preset: tiny\n" + ("learning_rte: 0.1\n" if where == "yaml" else ""))
    argv = ["--config", str(config), "--data_dir", str(shards)] + (["--learnin_rate", "0.1"] if where == "cli" else [])
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code != 0
    assert ("learning_rte" if where == "yaml" else "--learnin_rate") in str(exit_info.value) + capsys.readouterr().err


# --------------------------------------------------------------------------- failures: one line, nothing damaged


def tree_bytes(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def other_data(shards, tmp_path_factory, real_text):
    """The same corpus prepared again differently (no validation split): a "re-prepared" data folder."""
    return text_shards(tmp_path_factory.mktemp("other"), real_text[:200_000], val_tokens=0, shard_size=30000)


def truncate(path, keep=100):
    path.write_bytes(path.read_bytes()[:keep])


def corrupt_val_shard(data, out):
    truncate(next(data.glob("*val*.bin")))


def wrong_magic_train_shard(data, out):
    path = next(data.glob("*train*.bin"))
    path.write_bytes(b"\0" * 8 + path.read_bytes()[8:])


def drop_manifest(data, out):
    (data / "manifest.json").unlink()


def drop_train_shard(data, out):
    next(data.glob("*train*.bin")).unlink()


@pytest.mark.parametrize(
    ("case", "damage", "extra", "message"),
    [
        ("truncated val shard", corrupt_val_shard, [], "bytes, but manifest.json lists"),
        ("wrong-magic train shard", wrong_magic_train_shard, [], "magic number"),
        ("missing manifest", drop_manifest, [], "has no manifest.json"),
        ("missing train shard", drop_train_shard, [], "but missing"),
        ("other block_size on resume", None, ["--resume", "true", "--block_size", "16", "--total_batch_size", "64"],
         "was saved with block_size=32 (this run: 16)"),
        ("re-prepared data on resume", "other", ["--resume", "true"], "cannot resume from"),
        ("fp16 with Muon", None, ["--precision", "fp16", "--optimizer", "muon"], "precision=fp16 with optimizer=muon"),
        ("sample prompt longer than the context", None, ["--sample_prompt", "word " * 40],
         "sample_prompt is 41 tokens, block_size=32"),
    ],
)  # fmt: skip
def test_each_failure_is_one_line_naming_the_thing_and_damages_nothing(
    shards, other_data, straight_run, tmp_path, capsys, case, damage, extra, message
):
    import pretrain as script

    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(other_data if damage == "other" else shards, data)
    shutil.copytree(straight_run[0], out)
    if callable(damage):
        damage(data, out)
    before = tree_bytes(out), tree_bytes(data)
    argv = ["--data_dir", str(data), "--output_dir", str(out), *TINY_RUN, *STEPS, *extra]
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    error = str(exit_info.value)
    assert error.startswith("pretrain.py: ") and message in error and "\n" not in error, (case, error)
    assert "Traceback" not in capsys.readouterr().err
    assert (tree_bytes(out), tree_bytes(data)) == before, case


def test_data_without_validation_split_trains_and_says_so(other_data, tmp_path, capsys):
    import pretrain as script

    script.main(["--data_dir", str(other_data), "--output_dir", str(tmp_path / "run"), *TINY_RUN,
                 "--max_steps", "2", "--eval_interval", "1"])  # fmt: skip
    assert "has no validation split" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "run_summary.json").read_text())["val_loss"] is None


def test_resume_on_a_finished_run_changes_nothing(shards, straight_run, tmp_path, capsys):
    import pretrain as script

    out = tmp_path / "run"
    shutil.copytree(straight_run[0], out)
    before = tree_bytes(out)
    script.main(["--data_dir", str(shards), "--output_dir", str(out), *TINY_RUN, *STEPS, "--resume", "true"])
    assert "nothing to do" in capsys.readouterr().out
    assert tree_bytes(out) == before


@pytest.mark.parametrize("state", ["corrupt latest checkpoint", "killed in finish: no final", "killed in finish: no summary"])
def test_resume_recovers_to_the_same_final_weights(shards, straight_run, tmp_path, capsys, state):
    import pretrain as script

    out = tmp_path / "run"
    shutil.copytree(straight_run[0], out)
    (out / "run_summary.json").unlink()
    if state == "corrupt latest checkpoint":  # and killed before final/: it falls back to step 12
        truncate(out / "checkpoints" / "step_000016" / "model.safetensors", keep=5000)
        shutil.rmtree(out / "final")
    elif state == "killed in finish: no final":
        (out / "final").rename(out / ".final.tmp")
        truncate(out / ".final.tmp" / "model.safetensors", keep=5000)
    script.main(["--data_dir", str(shards), "--output_dir", str(out), *TINY_RUN, *STEPS, "--resume", "true"])
    printed = capsys.readouterr().out
    if state == "corrupt latest checkpoint":
        assert "step_000016 is incomplete (model.safetensors has 5000 bytes" in printed
        assert "resumed from" in printed and "step_000012" in printed
    a, b = load_file(straight_run[0] / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 16 and summary["val_loss"] is not None


# --------------------------------------------------------------------------- preemption (2-rank cases: test_preemption.py)


def signal_before_call(monkeypatch, owner, name: str, call: int, signum: int) -> list:
    """Send this process `signum` just before the `call`-th call of `owner.name`: the notice lands at that seeded
    moment however slow the machine is. Returns the list of moments it fired at (the step the run had reached)."""
    original, calls, fired = getattr(owner, name), [0], []

    def gated(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signum)  # the handler runs before the next bytecode: the notice is in
            fired.append(call)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, gated)
    return fired


def run_here(argv) -> tuple[int, str]:
    """pretrain.main in this process: (exit code, stdout)."""
    import contextlib
    import io

    import pretrain as script
    from conftest import reset_process_state

    reset_process_state()
    printed, code = io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
            script.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    finally:
        reset_process_state()
    return code, printed.getvalue()


def complete_checkpoints(out) -> list[int]:
    """Steps of the checkpoints whose files all have the sizes their checkpoint.json lists (read here, not by the
    project's own check)."""
    steps = []
    for folder in sorted((out / "checkpoints").glob("step_*")):
        info = json.loads((folder / "checkpoint.json").read_text())
        if all((folder / name).stat().st_size == size for name, size in info["files"].items()):
            steps.append(info["step"])
    return steps


def assert_bitwise_same_run(a, b):
    assert train_losses(a) == train_losses(b)
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigterm_mid_run_saves_exits_75_and_the_next_start_continues_bitwise(shards, straight_run, tmp_path,
                                                                             monkeypatch):
    from gpt2custom.data import ShardLoader
    from gpt2custom.preemption import EXIT_PREEMPTED

    out = tmp_path / "run"
    argv = ["--data_dir", shards, "--output_dir", out, *TINY_RUN, *STEPS]
    fired = signal_before_call(monkeypatch, ShardLoader, "next_batch", call=10, signum=signal.SIGTERM)  # step 10
    code, printed = run_here(argv)
    monkeypatch.undo()
    assert fired and code == EXIT_PREEMPTED == 75, printed
    assert max(complete_checkpoints(out)) == 10 == max(json.loads(r)["step"] for r in
                                                       (out / "metrics.jsonl").read_text().splitlines())
    assert not (out / "final").exists()
    code, printed = run_here(argv)  # the same command: --resume auto is the default
    assert code in (0, None) and "resumed from" in printed and "step_000010" in printed
    assert_bitwise_same_run(out, straight_run[0])


def test_sigusr1_during_the_last_samples_is_finished_by_the_next_start(shards, straight_run, tmp_path, monkeypatch):
    """The notice lands inside sampling at the last step: the checkpoint marks that step's evaluation, samples and
    save as not done, and the next start does them before finishing."""
    from transformers.generation.utils import GenerationMixin

    out = tmp_path / "run"
    argv = ["--data_dir", shards, "--output_dir", out, *TINY_RUN, *STEPS]
    fired = signal_before_call(monkeypatch, GenerationMixin, "generate", call=1, signum=signal.SIGUSR1)
    code, printed = run_here(argv)
    monkeypatch.undo()
    assert fired and code == 75, printed
    assert max(complete_checkpoints(out)) == 16 and not (out / "final").exists()
    code, printed = run_here(argv)
    assert code in (0, None) and "step_000016" in printed
    assert_bitwise_same_run(out, straight_run[0])
    a, b = (json.loads((run / "run_summary.json").read_text()) for run in (straight_run[0], out))
    assert (a["val_loss"], a["steps"], a["tokens"]) == (b["val_loss"], b["steps"], b["tokens"])
    assert "sample: " in printed  # the samples due at step 16 ran after the resume


def test_a_fresh_run_in_a_used_folder_is_one_line_refusal(shards, straight_run, tmp_path, capsys):
    import pretrain as script

    out = tmp_path / "run"
    shutil.copytree(straight_run[0], out)
    (out / "run_summary.json").unlink()
    before = tree_bytes(out)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--data_dir", str(shards), "--output_dir", str(out), *TINY_RUN, *STEPS, "--resume", "false"])
    error = str(exit_info.value)
    assert error.startswith(f"pretrain.py: output_dir {out} already holds a run (") and "\n" not in error, error
    assert "--resume auto" in error
    assert tree_bytes(out) == before


def test_a_second_start_on_a_folder_in_use_is_one_line_and_writes_nothing(shards, straight_run, tmp_path, capsys):
    import pretrain as script
    from gpt2custom.files import exclusive_lock

    out = tmp_path / "run"
    shutil.copytree(straight_run[0], out)
    (out / "run_summary.json").unlink()  # unfinished: without the lock this start would resume and write
    before = tree_bytes(out)
    first = exclusive_lock(out)  # the run still going (an flock held by another open file, as another process's is)
    argv = ["--data_dir", str(shards), "--output_dir", str(out), *TINY_RUN, *STEPS]
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    error = str(exit_info.value)
    assert error == f"pretrain.py: another run holds {out}: wait for it to finish, or give this one another --output_dir"
    assert tree_bytes(out) == before
    first.close()
    script.main(argv)  # free again: the run continues to its end
    assert (out / "run_summary.json").exists()


def test_device_syncs_only_on_logged_steps_and_when_something_runs(shards, tmp_path, monkeypatch):
    """log_interval 3 over 6 steps, and the checkpoint + validation of the last step: 2 logged steps and 1 step with
    work, so 3 waits for the device (the loop used to wait at every step as well: 8)."""
    from gpt2custom.runlog import RunLogger

    syncs = []
    original = RunLogger._sync
    monkeypatch.setattr(RunLogger, "_sync", lambda self: (syncs.append(self.progress.step), original(self))[1])
    code, _ = run_here(["--data_dir", shards, "--output_dir", tmp_path / "run", *TINY_RUN, "--max_steps", "6",
                        "--log_interval", "3", "--checkpoint_interval", "1000"])  # fmt: skip
    assert code in (0, None)
    logged, with_work = [3, 6], [6]  # the config: logs every 3rd step; eval and checkpoint only at the last
    assert sorted(syncs) == sorted(logged + with_work), syncs


def test_progress_bar_shows_the_time_left_of_max_time(tmp_path):
    from accelerate import Accelerator

    from conftest import reset_process_state
    from gpt2custom.runlog import RunLogger, RunProgress

    reset_process_state()
    log = RunLogger(tmp_path, Accelerator(cpu=True), RunProgress(), tokens_per_step=1, max_steps=2, flops_per_token=1.0,
                    peak_flops=None, price_per_gpu_hour=None, max_time=3725)  # fmt: skip
    log.start()
    log.step(torch.tensor(2.5), None, 1e-3)
    left = log.bar.postfix.split("left=")[1].split(",")[0]
    assert left in ("1:02:05", "1:02:04"), log.bar.postfix  # 3725 s = 1 h 2 min 5 s, less the moment it took
    log.close()
    reset_process_state()  # the Accelerator's process-wide state: later tests build their own
