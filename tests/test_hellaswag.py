"""HellaSwag: both conventions against a slow one-example-at-a-time reference, batching, export, ranks, bad input."""

import json
import random
import re
import socket

import datasets
import lm_eval.tasks.hellaswag.utils as lm_eval_hellaswag
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import assert_png, make_tiny_model, run_script, serve_directory, write_jsonl
from gpt2custom.checkpoints import export_gpt2, load_model
from gpt2custom.hellaswag import evaluate_hellaswag, load_hellaswag, read_examples, score_endings

ACTIVITIES = ["Removing ice from car", "Baking cookies", "Home and Garden", "Playing harmonica", "Personal Care"]


def make_examples(text: str, n: int = 20, seed: int = 0) -> list[dict]:
    """HellaSwag-shaped examples from real sentences: ActivityNet-style ones, and WikiHow-style ones with the
    bracket markers ([header], [title], [step]) and mixed-case ctx_b that the harness preprocessing rewrites."""
    rng = random.Random(seed)
    lines = [line.strip() for line in text.splitlines() if len(line.split()) >= 4]
    examples = []
    for i in range(n):
        ctx_a = rng.choice(lines)
        ctx_b = rng.choice(["", "he", "the Man then", "they Keep going and"])
        if i % 3 == 0:
            ctx_a = f"[header] How to {rng.choice(lines).lower()} [title] {rng.choice(lines)}"
        endings = [rng.choice(lines) for _ in range(4)]
        if i % 4 == 0:
            endings[1] = f"[step] {endings[1]} [substeps] {endings[2]}"
        examples.append({
            "ind": i, "activity_label": rng.choice(ACTIVITIES), "ctx_a": ctx_a, "ctx_b": ctx_b,
            "ctx": f"{ctx_a} {ctx_b}" if ctx_b else ctx_a, "endings": endings, "label": rng.randrange(4),
            "split": "val", "split_type": "indomain", "source_id": f"fixture~{i}",
        })
    return examples


@pytest.fixture(scope="module")
def examples(real_text):
    return make_examples(real_text)


