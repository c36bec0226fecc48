"""What a training run tells its user, kept out of the training loop: the step counters (saved with each
checkpoint), the timing window, the metrics row, throughput, MFU, dollars and the progress bar.

Two clocks: `train_seconds` counts only training steps (tokens/s and MFU come from it), `wall_seconds` counts
everything since the run began, evaluation and checkpoints included (a user's bill does, so dollars come from it).
Both continue across resumes. The loss is read from the device once per logged step, never in between.
"""

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gpt2custom.metrics import dollars, mfu


class RunProgress:
    """Step, tokens, both clocks and the last evaluation; saved with each checkpoint through accelerate's
    `register_for_checkpointing`, so a resumed run continues its counters (and can still finish its summary)."""

    def __init__(self):
        self.step, self.tokens, self.train_seconds, self.wall_seconds = 0, 0, 0.0, 0.0
        self.last_eval: dict = {}
        # the evaluation / samples / checkpoint due after `step` are not done yet (a notice stopped them)
        self.after_step_pending = False

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "train_seconds": self.train_seconds,
                "wall_seconds": self.wall_seconds, "last_eval": dict(self.last_eval),
                "after_step_pending": self.after_step_pending}  # fmt: skip

    def load_state_dict(self, state: dict):
        self.step, self.tokens, self.train_seconds = state["step"], state["tokens"], state["train_seconds"]
        self.wall_seconds = state.get("wall_seconds", self.train_seconds)  # checkpoints from before the wall clock
        self.last_eval = dict(state.get("last_eval") or {})
        self.after_step_pending = bool(state.get("after_step_pending", False))


