"""The zero-shot suite through lm-evaluation-harness: lm-eval's own task definitions on local HellaSwag- and ARC-format
files, run on our model object; its HellaSwag picks equal our fast scorer's, its ARC numbers equal a plain
one-choice-at-a-time reference, and the numbers reach eval_results.json, the table, the chart and the model card."""

import json
import random
import shutil
from importlib.metadata import version

import pytest
import torch
import yaml

pytest.importorskip("lm_eval")

from test_hellaswag import make_examples  # noqa: E402

import eval_hellaswag  # noqa: E402
from conftest import assert_png, make_tiny_model, write_jsonl  # noqa: E402
from gpt2custom.checkpoints import load_model  # noqa: E402
from gpt2custom.evaluation import local_task_file, run_lm_eval  # noqa: E402
from gpt2custom.hellaswag import score_endings  # noqa: E402
from gpt2custom.hub import write_model_card  # noqa: E402


def make_arc(text: str, n: int = 12, seed: int = 1) -> list[dict]:
    """ARC-shaped questions (the Hub's allenai/ai2_arc rows) from real sentences, with 3 to 5 choices and both label
    styles (A-D and 1-4) as the real set has."""
    rng = random.Random(seed)
    lines = [line.strip() for line in text.splitlines() if 4 <= len(line.split()) <= 12]
    rows = []
    for i in range(n):
        k = rng.choice([3, 4, 4, 5])
        labels = [str(j + 1) for j in range(k)] if i % 4 == 3 else ["ABCDE"[j] for j in range(k)]
        rows.append({"id": f"fixture_{i}", "question": rng.choice(lines) + "?",
                     "choices": {"text": [rng.choice(lines) for _ in range(k)], "label": labels},
                     "answerKey": rng.choice(labels)})
    return rows


def arc_reference(model, tokenizer, rows) -> dict:
    """acc / acc_norm of ARC by plain loops: lm-eval's prompt "Question: q\\nAnswer:", each choice as " " + text
    encoded with the prompt and cut after the prompt's tokens, summed log-probs; acc_norm divides by characters."""
    acc = acc_norm = 0
    with torch.no_grad():
        for row in rows:
            context = f"Question: {row['question']}\nAnswer:"
            ctx = tokenizer.encode(context)
            scores = []
            for choice in row["choices"]["text"]:
                ending = tokenizer.encode(context + " " + choice)[len(ctx):]
                logits = model(torch.tensor([ctx + ending])).logits[0].double().log_softmax(-1)
                scores.append(sum(logits[len(ctx) - 1 + k, t].item() for k, t in enumerate(ending)))
            gold = row["choices"]["label"].index(row["answerKey"])
            acc += max(range(len(scores)), key=scores.__getitem__) == gold
            lengths = [len(c) for c in row["choices"]["text"]]
            acc_norm += max(range(len(scores)), key=lambda j: scores[j] / lengths[j]) == gold
    return {"acc": acc / len(rows), "acc_norm": acc_norm / len(rows)}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, real_text):
    folder = tmp_path_factory.mktemp("lm_eval_data")
    return {"hellaswag": write_jsonl(folder / "hellaswag_val.jsonl", make_examples(real_text, n=16, seed=5)),
            "arc_easy": write_jsonl(folder / "arc_easy_test.jsonl", make_arc(real_text))}


def test_local_task_file_includes_the_stock_definition_and_points_it_at_the_file(tmp_path, fixtures):
    path = local_task_file(tmp_path, "arc_easy", fixtures["arc_easy"])
    config = yaml.safe_load(path.read_text())
    assert config["include"].endswith("lm_eval/tasks/arc/arc_easy.yaml") and config["task"] == "arc_easy"
    assert config["dataset_kwargs"] == {"data_files": {"test": str(fixtures["arc_easy"])}}
    assert "doc_to_text" not in config  # prompts, choices and metrics stay lm-eval's


def test_lm_eval_hellaswag_picks_equal_our_fast_scorer_on_every_example(tmp_path, fixtures, tokenizer):
    model = make_tiny_model()
    local_task_file(tmp_path, "hellaswag", fixtures["hellaswag"])
    out = run_lm_eval(model, tokenizer, ["hellaswag"], include_path=tmp_path, batch_size=8, bootstrap_iters=0,
                      log_samples=True)
    samples = sorted(out["samples"]["hellaswag"], key=lambda s: s["doc_id"])
    theirs = torch.tensor([[r[0] for r in s["filtered_resps"]] for s in samples], dtype=torch.float64)
    examples = [json.loads(line) for line in fixtures["hellaswag"].read_text().splitlines()]
    ours = score_endings(model, tokenizer, examples, "harness", batch_size=4)
    assert len(samples) == len(examples) == 16
    torch.testing.assert_close(ours.logprob, theirs, rtol=1e-5, atol=1e-4)  # the same log-likelihoods
    assert ours.predictions().tolist() == theirs.argmax(dim=1).tolist()
    lengths = torch.tensor([[len(c) for c in s["doc"]["choices"]] for s in samples], dtype=torch.float64)
    assert ours.predictions(normalized=True).tolist() == (theirs / lengths).argmax(dim=1).tolist()
    assert [s["acc"] for s in samples] == (ours.predictions() == ours.label).double().tolist()
    assert [s["acc_norm"] for s in samples] == (ours.predictions(normalized=True) == ours.label).double().tolist()
    assert len(set(ours.predictions().tolist())) > 1  # picks that vary: the comparison can fail


