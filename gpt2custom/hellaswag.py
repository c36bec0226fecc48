"""HellaSwag (zero-shot, 4 endings per context) in the two conventions people publish, and a fast batched scorer.

The two conventions give different numbers for the same model, so every number we report is named:

* ``completion`` (build-nanogpt / llm.c): context = ``ctx``, each ending tokenized as ``" " + ending``; ``acc``
  picks the ending with the highest summed log-likelihood, ``acc_norm`` the highest mean log-likelihood per token.
  Published, GPT-2 124M on the 10,042 validation examples: acc 28.59 / acc_norm 29.55.
* ``harness`` (EleutherAI lm-evaluation-harness, ``hellaswag`` task): its text preprocessing, query
  ``activity_label + ": " + ctx_a + " " + ctx_b.capitalize()``, continuation ``" " + ending`` tokenized as
  ``encode(query + continuation)[len(encode(query)):]``; ``acc`` by summed log-likelihood, ``acc_norm`` by
  log-likelihood divided by the character length of the preprocessed ending.
  Published, GPT-2 124M: acc 28.92 / acc_norm 31.14.

Data: ``load_hellaswag()`` reads ``Rowan/hellaswag`` through ``datasets`` from the Hub's Parquet export (revision
``refs/convert/parquet``: the repo's main branch holds only a loading script, which datasets 4+ refuses) or, failing
that, the original jsonl from GitHub, into a cache once; a local ``.jsonl`` / ``.parquet`` path or any URL overrides
it. ``lm_eval_hub_task`` points lm-evaluation-harness's own ``hellaswag`` task at the same export.

Speed (``score_endings``): examples are sorted by length and batched; each context runs through the model once and
its key/value cache is repeated for the four endings; log-probabilities (and, for GPT-2-style heads, lm_head itself)
are computed only where an ending token is predicted; bf16 autocast on GPUs. A context too long for the model loses
its oldest tokens (the harness truncates each ending's row instead; HellaSwag never comes near 1024 tokens).

Sharded models (FSDP2, ``fully_shard``): every forward gathers parameters from all ranks, so every rank must make the
same number of forwards, through the root module (a submodule such as ``base_model`` or the output embeddings called
on its own would skip the root's gather). The ranks agree on the most forwards any of them needs, the ones with fewer
examples run that many more one-token forwards whose outputs are dropped, and each batch runs the whole model.
"""

import json
import os
import re
import tempfile
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .fsdp import is_fsdp_module
from .tokenizer import cache_dir as default_cache_root

GITHUB_URLS = {
    split: f"https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{name}.jsonl"
    for split, name in (("train", "train"), ("validation", "val"), ("test", "test"))
}
HUB_DATASET = "Rowan/hellaswag"
# The Hub's automatic Parquet export of the dataset: main holds only hellaswag.py, a script datasets 4+ will not run.
HUB_REVISION = "refs/convert/parquet"
REQUIRED_KEYS = ("ctx", "ctx_a", "ctx_b", "activity_label", "endings", "label")
NUM_ENDINGS = 4
CONVENTIONS = ("completion", "harness")
# Model types whose logits are exactly output_embeddings(base_model(...).last_hidden_state) (no soft-capping or
# scaling), so lm_head can skip padding. Other models are scored through their full logits, just as exactly.
PLAIN_HEAD_MODEL_TYPES = {"gpt2custom", "gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3"}


# ----------------------------------------------------------------------------------------------------------- data


