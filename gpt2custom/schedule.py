"""The journey as a graph: which stages may run at the same time, on the estimate's clock (`simulate`) and for real
(`run_graph`).

One policy for both. A stage starts when every stage it reads (`Stage.reads`) has finished; stages that use the
devices (training, evaluation, generation: `DEVICE_STAGES`) take turns, since two `accelerate launch` runs on the
same GPUs would fight over their memory and ports; a stage that needs no device (data preparation, chat data through
an API or from docstrings) runs beside anything. Ready stages start in the journey's order (STAGES), so the
commands print in a fixed order. With the seed's journey that puts `chat_data` beside `data` + `pretrain`, and
`evaluate` before `sft`.
"""

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable

# The stages that run on the accelerators (on a CPU run: that take all its cores). The others need no GPU and can run
# on the launching machine (`--until chat_data`) before a GPU node is rented.
DEVICE_STAGES = frozenset({"pretrain", "evaluate", "sft", "chat"})


def simulate(order: list[str], seconds: dict[str, float], reads: dict[str, tuple],
             device: frozenset = DEVICE_STAGES) -> dict[str, tuple[float, float]]:
    """Each stage's (start, end) in seconds from 0 under the policy above, for the stages in `order` (a stage it
    reads that is not in `order` counts as finished at 0)."""
    times: dict[str, tuple[float, float]] = {}
    device_free = 0.0
    pending = list(order)
    while pending:
        # the next to start: the earliest ready time, ties in journey order (list scheduling, as run_graph does)
        def ready_at(name, device_free=device_free):
            at = max([times[r][1] for r in reads.get(name, ()) if r in times] + [0.0])
            return max(at, device_free) if name in device else at

        waiting = [n for n in pending if all(r in times or r not in order for r in reads.get(n, ()))]
        name = min(waiting, key=lambda n: (ready_at(n), order.index(n)))
        start = ready_at(name)
        times[name] = (start, start + max(0.0, seconds.get(name) or 0.0))
        if name in device:
            device_free = times[name][1]
        pending.remove(name)
    return times


def critical_path(times: dict[str, tuple[float, float]], reads: dict[str, tuple],
                  device: frozenset = DEVICE_STAGES) -> list[str]:
    """The chain of stages that sets the total: from the last to finish, back through whichever stage it waited
    for (a stage it reads, or the device stage before it), to one that started at 0."""
    if not times:
        return []
    name = max(times, key=lambda n: (times[n][1], -times[n][0]))
    path = [name]
    while times[name][0] > 1e-9:
        start = times[name][0]
        blockers = [r for r in reads.get(name, ()) if r in times and abs(times[r][1] - start) < 1e-6]
        if not blockers and name in device:
            blockers = [n for n in times if n in device and n != name and abs(times[n][1] - start) < 1e-6]
        if not blockers:
            break
        name = blockers[0]
        path.append(name)
    return path[::-1]


def stop_children(grace_s: float = 10.0):
    """SIGTERM to every process under this one (each running stage's whole tree), SIGKILL to what is left after
    `grace_s`. It waits without reaping: a stage's own `subprocess` call must collect its child's exit status (reaped
    here, it would read "exit 0" and record an interrupted stage as finished)."""
    import psutil  # accelerate's own dependency

    def running(p) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def wait(procs):
        deadline = time.monotonic() + grace_s
        while (procs := [p for p in procs if running(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        return procs

    tree = psutil.Process(os.getpid()).children(recursive=True)
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    for p in wait(tree):
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    wait(tree)


class Outcome:
    """What `run_graph` did: the stages that finished, the one that failed and why, those stopped because of it (or
    of a signal), and those never started."""

    def __init__(self):
        self.finished: list[str] = []
        self.failed: tuple[str, str] | None = None  # (stage, message)
        self.stopped: list[str] = []
        self.interrupted = False  # Ctrl-C or SIGTERM to the pipeline

    def failure(self) -> str | None:
        if self.interrupted:
            return (f"stopped during stage{'s' if len(self.stopped) > 1 else ''} {' and '.join(self.stopped)}; "
                    "rerun the same command to continue")
        if self.failed:
            also = f" (stopped {', '.join(self.stopped)} too)" if self.stopped else ""
            return self.failed[1] + also
        return None


def run_graph(order: list[str], reads: dict[str, tuple], run: Callable[[str], None],
              started: Callable[[str], bool] | None = None, device: frozenset = DEVICE_STAGES,
              failures: tuple = (Exception,), grace_s: float = 10.0, poll_s: float = 0.05) -> Outcome:
    """Run the stages in `order` (each through `run(name)` in its own thread) under the policy above. `started(name)`,
    if given, tells when a stage has printed its command: the next one waits for that, so the commands print in
    order. An exception of `failures` in one stage, or Ctrl-C / SIGTERM (SystemExit) in the main thread, stops every
    running stage (`stop_children`) and starts no more; what was interrupted continues when the same command runs
    again (each script's own resume)."""
    out = Outcome()
    done_q: queue.Queue = queue.Queue()
    running: dict[str, threading.Thread] = {}
    pending = list(order)
    device_busy = False
    stopping = False

    def worker(name):
        try:
            run(name)
            done_q.put((name, None))
        except BaseException as e:  # noqa: BLE001 - reported to the main thread, which decides
            done_q.put((name, e))

    def ready(name):
        if any(r in pending or r in running for r in reads.get(name, ()) if r in order):
            return False
        return not (name in device and device_busy)

    def stop(interrupted: bool):
        nonlocal stopping
        if not stopping:
            stopping = True
            out.interrupted |= interrupted
            stop_children(grace_s)

    try:
        while pending or running:
            for name in [n for n in pending if not stopping and ready(n)]:
                if not ready(name):  # a device stage started just before in this pass
                    continue
                pending.remove(name)
                device_busy |= name in device
                running[name] = threading.Thread(target=worker, args=(name,), name=f"stage-{name}", daemon=True)
                running[name].start()
                while started and running[name].is_alive() and not started(name):
                    time.sleep(poll_s)
            if stopping and not running:
                break
            if not running:  # nothing can start: a stage reads one that is not in `order` and not done
                break
            try:
                name, error = done_q.get(timeout=poll_s * 4)
            except queue.Empty:
                continue
            running.pop(name).join()
            device_busy &= name not in device
            if error is None:
                out.finished.append(name)
            elif stopping:
                out.stopped.append(name)
            elif isinstance(error, failures):
                out.failed = (name, str(error))
                stop(interrupted=False)
            else:  # a bug, not a stage's failure: still nothing keeps running behind the traceback
                stop(interrupted=False)
                for thread in running.values():
                    thread.join()
                raise error
    except (KeyboardInterrupt, SystemExit):
        out.stopped = list(running)
        stop(interrupted=True)
        for thread in running.values():
            thread.join()
    return out
