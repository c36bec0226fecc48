"""Perplexity: exp of the mean token loss, checked against hand loops; its sources; the comparison outputs."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import assert_png, make_tiny_model
from gpt2custom.evaluation import (
    load_perplexity_tokens,
    perplexity,
    plot_comparison,
    results_table,
    sliding_windows,
    write_json,
)


@pytest.fixture(scope="module")
def tokens(tokenizer, real_text):
    return np.asarray(tokenizer.encode(real_text[:2500]), dtype=np.int64)  # about 700 tokens


def test_perplexity_is_exp_of_mean_loss_over_non_overlapping_windows(tokens):
    model = make_tiny_model(block_size=128)
    n = len(tokens)
    starts = list(range(0, n - 129, 128)) + [n - 129]  # windows of 129 tokens; the last one ends at the last token
    nll, count, done = 0.0, 0, 0
    with torch.no_grad():
        for start in starts:
            window = torch.tensor(tokens[start : start + 129])
            logprobs = torch.log_softmax(model(window[None, :-1]).logits[0].double(), dim=-1)
            for i in range(128):
                if start + i + 1 > done:  # each token is scored once
                    nll -= logprobs[i, window[i + 1]].item()
                    count += 1
            done = start + 128
    result = perplexity(model, tokens, batch_size=3, show_progress=False, dataset="hand")
    assert count == len(tokens) - 1 == result["tokens"]
    assert result["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert result["dataset"] == "hand"


def test_strided_perplexity_scores_each_token_once_with_its_window_context(tokens):
    """Reference: every token j >= 1 predicted from its own context, one forward per token. Windows of L inputs
    move by S; the first scores tokens 1..L from the start, later ones score the next S tokens, seeing L inputs."""
    model = make_tiny_model(block_size=64)
    L, S, n = 32, 12, 150
    toks = tokens[:n]
    nll = 0.0
    with torch.no_grad():
        for j in range(1, n):
            if j <= L:
                start = 0
            else:
                end = min(n, L + 1 + math.ceil((j - L) / S) * S)  # the end of the span of targets holding j
                start = end - 1 - L
                assert j - start >= L - S + 1  # at least L - S tokens of context, the point of the stride
            logits = model(torch.tensor(toks[start:j])[None], logits_to_keep=1).logits[0, -1].double()
            nll -= torch.log_softmax(logits, dim=-1)[toks[j]].item()
    result = perplexity(model, toks, max_length=L, stride=S, batch_size=4, show_progress=False)
    assert result["tokens"] == n - 1
    assert result["loss"] == pytest.approx(nll / (n - 1), rel=1e-5)
    one_at_a_time = perplexity(model, toks, max_length=L, stride=S, batch_size=1, show_progress=False)
    assert one_at_a_time["loss"] == pytest.approx(result["loss"], rel=1e-6)


@pytest.mark.parametrize("num_tokens, max_length, stride", [(2, 8, 8), (9, 8, 8), (10, 8, 8), (100, 8, 3), (57, 16, 1)])
def test_windows_tile_the_targets_with_equal_input_lengths(num_tokens, max_length, stride):
    windows = sliding_windows(num_tokens, max_length, stride)
    scored = [t for _, s, e in windows for t in range(s, e)]
    assert scored == list(range(1, num_tokens))
    assert {e - 1 - a for a, _, e in windows} == {min(num_tokens - 1, max_length)}
    assert all(a < s for a, s, _ in windows)  # every target has at least one input before it


def test_text_file_and_local_dataset_sources(tmp_path, tokenizer):
    text = "The cat sat on the mat.\nIt was warm.\n"
    (tmp_path / "a.txt").write_text(text)
    ids, description = load_perplexity_tokens(str(tmp_path / "a.txt"), tokenizer)
    assert ids.tolist() == tokenizer.encode(text) and description == str(tmp_path / "a.txt")
    assert load_perplexity_tokens(str(tmp_path / "a.txt"), tokenizer, max_tokens=3)[0].tolist() == ids[:3].tolist()

    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(["a b", "c d"])))
    ids, description = load_perplexity_tokens(str(folder), tokenizer, split="train")
    assert ids.tolist() == tokenizer.encode("a b\n\nc d")  # documents joined by a blank line, as for wikitext
    assert description == f"{folder} (train)"
    with pytest.raises(ValueError, match=r"has no column 'content'; its columns are \['text', 'n'\]"):
        load_perplexity_tokens(str(folder), tokenizer, split="train", column="content")


def test_shard_folder_source_reads_the_split_in_manifest_order(tmp_path, tokens):
    from gpt2custom.data import MANIFEST, MANIFEST_FORMAT, write_shard

    parts = {"val_000000.bin": tokens[:300], "val_000001.bin": tokens[300:], "train_000000.bin": tokens[:5]}
    for name, part in parts.items():
        write_shard(tmp_path / name, part)
    manifest = {split: {"shards": [{"file": n, "tokens": len(p)} for n, p in parts.items() if n.startswith(split)]}
                for split in ("val", "train")}
    (tmp_path / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "splits": manifest}))
    ids, description = load_perplexity_tokens(str(tmp_path), tokenizer=None)
    assert ids.tolist() == tokens.tolist() and description == f"{tmp_path} (val shards)"
    assert load_perplexity_tokens(str(tmp_path), None, max_tokens=350)[0].tolist() == tokens[:350].tolist()
    assert load_perplexity_tokens(str(tmp_path), None, split="train")[0].tolist() == tokens[:5].tolist()


def test_token_ids_outside_the_vocabulary_are_one_clear_error():
    model = make_tiny_model()
    with pytest.raises(ValueError, match="shards: token id 60000 is outside the model's vocabulary of 50304"):
        perplexity(model, np.array([1, 2, 60000]), show_progress=False, dataset="shards")


def test_comparison_outputs(tmp_path):
    results = [
        {"model": "ours", "hellaswag_completion": {"acc": 0.25, "acc_norm": 0.3}, "perplexity": {"loss": 3.0, "ppl": 20.09}},
        {"model": "openai-community/gpt2", "hellaswag_completion": {"acc": 0.2859, "acc_norm": 0.2955}},
    ]
    table = results_table(results).splitlines()
    assert table[0].split(" | ")[:3] == ["model                ", "completion acc", "completion acc_norm"]
    assert "28.59" in table[3] and "29.55" in table[3] and table[3].rstrip().endswith("-")
    assert "harness" not in table[0]  # only conventions that were run
    write_json(tmp_path / "r.json", {"results": results})
    assert json.loads((tmp_path / "r.json").read_text()) == {"results": results}
    plot_comparison(results, tmp_path / "r.png")
    assert_png(tmp_path / "r.png", series=2)  # one bar colour per model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png"]  # no temporary files left


def test_a_run_with_perplexity_only_charts_it_and_a_run_without_scores_writes_no_chart(tmp_path):
    # the smoke pipeline's evaluation: no HellaSwag, no lm-eval task, one model's perplexity on the val shards
    ours = {"model": "runs/smoke/pretrain/final", "perplexity": {"dataset": "runs/smoke/data", "loss": 4.89,
                                                                  "ppl": 132.9, "tokens": 20000}}
    assert plot_comparison([ours], tmp_path / "ppl.png") is True
    assert_png(tmp_path / "ppl.png", min_width=700, series=1)  # an axis of its own, not an empty 240 px box
    assert plot_comparison([{"model": "m"}], tmp_path / "none.png") is False and not (tmp_path / "none.png").exists()