def load_hellaswag(path: "str | Path | None" = None, split: str = "validation", cache_dir: "str | Path | None" = None):
    """HellaSwag examples as dicts (``ctx, ctx_a, ctx_b, activity_label, endings`` (4), ``label`` (int), ...).

    ``path``: a local ``.jsonl`` or ``.parquet`` file, an ``http(s)://`` URL of a jsonl (downloaded into the cache),
    or None for the official ``split`` (the Hub's Parquet export of ``Rowan/hellaswag``, else the GitHub jsonl),
    cached under ``cache_dir`` (default ``$GPT2CUSTOM_CACHE/hellaswag``) as jsonl."""
    cache = Path(cache_dir) if cache_dir else default_cache_root() / "hellaswag"
    if path is not None and not str(path).startswith(("http://", "https://")):
        return read_examples(path)
    if path is None and split not in GITHUB_URLS:
        raise ValueError(f"unknown HellaSwag split {split!r}; expected one of {sorted(GITHUB_URLS)}")
    url = str(path) if path is not None else GITHUB_URLS[split]
    target = cache / url.rsplit("/", 1)[-1]
    if target.exists():
        return read_examples(target)
    if path is not None:  # the user named this URL: no silent substitute
        try:
            _download(url, target)
        except OSError as e:
            raise ValueError(f"cannot download HellaSwag from {url}: {e}") from e
        return read_examples(target)
    try:
        _write_from_hub(split, target)
    except Exception as hub_error:  # noqa: BLE001 - offline, Hub down, repo changed: try the original files
        try:
            _download(url, target)
        except OSError as github_error:
            raise ValueError(
                f"cannot download HellaSwag {split!r}: the Hub dataset {HUB_DATASET} (revision {HUB_REVISION}) "
                f"failed ({hub_error}); {url} failed ({github_error}). Pass a local copy with --hellaswag_path "
                "FILE.jsonl"
            ) from hub_error
    return read_examples(target)


def lm_eval_hub_task(folder: "str | Path") -> Path:
    """Write ``folder/hellaswag.yaml``: lm-eval's own ``hellaswag`` task (``include``d: prompts, choices and metrics
    stay the harness's) reading ``Rowan/hellaswag`` from the Hub's Parquet export, which loads under datasets 4+
    where the task's own ``load_dataset("Rowan/hellaswag")`` stops at the loading script. Pass ``folder`` as an
    include path of the TaskManager; the task keeps its name."""
    import lm_eval.tasks

    config = {
        "include": str(Path(lm_eval.tasks.__file__).parent / "hellaswag" / "hellaswag.yaml"),
        "task": "hellaswag",
        "dataset_path": HUB_DATASET,
        "dataset_kwargs": {"revision": HUB_REVISION},
    }
    path = Path(folder) / "hellaswag.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")  # JSON is YAML
    return path


