"""FSDP2 for real, on 2 CPU (gloo) ranks: pretrain.py launched with accelerate_configs/fsdp2_cpu_2proc.yaml against
the same run in one process without any distribution, checked with what torch itself wrote: the checkpoint's
torch.distributed.checkpoint metadata (which rank stored which rows) and torch's own gather of it into one state dict.

Three launches (FSDP float64, FSDP bf16, FSDP bf16 resumed), each bounded by a deadline that dumps the
ranks' stacks on a hang.
"""

import json
import os
import re
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_main_here, text_shards
from gpt2custom.distributed import run_with_deadline
from gpt2custom.plots import read_metrics

pytestmark = pytest.mark.slow

C, T, B, STEPS = 64, 32, 4, 10  # the tiny preset's width; 2 ranks x B x T x 2 micro-steps = 512 tokens per step
ARGS = [
    "--model_preset", "tiny", "--block_size", str(T), "--micro_batch_size", str(B), "--total_batch_size", str(2 * B * T * 2),
    "--max_steps", str(STEPS), "--warmup_steps", "3", "--learning_rate", "3e-3", "--grad_clip", "1.0",
    "--precision", "fp64", "--cpu", "true", "--compile", "false", "--seed", "3",
    "--eval_interval", "5", "--eval_batches", "0", "--hellaswag_interval", "3",
    "--sample_interval", "5", "--num_samples", "2", "--sample_tokens", "8",
    "--checkpoint_interval", "5", "--keep_checkpoints", "3", "--report_to", "none",
]  # fmt: skip
DEADLINE = 300  # seconds per launch; a run takes about 20
# HellaSwag at 3, 6, 9 (and the last step), validation at 5 and 10: scoring must work on a model that has just been
# resharded after a backward pass. After validation's forward FSDP2 leaves the root unsharded, which would hide a
# scoring path that calls the model's pieces outside its forward (a mutation showed it).
VAL_STEPS, HELLASWAG_STEPS = [5, 10], [3, 6, 9, 10]


