"""Publishing to the Hugging Face Hub: the model card, the exact folder to upload, and the upload.

    write_model_card(model_dir, model_id="org/gpt2custom-124m", eval_json="eval.json", training=summary)
    folder = build_upload_folder("runs/pretrain/final", "dry_run/", repo_id="org/gpt2custom-124m")
    upload_folder(folder, "org/gpt2custom-124m", private=True, revision="v1")

The card's `model-index` holds the HellaSwag and perplexity numbers of `eval_hellaswag.py`'s JSON; each HellaSwag
metric names its scoring convention, because the two conventions differ by several points on the same model. Its
lm-evaluation-harness numbers (`--tasks`) are named by task, metric and harness version. `eval_chat.py`'s summary
(`chat_eval`) adds the judged win rate against its baseline and a few side-by-side answers.
"""

import json
import math
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from safetensors import safe_open
from transformers import GenerationConfig

from configuration_gpt2custom import GPT2CustomConfig
from modeling_gpt2custom import GPT2CustomForCausalLM

from .chat import add_chat_format, stop_token_ids
from .checkpoints import export_gpt2
from .files import model_tokenizer
from .formatting import fmt_count, fmt_dollars, fmt_seconds
from .tokenizer import EOT_ID
from .training import MUON_VERDICT

HANDLER_FILE = Path(__file__).resolve().parents[1] / "handler.py"
# Installed by Inference Endpoints when the image is built: the remote code uses the 5.2x cache and mask APIs,
# and the default image may ship an older transformers.
ENDPOINT_REQUIREMENTS = "transformers>=5.24,<6\n"

HELLASWAG_CONVENTIONS = {
    "hellaswag_completion": ("completion", "completion style: build-nanogpt/llm.c"),
    "hellaswag_harness": ("lm-evaluation-harness", "lm-evaluation-harness style"),
}
PERPLEXITY = "perplexity"

# Sampling defaults for a published model: greedy decoding makes small GPT-2s loop on one sentence.
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 256}


# ------------------------------------------------------------------------------------------------- eval results


def _load_json(source: "str | Path | dict", default_name: str, script: str) -> tuple[dict, str]:
    """(data, where) from a path or an already-loaded dict; an unreadable file is one ValueError naming it."""
    if isinstance(source, dict):
        return source, default_name
    try:
        return json.loads(Path(source).read_text(encoding="utf-8")), str(source)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{source}: cannot read {script}'s JSON: {e}") from e


def read_eval_json(eval_json: "str | Path | dict") -> dict:
    """eval_hellaswag.py's output: `{"hellaswag": {...}, "results": [{"model": ..., ...}, ...]}`."""
    data, where = _load_json(eval_json, "eval results", "eval_hellaswag.py")
    if not isinstance(data, dict) or not isinstance(data.get("results"), list) or not data["results"]:
        raise ValueError(f"{where}: expected a JSON object with a non-empty 'results' list (eval_hellaswag.py output)")
    for i, row in enumerate(data["results"]):
        if not isinstance(row, dict) or "model" not in row:
            raise ValueError(f"{where}: results[{i}] has no 'model' key")
    return data


def read_chat_eval(chat_eval: "str | Path | dict") -> dict:
    """eval_chat.py's chat_eval.json: `{"model", "baseline", "judge", "prompts", "counts", "rates", ...}`."""
    data, where = _load_json(chat_eval, "chat eval results", "eval_chat.py")
    missing = [k for k in ("baseline", "judge", "prompts", "counts", "rates", "decided") if k not in data]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; expected eval_chat.py's chat_eval.json")
    return data


def _same_model(name: str, model_dir: Path, model_id: str) -> bool:
    return name == model_id or Path(name).expanduser().resolve() == model_dir.resolve()