@contextmanager
def _atomic_file(target: Path, mode: str):
    """Write to a temporary file beside ``target`` and rename it: a killed download never leaves a partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as out:
            yield out
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _download(url: str, target: Path):
    with _atomic_file(target, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
        while chunk := response.read(1 << 20):
            out.write(chunk)


def _write_from_hub(split: str, target: Path):
    """The Hub parquet, rewritten as the original jsonl so the cache has one format (labels stay strings)."""
    from datasets import load_dataset

    rows = load_dataset(HUB_DATASET, split=split, revision=HUB_REVISION)
    with _atomic_file(target, "w") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")


def read_examples(path: "str | Path") -> list[dict]:
    """Parse and check a HellaSwag jsonl or parquet file; a bad row raises ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"HellaSwag file {path} does not exist; expected a .jsonl or .parquet file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = [(f"{path} row {i + 1}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    else:
        rows = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((f"{path}:{lineno}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); expected one HellaSwag example "
                                     "per line") from None
    if not rows:
        raise ValueError(f"{path} holds no HellaSwag examples")
    return [_checked(row, where) for where, row in rows]


def _checked(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; a HellaSwag example needs {list(REQUIRED_KEYS)}")
    for key in ("ctx", "ctx_a", "ctx_b", "activity_label"):
        if not isinstance(row[key], str):
            raise ValueError(f"{where}: {key} must be a string, got {row[key]!r}")
    endings = row["endings"]
    if not (isinstance(endings, list) and len(endings) == NUM_ENDINGS and all(isinstance(e, str) for e in endings)):
        raise ValueError(f"{where}: endings must be a list of {NUM_ENDINGS} strings, got {endings!r}")
    label = row["label"]
    if isinstance(label, str) and label.strip().isdigit():  # the Hub parquet stores labels as strings ("2")
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool):
        raise ValueError(f"{where}: label {row['label']!r} is not an integer; expected 0-{NUM_ENDINGS - 1} "
                         "(the test split has no labels)")
    if not 0 <= label < NUM_ENDINGS:
        raise ValueError(f"{where}: label {label!r} is out of range; expected 0-{NUM_ENDINGS - 1}")
    return {**row, "label": label}


# -------------------------------------------------------------------------------------------------- conventions


def harness_preprocess(text: str) -> str:
    """lm-evaluation-harness's cleanup: the brackets are WikiHow artifacts ("[title]", "[step]", ...)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


@dataclass
class Rendered:
    """One example as token ids: the shared context, the 4 endings, and the acc_norm divisor of each ending."""

    context: list[int]
    endings: list[list[int]]
    norm: list[float]
    label: int


def render(examples: list[dict], tokenizer, convention: str) -> list[Rendered]:
    """Token ids for every example in one convention (batched tokenizer calls: 50k strings in about a second)."""
    def encode(texts):
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    if convention == "completion":
        contexts = encode([ex["ctx"] for ex in examples])
        endings = encode([" " + e for ex in examples for e in ex["endings"]])
        norms = [float(len(e)) for e in endings]  # mean loss per ending token
    elif convention == "harness":
        queries = [harness_preprocess(f"{ex['activity_label']}: {ex['ctx_a']} {ex['ctx_b'].capitalize()}")
                   for ex in examples]
        choices = [[harness_preprocess(e) for e in ex["endings"]] for ex in examples]
        contexts = encode(queries)
        # The harness encodes query + continuation as one string and takes what follows the query's own tokens.
        # Preprocessing strips the query, so its rule of moving trailing spaces into the continuation never applies.
        whole = encode([q + " " + c for q, cs in zip(queries, choices) for c in cs])
        endings = [w[len(contexts[k // NUM_ENDINGS]) :] for k, w in enumerate(whole)]
        norms = [float(len(c)) for cs in choices for c in cs]  # characters of the preprocessed ending
    else:
        raise ValueError(f"unknown HellaSwag convention {convention!r}; expected one of {list(CONVENTIONS)}")
    out = []
    for i, ex in enumerate(examples):
        ends = endings[i * NUM_ENDINGS : (i + 1) * NUM_ENDINGS]
        if not contexts[i] or not all(ends):
            raise ValueError(f"HellaSwag example {i} ({ex.get('ind', 'no ind')}): empty context or ending after "
                             f"tokenization in the {convention} convention")
        out.append(Rendered(contexts[i], ends, norms[i * NUM_ENDINGS : (i + 1) * NUM_ENDINGS], ex["label"]))
    return out


# ------------------------------------------------------------------------------------------------------ scoring


@dataclass
class EndingScores:
    """Per example and ending: summed log-likelihood of the ending tokens, and the acc_norm divisor."""

    logprob: torch.Tensor  # (n, 4) float64
    norm: torch.Tensor  # (n, 4) float64
    label: torch.Tensor  # (n,) long

    def predictions(self, normalized: bool = False) -> torch.Tensor:
        # argmax takes the first of tied maxima, as numpy's (harness) and argmin of the loss (build-nanogpt) do
        return (self.logprob / self.norm if normalized else self.logprob).argmax(dim=1)


def inference_autocast(device: torch.device):
    """bf16 autocast on GPUs (fp16 on those without bf16, such as V100/T4); full precision on CPU."""
    if device.type != "cuda":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def max_context(model) -> int:
    """The longest input the model takes (our ``block_size``, GPT-2's ``n_positions``: both mapped to this name)."""
    return model.config.max_position_embeddings


@torch.inference_mode()
def score_endings(model, tokenizer, examples: list[dict], convention: str = "completion", batch_size: int = 32,
                  show_progress: bool = False, agree_on_forwards=None) -> EndingScores:
    """Log-likelihoods of all endings of ``examples`` under ``model`` (any HF causal LM with a KV cache).

    Examples are sorted by length and scored ``batch_size`` at a time; results come back in the input order.
    ``agree_on_forwards(n) -> N``: for sharded models, a collective that returns the most forwards any rank needs
    (``n`` is this rank's); this rank then runs ``N - n`` more forwards whose outputs it drops. Every rank must call
    this function with it, even with no examples."""
    rendered = render(examples, tokenizer, convention)
    device = next(model.parameters()).device
    limit = max_context(model)
    for i, r in enumerate(rendered):  # keep each example within the context window: drop the oldest context tokens
        longest = max(map(len, r.endings))
        if longest >= limit:  # not even one context token would be left to predict its first token from
            raise ValueError(f"HellaSwag example {i} (ind {examples[i].get('ind')}): an ending of {longest} tokens "
                             f"does not fit the model's context of {limit} tokens with its context")  # fmt: skip
        overflow = len(r.context) + longest - limit
        if overflow > 0:
            r.context = r.context[overflow:]
    logprob = torch.zeros(len(rendered), NUM_ENDINGS, dtype=torch.float64, device=device)
    # longest first: similar lengths share a batch (little padding), and an out-of-memory shows on the first batch
    order = sorted(range(len(rendered)), key=lambda i: -len(rendered[i].context) - max(map(len, rendered[i].endings)))
    plan = [_fitting_batches(order[start : start + batch_size], rendered, limit)
            for start in range(0, len(order), batch_size)]  # fmt: skip
    forwards = sum(_forwards([rendered[i] for i in sub]) for subs in plan for sub in subs)
    extra = agree_on_forwards(forwards) - forwards if agree_on_forwards is not None else 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(order), unit="ex", desc=f"hellaswag/{convention}", disable=not show_progress)
    with inference_autocast(device), bar:
        for subs in plan:
            for sub in subs:
                logprob[sub] = _score_batch(model, [rendered[i] for i in sub], device, limit)
            bar.update(sum(map(len, subs)))
        for _ in range(extra):  # keeps a sharded model's ranks in step: the others still need this rank's shards
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False, logits_to_keep=1)
    model.train(was_training)
    norm = torch.tensor([r.norm for r in rendered], dtype=torch.float64).reshape(-1, NUM_ENDINGS)
    label = torch.tensor([r.label for r in rendered], dtype=torch.long)
    return EndingScores(logprob.cpu(), norm, label)


