"""How long a checkpoint stalls training: today's save (pretrain.py's `Checkpointer.save`: accelerate's `save_state`,
atomic rename, size list) against torch.distributed.checkpoint's `async_save`, which returns once the state is
staged (copied off the training tensors) and writes in the background.

    PYTHONPATH=. python bench/bench_checkpoint.py                       # 124M, AdamW state, on the CPU
    PYTHONPATH=. python bench/bench_checkpoint.py --preset tiny --repeats 2

Counts: the model and AdamW (one step taken, so its two moment buffers exist) on `--device`; each method saves the
same step `--repeats` times into a fresh folder under `--dir`; "stall" is the time until the call returns to the
training loop, "total" until the files are on disk (for async, `future.result()`); the size is what lands on disk.
Prints one Markdown table (median over repeats).
"""

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def build(preset: str, device: str):
    from configuration_gpt2custom import GPT2CustomConfig
    from gpt2custom.training import build_optimizers
    from modeling_gpt2custom import GPT2CustomForCausalLM

    torch.manual_seed(0)
    model = GPT2CustomForCausalLM(GPT2CustomConfig.from_preset(preset)).to(device).train()
    (optimizer,) = build_optimizers(model, fused=False)
    for p in model.parameters():  # one step with made-up gradients: AdamW's moment buffers now exist
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def today(model, optimizer, root: Path, step: int):
    """pretrain.py's save, as it runs there (one process: no collectives to wait for)."""
    from accelerate import Accelerator

    from gpt2custom.resume import Checkpointer

    acc = Accelerator(cpu=next(model.parameters()).device.type == "cpu")
    prepared_model, prepared_opt = acc.prepare(model, optimizer)
    checkpointer = Checkpointer(acc, root, model, keep=1)
    began = time.perf_counter()
    checkpointer.save(step)
    seconds = time.perf_counter() - began
    return seconds, seconds, root / f"step_{step:06d}"


def dcp_async(model, optimizer, root: Path, step: int):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    folder = root / f"dcp_{step:06d}"
    began = time.perf_counter()
    future = dcp.async_save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))
    stall = time.perf_counter() - began
    future.result()
    return stall, time.perf_counter() - began, folder


def dcp_sync(model, optimizer, root: Path, step: int):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    folder = root / f"dcps_{step:06d}"
    began = time.perf_counter()
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))
    seconds = time.perf_counter() - began
    return seconds, seconds, folder


def copy_only(model, optimizer, root: Path, step: int):
    """The floor of any asynchronous save's stall: one copy of every tensor into fresh (host) memory."""
    tensors = list(model.state_dict().values()) + [v for state in optimizer.state.values() for v in state.values()
                                                    if torch.is_tensor(v)]  # fmt: skip
    began = time.perf_counter()
    copies = [t.detach().to("cpu", copy=True) for t in tensors]
    seconds = time.perf_counter() - began
    root.mkdir(parents=True, exist_ok=True)
    del copies
    return seconds, seconds, root


METHODS = {"today (accelerate save_state)": today, "dcp.save": dcp_sync, "dcp.async_save": dcp_async,
           "copy to host memory only (async floor)": copy_only}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, optimizer = build(args.preset, args.device)
    n_params = sum(p.numel() for p in model.parameters())
    base = Path(args.dir or tempfile.mkdtemp(prefix="bench_checkpoint_"))
    rows = []
    for name, method in METHODS.items():
        stalls, totals, size = [], [], 0.0
        for repeat in range(args.repeats):
            root = base / f"{name.split()[0]}_{repeat}"
            shutil.rmtree(root, ignore_errors=True)
            stall, total, folder = method(model, optimizer, root, step=repeat + 1)
            stalls.append(stall)
            totals.append(total)
            size = folder_mb(folder)
            shutil.rmtree(root, ignore_errors=True)
        rows.append((name, size, statistics.median(stalls), statistics.median(totals)))
    print(f"\n{args.preset}: {n_params:,} parameters + AdamW state on {args.device}, median of {args.repeats}, "
          f"written to {base}\n")  # fmt: skip
    print("| method | size MB | stall s (training waits) | total s (on disk) |")
    print("|---|---|---|---|")
    for name, size, stall, total in rows:
        print(f"| {name} | {size:,.0f} | {stall:.2f} | {total:.2f} |")
    shutil.rmtree(base, ignore_errors=True) if args.dir is None else None


if __name__ == "__main__":
    main()
