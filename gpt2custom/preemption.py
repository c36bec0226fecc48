"""Stopping a run for a preemption notice or a time budget: every rank stops at the same point, one complete
checkpoint is written, and the process exits with `EXIT_PREEMPTED` (75, sysexits' EX_TEMPFAIL: "try again later").

Spot and preemptible machines are taken back with a notice: SIGTERM, then a hard kill up to 30-120 s later;
Kubernetes sends SIGTERM to the container's first process; SLURM sends a chosen signal (`--signal=B:USR1@120`).

- The signals (a setting, SIGTERM and SIGUSR1 by default) only set a flag on the rank that receives them. The ranks
  agree on it with one all-reduce of that flag, on a gloo group of their own (a host-side collective: the GPUs are
  never made to wait), at points every rank passes the same number of times: each micro-step boundary, each forward
  of the model while evaluating, scoring HellaSwag or sampling. So all ranks stop together, whichever rank or
  launcher got the signal.
- The same signal again within `DUPLICATE_WINDOW_S` is the same notice (a machine shutdown signals every process,
  and the launcher forwards its own copy). Later, before the checkpoint is complete, it means "now": the process
  dies of that signal at once, and the previous complete checkpoint stays the latest (saves are atomic). After the
  checkpoint is complete any signal ends the process with `EXIT_PREEMPTED`.
- `deadline_s` bounds the time from the notice to the exit: a save that the last save's duration says would not
  fit is skipped, and a watchdog ends the process at the deadline whatever it is doing.
- Under torchrun (`accelerate launch` with several processes) the launcher exits 128 + the signal it got (143 for
  SIGTERM). When the launcher did not send the notice to all of its ranks (a signal to one rank, `max_time`),
  its first local rank sends it SIGTERM once the checkpoint is complete, so that the launcher, too, exits 143 rather
  than 1 (a crash). A rank whose launcher has gone (killed) stops like on a notice instead of training on alone.
"""

import os
import signal
import sys
import threading
import time

import torch

EXIT_PREEMPTED = 75
DUPLICATE_WINDOW_S = 2.0
# After telling the launcher, how long a rank waits for the launcher's own SIGTERM before it exits by itself.
LAUNCHER_ECHO_WAIT_S = 10.0


class Preempted(Exception):
    """Raised inside evaluation, HellaSwag or sampling when the ranks have agreed to stop."""


def parse_signals(names: str) -> list[signal.Signals]:
    """"SIGTERM,SIGUSR1" -> the signals; an unknown name is one clear error."""
    out = []
    for name in filter(None, (n.strip().upper() for n in str(names).split(","))):
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name in ("SIGKILL", "SIGSTOP") or not hasattr(signal.Signals, name):
            raise ValueError(f"preempt_signals={names!r}: {name} is not a signal a process can catch (expected names "
                             f"such as SIGTERM,SIGUSR1)")  # fmt: skip
        out.append(signal.Signals[name])
    return out


