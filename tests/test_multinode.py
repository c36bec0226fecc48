"""Two "nodes" on 127.0.0.1 (`accelerate launch --num_machines 2`), each with its own output folder as on machines
without a shared filesystem: checkpoints land on both, a resume continues together to the losses of the
uninterrupted run, and nodes that see different checkpoints both stop with the same message instead of hanging."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, free_port, text_shards

RUN = [
    "--model_preset", "tiny", "--block_size", "32", "--micro_batch_size", "4", "--total_batch_size", "256",
    "--max_steps", "8", "--warmup_steps", "2", "--learning_rate", "3e-3", "--precision", "fp32", "--compile", "false",
    "--cpu", "true", "--eval_interval", "4", "--eval_batches", "2", "--hellaswag_interval", "0",
    "--sample_interval", "0", "--checkpoint_interval", "4", "--keep_checkpoints", "2", "--report_to", "none",
]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory, real_text):
    return text_shards(tmp_path_factory.mktemp("corpus"), real_text[:200_000])


def launch_two_nodes(shards, outs, *extra, timeout=240):
    """Both node processes at once; returns their CompletedProcess-like (returncode, output) pairs."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    procs = []
    for rank, out in enumerate(outs):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
               "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
               "pretrain.py", "--data_dir", str(shards), "--output_dir", str(out), *RUN, *extra]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))  # fmt: skip
    results = []
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("a node hung")
        results.append((proc.returncode, output))
    return results


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def kill_after_step_4(out):
    """What a kill after the step-4 checkpoint leaves on one node's disk."""
    shutil.rmtree(out / "checkpoints" / "step_000008")
    shutil.rmtree(out / "final", ignore_errors=True)
    (out / "run_summary.json").unlink(missing_ok=True)


@pytest.mark.slow
def test_nodes_without_a_shared_disk_checkpoint_and_resume_together(shards, tmp_path):
    outs = [tmp_path / "node0", tmp_path / "node1"]
    for code, output in launch_two_nodes(shards, outs):
        assert code == 0, output[-3000:]
    straight = losses(outs[0])
    for out in outs:  # every node holds a complete checkpoint of its own
        assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_000004", "step_000008"]
        assert (out / "checkpoints" / "step_000008" / "model.safetensors").exists()

    for out in outs:
        kill_after_step_4(out)
    for code, output in launch_two_nodes(shards, outs, "--resume", "true"):
        assert code == 0, output[-3000:]
        assert "resumed from" in output and "step_000004" in output
    resumed = losses(outs[0])
    assert sorted(resumed) == list(range(1, 9))
    assert max(abs(resumed[s] - straight[s]) for s in straight) < 1e-6

    # Node 1 lost its checkpoints: both stop at start-up with the same message, neither trains alone.
    kill_after_step_4(outs[0])
    shutil.rmtree(outs[1] / "checkpoints")
    results = launch_two_nodes(shards, outs, "--resume", "true")
    for code, output in results:
        assert code != 0
        assert "the ranks see different checkpoints" in output, output[-3000:]
        assert 'pretrain.py", line' not in output  # our one line; the launcher adds its own exit report
