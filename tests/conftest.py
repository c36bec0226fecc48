"""Fixtures shared by the tests: the offline tokenizer, tiny models, real text."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(1)  # the suite runs as two xdist workers on two cores: one thread each


def run_script(*args, cwd=REPO, env=None, timeout=300, check=True):
    """Run a Python script or module of the repo in a fresh process; returns CompletedProcess (text).

    Bounded by `timeout`: a process (or a launcher's rank) still running then fails the test with the Python stacks
    of every process it started, rather than holding CI until its own limit. A `None` in `env` removes that variable."""
    from gpt2custom.distributed import run_with_deadline

    # One thread per process: the suite runs several processes on 2 cores, and oversubscribed threads crawl.
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    try:
        proc = run_with_deadline([sys.executable, *map(str, args)], timeout, cwd=cwd, env=full_env)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{args} still running after {timeout} s\nstdout:\n{(e.output or '')[-3000:]}\n"
                             f"stderr and stacks:\n{(e.stderr or '')[-8000:]}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def reset_process_state():
    """Forget what a run in this process left behind: accelerate's process-wide singletons (distributed type,
    precision, gradient accumulation) and dynamo's compiled graphs."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch._dynamo.reset()


def run_main_here(main, *args) -> str:
    """A script's `main(*args)` in this process (it has paid for torch's import already), from a clean process-wide
    state and leaving one behind; returns what it printed on stdout (stderr, the progress bars, is dropped)."""
    import contextlib
    import io

    reset_process_state()
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
            main(*args)
    finally:
        reset_process_state()
    return printed.getvalue()


def text_shards(root, text: str, val_tokens: int = 3000, shard_size: int = 20000) -> Path:
    """`root/shards`: token shards of `text` (one document per paragraph) made by prepare_data.py's own `main`, in
    this process (a fresh interpreter would spend seconds importing what this one has)."""
    import contextlib
    import io

    import prepare_data

    root = Path(root)
    (root / "text.txt").write_text(text, encoding="utf-8")
    argv = ["--source", str(root / "text.txt"), "--text_sample_by", "paragraph", "--out_dir", str(root / "shards"),
            "--val_tokens", str(val_tokens), "--shard_size", str(shard_size), "--num_proc", "1"]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        prepare_data.main(prepare_data.parse_options(argv))
    return root / "shards"


