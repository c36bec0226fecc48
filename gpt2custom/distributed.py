"""Ending a multi-process run in order, and running one under a deadline that shows where a rank is stuck.

Why `shutdown` exists (issue 14: 2-rank `sft.py` sometimes never exited; 1 of 10 launches here, 2 of 3 fresh CI
runs). `torch.distributed.destroy_process_group()`, which `Trainer.end()` and `Accelerator.end_training()` call, only
unregisters the process groups; a gloo group that DDP's reducer still references keeps its worker threads. They are
joined when the DDP wrapper is freed, which for a Trainer happens when `main` returns: on the main thread, in the
reducer's destructor, with the GIL held. A worker that has just run an all-gather frees the work's tensors at that
moment; they have Python objects, so it waits for the GIL while the main thread waits for it (native stacks:
`Reducer::~Reducer -> ProcessGroupGloo::~ProcessGroupGloo -> thread::join` against
`AsyncAllgatherWork::~AsyncAllgatherWork -> decref_pyobject -> gil_scoped_acquire`). That rank never exits, its peer
has, and the launcher waits forever. `shutdown` puts a barrier and a pause with the GIL released after the last
collective, so every worker is idle, and then frees the wrappers and the group itself, so the join happens there.

`run_with_deadline` is for tests and benchmarks that launch ranks: past the deadline it prints the stacks of every
process the launch started (py-spy when installed, else faulthandler through SIGABRT) and kills them.
"""

import gc
import os
import shutil
import signal
import subprocess
import time

import torch

# After the barrier: time for gloo worker threads to take the GIL and drop their last tensors (they need it briefly).
SETTLE_SECONDS = 0.5


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def shutdown(owner=None) -> None:
    """End this process's distributed state, in order. Call it on every rank, once, as the last thing that involves
    the other ranks (after training, evaluation, saving, push_to_hub); the owner cannot train afterwards.

    `owner`: the run's `transformers.Trainer` (TRL's trainers included), `accelerate.Accelerator`, or None (a bare
    `PartialState` / `torch.distributed` run). In order: a barrier; a pause with the GIL released, so the gloo
    workers finish their last frees; the owner's own end (`Trainer.end` / `Accelerator.end_training`: trackers
    finished, groups unregistered); the DDP-wrapped models, optimizers and dataloaders it holds dropped and
    collected, whose reducers held the last reference to the group, so its worker threads are joined here; then any
    group still registered destroyed. Without a process group only the owner's end and the freeing run.
    A wrapped model the caller still holds keeps its reducer and thereby the group's threads (harmless once the
    workers are idle, but joined only at exit): drop such references first.
    """
    if _distributed():
        torch.distributed.barrier()  # no rank tears down while another still sends to it
        time.sleep(SETTLE_SECONDS)
    end = getattr(owner, "end", None) or getattr(owner, "end_training", None)
    if end is not None:
        end()
    if owner is not None and hasattr(owner, "model_wrapped"):  # a Trainer: its references to the DDP wrapper
        owner.model_wrapped = owner.model
        owner.optimizer = owner.lr_scheduler = None
    accelerator = getattr(owner, "accelerator", owner)
    if hasattr(accelerator, "free_memory"):
        accelerator.free_memory()  # the prepared (wrapped) models, optimizers, schedulers and dataloaders
    gc.collect()  # wrappers sit in reference cycles: their reducers go now, not in interpreter teardown
    if _distributed():  # owner None, or an end that left the group registered
        torch.distributed.destroy_process_group()
        gc.collect()


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after "pid (comm)": state, ppid, ...; None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def _descendants(root: int) -> list[int]:
    """Pids of every process below `root` (Linux /proc). Not a session or group: torchrun starts each rank in a
    session of its own."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def dump_stacks(pids: list[int]) -> str:
    """The stacks of these processes: with py-spy (Python and native frames) as text returned here; without it
    through SIGABRT to each process, which then prints its Python stacks (every thread) to its stderr when it runs
    with PYTHONFAULTHANDLER=1, and dies."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGABRT)
            except ProcessLookupError:
                pass
        return f"sent SIGABRT to {pids} (no py-spy): faulthandler's stacks are in their stderr above\n"
    out = []
    for pid in pids:
        dump = subprocess.run([py_spy, "dump", "--native", "--pid", str(pid)], capture_output=True, text=True,
                              timeout=60)
        out.append(f"--- py-spy dump --native --pid {pid}\n{dump.stdout}{dump.stderr}")
    return "\n".join(out)


def run_with_deadline(cmd: list[str], timeout: float, **popen_kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)`, bounded. Past `timeout` seconds the stacks of the
    processes `cmd` started (the ranks under a launcher) are dumped (`dump_stacks`), every process of the tree is
    killed, and `subprocess.TimeoutExpired` is raised with `.output` = stdout and `.stderr` = stderr followed by the
    stacks. Set PYTHONFAULTHANDLER=1 in the env for stacks without py-spy."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            below = _descendants(proc.pid)
            stacks = dump_stacks([pid for pid in below if _alive(pid)] or [proc.pid])
            deadline = time.monotonic() + 10
            while shutil.which("py-spy") is None and time.monotonic() < deadline and any(map(_alive, below)):
                time.sleep(0.1)  # SIGABRT'ed processes write their stacks to the pipe before the kill
            for pid in [proc.pid, *_descendants(proc.pid), *below]:  # a rank may outlive its launcher: every pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            stdout, stderr = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr + "\n" + stacks) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