class RunLogger:
    """Counts the steps of `progress`, times them, and writes metrics.jsonl, the tracker and the progress bar."""

    def __init__(self, out_dir, accelerator, progress: RunProgress, *, tokens_per_step: int, max_steps: int,
                 flops_per_token: float, peak_flops: float | None, price_per_gpu_hour: float | None,
                 log_interval: int = 1, max_time: float | None = None):  # fmt: skip
        self.out, self.acc, self.progress, self.max_time = Path(out_dir), accelerator, progress, max_time
        self.tokens_per_step, self.max_steps, self.log_interval = tokens_per_step, max_steps, log_interval
        self.flops_per_token, self.peak, self.price = flops_per_token, peak_flops, price_per_gpu_hour
        self.bar = None

    # ------------------------------------------------------------------ clocks
    def start(self):
        """Start both clocks (and this start's `max_time` budget, shown in the progress bar)."""
        self._wall_base, self._wall_start = self.progress.wall_seconds, time.perf_counter()
        self._window_seconds, self._window_steps, self._window_start = 0.0, 0, time.perf_counter()
        self.bar = tqdm(total=self.max_steps, initial=self.progress.step, desc="pretrain",
                        disable=not self.acc.is_local_main_process)  # fmt: skip

    def _sync(self):
        if self.acc.device.type == "cuda":
            torch.cuda.synchronize(self.acc.device)

    def update_wall(self):
        self.progress.wall_seconds = self._wall_base + time.perf_counter() - self._wall_start

    def stop(self):
        """Stopping early: the training time since the last logged step is kept (it is saved with the checkpoint),
        and the progress bar closes."""
        self._sync()
        self.progress.train_seconds += self._window_seconds + time.perf_counter() - self._window_start
        self._window_seconds, self._window_steps, self._window_start = 0.0, 0, time.perf_counter()
        self.update_wall()
        self.close()

    @contextmanager
    def not_training(self):
        """Evaluation, sampling and checkpoints: wall time, but not training time (tokens/s leaves them out). Enter
        it only when one of them runs: it waits for the device."""
        self._sync()
        self._window_seconds += time.perf_counter() - self._window_start
        try:
            yield
        finally:
            self.update_wall()
            self._window_start = time.perf_counter()

    # ------------------------------------------------------------------ steps
    def step(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, lr: float) -> float | None:
        """Count one optimizer step; on logged steps (and the last) read the loss, write the row and return it."""
        progress = self.progress
        progress.step += 1
        progress.tokens += self.tokens_per_step
        self._window_steps += 1
        self.bar.update(1)
        if progress.step % self.log_interval and progress.step != self.max_steps:
            return None
        loss_value = self.acc.reduce(loss.detach(), "mean").item()  # the one host sync per logged step
        self._sync()
        seconds = self._window_seconds + time.perf_counter() - self._window_start
        progress.train_seconds += seconds
        self.update_wall()
        tok_s = self.tokens_per_step * self._window_steps / max(seconds, 1e-9)
        self._window_seconds, self._window_steps, self._window_start = 0.0, 0, time.perf_counter()
        row = {"kind": "train", "step": progress.step, "loss": loss_value, "lr": lr,
               "grad_norm": float(grad_norm) if grad_norm is not None else None, "tokens": progress.tokens,
               "tokens_per_s": tok_s, "train_s": progress.train_seconds, "wall_s": progress.wall_seconds}  # fmt: skip
        util = mfu(tok_s / self.acc.num_processes, self.flops_per_token, self.peak)
        spent = dollars(progress.wall_seconds, self.acc.num_processes, self.price)
        row.update({k: v for k, v in (("mfu", util), ("dollars", spent)) if v is not None})
        self.log(row)
        postfix = {"loss": f"{loss_value:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tok_s:,.0f}"}
        if util is not None:
            postfix["mfu"] = f"{util:.1%}"
        if spent is not None:
            postfix["$"] = f"{spent:.2f}"
        if self.max_time is not None:  # this start's budget: at 0 the run checkpoints and stops
            left = max(0, int(self.max_time - (time.perf_counter() - self._wall_start)))
            postfix["left"] = f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
        self.bar.set_postfix(postfix, refresh=False)
        return loss_value

    # ------------------------------------------------------------------ output
    def log(self, row: dict):
        """One JSON line in metrics.jsonl and the tracker (main process only)."""
        if self.acc.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, int | float) and k != "step"}
        self.acc.log(scalars, step=row["step"])

    def write(self, text: str):
        """A line above the progress bar, printed once (main process), not once per rank."""
        if self.acc.is_main_process:
            (self.bar.write if self.bar is not None else print)(text)

    def eval_row(self, row: dict):
        self.log(row)
        self.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def close(self):
        if self.bar is not None:
            self.bar.close()

    def summary(self) -> dict:
        """Throughput from training time, dollars from wall time."""
        p = self.progress
        tok_s = p.tokens / p.train_seconds if p.train_seconds else None
        per_gpu = tok_s / self.acc.num_processes if tok_s else None
        return {
            "tokens": p.tokens,
            "steps": p.step,
            "train_time_s": p.train_seconds,
            "wall_time_s": p.wall_seconds,
            "tokens_per_s": tok_s,
            "mfu": mfu(per_gpu, self.flops_per_token, self.peak) if per_gpu else None,
            "flops_per_token": self.flops_per_token,
            "num_processes": self.acc.num_processes,
            "dollars": dollars(p.wall_seconds, self.acc.num_processes, self.price),
        }


def format_summary(summary: dict) -> str:
    """The run's last lines: validation loss (with the unigram baseline when computed), then throughput and cost."""
    lines = []
    if summary.get("val_loss") is not None:
        line = f"val loss {summary['val_loss']:.4f}"
        if summary.get("unigram_val_loss") is not None:
            line += f" (unigram baseline {summary['unigram_val_loss']:.4f})"
        lines.append(line)
    line = f"{summary['tokens']:,} tokens, {summary['wall_time_s']:.1f} s wall"
    if summary.get("tokens_per_s"):
        line += f", {summary['tokens_per_s']:,.0f} tok/s while training"
    if summary.get("mfu"):
        line += f", MFU {summary['mfu']:.1%}"
    if summary.get("dollars") is not None and math.isfinite(summary["dollars"]):
        line += f", ${summary['dollars']:.2f}"
    lines.append(line)
    return "\n".join(lines)