def split_eval_rows(data: dict, model_dir: "str | Path", model_id: str) -> tuple[dict, list[dict]]:
    """(this model's row, the other rows): this model's row is the one whose `model` is the folder or the repo id."""
    rows = data["results"]
    ours = [r for r in rows if _same_model(str(r["model"]), Path(model_dir), model_id)]
    if len(ours) != 1:
        names = [r["model"] for r in rows]
        raise ValueError(
            f"eval results are for models {names}: expected exactly one to be {str(model_dir)!r} or {model_id!r} "
            "(run eval_hellaswag.py on this checkpoint folder)"
        )
    return ours[0], [r for r in rows if r is not ours[0]]


def eval_results_for(row: dict, hellaswag: dict) -> list[EvalResult]:
    """The model-index entries of one results row: acc/acc_norm per HellaSwag convention, and perplexity."""
    split = hellaswag.get("split", "validation")
    n = hellaswag.get("n")
    # `limit` set means a subset was scored: say so in the dataset args rather than pass it off as the full split.
    args = {"num_examples": n} if hellaswag.get("limit") else None
    results = []
    for key, (config, convention) in HELLASWAG_CONVENTIONS.items():
        for metric in ("acc", "acc_norm"):
            value = (row.get(key) or {}).get(metric)
            if value is None:
                continue
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="Text Generation",
                    dataset_type="Rowan/hellaswag",
                    dataset_name="HellaSwag",
                    dataset_split=split,
                    dataset_args=args,
                    metric_type=metric,
                    metric_value=float(value),
                    metric_name=f"{metric} (0-shot, {convention})",
                    metric_config=config,
                )
            )
    ppl = row.get(PERPLEXITY) or {}
    if ppl.get("ppl") is not None:
        dataset = str(ppl.get("dataset") or "held-out text")
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name="Text Generation",
                dataset_type=dataset,
                dataset_name=dataset,
                metric_type="perplexity",
                metric_value=float(ppl["ppl"]),
                metric_name=f"perplexity on {dataset}" + (f", {ppl['tokens']:,} tokens" if ppl.get("tokens") else ""),
            )
        )
    return results


# lm-eval task -> (dataset id on the Hub, the card's name for it), for tasks scored on local copies of their data
LM_EVAL_DATASETS = {
    "hellaswag": ("Rowan/hellaswag", "HellaSwag"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "piqa": ("baber/piqa", "PIQA"),
    "winogrande": ("allenai/winogrande", "WinoGrande"),
    "lambada_openai": ("EleutherAI/lambada_openai", "LAMBADA (OpenAI)"),
}


def lm_eval_results_for(row: dict, lm_eval: dict) -> list[EvalResult]:
    """The model-index entries of a row's lm-eval scores: one per task and metric (stderrs beside their metric)."""
    version, shots = lm_eval.get("version", "?"), lm_eval.get("num_fewshot", 0)
    results = []
    for task, scores in (row.get("lm_eval") or {}).items():
        info = (lm_eval.get("tasks") or {}).get(task) or {}
        hub_id, pretty = LM_EVAL_DATASETS.get(task, (None, task))
        dataset = str(info.get("dataset") or hub_id or task)
        local = Path(dataset).suffix in (".jsonl", ".json", ".csv", ".parquet")
        # a local copy is named after the Hub dataset it stands for, and says it is a local file in its args
        args = {k: v for k, v in (("data_files", dataset if local else None),
                                  ("num_examples", info.get("n") if lm_eval.get("limit") else None)) if v}
        for metric, value in scores.items():
            if metric.endswith("_stderr") or value is None:
                continue
            results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="Text Generation",
                    dataset_type=(hub_id or dataset) if local else dataset,
                    dataset_name=pretty,
                    dataset_config=info.get("dataset_name"),
                    dataset_split=info.get("split"),
                    dataset_args=args or None,
                    metric_type=metric,
                    metric_value=float(value),
                    metric_name=f"{metric} ({shots}-shot, lm-evaluation-harness {version}, task {task})",
                    metric_config=task,
                )
            )
    return results