def _fitting_batches(idx: list[int], rendered: list[Rendered], limit: int) -> list[list[int]]:
    """Split a batch until its padded context + padded endings fit the model's context window (rarely needed)."""
    longest_prefix = max(len(rendered[i].context) - 1 for i in idx)
    longest_ending = max(len(e) for i in idx for e in rendered[i].endings)
    if longest_prefix + longest_ending <= limit or len(idx) == 1:
        return [idx]
    half = len(idx) // 2
    return _fitting_batches(idx[:half], rendered, limit) + _fitting_batches(idx[half:], rendered, limit)


def _forwards(batch: list[Rendered]) -> int:
    """How many model calls `_score_batch` makes for this batch: the context pass (when any context is longer than
    its last token) and the endings pass."""
    return 1 + (max(len(r.context) for r in batch) > 1)


def _padded(rows: list[list[int]], device, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of ``rows`` padded to the longest, on the right or on the left."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def _score_batch(model, batch: list[Rendered], device, limit: int) -> torch.Tensor:
    """(len(batch), 4) summed log-probs of the ending tokens.

    Pass 1 runs every context except its last token once, left-padded, and keeps the KV cache. Pass 2 repeats that
    cache 4x and runs one right-padded row per ending: [last context token, ending[:-1]], whose outputs predict
    exactly the ending's tokens. Padding only at the two outer ends keeps each context and its ending adjacent in
    the cache, which sliding-window attention needs. For models whose logits are lm_head(last hidden state),
    lm_head runs only on the scored outputs, unless the model is sharded (FSDP2): then only the full model's forward
    gathers its parameters, so it runs whole."""
    plain_head = model.config.model_type in PLAIN_HEAD_MODEL_TYPES and not is_fsdp_module(model)
    net = model.base_model if plain_head else model
    prefixes = [r.context[:-1] for r in batch]
    cache, prefix_mask = None, None
    if max(map(len, prefixes)) > 0:
        prefix_ids, prefix_mask = _padded(prefixes, device, left=True)
        extra = {} if plain_head else {"logits_to_keep": 1}
        positions = (prefix_mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = net(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=positions, use_cache=True,
                    **extra).cache
        cache.batch_repeat_interleave(NUM_ENDINGS)
        prefix_mask = prefix_mask.repeat_interleave(NUM_ENDINGS, dim=0)
    endings = [e for r in batch for e in r.endings]
    ids, mask = _padded([[r.context[-1], *e[:-1]] for r in batch for e in r.endings], device)
    start = torch.tensor([len(p) for p in prefixes for _ in range(NUM_ENDINGS)], device=device)
    # padded slots at the right end are clamped into the position table; they are masked out and never scored
    position_ids = (start[:, None] + torch.arange(ids.shape[1], device=device)).clamp(max=limit - 1)
    full_mask = mask if prefix_mask is None else torch.cat([prefix_mask, mask], dim=1)
    out = net(input_ids=ids, attention_mask=full_mask, position_ids=position_ids, cache=cache,
              use_cache=cache is not None)
    # Which output predicts which ending token is known on the host: indexing with it (not with a boolean mask)
    # keeps the GPU from waiting on the host between batches.
    width = ids.shape[1]
    flat = torch.tensor([i * width + k for i, e in enumerate(endings) for k in range(len(e))])
    owner = torch.tensor([i for i, e in enumerate(endings) for _ in e])
    target = torch.tensor([t for e in endings for t in e])
    flat, owner, target = (x.to(device, non_blocking=True) for x in (flat, owner, target))
    picked = (out.last_hidden_state if plain_head else out.logits).flatten(0, 1).index_select(0, flat)
    logits = model.get_output_embeddings()(picked) if plain_head else picked
    nll = F.cross_entropy(logits.float(), target, reduction="none")
    sums = torch.zeros(len(endings), dtype=torch.float64, device=device).index_add_(0, owner, -nll.double())
    return sums.reshape(len(batch), NUM_ENDINGS)


def evaluate_hellaswag(model, tokenizer, examples: list[dict], convention: str = "completion", batch_size: int = 32,
                       accelerator=None, show_progress: bool = True) -> dict:
    """``{"convention", "acc", "acc_norm", "n"}`` over ``examples``.

    With an ``accelerator`` each rank scores its share and the counts are summed across ranks (every rank gets the
    result). Call it on every rank with the unwrapped, uncompiled model (for FSDP2, the sharded root module: the ranks
    then make the same number of forwards); the model's train/eval mode is restored afterwards."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown HellaSwag convention {convention!r}; expected one of {list(CONVENTIONS)}")
    main = accelerator is None or accelerator.is_main_process
    agree = None
    if accelerator is None:
        local = examples
    else:
        with accelerator.split_between_processes(examples) as part:
            local = list(part)
        if accelerator.num_processes > 1:  # equal forwards: sharded models need them, pretrain.py checks in each
            def agree(n: int) -> int:
                return int(accelerator.reduce(torch.tensor(n, device=accelerator.device), "max").item())
    counts = torch.zeros(3, dtype=torch.float64)
    if local or agree is not None:  # a sharded model needs every rank in each forward, even one without examples
        scores = score_endings(model, tokenizer, local, convention, batch_size, show_progress and main, agree)
        counts = torch.tensor([
            len(local),
            (scores.predictions() == scores.label).sum().item(),
            (scores.predictions(normalized=True) == scores.label).sum().item(),
        ], dtype=torch.float64)
    if accelerator is not None:
        counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
    n, correct, correct_norm = counts.tolist()
    if n == 0:
        raise ValueError("no HellaSwag examples to evaluate")
    return {"convention": convention, "acc": correct / n, "acc_norm": correct_norm / n, "n": int(n)}