class _Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer answering from a daemon thread; `with` stops it and closes its socket on exit, after
    which connections are refused."""

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


def _start_server(handler_class) -> _Server:
    """`handler_class` served on 127.0.0.1, port 0 (the OS picks a free one), from a daemon thread; `.url`: the
    base URL."""
    server = _Server(("127.0.0.1", 0), handler_class)
    server.url = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def serve_json(respond) -> ThreadingHTTPServer:
    """A real HTTP server on 127.0.0.1 in a daemon thread; `respond(method, path, headers, body) -> (status, payload)`
    answers every GET and POST with JSON. Returns the server (`.url`: its base URL; `.shutdown()` stops it; `with`
    also closes its socket)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.answer()

        def do_POST(self):
            self.answer()

        def answer(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, payload = respond(self.command, self.path, headers, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return _start_server(Handler)


def serve_directory(path) -> ThreadingHTTPServer:
    """The files of folder `path` over HTTP GET, from a real server on 127.0.0.1 in a daemon thread (`.url`: its base
    URL). `with serve_directory(path) as server:` stops it and closes its socket at the end of the block."""

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    return _start_server(partial(Handler, directory=str(path)))


def write_jsonl(path, rows) -> Path:
    """`rows` as JSON Lines (one object per line, UTF-8) at `path`; returns the path."""
    path = Path(path)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# The start of every script `run_in_clean_process` runs; RESULT_FILE is set in the line written before it.
CLEAN_PROCESS_PREAMBLE = '''
import importlib.util, json, sys
from pathlib import Path

# Clean means the repo's own code cannot be imported: only a model folder's copies of the model files can be loaded.
for _name in ("gpt2custom", "modeling_gpt2custom", "configuration_gpt2custom"):
    if importlib.util.find_spec(_name) is not None:
        sys.exit(f"not a clean process: {_name} is importable from {importlib.util.find_spec(_name).origin}")


def model_facts(model) -> dict:
    """Where the loaded model's code came from: whether the name modeling_gpt2custom can be imported, and the class."""
    return {"repo_code_importable": importlib.util.find_spec("modeling_gpt2custom") is not None,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}"}


def load_folder(folder, trust_remote_code=True):
    """(model in eval mode, tokenizer, model_facts) of a saved folder, loaded as a user of the Hub would."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return model, tokenizer, model_facts(model)


def emit(result: dict):
    """The process's answer: the dict run_in_clean_process returns."""
    Path(RESULT_FILE).write_text(json.dumps(result))

'''


def run_in_clean_process(body: str, *args, cwd, timeout=300, env=None) -> dict:
    """Run `body` after CLEAN_PROCESS_PREAMBLE (`load_folder`, `model_facts`, `emit`) in a fresh interpreter, as a
    user of a published folder would: cwd = `cwd` (a folder outside the repo, where the script is written), no
    PYTHONPATH, offline, HF_HOME (so the remote-code module cache) inside `cwd`, and this process's thread count,
    so that matmuls reduce in the same order and logits match bitwise. `args` are its sys.argv[1:]; `env` is added
    last (None removes a variable). Returns the dict the body passed to `emit`; a failure, a timeout or no `emit`
    fails the test with the process's stderr."""
    cwd = Path(cwd).resolve()
    assert not cwd.is_relative_to(REPO), f"a clean process runs outside the repo, not in {cwd}"
    script, result = cwd / "clean_process.py", cwd / "clean_process_result.json"
    result.unlink(missing_ok=True)
    script.write_text(f"RESULT_FILE = {str(result)!r}\n" + CLEAN_PROCESS_PREAMBLE + textwrap.dedent(body))
    clean = {
        "PYTHONPATH": None,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(cwd / "hf_home"),
        "HF_MODULES_CACHE": str(cwd / "hf_home" / "modules"),
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    proc = run_script(script, *args, cwd=cwd, env={**clean, **(env or {})}, timeout=timeout)
    if not result.exists():
        raise AssertionError(
            f"{script} exited 0 without calling emit()\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return json.loads(result.read_text())


def assert_remote_code_class(facts: dict):
    """`facts` (the preamble's model_facts) say the model is our GPT2CustomForCausalLM as transformers loaded it
    from the folder's own modeling_gpt2custom.py (transformers_modules.<folder>...), and no copy was importable."""
    assert not facts["repo_code_importable"], facts
    cls = facts["model_class"]
    assert cls.startswith("transformers_modules.") and cls.endswith(".modeling_gpt2custom.GPT2CustomForCausalLM"), facts


# sys.argv: module, attribute path, n, delay, then the script and its arguments. The script runs as __main__ with
# `module.attribute` wrapped: after the n-th call returns, a timer thread stops the whole process (SIGSTOP) `delay`
# seconds later, wherever the main thread then is.
FREEZE_AFTER = """
import importlib, os, runpy, signal, sys, threading
module, path, n, delay = sys.argv[1], sys.argv[2].split("."), int(sys.argv[3]), float(sys.argv[4])
sys.argv = sys.argv[5:]
owner = importlib.import_module(module)
for part in path[:-1]:
    owner = getattr(owner, part)
original, calls = getattr(owner, path[-1]), [0]

def gated(*args, **kwargs):
    result = original(*args, **kwargs)
    calls[0] += 1
    if calls[0] == n:
        threading.Timer(delay, os.kill, (os.getpid(), signal.SIGSTOP)).start()
    return result

setattr(owner, path[-1], gated)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def start_then_freeze(script_args, *, after: str, calls: int, delay: float, cwd=REPO, env=None) -> subprocess.Popen:
    """Start `python *script_args` so that it stops itself (SIGSTOP) `delay` s after the `calls`-th call of `after`
    ("module:attribute.path") returns. A kill then lands inside the run, at a seeded moment, however slow or loaded
    the machine is: no polling race can let the run finish first. Pair with `kill_when_frozen`."""
    module, attribute = after.split(":")
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-c", FREEZE_AFTER, module, attribute, str(calls), str(delay), *map(str, script_args)]
    import tempfile

    log = tempfile.TemporaryFile("w+")  # not a pipe: a full pipe would block the run before it ever froze
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=log, stderr=log, text=True)
    proc.log = log
    return proc


def kill_when_frozen(proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until `proc` (from start_then_freeze) has stopped itself, then SIGKILL it. A run that exits first (it
    never made that many calls, or crashed) fails the test with its stderr."""
    import time

    deadline = time.monotonic() + timeout
    stat = Path(f"/proc/{proc.pid}/stat")
    while proc.poll() is None:
        if stat.read_text().rsplit(")", 1)[1].split()[0] == "T":  # the state field: stopped
            break
        assert time.monotonic() < deadline, f"{proc.args[5:]} neither froze nor ended within {timeout} s"
        time.sleep(0.01)
    else:
        proc.log.seek(0)
        raise AssertionError(f"the run ended (exit {proc.returncode}) before it froze:\n{proc.log.read()[-3000:]}")
    proc.kill()
    proc.wait()


CHAT_STOP_IDS = (50256, 50257, 50258, 50259)  # <|endoftext|> and the role markers: the published stop tokens


def greedy_reference(model, prompt_ids: list[int], max_new_tokens: int, stop_ids=()) -> list[int]:
    """The reference decoder: a full forward over everything so far (no cache), argmax of the last position,
    append; stops after a token in `stop_ids`."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
            ids.append(token)
            if token in stop_ids:
                break
    return ids[len(prompt_ids) :]


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Our chat format built by hand from its spec: each role marker's id, then "\n" + text + "\n" BPE-encoded, and
    the assistant marker to answer after."""
    role_id = {"system": 50257, "user": 50258, "assistant": 50259}
    ids = []
    for message in messages:
        ids += [role_id[message["role"]], *tokenizer("\n" + message["content"] + "\n")["input_ids"]]
    return ids + [role_id["assistant"], *tokenizer("\n")["input_ids"]]


# matplotlib's default colour cycle (tab10), grey aside: data series are drawn in these; axes, text, grids and the
# baselines our plots draw are black or grey.
SERIES_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]


def assert_png(path, min_width=300, min_height=200, series=1, min_pixels=300):
    """A decodable PNG of at least this size with `series` data series drawn on it: that many of matplotlib's cycle
    colours each cover `min_pixels` pixels. A legend's sample line covers ~80 (measured), a 16-point loss curve
    ~1,400: axes, title and legend without the data fail."""
    import matplotlib.image
    import numpy as np

    pixels = matplotlib.image.imread(str(path))
    assert pixels.shape[0] >= min_height and pixels.shape[1] >= min_width, (path, pixels.shape)
    rgb = pixels[..., :3]
    covered = {}
    for colour in SERIES_COLOURS:
        target = np.array([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
        covered[colour] = int((np.linalg.norm(rgb - target, axis=-1) < 0.1).sum())
    drawn = [colour for colour, count in covered.items() if count >= min_pixels]
    assert len(drawn) >= series, f"{path}: {len(drawn)} data series drawn, expected {series} (pixels per colour: {covered})"


def free_port() -> int:
    """A port the OS has just handed out, for launchers that need a number up front (accelerate's rendezvous,
    app.py). Servers the tests start themselves bind port 0 and report theirs (`serve_json`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tokenizer():
    from gpt2custom.tokenizer import load_tokenizer

    return load_tokenizer()


def make_tiny_model(seed=0, **overrides):
    """A tiny random GPT2Custom model whose outputs vary with the input (init std raised from 0.02)."""
    from configuration_gpt2custom import GPT2CustomConfig
    from modeling_gpt2custom import GPT2CustomForCausalLM

    torch.manual_seed(seed)
    config = GPT2CustomConfig.from_preset("tiny", **{"initializer_range": 0.2, **overrides})
    return GPT2CustomForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    """A saved tiny model folder (weights, config with auto_map, model code, tokenizer)."""
    from gpt2custom.checkpoints import save_model_folder

    out = tmp_path_factory.mktemp("tiny_checkpoint")
    save_model_folder(make_tiny_model(), out, tokenizer)
    return out


@pytest.fixture(scope="session")
def real_text() -> str:
    """About 1 MB of real text that every machine has: Python's own standard-library sources (code, comments and
    docstrings), in a fixed order."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
        size += len(parts[-1])
        if size > 1_000_000:
            break
    return "\n".join(parts)


# The longest files first (measured): with `--dist loadfile` the two workers then finish close together.
LONGEST_FIRST = ["test_pipeline.py", "test_recipe.py", "test_fsdp.py", "test_sft.py", "test_pretrain.py",
                 "test_muon.py", "test_chunked_loss.py", "test_multinode.py", "test_hellaswag.py", "test_synthetic.py",
                 "test_hub_datasets.py", "test_data.py", "test_lmeval.py", "test_train_step.py", "test_chat_eval.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
