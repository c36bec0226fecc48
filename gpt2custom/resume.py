"""Training-state checkpoints for pretrain.py: written atomically, checked before they are trusted, loaded whatever
wraps the model, and agreed on by every rank.

- `save_state` goes into `.step_N.tmp` and is renamed to `step_N` once every rank has written, with a
  `checkpoint.json` listing each file's size (subfolders included: FSDP writes its sharded model and optimizer as
  `torch.distributed.checkpoint` folders, one file per rank) and the model settings: a kill mid-save leaves the
  previous checkpoint as the latest, and a truncated or missing file is found before anything is loaded. The same
  step saved again (a resumed run finishing the step a notice interrupted) replaces the old folder by renames only.
  `checkpoint.json` also records how long the save took: a preemption's deadline asks whether the next one fits.
- The model's weights are saved under its own parameter names (not `_orig_mod.` / `module.`), so a checkpoint
  saved with `torch.compile` resumes without it and back, and under any world size.
- On resume every rank lists the checkpoints it can read; they continue from the newest one that all of them have
  (a corrupt newest one is named and skipped), or stop with one message on every node, never a hang.
- Each node needs the checkpoint on its own disk: with one shared filesystem rank 0 writes it; without one (found
  at start-up by a probe file), every node's first rank writes a full copy (`save_on_each_node`). FSDP cannot do
  that (each rank holds, and writes, only its shard), so an FSDP run without a shared filesystem stops at start-up.
"""

import json
import shutil
import time
import uuid
from pathlib import Path

import torch
from accelerate.utils import DistributedType, broadcast_object_list, gather_object
from safetensors.torch import load_file

INFO = "checkpoint.json"
MODEL_FILE = "model.safetensors"
CONFIG_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "bias")


class ResumeError(ValueError):
    """A checkpoint that cannot continue this run; the message says which and why."""