def chat_eval_results_for(chat_eval: dict) -> list[EvalResult]:
    """The judged win rate as a model-index entry (and the score counting ties as half a win)."""
    rates, judge = chat_eval.get("rates") or {}, (chat_eval.get("judge") or {}).get("model", "?")
    prompts = chat_eval.get("prompts") or {}
    win = (rates.get("win") or {}).get("rate")
    if win is None:
        return []
    common = dict(task_type="text-generation", task_name="Chat (pairwise judged)",
                  dataset_type=str(prompts.get("source", "held-out prompts")), dataset_name="held-out chat prompts",
                  dataset_args={"num_examples": chat_eval.get("decided")})
    baseline = chat_eval.get("baseline", "baseline")
    results = [EvalResult(**common, metric_type="win_rate", metric_value=float(win),
                          metric_name=f"win rate vs {baseline} (judge {judge}, both orders)")]
    if chat_eval.get("score"):
        results.append(EvalResult(**common, metric_type="score", metric_value=float(chat_eval["score"]["value"]),
                                  metric_name=f"win + tie/2 vs {baseline} (judge {judge}, both orders)"))
    return results


def _suite_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the lm-eval scores: one column per task and metric, stderr in parentheses."""
    columns = list(dict.fromkeys((task, metric) for r in rows for task, scores in (r.get("lm_eval") or {}).items()
                                 for metric in scores if not metric.endswith("_stderr")))
    if not columns:
        return [], []
    table = []
    for r in rows:
        cells = [f"`{r['model']}`"]
        for task, metric in columns:
            scores = (r.get("lm_eval") or {}).get(task) or {}
            value, err = scores.get(metric), scores.get(f"{metric}_stderr")
            cells.append("-" if value is None else f"{value:.4f}" + (f" ± {err:.4f}" if err is not None else ""))
        table.append(cells)
    return [f"{task} {metric}" for task, metric in columns], table


def _eval_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): HellaSwag columns only when some row has a HellaSwag score; perplexity beside the text it was
    measured on, since perplexities on different texts (chat answers, pretraining shards) do not compare."""

    def cell(row, key, metric, fmt=".4f"):
        value = (row.get(key) or {}).get(metric)
        return "-" if value is None else format(value, fmt)

    hellaswag = any(r.get(key) for r in rows for key in HELLASWAG_CONVENTIONS)
    headers = ["acc (completion)", "acc_norm (completion)", "acc (harness)", "acc_norm (harness)"] if hellaswag else []
    with_ppl = any((r.get(PERPLEXITY) or {}).get("ppl") is not None for r in rows)
    headers += ["perplexity", "measured on"] if with_ppl else []
    table = []
    for r in rows:
        cells = [f"`{r['model']}`"]
        if hellaswag:
            cells += [cell(r, key, m) for key in HELLASWAG_CONVENTIONS for m in ("acc", "acc_norm")]
        if with_ppl:
            ppl = r.get(PERPLEXITY) or {}
            tokens = f" ({ppl['tokens']:,} tokens)" if ppl.get("tokens") else ""
            cells += [cell(r, PERPLEXITY, "ppl", ".2f"), f"{ppl.get('dataset') or '-'}{tokens}"]
        table.append(cells)
    return headers, table


# ------------------------------------------------------------------------------------------------- model card


def training_rows(training: dict) -> list[tuple[str, str]]:
    """(label, value) rows for the card from a run summary; keys that are absent or None are left out."""
    formats = {
        "tokens": ("Training tokens", lambda v: f"{fmt_count(v)} ({v:,})"),
        "steps": ("Optimizer steps", lambda v: f"{v:,}"),
        "wall_time_s": ("Training time", fmt_seconds),
        "tokens_per_s": ("Throughput", lambda v: f"{v:,.0f} tokens/s"),
        "mfu": ("Model FLOPs utilization", lambda v: f"{v:.1%}"),
        "gpu": ("Hardware", str),
        "num_processes": ("Processes (GPUs)", str),
        "dollars": ("Compute cost", fmt_dollars),
        "val_loss": ("Final validation loss", lambda v: f"{v:.4f}"),
        "hellaswag_acc_norm": ("HellaSwag acc_norm during training", lambda v: f"{v:.4f}"),
    }
    rows = [(label, fmt(training[k])) for k, (label, fmt) in formats.items() if training.get(k) is not None]
    rows += [
        (k, str(v))
        for k, v in training.items()
        if k not in formats and k != "config" and v is not None and not isinstance(v, (dict, list))
    ]
    return rows


