"""How the pipeline starts a stage's script: the command line (flags from a mapping, `accelerate launch` through this
interpreter), and running it with its output to the terminal and a log, so that stopping the pipeline stops the
stage too."""

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # where the stage scripts live


def flag_args(args: dict) -> list[str]:
    """`{"max_steps": 10, "cpu": True, "models": ["a", "b"], "x": None}` -> `--max_steps 10 --cpu true --models a b`."""
    out = []
    for key, value in args.items():
        if value is None:
            continue
        out.append(f"--{key}")
        if isinstance(value, bool):
            out.append("true" if value else "false")
        elif isinstance(value, list | tuple):
            out.extend(str(v) for v in value)
        else:
            out.append(str(value))
    return out


def rel(path: "str | Path") -> str:
    """A path as the user would type it from the current folder."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def script(name: str) -> list[str]:
    """`python <script>` with this interpreter (an unactivated venv's python works)."""
    return [sys.executable, rel(ROOT / name)]


def launch(name: str, cpu: bool, num_processes: int | None, accelerate_config: str | None) -> list[str]:
    """`accelerate launch` for the stages that train or evaluate, through this interpreter's accelerate (not the
    first `accelerate` on PATH). On the CPU, more than one process needs `--multi_gpu` (gloo ranks); without it
    accelerate starts one process whatever `--num_processes` says."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if cpu:
        n = num_processes or 1
        cmd += ["--cpu", *(["--multi_gpu"] if n > 1 else []), "--num_processes", str(n), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
        if n > 1:
            cmd += ["--main_process_port", "0"]  # accelerate picks a free port
    else:
        if accelerate_config:
            cmd += ["--config_file", accelerate_config]
        if num_processes:
            cmd += ["--num_processes", str(num_processes)]
    return cmd + [rel(ROOT / name)]


def command_text(cmd: list[str]) -> str:
    return shlex.join(cmd)


def _pump(source, sinks, keep: list | None):
    """Copy a child's stream to the terminal and the log as it arrives (tqdm's carriage returns intact)."""
    for chunk in iter(lambda: source.read1(65536), b""):
        for sink in sinks:
            sink.write(chunk)
            sink.flush()
        if keep is not None:
            keep.append(chunk)


def execute(cmd: list[str], log_path: Path, stdin_text: str | None = None) -> tuple[int, str]:
    """Run one command; its stdout and stderr go to the terminal and the log. Returns (exit status, stdout).

    The child stays in the pipeline's process group, so Ctrl-C in the terminal or a signal to the group reaches it
    and accelerate's workers directly. If the pipeline alone is stopped while it runs (SIGTERM to its process: see
    `stop_on_sigterm`), every process under it gets SIGTERM, then SIGKILL after 10 s, before the pipeline exits:
    no stage keeps running, orphaned, holding its output folder's lock."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n$ {command_text(cmd)}\n".encode())
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        out: list[bytes] = []
        threads = [threading.Thread(target=_pump, args=(proc.stdout, [sys.stdout.buffer, log], out), daemon=True),
                   threading.Thread(target=_pump, args=(proc.stderr, [sys.stderr.buffer, log], None), daemon=True)]
        for t in threads:
            t.start()
        try:
            if stdin_text is not None:
                proc.stdin.write(stdin_text.encode())
                proc.stdin.close()
            rc = proc.wait()
        except BaseException:  # KeyboardInterrupt, or SystemExit from the SIGTERM handler
            stop_tree(proc)
            raise
        for t in threads:
            t.join()
    return rc, b"".join(out).decode("utf-8", errors="replace")


def stop_tree(proc: subprocess.Popen, grace_s: float = 10.0):
    """SIGTERM to the child and everything under it, SIGKILL to what is left after `grace_s`."""
    import psutil  # accelerate's own dependency

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    proc.wait()


def stop_on_sigterm():
    """SIGTERM to the pipeline becomes SystemExit in the main thread, so `execute` stops the running stage."""

    def handler(signum, frame):
        raise SystemExit(f"pipeline.py: stopped by signal {signum}")

    signal.signal(signal.SIGTERM, handler)