@pytest.fixture(scope="module")
def data(tmp_path_factory, real_text):
    """Token shards of real text, and a HellaSwag-format file whose two halves need different numbers of forwards."""
    root = tmp_path_factory.mktemp("fsdp_data")
    text_shards(root, real_text[:200_000])
    lines = [ln.strip() for ln in real_text.splitlines() if 4 <= len(ln.split()) <= 6 and len(ln) < 40][:40]  # fit T=32
    # 13 examples: rank 0 scores the first 7, rank 1 the last 6, whose one-token contexts need no context pass. So
    # rank 1 makes fewer forwards, and a sharded model hangs unless the ranks agree on a count.
    rows = [{"ind": i, "activity_label": "Reading", "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
             "endings": lines[20 + i : 24 + i], "label": i % 4}
            for i, ctx in enumerate(lines[:7] + ["And"] * 6)]  # fmt: skip
    (root / "hellaswag.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def launch(data, out, *extra, launcher=("--config_file", "accelerate_configs/fsdp2_cpu_2proc.yaml")):
    """pretrain.py on 2 ranks with accelerate's FSDP config for CPUs (or another `launcher` setting)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--main_process_port", "0", "pretrain.py",
           "--data_dir", data / "shards", "--hellaswag_path", data / "hellaswag.jsonl", "--output_dir", out, *ARGS,
           *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    proc = run_with_deadline(list(map(str, cmd)), DEADLINE, cwd=REPO, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def one_process_run(data, tmp_path_factory):
    """The same run with no distribution at all, in this process (pretrain.py's own main; accumulating the 4
    micro-batches the two ranks take per step): the reference sharding must reproduce. Two DDP ranks were shown
    equal to one process in tests/test_recipe.py."""
    import pretrain

    out = tmp_path_factory.mktemp("one")
    argv = ["--data_dir", data / "shards", "--hellaswag_path", data / "hellaswag.jsonl", "--output_dir", out, *ARGS]
    return out, run_main_here(pretrain.main, [str(a) for a in argv])


@pytest.fixture(scope="module")
def fsdp_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    return out, launch(data, out)


def rows(out, kind):
    """metrics.jsonl's rows of `kind` by step (after a resume the later row for a step wins)."""
    return [row for row in read_metrics(out / "metrics.jsonl") if row["kind"] == kind]


def test_fsdp_trains_and_evaluates_as_one_process_does(fsdp_run, one_process_run):
    (fsdp, _), (one, _) = fsdp_run, one_process_run
    a, b = rows(fsdp, "train"), rows(one, "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    # float64, so that rounding cannot hide a real difference. In fp32 FSDP2 and one process (or DDP) differ by ~1e-6
    # in the loss and up to ~1e-5 in weights after 10 steps: the clipping norm is summed per shard then across ranks
    # (another order: the clip factor differs in its last bits), gradients are summed across ranks in another order,
    # and AdamW turns rounding-sized gradients (the key bias's exact gradient is 0: softmax ignores a shift) into
    # full-size steps. In float64 the same runs agree to ~1e-15 (measured): reduction order, not a bug.
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) < 1e-12
    ea, eb = rows(fsdp, "eval"), rows(one, "eval")
    assert [r["step"] for r in ea] == [r["step"] for r in eb] == sorted(set(VAL_STEPS + HELLASWAG_STEPS))
    for x, y in zip(ea, eb):
        assert ("val_loss" in x, "val_loss" in y) == (x["step"] in VAL_STEPS,) * 2
        # each rank takes whole windows of its half of the val tokens: a few at the seams go (1.6e-3 measured)
        assert x.get("val_loss") == pytest.approx(y.get("val_loss"), abs=3e-3)
        # one process scores through base_model + lm_head on the scored rows; FSDP through the whole sharded model
        assert (x.get("hellaswag_acc"), x.get("hellaswag_acc_norm")) == (y.get("hellaswag_acc"), y.get("hellaswag_acc_norm"))


def test_each_rank_holds_half_of_every_block(fsdp_run):
    out, log = fsdp_run
    block = 12 * C * C + 13 * C  # GPT-2 block: c_attn 3C²+3C, c_proj C²+C, c_fc 4C²+4C, mlp c_proj 4C²+C, 2 LayerNorms 4C
    line = re.search(r"FSDP2 sharding, block elements per rank: (.*)", log).group(1)
    per_block = re.findall(r"h\.(\d+) \[(\d+), (\d+)\] of (\d+)", line)
    assert [int(i) for i, *_ in per_block] == [0, 1]  # the tiny preset's two blocks
    for _, r0, r1, total in per_block:
        assert int(total) == block and int(r0) + int(r1) == block
        assert abs(int(r0) - block / 2) < 0.02 * block and abs(int(r1) - block / 2) < 0.02 * block
    # What torch.distributed.checkpoint recorded: every block tensor in two halves, written by the two ranks.
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(out / "checkpoints" / "step_000010" / "pytorch_model_fsdp_0").read_metadata()
    files = {(index.fqn, tuple(index.offset)): info.relative_path for index, info in metadata.storage_data.items()}
    block_tensors = {k: v for k, v in metadata.state_dict_metadata.items() if ".transformer.h." in k}
    assert len(block_tensors) == 2 * 12  # 12 tensors per block
    for name, tensor in block_tensors.items():
        assert len(tensor.chunks) == 2, name
        writers = {files[(name, tuple(chunk.offsets))] for chunk in tensor.chunks}
        assert writers == {"__0_0.distcp", "__1_0.distcp"}, name
        for chunk in tensor.chunks:
            assert chunk.sizes.numel() == tensor.size.numel() // 2, name


def test_samples_and_hellaswag_run_on_both_ranks(fsdp_run):
    out, log = fsdp_run
    # generate ran on both ranks (a sharded forward needs both); the texts are printed once
    assert len(re.findall(r"^sample: ", log, flags=re.M)) == 2 * 2
    evals = rows(out, "eval")
    assert [r["step"] for r in evals if "hellaswag_acc" in r] == HELLASWAG_STEPS
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == STEPS and summary["hellaswag_acc_norm"] == evals[-1]["hellaswag_acc_norm"]


def test_final_folder_is_gathered_and_loads_with_automodel(fsdp_run, one_process_run, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    (out, _), (one, _) = fsdp_run, one_process_run
    final = out / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["GPT2CustomForCausalLM"]  # not fully_shard's FSDPGPT2CustomForCausalLM
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_gpt2custom.GPT2CustomForCausalLM"
    for name in ("configuration_gpt2custom.py", "modeling_gpt2custom.py"):
        assert (final / name).read_text() == (REPO / name).read_text()
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)
    assert type(model).__name__ == "GPT2CustomForCausalLM"
    assert model.lm_head.weight is model.transformer.wte.weight
    # the weights are the last checkpoint's shards, joined by torch's own DCP reader
    dcp_to_torch_save(out / "checkpoints" / "step_000010" / "pytorch_model_fsdp_0", tmp_path / "full.pt")
    gathered = torch.load(tmp_path / "full.pt")["model"]
    saved = load_file(final / "model.safetensors")
    assert set(saved) <= set(gathered) and "transformer.h.1.mlp.c_fc.weight" in saved
    for name, value in saved.items():
        assert torch.equal(value, gathered[name]), name
    for name, value in model.state_dict().items():
        assert torch.equal(value, gathered[name]), name
    # and what one process trained (float64, the same 10 steps), up to the order of the sums
    one_weights = load_file(one / "final" / "model.safetensors")
    assert set(one_weights) == set(saved)
    assert max((saved[k] - one_weights[k]).abs().max().item() for k in saved) < 1e-12


# ----------------------------------------------------------------------------------------- FSDP2 + bf16
# The README's 774M command: accelerate_configs/fsdp_8gpu.yaml has `mixed_precision: bf16`, which FSDP2 runs as a
# MixedPrecisionPolicy (bf16 parameters in forward and backward, no autocast), so every op, the chunked loss
# included, must take bf16 operands. The reference: one process under bf16 autocast with fp32 weights, what each DDP
# rank runs (two DDP ranks = one process is shown in tests/test_recipe.py): the same data, a different rounding.
BF16 = ["--precision", "bf16", "--hellaswag_interval", "0", "--sample_interval", "0", "--eval_interval", "5"]
FSDP_BF16 = ("--config_file", "accelerate_configs/fsdp2_cpu_2proc.yaml", "--mixed_precision", "bf16")


@pytest.fixture(scope="module")
def fsdp_bf16_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_bf16")
    launch(data, out, *BF16, launcher=FSDP_BF16)
    return out


def test_fsdp2_bf16_trains_like_bf16_autocast_in_one_process(fsdp_bf16_run, data, tmp_path):
    import pretrain

    one = tmp_path / "one_bf16"
    argv = ["--data_dir", data / "shards", "--hellaswag_path", data / "hellaswag.jsonl", "--output_dir", one, *ARGS, *BF16]
    run_main_here(pretrain.main, [str(a) for a in argv])
    a, b = rows(fsdp_bf16_run, "train"), rows(one, "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in a)
    assert a[-1]["loss"] < a[0]["loss"] - 1.0  # it learns
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=0.02), (x["step"], x["loss"], y["loss"])
    assert [r["step"] for r in rows(fsdp_bf16_run, "eval")] == VAL_STEPS
    for x, y in zip(rows(fsdp_bf16_run, "eval"), rows(one, "eval"), strict=True):
        assert x["val_loss"] == pytest.approx(y["val_loss"], rel=0.02)
    # the final folder holds fp32 weights gathered from the shards, whatever FSDP computed in
    assert {t.dtype for t in load_file(fsdp_bf16_run / "final" / "model.safetensors").values()} == {torch.float32}


def test_fsdp2_bf16_resume_is_exact_and_a_truncated_shard_is_skipped(fsdp_bf16_run, data, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(fsdp_bf16_run, out)
    # the newest checkpoint loses the end of rank 1's model shard (a subfolder file), and the run its final folder
    shard = out / "checkpoints" / "step_000010" / "pytorch_model_fsdp_0" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])
    shutil.rmtree(out / "final")
    (out / "run_summary.json").unlink()
    log = launch(data, out, *BF16, "--resume", "true", launcher=FSDP_BF16)
    assert "pytorch_model_fsdp_0/__1_0.distcp has" in log and "skipping it" in log
    assert re.search(r"resumed from \S*step_000005 at step 5", log)
    assert [r["loss"] for r in rows(out, "train")] == [r["loss"] for r in rows(fsdp_bf16_run, "train")]
    a, b = load_file(out / "final" / "model.safetensors"), load_file(fsdp_bf16_run / "final" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "run_summary.json").read_text())["steps"] == STEPS