def checkpoint_folders(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (`.step_*.tmp` are unfinished saves)."""
    return sorted(p for p in Path(ckpt_dir).glob("step_*") if p.is_dir())


def model_settings(config) -> dict:
    return {key: getattr(config, key) for key in CONFIG_KEYS}


def storage_is_shared(accelerator, folder: Path) -> bool:
    """True when every rank reads the file rank 0 has just written into `folder` (one filesystem for the run)."""
    nonce = [uuid.uuid4().hex if accelerator.is_main_process else None]
    broadcast_object_list(nonce)
    probe = folder / ".shared_probe"
    if accelerator.is_main_process:
        probe.write_text(nonce[0])
    accelerator.wait_for_everyone()
    sees = probe.exists() and probe.read_text() == nonce[0]
    everyone = all(gather_object([sees]))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink(missing_ok=True)
    return everyone


class Checkpointer:
    def __init__(self, accelerator, ckpt_dir: "str | Path", raw_model: torch.nn.Module, *, keep: int = 2):
        self.acc, self.dir, self.model, self.keep = accelerator, Path(ckpt_dir), raw_model, keep
        if accelerator.is_local_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        self.shared = storage_is_shared(accelerator, self.dir)
        if not self.shared and accelerator.distributed_type == DistributedType.FSDP:
            raise ResumeError(f"{self.dir} is not on one filesystem that every rank sees: FSDP checkpoints hold each "
                              f"rank's shard, so put output_dir on a shared filesystem")  # fmt: skip
        if not self.shared:  # each node keeps a full copy of what its ranks need
            accelerator.project_configuration.save_on_each_node = True
        self.writer = accelerator.is_main_process if self.shared else accelerator.is_local_main_process
        self.settings = model_settings(raw_model.config)
        # the step of the last complete checkpoint and how long its save took (a preemption's deadline needs it)
        self.last_saved: int | None = None
        self.last_save_seconds: float | None = None
        if accelerator.distributed_type != DistributedType.FSDP:  # FSDP saves its own sharded state
            accelerator.register_save_state_pre_hook(self._save_weights_by_name)
            accelerator.register_load_state_pre_hook(self._load_weights_by_name)

    # ------------------------------------------------------------------ weights under their own names
    def _save_weights_by_name(self, models, weights, output_dir):
        if weights:
            weights[0] = self.model.state_dict()

    def _load_weights_by_name(self, models, input_dir):
        path = Path(input_dir) / MODEL_FILE
        state = {}
        for key, value in load_file(path).items():  # older checkpoints carry the wrappers' prefixes
            for prefix in ("module.", "_orig_mod."):
                key = key.removeprefix(prefix)
            state[key] = value
        try:
            missing, unexpected = self.model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # a size mismatch
            raise ResumeError(f"{path} does not fit this model: {str(e).splitlines()[-1].strip()}") from None
        missing = [k for k in missing if k not in getattr(self.model, "_tied_weights_keys", {})]
        if missing or unexpected:
            raise ResumeError(f"{path} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        models.clear()  # loaded: accelerate must not load them again under the wrapped names

    # ------------------------------------------------------------------ save
    def save(self, step: int, extra: dict | None = None):
        """Write `step_N` atomically. A kill at any moment leaves every complete checkpoint complete: the same step
        saved again replaces the old folder only by renames (the old one is kept aside until the new one is in)."""
        final, tmp = self.dir / f"step_{step:06d}", self.dir / f".step_{step:06d}.tmp"
        aside = self.dir / f".step_{step:06d}.old"
        began = time.perf_counter()
        if self.writer:
            shutil.rmtree(tmp, ignore_errors=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        self.acc.wait_for_everyone()
        if self.writer:
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            info = {"step": step, "model": self.settings, "files": files,
                    "save_seconds": round(time.perf_counter() - began, 3), **(extra or {})}  # fmt: skip
            (tmp / INFO).write_text(json.dumps(info, indent=1))
            if final.exists():
                shutil.rmtree(aside, ignore_errors=True)
                final.rename(aside)
            tmp.rename(final)
            shutil.rmtree(aside, ignore_errors=True)
            for old in checkpoint_folders(self.dir)[: -self.keep]:
                shutil.rmtree(old)
        self.acc.wait_for_everyone()
        self.last_saved, self.last_save_seconds = step, time.perf_counter() - began

    # ------------------------------------------------------------------ resume
    def problem(self, path: Path) -> str | None:
        """Why `path` cannot be trusted (missing or truncated files), or None."""
        info_path = path / INFO
        if not info_path.exists():
            return f"no {INFO}"
        try:
            info = json.loads(info_path.read_text())
        except ValueError:
            return f"{INFO} is not valid JSON"
        for name, size in info.get("files", {}).items():
            if not (path / name).exists():
                return f"{name} is missing"
            if (path / name).stat().st_size != size:
                return f"{name} has {(path / name).stat().st_size} bytes, expected {size}"
        return None

    def check_settings(self, path: Path):
        saved = json.loads((path / INFO).read_text()).get("model", {})
        diff = [f"{k}={saved[k]} (this run: {v})" for k, v in self.settings.items() if k in saved and saved[k] != v]
        if diff:
            raise ResumeError(f"checkpoint {path} was saved with {', '.join(diff)}: resume with the same model "
                              f"settings, or start a new output_dir")  # fmt: skip

    def _say(self, text: str):
        if self.acc.is_local_main_process:
            print(text, flush=True)

    def resume(self) -> Path | None:
        """Load the newest checkpoint every rank can read; None when there is none (a fresh start)."""
        if self.writer:  # unfinished saves of earlier runs
            for tmp in self.dir.glob(".step_*.tmp"):
                shutil.rmtree(tmp, ignore_errors=True)
            for aside in self.dir.glob(".step_*.old"):  # killed between a re-save's two renames: the old one is back
                final = aside.with_name(aside.name[1:].removesuffix(".old"))
                aside.rename(final) if not final.exists() else shutil.rmtree(aside, ignore_errors=True)
        self.acc.wait_for_everyone()
        folders = checkpoint_folders(self.dir)
        readable = []
        for path in reversed(folders):
            if (why := self.problem(path)) is None:
                readable.append(int(path.name.removeprefix("step_")))
            else:
                self._say(f"checkpoint {path} is incomplete ({why}): skipping it")
        per_rank = gather_object([readable])
        common = sorted(set.intersection(*map(set, per_rank)), reverse=True)
        if not common:
            if not any(per_rank):
                if folders:
                    raise ResumeError(f"no complete checkpoint in {self.dir}: every one is incomplete or corrupt")
                return None
            have = ", ".join(f"rank {r}: {steps[:3] or 'none'}" for r, steps in enumerate(per_rank))
            raise ResumeError(f"the ranks see different checkpoints in {self.dir} ({have}); put output_dir on one "
                              f"shared filesystem, or give every node its own copy of the checkpoints")  # fmt: skip
        for step in common:
            path = self.dir / f"step_{step:06d}"
            self.check_settings(path)
            error = None
            try:
                self.acc.load_state(str(path))
            except ValueError as e:  # the run's data or batch layout differs: corrupt it is not
                raise ResumeError(f"cannot resume from {path}: {e}") from None
            except Exception as e:  # unreadable files: fall back to the previous checkpoint
                error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if all(e is None for e in gather_object([error])):
                self.last_saved = step
                self.last_save_seconds = json.loads((path / INFO).read_text()).get("save_seconds")
                return path
            self._say(f"checkpoint {path} could not be loaded ({error or 'on another rank'}): trying the previous one")
        raise ResumeError(f"no loadable checkpoint in {self.dir}")