@pytest.mark.slow
def test_script_writes_lm_eval_scores_to_results_chart_and_model_card(tmp_path, fixtures, tiny_checkpoint, capsys):
    out = tmp_path / "eval"
    eval_hellaswag.main(["--models", str(tiny_checkpoint), "--hellaswag_path", str(fixtures["hellaswag"]),
                         "--tasks", "hellaswag", "arc_easy", "--task_data", f"hellaswag={fixtures['hellaswag']}",
                         f"arc_easy={fixtures['arc_easy']}", "--out_dir", str(out), "--lm_eval_batch_size", "8",
                         "--bootstrap_iters", "10"])
    data = json.loads((out / "eval_results.json").read_text())
    assert data["lm_eval"]["version"] == version("lm_eval") and data["lm_eval"]["num_fewshot"] == 0
    assert data["lm_eval"]["tasks"]["arc_easy"] == {"dataset": str(fixtures["arc_easy"]), "dataset_name": None,
                                                    "split": "test", "n": 12, "task_version": 1.0}
    assert data["lm_eval"]["tasks"]["hellaswag"]["split"] == "validation"
    (row,) = data["results"]
    # lm-eval's HellaSwag equals our scorer's harness convention; ARC equals the plain reference
    assert {k: row["lm_eval"]["hellaswag"][k] for k in ("acc", "acc_norm")} == row["hellaswag_harness"]
    model = load_model(str(tiny_checkpoint)).eval()
    tokenizer = eval_hellaswag.tokenizer_for(str(tiny_checkpoint), None)
    arc = [json.loads(line) for line in fixtures["arc_easy"].read_text().splitlines()]
    reference = arc_reference(model, tokenizer, arc)
    assert {k: row["lm_eval"]["arc_easy"][k] for k in ("acc", "acc_norm")} == pytest.approx(reference, abs=1e-12)
    p = reference["acc"]
    assert row["lm_eval"]["arc_easy"]["acc_stderr"] == pytest.approx((p * (1 - p) / (len(arc) - 1)) ** 0.5)
    table = capsys.readouterr().out
    assert "arc_easy acc_norm" in table and f"{100 * reference['acc_norm']:.2f}" in table
    assert_png(out / "eval_results.png")

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model_dir)
    card = write_model_card(model_dir, model_id="me/tiny", eval_json=data | {"results": [{**row, "model": "me/tiny"}]})
    index = {(r.dataset_name, r.metric_type): r for r in card.data.eval_results}
    arc_acc = index["ARC-Easy", "acc"]
    assert arc_acc.metric_value == row["lm_eval"]["arc_easy"]["acc"] and arc_acc.dataset_split == "test"
    assert arc_acc.metric_name == f"acc (0-shot, lm-evaluation-harness {version('lm_eval')}, task arc_easy)"
    assert arc_acc.dataset_type == "allenai/ai2_arc" and arc_acc.dataset_args["data_files"] == str(fixtures["arc_easy"])
    assert ("HellaSwag", "acc_norm") in index and ("ARC-Easy", "acc_stderr") not in index
    text = (model_dir / "README.md").read_text()
    assert f"lm-evaluation-harness]({'https://github.com/EleutherAI/lm-evaluation-harness'})\n{version('lm_eval')}" in text
    assert f"{row['lm_eval']['arc_easy']['acc']:.4f} ± {row['lm_eval']['arc_easy']['acc_stderr']:.4f}" in text


@pytest.mark.parametrize("task_data, message", [
    ("arc_easy={missing}", "is not a .jsonl/.json/.csv/.parquet file"),
    ("piqa={missing}", "expected TASK=FILE with TASK one of --tasks ['arc_easy']"),
    # HellaSwag rows given as ARC: lm-eval would fail on its prompt template only after the model loaded
    ("arc_easy={hellaswag}", "lacks the column(s) ['question', 'choices', 'answerKey'] that lm-eval's arc_easy reads"),
    ("arc_easy={empty}", "has no rows"),
])
def test_bad_task_data_is_one_clear_error_before_any_model_loads(tmp_path, task_data, message):
    files = {"missing": tmp_path / "nowhere.jsonl", "hellaswag": tmp_path / "hs.jsonl", "empty": tmp_path / "e.jsonl"}
    write_jsonl(files["hellaswag"], make_examples("A short line of text for the context.\n" * 20, n=3))
    files["empty"].write_text("")
    with pytest.raises(SystemExit) as exit_:
        eval_hellaswag.main(["--models", str(tmp_path / "no_model"), "--conventions", "none", "--tasks", "arc_easy",
                             "--task_data", task_data.format(**files), "--out_dir", str(tmp_path / "out")])
    assert str(exit_.value.code).startswith("eval_hellaswag.py: error: ") and message in str(exit_.value.code)
    assert "\n" not in str(exit_.value.code) and not (tmp_path / "out" / "eval_results.json").exists()