@pytest.fixture(scope="module")
def fixture_file(tmp_path_factory, examples):
    return write_jsonl(tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl", examples)


# --------------------------------------------------------------------------- the reference: one ending at a time


def reference_example(model, tokenizer, ex, convention):
    """(summed log-probs, acc_norm divisors) of the 4 endings, one full forward per ending, plain loops."""
    if convention == "completion":
        context = tokenizer.encode(ex["ctx"])
        endings = [tokenizer.encode(" " + e) for e in ex["endings"]]
        divisors = [len(e) for e in endings]
    else:
        # lm-evaluation-harness's own document processing (its hellaswag task's process_docs)
        doc = lm_eval_hellaswag.process_docs(datasets.Dataset.from_list([ex]))[0]
        query, choices = doc["query"], doc["choices"]
        context = tokenizer.encode(query)
        endings = [tokenizer.encode(query + " " + c)[len(context):] for c in choices]
        divisors = [len(c) for c in choices]
    limit = model.config.max_position_embeddings
    longest = max(len(e) for e in endings)
    if len(context) + longest > limit:
        context = context[len(context) + longest - limit:]
    scores = []
    for ending in endings:
        logits = model(torch.tensor([context + ending])).logits[0]
        total = 0.0
        for k, token in enumerate(ending):  # the logits at position p predict the token at p + 1
            total += torch.log_softmax(logits[len(context) - 1 + k].double(), dim=-1)[token].item()
        scores.append(total)
    return scores, divisors


def reference_predictions(model, tokenizer, examples, convention):
    scores, preds, preds_norm = [], [], []
    with torch.no_grad():
        for ex in examples:
            s, d = reference_example(model, tokenizer, ex, convention)
            scores.append(s)
            preds.append(max(range(4), key=lambda i: s[i]))
            preds_norm.append(max(range(4), key=lambda i: s[i] / d[i]))
    return torch.tensor(scores, dtype=torch.float64), preds, preds_norm


# ------------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("convention", ["completion", "harness"])
def test_convention_equals_one_at_a_time_reference_on_every_example(convention, examples, tokenizer):
    model = make_tiny_model()
    ref_scores, ref_preds, ref_preds_norm = reference_predictions(model, tokenizer, examples, convention)
    scores = score_endings(model, tokenizer, examples, convention, batch_size=8)
    torch.testing.assert_close(scores.logprob, ref_scores, rtol=1e-5, atol=1e-4)
    assert scores.predictions().tolist() == ref_preds
    assert scores.predictions(normalized=True).tolist() == ref_preds_norm
    result = evaluate_hellaswag(model, tokenizer, examples, convention, batch_size=8, show_progress=False)
    labels = [ex["label"] for ex in examples]
    assert result == {
        "convention": convention,
        "acc": sum(p == y for p, y in zip(ref_preds, labels)) / len(examples),
        "acc_norm": sum(p == y for p, y in zip(ref_preds_norm, labels)) / len(examples),
        "n": len(examples),
    }


def test_conventions_score_different_texts(examples, tokenizer):
    model = make_tiny_model()
    completion = score_endings(model, tokenizer, examples, "completion")
    harness = score_endings(model, tokenizer, examples, "harness")
    assert not torch.allclose(completion.logprob, harness.logprob)
    assert (harness.norm > completion.norm).all()  # characters against tokens


def test_batched_equals_unbatched(examples, tokenizer):
    model = make_tiny_model(seed=1)
    one = score_endings(model, tokenizer, examples, "harness", batch_size=1)
    many = score_endings(model, tokenizer, examples, "harness", batch_size=7)
    torch.testing.assert_close(many.logprob, one.logprob, rtol=1e-5, atol=1e-4)
    assert many.predictions().tolist() == one.predictions().tolist()
    assert many.predictions(normalized=True).tolist() == one.predictions(normalized=True).tolist()


def test_contexts_longer_than_the_model_window_keep_their_latest_tokens(examples, tokenizer):
    model = make_tiny_model(block_size=36)  # many fixture contexts + endings exceed 36 tokens
    ref_scores, ref_preds, _ = reference_predictions(model, tokenizer, examples[:10], "completion")
    scores = score_endings(model, tokenizer, examples[:10], "completion", batch_size=10)
    torch.testing.assert_close(scores.logprob, ref_scores, rtol=1e-5, atol=1e-4)
    assert scores.predictions().tolist() == ref_preds


def test_an_ending_longer_than_the_model_window_is_one_error_naming_the_example(examples, tokenizer):
    """Not an IndexError from deep in the scorer: the context would be cut to nothing (seen with a 32-token model)."""
    model = make_tiny_model(block_size=8)
    long = dict(examples[0], endings=[" ".join(["word"] * 12)] * 4)
    with pytest.raises(ValueError, match=r"HellaSwag example 0 \(ind .*\): an ending of 12 tokens does not fit .* 8 tokens"):
        score_endings(model, tokenizer, [long], "completion")


def test_stock_gpt2_export_scores_like_the_original(examples, tokenizer, tmp_path):
    model = make_tiny_model(seed=2)
    export_gpt2(model, tmp_path / "export", tokenizer)
    stock = load_model(str(tmp_path / "export")).eval()
    assert type(stock).__name__ == "GPT2LMHeadModel"
    for convention in ("completion", "harness"):
        ours = score_endings(model, tokenizer, examples, convention, batch_size=8)
        theirs = score_endings(stock, tokenizer, examples, convention, batch_size=8)
        torch.testing.assert_close(theirs.logprob, ours.logprob, rtol=1e-5, atol=1e-4)
        assert theirs.predictions(normalized=True).tolist() == ours.predictions(normalized=True).tolist()


def test_other_causal_lm_with_sliding_window_attention_equals_reference(examples, tokenizer):
    """A non-GPT-2 Hub architecture (GPT-Neo, local attention over 8 tokens in every other layer) goes through the
    full-logits path; each context must sit right before its ending in the cache for the window to be right."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(0)
    config = GPTNeoConfig(vocab_size=50304, max_position_embeddings=128, hidden_size=64, num_layers=2, num_heads=2,
                          attention_types=[[["global", "local"], 1]], window_size=8, initializer_range=0.2)
    model = GPTNeoForCausalLM(config).eval()
    ref_scores, ref_preds, ref_preds_norm = reference_predictions(model, tokenizer, examples[:10], "harness")
    scores = score_endings(model, tokenizer, examples[:10], "harness", batch_size=5)
    torch.testing.assert_close(scores.logprob, ref_scores, rtol=1e-5, atol=1e-4)
    assert scores.predictions().tolist() == ref_preds
    assert scores.predictions(normalized=True).tolist() == ref_preds_norm


def test_evaluation_restores_training_mode(examples, tokenizer):
    model = make_tiny_model().train()
    evaluate_hellaswag(model, tokenizer, examples[:3], show_progress=False)
    assert model.training


# ------------------------------------------------------------------------------------------------------ data


def test_download_goes_to_the_cache_once(tmp_path, fixture_file, examples):
    with serve_directory(fixture_file.parent) as server:
        url = f"{server.url}/{fixture_file.name}"
        assert load_hellaswag(url, cache_dir=tmp_path) == examples
    assert (tmp_path / fixture_file.name).read_bytes() == fixture_file.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [fixture_file.name]  # no temporary file left behind
    assert load_hellaswag(url, cache_dir=tmp_path) == examples  # the server is gone: served from the cache


def test_local_jsonl_and_hub_parquet_load_the_same_examples(tmp_path, fixture_file, examples):
    hub_rows = [{**ex, "label": str(ex["label"])} for ex in examples]  # Rowan/hellaswag stores labels as strings
    pq.write_table(pa.Table.from_pylist(hub_rows), tmp_path / "validation-00000-of-00001.parquet")
    from_parquet = load_hellaswag(tmp_path / "validation-00000-of-00001.parquet")
    assert load_hellaswag(fixture_file) == examples
    assert from_parquet == examples


def test_unreachable_download_names_the_url_and_the_way_out(tmp_path):
    with socket.socket() as s:  # bound and kept, never listening: connections are refused, nobody can take it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(ValueError, match=f"cannot download HellaSwag from http://127.0.0.1:{port}/x.jsonl"):
            load_hellaswag(f"http://127.0.0.1:{port}/x.jsonl", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("line3, message", [
    ('{"ctx": "broken', r":3: not valid JSON"),
    ('{"ctx": "a", "ctx_a": "a", "ctx_b": "", "activity_label": "x", "endings": ["a", "b", "c", "d"], "label": 4}',
     r":3: label 4 is out of range; expected 0-3"),
    ('{"ctx": "a", "ctx_a": "a", "ctx_b": "", "activity_label": "x", "endings": ["a", "b", "c", "d"], "label": ""}',
     r":3: label '' is not an integer"),
    ('{"ctx": "a", "ctx_a": "a", "ctx_b": "", "activity_label": "x", "endings": ["a", "b", "c"], "label": 0}',
     r":3: endings must be a list of 4 strings"),
    ('{"ctx": "a", "ctx_a": "a", "activity_label": "x", "endings": ["a", "b", "c", "d"], "label": 0}',
     r":3: missing key\(s\) \['ctx_b'\]"),
])
def test_bad_line_is_one_error_naming_file_and_line(tmp_path, examples, line3, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(examples[0]) + "\n" + json.dumps(examples[1]) + "\n" + line3 + "\n")
    with pytest.raises(ValueError, match=re.escape(str(path)) + message):
        read_examples(path)


def test_unloadable_model_is_one_clear_error(tmp_path, fixture_file):
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    proc = run_script("eval_hellaswag.py", "--models", broken, "--hellaswag_path", fixture_file,
                      "--out_dir", tmp_path / "out", check=False)
    assert proc.returncode == 1
    assert f"cannot load a causal LM from '{broken}'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ the script


@pytest.mark.slow
def test_two_gloo_ranks_write_the_results_of_one_process(tmp_path, tiny_checkpoint, fixture_file, real_text):
    text = tmp_path / "text.txt"
    text.write_text(real_text[:3000])
    proc = run_script(
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", 0,
        "eval_hellaswag.py", "--models", tiny_checkpoint, "--hellaswag_path", fixture_file, "--limit", "19",
        "--batch_size", "4", "--perplexity", text, "--stride", "100", "--cpu", "true", "--out_dir", tmp_path,
        env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
    )
    written = json.loads((tmp_path / "eval_results.json").read_text())
    assert_png(tmp_path / "eval_results.png")
    assert "completion acc" in proc.stdout and str(tiny_checkpoint) in proc.stdout  # the table, printed once
    assert proc.stdout.count("| completion acc |") == 1

    from gpt2custom.evaluation import perplexity, text_tokens
    from gpt2custom.tokenizer import load_tokenizer

    model, tokenizer = load_model(str(tiny_checkpoint)).eval(), load_tokenizer(str(tiny_checkpoint))
    examples = read_examples(fixture_file)[:19]
    one = {"model": str(tiny_checkpoint)}
    for convention in ("completion", "harness"):
        result = evaluate_hellaswag(model, tokenizer, examples, convention, show_progress=False)
        one[f"hellaswag_{convention}"] = {"acc": result["acc"], "acc_norm": result["acc_norm"]}
    ppl = perplexity(model, text_tokens(text.read_text(), tokenizer), stride=100, show_progress=False)
    assert written["hellaswag"] == {"split": "validation", "n": 19, "limit": 19, "source": str(fixture_file)}
    [two] = written["results"]
    assert {k: v for k, v in two.items() if k != "perplexity"} == one
    assert two["perplexity"]["tokens"] == ppl["tokens"]
    assert two["perplexity"]["loss"] == pytest.approx(ppl["loss"], rel=1e-6)  # other batch shapes: fp32 rounding
    assert two["perplexity"]["dataset"] == str(text)
