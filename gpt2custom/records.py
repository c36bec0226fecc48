"""What each stage was made from, and whether it must run again.

A stage's completion record, `{run_dir}/records/<stage>.json`, holds the stage's effective settings (its flags
after merging its own config file), the identity of each input it read (the digest of that upstream stage's record,
or of a file's size and modification time for a data set the pipeline did not make), when it started and when it
finished. It is written at the start with `finished: null` and rewritten with the finish time only after the stage's
output has passed its check (gpt2custom/checks.py), so a record with a finish time means "complete and checked".

A stage is "done" when its record is finished, its settings and inputs are the ones it would run with now, and its
output is still there. Otherwise it is "to run", with the first reason that applies: forced (`--force`), not run yet,
interrupted (a started record: the script's own resume continues it), settings changed (the keys, old -> new), input
changed (an upstream stage runs again, or its record is no longer the one this stage read), output missing. The
decision walks the stages in order, so a change redoes that stage and every later stage that read its output, and
never an earlier one. Stages declare what they read (`Stage.reads`); nothing else orders them, so independent stages
could run side by side.
"""

import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .files import write_json_atomic

DONE, TO_RUN, NOT_SELECTED, CANNOT_RUN = "done", "to run", "not selected", "cannot run"


@dataclass
class Stage:
    name: str
    commands: list[list[str]]  # run in order; the stage's output is checked after the last one
    output: Path  # the file or folder whose presence the plan expects of a done stage
    settings: dict  # the effective settings: what the record keeps and the plan compares
    reads: tuple[str, ...] = ()  # upstream stages whose outputs this stage reads
    inputs: list[str] = field(default_factory=list)  # for people: what it reads
    outputs: list[str] = field(default_factory=list)  # for people: what it writes
    clear: list[Path] = field(default_factory=list)  # removed before a fresh start (settings or inputs changed)
    capture_stdin: str | None = None  # text for the last command's stdin (chat prompts)
    check: Callable[[], None] | None = None  # raises CheckFailed when the output is not usable
    identity: Callable[[], str] | None = None  # a stage with no commands (an existing data set): its input's identity
    note: str | None = None  # why the stage looks the way it does (substitutions)
    skip_reason: str | None = None  # set: the stage cannot run in this configuration
    where: str | None = None  # how a downstream stage names this output in a reason ("sft/"); default outputs[0]

    def label(self) -> str:
        return self.where or (self.outputs[0] if self.outputs else self.name)


class CheckFailed(RuntimeError):
    """A stage's output is not usable: one line saying why."""


@dataclass
class Decision:
    status: str  # done | to run | not selected | cannot run
    reason: str  # for "to run": why; for "done": what it was made from
    resume: bool = False  # to run: an interrupted attempt with the same settings and inputs is continued
    stale: bool = False  # to run: the old output was made from other settings or inputs and is removed first


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_identity(path: Path) -> str:
    """A data set the pipeline did not make: its size and modification time (a folder: of every file in it)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return digest([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.exists()])


def normalized(settings: dict) -> dict:
    """Settings as they come back from the record's JSON (tuples become lists, paths strings)."""
    return json.loads(json.dumps(settings, default=str))


class Records:
    """The completion records of one run folder."""

    def __init__(self, run_dir: Path):
        self.folder = Path(run_dir) / "records"

    def path(self, stage: str) -> Path:
        return self.folder / f"{stage}.json"

    def read(self, stage: str) -> dict | None:
        try:
            return json.loads(self.path(stage).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def identity(self, stage: Stage) -> str | None:
        """What a downstream stage records as having read from `stage`: its finished record's digest."""
        if stage.identity is not None:
            return stage.identity()
        record = self.read(stage.name)
        return digest(record) if record and record.get("finished") else None

    def start(self, stage: Stage, inputs: dict, resume: bool):
        previous = (self.read(stage.name) if resume else None) or {}
        write_json_atomic(self.path(stage.name), {
            "stage": stage.name, "settings": normalized(stage.settings), "inputs": inputs,
            "started": previous.get("started") or now(), "finished": None,
            "id": previous.get("id") or uuid.uuid4().hex,  # two runs in the same second still differ
        })  # fmt: skip

    def fail(self, stage: Stage, reason: str):
        """The output did not pass its check: the record stays unfinished and says why (the plan shows it)."""
        record = self.read(stage.name)
        record["failed"] = reason
        write_json_atomic(self.path(stage.name), record)

    def finish(self, stage: Stage, extra: dict | None = None):
        record = self.read(stage.name)
        record.pop("failed", None)
        record.update(finished=now(), **(extra or {}))
        write_json_atomic(self.path(stage.name), record)


def settings_diff(old: dict, new: dict, limit: int = 3) -> str | None:
    """"learning_rate 0.01 → 0.005, max_steps 150 → (unset)" for the keys that differ, or None."""
    new = normalized(new)
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, "(unset)") != new.get(k, "(unset)"))
    if not keys:
        return None
    parts = [f"{k} {json.dumps(old[k]) if k in old else '(unset)'} → {json.dumps(new[k]) if k in new else '(unset)'}"
             for k in keys[:limit]]
    return ", ".join(parts) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def decide(stages: list[Stage], records: Records, selected: list[str], force: tuple[str, ...] = ()) -> dict:
    """Each stage's Decision (see the module docstring), in order."""
    by_name = {s.name: s for s in stages}
    out: dict[str, Decision] = {}
    for stage in stages:
        out[stage.name] = _decide_one(stage, by_name, out, records, force)
        if stage.name not in selected and out[stage.name].status in (DONE, TO_RUN):
            d = out[stage.name]
            out[stage.name] = Decision(NOT_SELECTED, d.reason if d.status == TO_RUN else "done")
    return out


def current_inputs(stage: Stage, by_name: dict, records: Records) -> dict:
    return {name: records.identity(by_name[name]) for name in stage.reads}


def _decide_one(stage: Stage, by_name: dict, decided: dict, records: Records, force) -> Decision:
    if stage.skip_reason:
        return Decision(CANNOT_RUN, stage.skip_reason)
    if not stage.commands:
        return Decision(DONE, stage.note or "nothing to run")
    record = records.read(stage.name)
    if stage.name in force:
        return Decision(TO_RUN, "forced (--force)", stale=record is not None)
    if record is None:
        return Decision(TO_RUN, "not run yet")
    changed = settings_diff(record.get("settings") or {}, stage.settings)
    if changed:
        return Decision(TO_RUN, f"settings changed: {changed}", stale=True)
    for name in stage.reads:
        upstream = decided[name]
        if upstream.status == TO_RUN or (upstream.status == NOT_SELECTED and upstream.reason != "done"):
            return Decision(TO_RUN, f"input changed: {by_name[name].label()} (runs again)", stale=True)
        if (record.get("inputs") or {}).get(name) != records.identity(by_name[name]):
            return Decision(TO_RUN, f"input changed: {by_name[name].label()}", stale=True)
    if not record.get("finished"):
        if record.get("failed"):
            return Decision(TO_RUN, f"its output failed the check: {record['failed']}", resume=True)
        return Decision(TO_RUN, "interrupted: continues where it stopped", resume=True)
    if not stage.output.exists():
        return Decision(TO_RUN, f"output missing: {stage.output}", stale=True)
    return Decision(DONE, f"made {record['finished']}")
