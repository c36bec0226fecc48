"""Do the 2-rank entry points always exit? Each one launched N times in a row on 2 gloo ranks under a deadline.

Issue 14: `sft.py` on 2 gloo ranks sometimes never exited (a rank deadlocked in interpreter teardown, see
`gpt2custom/distributed.py`). This runs each entry point `--runs` times with
`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2` on tiny local inputs it makes itself (a tiny
random checkpoint, a chat JSONL of greetings, a HellaSwag-format jsonl), and counts:

  exits   the launch ended by itself with exit code 0 before `--timeout`
  failed  it ended by itself with another exit code (the log's tail is printed)
  hangs   it was still running at `--timeout`: the stacks of its ranks are printed (py-spy when installed, else
          faulthandler), then it is killed

and the wall seconds of the runs (median, max). Not part of CI: 10 runs of both entries take several minutes.

    PYTHONPATH=. python bench/bench_multiprocess_exit.py --runs 10                  # sft and eval
    PYTHONPATH=. python bench/bench_multiprocess_exit.py --entries sft --runs 3 --timeout 300
    PYTHONPATH=. python bench/bench_multiprocess_exit.py --repo /path/to/other/checkout   # e.g. before a fix

Adding an entry point (pretraining): write `<name>_args(inputs, out_dir) -> [script, *args]` below, using or adding
to `make_inputs`, and register it in ENTRIES.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # gpt2custom and the model files, from any working directory

NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Olivia"]


def make_inputs(folder: Path) -> dict[str, Path]:
    """A tiny random checkpoint, a chat JSONL and a HellaSwag-format jsonl, written once into `folder`."""
    import torch

    from configuration_gpt2custom import GPT2CustomConfig
    from gpt2custom.checkpoints import save_model_folder
    from gpt2custom.tokenizer import load_tokenizer
    from modeling_gpt2custom import GPT2CustomForCausalLM

    inputs = {"checkpoint": folder / "tiny", "chat": folder / "chat.jsonl", "hellaswag": folder / "hellaswag.jsonl"}
    if not inputs["checkpoint"].exists():
        torch.manual_seed(0)
        model = GPT2CustomForCausalLM(GPT2CustomConfig.from_preset("tiny", initializer_range=0.2))
        save_model_folder(model, inputs["checkpoint"], load_tokenizer())
    rows = []
    for name in NAMES:
        messages = [{"role": "user", "content": f"Say hello to {name}."},
                    {"role": "assistant", "content": "Hello! I am a tiny model."}]
        rows.append({"messages": messages})
        rows.append({"messages": [*messages, {"role": "user", "content": "Again."},
                                  {"role": "assistant", "content": "Hello again!"}]})
    inputs["chat"].write_text("".join(json.dumps(row) + "\n" for row in rows))
    examples = []
    for i, name in enumerate(NAMES):
        ctx_a = f"{name} walks into the kitchen and picks up a kettle."
        endings = [f"{name} fills it with water.", "The kettle flies away.", f"{name} sings to the moon.",
                   "A car drives past."]
        examples.append({"ind": i, "activity_label": "Making tea", "ctx_a": ctx_a, "ctx_b": "then",
                         "ctx": f"{ctx_a} then", "endings": endings, "label": 0, "split": "val",
                         "split_type": "indomain", "source_id": f"bench~{i}"})
    inputs["hellaswag"].write_text("".join(json.dumps(e) + "\n" for e in examples))
    inputs["shards"] = folder / "shards"
    if not (inputs["shards"] / "manifest.json").exists():
        subprocess.run([sys.executable, "prepare_data.py", "--source", "stdlib", "--max_tokens", "60000",
                        "--val_tokens", "6000", "--shard_size", "30000", "--num_proc", "1", "--out_dir",
                        str(inputs["shards"])], cwd=REPO, check=True, capture_output=True)  # fmt: skip
    return inputs


def sft_args(inputs: dict, out_dir: Path) -> list[str]:
    """sft.py as tests/test_sft.py runs it: the smoke config, few steps, a held-out split, a final evaluation."""
    return ["sft.py", "--config", "configs/sft-smoke.yaml", "--model_name_or_path", str(inputs["checkpoint"]),
            "--dataset_name", str(inputs["chat"]), "--output_dir", str(out_dir), "--max_steps", "10",
            "--gradient_accumulation_steps", "1", "--eval_size", "2", "--eval_steps", "1000", "--logging_steps", "5"]


def eval_args(inputs: dict, out_dir: Path) -> list[str]:
    """eval_hellaswag.py on both conventions of the local examples."""
    return ["eval_hellaswag.py", "--models", str(inputs["checkpoint"]), "--hellaswag_path", str(inputs["hellaswag"]),
            "--batch_size", "4", "--cpu", "true", "--out_dir", str(out_dir)]


# name -> (what it runs, its arguments). The pretraining entry (pretrain.py) goes here.
def pretrain_args(inputs: dict, out_dir: Path) -> list[str]:
    """pretrain.py on the tiny preset: 6 steps with validation, HellaSwag, samples and checkpoints on both ranks."""
    return ["pretrain.py", "--model_preset", "tiny", "--block_size", "32", "--micro_batch_size", "4",
            "--total_batch_size", "256", "--max_steps", "6", "--warmup_steps", "2", "--precision", "fp32",
            "--compile", "false", "--cpu", "true", "--data_dir", str(inputs["shards"]), "--hellaswag_path",
            str(inputs["hellaswag"]), "--eval_interval", "3", "--hellaswag_interval", "3", "--eval_batches", "2",
            "--sample_interval", "3", "--checkpoint_interval", "3", "--report_to", "none", "--output_dir",
            str(out_dir)]  # fmt: skip


ENTRIES = {
    "pretrain": pretrain_args,
    "sft": sft_args,
    "eval": eval_args,
}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(repo: Path, script_args: list[str], timeout: float) -> tuple[str, float, str]:
    """One 2-rank launch: ("exit" | "failed" | "hang", wall seconds, log)."""
    from gpt2custom.distributed import run_with_deadline

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), *script_args]
    env = {**os.environ, "PYTHONPATH": str(repo), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONFAULTHANDLER": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    try:
        proc = run_with_deadline(cmd, timeout, cwd=repo, env=env)
    except subprocess.TimeoutExpired as e:
        return "hang", time.perf_counter() - start, f"{e.output}\n{e.stderr}"
    seconds = time.perf_counter() - start
    return ("exit" if proc.returncode == 0 else "failed"), seconds, proc.stdout + proc.stderr


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", nargs="+", default=list(ENTRIES), choices=list(ENTRIES))
    parser.add_argument("--runs", type=int, default=10, help="launches per entry point, one after the other")
    parser.add_argument("--timeout", type=float, default=300, help="seconds before a launch counts as hung")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose scripts run (default: this one)")
    parser.add_argument("--workdir", type=Path, default=None, help="inputs and outputs (default: a temporary folder)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_exit_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        inputs = make_inputs(work)
        rows = []
        for name in args.entries:
            outcomes, seconds = [], []
            for run in range(args.runs):
                outcome, wall, log = launch(args.repo.resolve(), ENTRIES[name](inputs, work / f"{name}-{run}"),
                                            args.timeout)
                outcomes.append(outcome)
                seconds.append(wall)
                print(f"{name} run {run + 1}/{args.runs}: {outcome} after {wall:.1f} s", flush=True)
                if outcome != "exit":
                    (work / f"{name}-{run}.log").write_text(log)
                    print(log[-6000:], flush=True)
            rows.append((name, outcomes, seconds))

    print(f"\n{args.runs} runs per entry point, timeout {args.timeout:.0f} s, repo {args.repo.resolve()}\n")
    print("| entry | runs | exits | failed | hangs | median s | max s |")
    print("|---|---|---|---|---|---|---|")
    for name, outcomes, seconds in rows:
        print(f"| {name} | {len(outcomes)} | {outcomes.count('exit')} | {outcomes.count('failed')} | "
              f"{outcomes.count('hang')} | {statistics.median(seconds):.1f} | {max(seconds):.1f} |")


if __name__ == "__main__":
    main()