class Notice:
    """The run's stop flag. Every rank makes one, installs it, and calls `should_stop()` (or `check()`) at the same
    points; `reason` (None until then) is then set on every rank at the same call. `max_time` counts from this
    start."""

    def __init__(self, accelerator, signals=(signal.SIGTERM, signal.SIGUSR1), max_time: float | None = None,
                 deadline_s: float | None = None):  # fmt: skip
        self.acc, self.signals, self.max_time, self.deadline_s = accelerator, list(signals), max_time, deadline_s
        self.started = time.monotonic()
        self.received: float | None = None  # when this process got its first signal
        self.signum: int | None = None
        self.reason: str | None = None  # set on every rank once they agree
        self.agreed_at: float | None = None
        self.saved = False  # the checkpoint is complete: any signal may end the process now
        self.torchrun = bool(os.environ.get("TORCHELASTIC_RUN_ID")) and accelerator.num_processes > 1
        self.parent = os.getppid()
        self.group = None
        if accelerator.num_processes > 1:
            # every rank creates the group (a collective); gloo whatever the default backend is, so the flag stays
            # on the host
            self.group = torch.distributed.new_group(backend="gloo")
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._wants = torch.zeros(3, dtype=torch.int32)  # what any rank saw: its signal, its launcher gone, max_time

    # ------------------------------------------------------------------ signals
    def install(self):
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.signals}

    def uninstall(self):
        """The handlers from before `install` (a run inside a longer-lived process, such as a test)."""
        for sig, handler in getattr(self, "_previous", {}).items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum, frame):
        now = time.monotonic()
        if self.saved:
            os._exit(EXIT_PREEMPTED)
        if self.received is None:
            self.received, self.signum = now, signum
            print(f"{signal.Signals(signum).name}: every rank stops at its next check, after a checkpoint",
                  file=sys.stderr, flush=True)  # fmt: skip
            return
        if now - self.received < DUPLICATE_WINDOW_S:
            return  # the same notice, delivered twice
        print(f"{signal.Signals(signum).name} again: stopping now; the last complete checkpoint stays",
              file=sys.stderr, flush=True)  # fmt: skip
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    # ------------------------------------------------------------------ the flag
    def _local_wants(self) -> list[int]:
        """What this process alone sees (no collective): [its signal's number or 0, launcher gone, max_time spent]."""
        return [self.signum or 0, int(self.torchrun and os.getppid() != self.parent),
                int(self.max_time is not None and time.monotonic() - self.started >= self.max_time)]

    def should_stop(self) -> bool:
        """True on every rank once any rank wants to stop. A collective: every rank calls it at the same points."""
        if self.reason is not None:
            return True
        wants = self._local_wants()
        if self.group is not None:
            self._wants.copy_(torch.tensor(wants, dtype=torch.int32))
            torch.distributed.all_reduce(self._wants, op=torch.distributed.ReduceOp.MAX, group=self.group)
            wants = self._wants.tolist()  # a host tensor: no device sync
        signum, launcher_gone, out_of_time = wants
        if signum:
            self.reason = signal.Signals(signum).name
        elif launcher_gone:
            self.reason = "the launcher has exited"
        elif out_of_time:
            self.reason = f"max_time={self.max_time:g} s reached"
        else:
            return False
        self.agreed_at = time.monotonic()
        self._start_watchdog()
        return True

    def check(self):
        if self.should_stop():
            raise Preempted(self.reason)

    def watch(self, module: torch.nn.Module):
        """A forward pre-hook on `module` that checks the flag before each forward (remove the handle after): every
        rank makes the same forwards in evaluation, HellaSwag and sampling, so the check stays collective. Prepended,
        so that it runs before a sharded module gathers its parameters."""
        return module.register_forward_pre_hook(lambda mod, args: self.check(), prepend=True)

    # ------------------------------------------------------------------ deadline
    def seconds_since_notice(self) -> float:
        start = self.received if self.received is not None else self.agreed_at
        return time.monotonic() - start if start is not None else 0.0

    def save_fits(self, expected_save_s: float | None) -> bool:
        """Whether a save that took `expected_save_s` last time still fits in the deadline on every rank (unknown: it
        is tried). A collective, so that the ranks all save or all skip."""
        fits = (self.deadline_s is None or expected_save_s is None
                or self.seconds_since_notice() + expected_save_s <= self.deadline_s)  # fmt: skip
        if self.group is not None:
            self._flag.fill_(not fits)
            torch.distributed.all_reduce(self._flag, group=self.group)
            fits = not self._flag.item()
        return fits

    def _start_watchdog(self):
        if self.deadline_s is None:
            return
        left = max(0.0, self.deadline_s - self.seconds_since_notice())

        def expire():
            print(f"preempt_deadline_s={self.deadline_s:g} reached: exiting now; the last complete checkpoint stays",
                  file=sys.stderr, flush=True)  # fmt: skip
            os._exit(EXIT_PREEMPTED)

        timer = threading.Timer(left, expire)
        timer.daemon = True
        timer.start()

    # ------------------------------------------------------------------ the end
    def finish(self):
        """After the checkpoint is complete, on every rank: tell a torchrun launcher that did not send the notice to
        all of its ranks (so it exits 128 + SIGTERM, not 1), then return; the caller exits with EXIT_PREEMPTED."""
        self.saved = True
        if not self.torchrun or os.getppid() != self.parent:
            return
        from accelerate.utils import gather_object

        node = os.environ.get("GROUP_RANK", "0")
        got = gather_object([(node, self.received is not None)])
        if all(received for n, received in got if n == node):
            return  # the launcher (or the machine) signalled every rank of this node: it is shutting down already
        if self.acc.is_local_main_process:
            os.kill(self.parent, signal.SIGTERM)
        deadline = time.monotonic() + LAUNCHER_ECHO_WAIT_S
        while time.monotonic() < deadline:  # the launcher's SIGTERM ends this process (see _on_signal)
            time.sleep(0.05)


# ---------------------------------------------------------------------- a step abandoned between micro-steps


def step_start(loader) -> dict:
    """What a training step changes before its optimizer step: the loader's position and the random streams
    (dropout). Host-side copies only (the CUDA generator's state is its seed and offset), so no device sync."""
    state = {"loader_step": loader.step, "cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rewind_step(loader, state: dict):
    """Back to `step_start`'s state: the abandoned step's batches and random numbers are drawn again on resume."""
    loader.step = state["loader_step"]
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
