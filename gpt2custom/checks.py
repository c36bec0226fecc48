"""Each stage's output check: a stage is complete only when what it wrote can be used by the next one. A check
raises `CheckFailed` with one line saying what is wrong; the pipeline then stops without marking the stage done."""

import json
from pathlib import Path

from .records import CheckFailed


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def check_files(*paths: Path):
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise CheckFailed(f"expected output missing: {', '.join(missing)}")


def check_data(data_dir: Path):
    manifest = read_json(data_dir / "manifest.json")
    if not manifest:
        raise CheckFailed(f"{data_dir / 'manifest.json'}: missing or unreadable")
    train = ((manifest.get("splits") or {}).get("train") or {}).get("tokens")
    if not train:
        raise CheckFailed(f"{data_dir / 'manifest.json'}: no training tokens")


def check_chat_data(path: Path, min_rows: int, failed_is_error: bool):
    """At least `min_rows` usable rows (accepted: no rejection flag); otherwise one line with the rejection reasons.
    For generated data, prompts that failed after every retry are an error too (the next run asks them again)."""
    from .synthetic import OutputFiles, file_counts, read_rows

    files = OutputFiles.for_output(path)
    if failed_is_error and read_rows(files.failed):
        raise CheckFailed(f"prompts still failed after every retry ({files.failed}); rerun the same command to ask "
                          "them again")
    counts = file_counts(files)
    if counts["accepted"] < min_rows:
        reasons = {**counts["rejected"], **counts["rejected_instructions"]}
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items(), key=lambda x: -x[1])) or "none"
        raise CheckFailed(f"{path}: {counts['accepted']} usable rows, expected at least {min_rows} (chat_data.min_rows)"
                          f"; rejected: {why}; failed prompts: {counts['failed']}")


def check_model_generates(model_dir: Path):
    """The SFT folder loads as a chat model (AutoModelForCausalLM + AutoTokenizer with a chat template) and
    generates from a rendered conversation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    except (OSError, ValueError) as e:
        raise CheckFailed(f"{model_dir} does not load as a model: {e}") from None
    if not tokenizer.chat_template:
        raise CheckFailed(f"{model_dir}: the tokenizer has no chat template")
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    if out.shape[1] <= inputs["input_ids"].shape[1]:
        raise CheckFailed(f"{model_dir}: generate() returned no new token")


def check_chat_samples(samples_path: Path, prompts: list[str]):
    """One model answer per prompt, none empty and none replaced by chat.py's own message. (An answer cut by the
    length limit is a model answer: the report says so.)"""
    data = read_json(samples_path) or {}
    samples = data.get("samples") or []
    if len(samples) != len(prompts):
        raise CheckFailed(f"{samples_path}: {len(samples)} answers for {len(prompts)} prompts (chat.py's transcript "
                          "could not be split into one answer per prompt)")
    for x in samples:
        if x.get("error"):
            raise CheckFailed(f"chat.py did not answer {x['prompt']!r}: {x['error']}")
        if not x["answer"].strip():
            raise CheckFailed(f"the model's answer to {x['prompt']!r} is empty: it ended the turn at once (see "
                              "report.md's chat samples)")