def _count_parameters(model_dir: Path) -> int | None:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with safe_open(str(path), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A GPT-2 style causal language model ({{ params }} parameters) trained from scratch with Hugging Face tools
(transformers, accelerate{% if base_model %}, TRL{% endif %}).
{%- if base_model %} Fine-tuned from [{{ base_model }}](https://huggingface.co/{{ base_model }}).{% endif %}

| | |
|---|---|
| Architecture | {{ architecture }} |
| Layers / heads / width | {{ n_layer }} / {{ n_head }} / {{ n_embd }} |
| Context | {{ context }} tokens |
| Vocabulary | {{ vocab_size }} (GPT-2 BPE, 50257 ids; chat role markers in the spare ids) |
| Weights | safetensors, {{ dtype }} |

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{{ repo_id }}"{{ remote_arg }})
model = AutoModelForCausalLM.from_pretrained("{{ repo_id }}"{{ remote_arg }})
messages = [{"role": "user", "content": "Give me three tips for learning to cook."}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=128)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
{% if remote_code %}
The model code (`modeling_gpt2custom.py`, `configuration_gpt2custom.py`) lives in this repository, hence
`trust_remote_code=True`; pin `revision=` to a commit to run exactly the code you reviewed.
{% else %}
This is a stock `GPT2LMHeadModel`: no remote code, served as is by TGI, vLLM and the default Inference Endpoints
containers.
{% endif %}
The chat format is `<|system|>`, `<|user|>` and `<|assistant|>` lines; an answer ends with `<|endoftext|>`.
{%- if not fine_tuned %} A model that was only pretrained continues text and follows that format poorly.{% endif %}

### Inference Endpoints

`handler.py` serves this repository on a custom Inference Endpoint (`requirements.txt` pins transformers 5):

```bash
curl $ENDPOINT_URL -H "Authorization: Bearer $HF_TOKEN" -H "Content-Type: application/json" \\
  -d '{"inputs": [{"role": "user", "content": "Hi!"}], "parameters": {"max_new_tokens": 64}}'
# [{"generated_text": "..."}]
```

`inputs` is a string (continued as text) or a list of messages; parameters: `max_new_tokens`, `do_sample`,
`temperature` (0 = greedy), `top_p`, `top_k`, `repetition_penalty`, `seed`, `truncate`, `return_full_text`,
`details`. New tokens are capped by the context window; a longer input is refused unless `truncate` is given.

## Training
{% if training_rows %}
| | |
|---|---|
{% for label, value in training_rows -%}
| {{ label }} | {{ value }} |
{% endfor %}
{%- else %}
No run summary was found next to the checkpoint.
{% endif %}
{%- if optimizer %}
Optimizer: {{ optimizer }}. {{ muon_verdict }}
{% endif %}
{%- if datasets %}
Data: {% for d in datasets %}[{{ d }}](https://huggingface.co/datasets/{{ d }}){% if not loop.last %}, {% endif %}{% endfor %}.
{% endif %}
{%- if hyperparameters %}
<details><summary>Hyperparameters</summary>

| | |
|---|---|
{% for k, v in hyperparameters -%}
| `{{ k }}` | `{{ v }}` |
{% endfor %}
</details>
{% endif %}

## Evaluation
{% if suite_rows %}
Zero-shot suite through [lm-evaluation-harness](https://github.com/EleutherAI/lm-evaluation-harness)
{{ suite.version }} ({{ suite.num_fewshot }}-shot{% if suite.limit %}, first {{ suite.limit }} examples per task{% endif %};
task: dataset, split, examples: {% for task, info in suite.tasks.items() %}`{{ task }}`: {{ info.dataset }}, {{ info.split }}, {{ info.n }}{% if not loop.last %}; {% endif %}{% endfor %}).
`acc_norm` normalises the log-likelihood by the answer's length in characters; ± is the standard error.

| Model | {{ suite_headers | join(" | ") }} |
|---|{% for h in suite_headers %}---|{% endfor %}
{% for row in suite_rows -%}
| {{ row | join(" | ") }} |
{% endfor %}
{% endif %}
{%- if eval_rows %}
{%- if hellaswag_scored %}
0-shot HellaSwag ({{ hellaswag_split }} split{% if hellaswag_limit %}, first {{ hellaswag_n }} examples{% endif %}),
scored two ways that are not interchangeable: *completion style* (build-nanogpt / llm.c: each ending after the raw
context; `acc_norm` = lowest mean loss per token) and *lm-evaluation-harness style* (activity label and cleaned-up
text; `acc_norm` = highest log-likelihood per character). `acc` is the highest total log-likelihood in both.
Random chance is 0.25; OpenAI's GPT-2 124M scores acc_norm 0.2955 (completion) and 0.3114 (harness).
{% endif %}
{%- if "perplexity" in eval_headers %}
Perplexity is exp(mean loss per token) on the text named beside it; figures measured on different texts do not
compare.
{% endif %}
| Model | {{ eval_headers | join(" | ") }} |
|---|{% for h in eval_headers %}---|{% endfor %}
{% for row in eval_rows -%}
| {{ row | join(" | ") }} |
{% endfor %}
{%- elif not suite_rows %}
Not evaluated yet (`eval_hellaswag.py` writes the JSON this card reads).
{% endif %}
{%- if chat %}
### Chat: judged against {{ chat.baseline }}

{{ chat.judge.model }} compared this model's answers with {{ chat.baseline }}'s on {{ chat.prompts.n }} held-out
prompts (MT-Bench's pairwise prompt), each prompt twice with the answers' positions swapped; a win or a loss needs
both orders to agree, anything else is a tie. Rates over the {{ chat.decided }} prompts with two valid verdicts,
with Wilson 95 % intervals{% if chat.counts.invalid %} ({{ chat.counts.invalid }} prompts with a malformed verdict
left out){% endif %}.

| | prompts | rate | 95 % interval |
|---|---|---|---|
{% for outcome in ["win", "tie", "loss"] -%}
| {{ outcome }} | {{ chat.counts[outcome] }} | {% if chat.rates[outcome].rate is none %}- | -{% else %}{{ "%.3f"|format(chat.rates[outcome].rate) }} | {{ "%.3f"|format(chat.rates[outcome].ci95[0]) }} - {{ "%.3f"|format(chat.rates[outcome].ci95[1]) }}{% endif %} |
{% endfor %}
{% if chat.position_consistency is not none %}The judge gave the same verdict in both orders on {{ "%.0f"|format(100 * chat.position_consistency) }} % of the prompts.{% endif %}
{%- for ex in chat.examples %}

<details><summary>{{ ex.outcome }}: {{ ex.question[:100] | replace("\n", " ") }}</summary>

**Prompt:** {{ ex.question[:1000] }}

**This model:** {{ ex.model_answer[:1000] }}

**{{ chat.baseline }}:** {{ ex.baseline_answer[:1000] }}

</details>
{%- endfor %}
{% endif %}

## Intended use and limitations

A small research and teaching model: it shows what a GPT-2 sized network learns from its data and recipe, and is a
base for experiments. It is not a reliable source of facts: it makes things up with confidence, has no safety
tuning, reflects the biases of English web text, and forgets anything beyond its {{ context }}-token context. Do not
use it for decisions about people, medical, legal or financial advice, or anything where a wrong answer does harm.
"""


def write_model_card(
    model_dir: "str | Path",
    *,
    model_id: str,
    base_model: str | None = None,
    datasets=(),
    training: dict | None = None,
    eval_json: "str | Path | dict | None" = None,
    chat_eval: "str | Path | dict | None" = None,
    tags=(),
) -> ModelCard:
    """Write README.md (YAML metadata with `model-index`, then the card) into `model_dir` and return the card.

    `model_id` is the repo id ("org/name"); `training` a run summary (tokens, wall_time_s, tokens_per_s, mfu, gpu,
    dollars, config, ...) of which the present keys are shown; `eval_json` eval_hellaswag.py's output (a path or the
    parsed dict), of which the row for `model_dir` or `model_id` goes into `model-index` and all rows into the tables;
    `chat_eval` eval_chat.py's chat_eval.json (a path or the parsed dict): the judged win rate and a few examples.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise ValueError(f"{model_dir}: no config.json; expected a saved model folder")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    remote_code = "auto_map" in config
    model_name = model_id.split("/")[-1]

    eval_headers, eval_rows, hellaswag, results, suite, suite_headers, suite_rows = [], [], {}, [], {}, [], []
    if eval_json is not None:
        data = read_eval_json(eval_json)
        hellaswag = data.get("hellaswag") or {}
        suite = data.get("lm_eval") or {}
        ours, others = split_eval_rows(data, model_dir, model_id)
        results = eval_results_for(ours, hellaswag) + lm_eval_results_for(ours, suite)
        rows = [{**ours, "model": model_id}, *others]
        eval_headers, eval_rows = _eval_table(rows)
        suite_headers, suite_rows = _suite_table(rows)
    chat = read_chat_eval(chat_eval) if chat_eval is not None else None
    if chat:
        results += chat_eval_results_for(chat)

    card_tags = ["gpt2", "text-generation"] + (["custom_code"] if remote_code else []) + list(tags)
    card_data = ModelCardData(
        language="en",
        license="mit",
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(card_tags)),
        datasets=list(datasets) or None,
        base_model=base_model,
        model_name=model_name,
        eval_results=results or None,
    )
    training = training or {}
    hyperparameters = sorted(
        (k, v) for k, v in (training.get("config") or {}).items() if v is not None and not isinstance(v, dict)
    )
    params = _count_parameters(model_dir)
    card = ModelCard.from_template(
        card_data,
        template_str=CARD_TEMPLATE,
        repo_id=model_id,
        model_name=model_name,
        remote_arg=", trust_remote_code=True" if remote_code else "",
        remote_code=remote_code,
        params=fmt_count(params) if params else "unknown",
        architecture=(config.get("architectures") or [config.get("model_type")])[0],
        n_layer=config.get("n_layer"),
        n_head=config.get("n_head"),
        n_embd=config.get("n_embd"),
        context=config.get("block_size") or config.get("n_positions"),
        vocab_size=config.get("vocab_size"),
        dtype=config.get("dtype") or config.get("torch_dtype") or "float32",
        training_rows=training_rows(training),
        hyperparameters=hyperparameters,
        optimizer=(training.get("config") or {}).get("optimizer"),
        muon_verdict=MUON_VERDICT,
        eval_rows=eval_rows,
        eval_headers=eval_headers,
        hellaswag_scored="acc (completion)" in eval_headers,
        fine_tuned=bool(base_model) or bool(training.get("SFT")),
        suite=suite,
        suite_headers=suite_headers,
        suite_rows=suite_rows,
        chat=chat,
        hellaswag_split=hellaswag.get("split", "validation"),
        hellaswag_limit=hellaswag.get("limit"),
        hellaswag_n=hellaswag.get("n"),
    )
    card.save(model_dir / "README.md")
    return card


# ------------------------------------------------------------------------------------------------- upload folder


def _generation_config(tokenizer, existing: GenerationConfig) -> GenerationConfig:
    """The checkpoint's generation config with every chat role marker as a stop token and sampling defaults."""
    config = GenerationConfig(**{**existing.to_diff_dict(), "bos_token_id": EOT_ID, "pad_token_id": EOT_ID})
    config.eos_token_id = stop_token_ids(tokenizer)
    if not existing.do_sample:
        config.update(**SAMPLING_DEFAULTS)
    return config


def read_training_json(path: "str | Path") -> dict:
    """A run summary (pretrain.py's or sft.py's run_summary.json, the pipeline's card_training.json) for the card's
    training section; one error naming the file if it is not a JSON object."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such run summary")
    data, where = _load_json(path, "run summary", "the run summary")
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object (a run summary), got {type(data).__name__}")
    return data


def build_upload_folder(
    model_dir: "str | Path",
    out_dir: "str | Path",
    *,
    repo_id: str,
    stock_gpt2: bool = False,
    eval_json: "str | Path | dict | None" = None,
    chat_eval: "str | Path | dict | None" = None,
    training: dict | None = None,
    base_model: str | None = None,
    datasets=(),
    tags=(),
) -> Path:
    """Write exactly what gets uploaded into `out_dir` (which must not exist or be empty); returns it.

    Our format: model.safetensors, config.json with auto_map, the two model files, generation_config.json,
    tokenizer with chat template, handler.py, requirements.txt, README.md. `stock_gpt2=True`: the same, but the
    weights as a GPT2LMHeadModel and no model code. The folder is built beside `out_dir` and renamed into place.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").exists():
        raise ValueError(f"--model_dir {model_dir}: no config.json; expected a checkpoint folder (save_model_folder)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not empty: choose a new folder for the upload files")
    model_type = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type != GPT2CustomConfig.model_type:
        raise ValueError(
            f"{model_dir}/config.json: model_type {model_type!r}, expected {GPT2CustomConfig.model_type!r}"
        )
    eval_data = None if eval_json is None else _eval_renamed(eval_json, model_dir, repo_id)
    if training is None and (model_dir / "run_summary.json").exists():
        training = read_training_json(model_dir / "run_summary.json")

    # The repo's own classes: the published model files are this checkout's, and the logits test checks they fit.
    model = GPT2CustomForCausalLM.from_pretrained(model_dir, dtype="auto")
    tokenizer = model_tokenizer(model_dir, trust_remote_code=True)
    if not tokenizer.chat_template:
        add_chat_format(tokenizer, model.config.vocab_size)
    tokenizer.model_max_length = model.config.block_size
    # How this process loaded it (HF_HUB_OFFLINE, a local path), not a property of the tokenizer: keeping them
    # would make the published bytes depend on the environment that built them.
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        if stock_gpt2:
            export_gpt2(model, tmp, tokenizer)
        else:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        _generation_config(tokenizer, model.generation_config).save_pretrained(tmp)
        shutil.copyfile(HANDLER_FILE, tmp / "handler.py")
        (tmp / "requirements.txt").write_text(ENDPOINT_REQUIREMENTS, encoding="utf-8")
        write_model_card(
            tmp,
            model_id=repo_id,
            base_model=base_model,
            datasets=datasets,
            training=training,
            eval_json=eval_data,
            chat_eval=chat_eval,
            tags=tags,
        )
        tmp.chmod(0o755)  # mkdtemp makes it private; the result should look like any folder the user made
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _eval_renamed(eval_json: "str | Path | dict", model_dir: Path, repo_id: str) -> dict:
    """The eval results with the checkpoint's row named after the repo, which the upload folder's card matches."""
    data = read_eval_json(eval_json)
    ours, others = split_eval_rows(data, model_dir, repo_id)
    return {**data, "results": [{**ours, "model": repo_id}, *others]}


# ------------------------------------------------------------------------------------------------- upload


def upload_folder(
    folder: "str | Path",
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload model with gpt2custom publish.py",
):
    """Create the model repo (kept as is if it exists), the branch `revision` if needed, and upload `folder`.
    The token comes from HF_TOKEN or `hf auth login`; it is never printed. Returns the (last) CommitInfo."""
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=commit_message)
