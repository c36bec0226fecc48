"""The scripts' default Hub datasets, end to end: small replicas of HuggingFaceFW/fineweb-edu, Rowan/hellaswag and
argilla/magpie-ultra-v1.0, laid out file for file like the Hub repos (tests/fixtures/hub_replicas.py), served by a
local Hub (tests/fixtures/hub_server.py) that `huggingface_hub` and `datasets` reach through HF_ENDPOINT. The scripts
run with their default dataset ids and their own loading code; only where the Hub is changes."""

import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from datasets import Dataset

from conftest import REPO, run_main_here, serve_json

sys.path.insert(0, str(REPO / "tests" / "fixtures"))
import hub_replicas as replicas  # noqa: E402
from hub_server import HubServer, hub_endpoint  # noqa: E402

QUALITY_OK, DIFFICULTY_OK = ("good", "excellent"), ("very easy", "easy", "medium", "hard")  # configs/sft-124m.yaml


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory):
    return replicas.build_all(tmp_path_factory.mktemp("hub"))


class RecordingHub(HubServer):
    """The replica Hub, remembering the path of every request."""

    def __init__(self, root):
        super().__init__(root)
        self.requests = []
        handle = self.RequestHandlerClass.route
        requests = self.requests

        def route(handler, body):
            requests.append(handler.path)
            return handle(handler, body)

        self.RequestHandlerClass = type("Recording", (self.RequestHandlerClass,), {"route": route})


@pytest.fixture(scope="module")
def hub(hub_root, tmp_path_factory):
    """The replicas on a local Hub that this process's huggingface_hub and datasets use (caches of this module)."""
    with RecordingHub(hub_root) as server, pytest.MonkeyPatch.context() as monkeypatch:
        server.cache = tmp_path_factory.mktemp("hf_cache")
        hub_endpoint(monkeypatch, server.url, server.cache)
        yield server


@pytest.fixture
def fresh_caches(hub, tmp_path, monkeypatch):
    """Empty Hub and datasets caches: every file is fetched again, and datasets cannot fall back on a cached copy
    when the Hub refuses."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


# ------------------------------------------------------------------------------------------------------- HellaSwag


def test_hellaswag_loads_from_the_hub_parquet_export(hub, tmp_path):
    from gpt2custom.hellaswag import load_hellaswag

    # The Hub's rows with the label as an int: what the original jsonl holds.
    expected = [{**row, "label": int(row["label"])} for row in replicas.hellaswag_rows()["validation"]]
    assert load_hellaswag(cache_dir=tmp_path / "hs") == expected
    assert any("refs%2Fconvert%2Fparquet" in path for path in hub.requests)


def test_eval_hellaswag_scores_the_hub_data_with_our_scorer_and_lm_eval_without_task_data(hub, tmp_path,
                                                                                           tiny_checkpoint):
    import eval_hellaswag

    out = tmp_path / "eval"
    run_main_here(eval_hellaswag.main, ["--models", str(tiny_checkpoint), "--conventions", "completion", "--tasks",
                                        "hellaswag", "--limit", "5", "--bootstrap_iters", "0", "--cache_dir",
                                        str(tmp_path / "hs"), "--out_dir", str(out)])
    written = json.loads((out / "eval_results.json").read_text())
    assert written["hellaswag"]["n"] == 5 and "Rowan/hellaswag" in written["hellaswag"]["source"]
    lm_eval_task = written["lm_eval"]["tasks"]["hellaswag"]
    assert lm_eval_task["dataset"] == "Rowan/hellaswag" and lm_eval_task["n"] == 5
    # both picked from the same five examples: lm-eval's acc and our completion convention are each a count of 5
    row = written["results"][0]
    assert 5 * row["lm_eval"]["hellaswag"]["acc"] == round(5 * row["lm_eval"]["hellaswag"]["acc"])
    assert 5 * row["hellaswag_completion"]["acc"] == round(5 * row["hellaswag_completion"]["acc"])


def test_lm_eval_task_on_a_script_only_hub_dataset_is_one_line_naming_it(hub, fresh_caches, tmp_path,
                                                                         tiny_checkpoint):
    """lm-eval's own hellaswag task reads Rowan/hellaswag's main branch, which holds only a loading script."""
    import lm_eval.tasks

    import eval_hellaswag

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    stock = Path(lm_eval.tasks.__file__).parent / "hellaswag" / "hellaswag.yaml"
    (tasks / "hs_main.yaml").write_text(json.dumps({"include": str(stock), "task": "hs_main"}))
    with pytest.raises(SystemExit) as stop:
        run_main_here(eval_hellaswag.main, ["--models", str(tiny_checkpoint), "--tasks", "hs_main", "--include_path",
                                            str(tasks), "--conventions", "none", "--out_dir", str(tmp_path / "o")])
    message = str(stop.value.code)
    assert "\n" not in message and "Rowan/hellaswag" in message and "--task_data" in message, message


@pytest.mark.skipif(os.environ.get("GPT2CUSTOM_TEST_LM_EVAL_SUITE") != "1",
                    reason="indexing lm-eval's stock tasks takes ~12 s: GPT2CUSTOM_TEST_LM_EVAL_SUITE=1 runs it")
def test_lm_eval_suite_without_task_data_loads_hellaswag_and_names_the_first_dataset_it_cannot_load(
        hub, fresh_caches, tmp_path, tiny_checkpoint):
    """The replica Hub has hellaswag but not allenai/ai2_arc (arc_easy, the suite's second task)."""
    import eval_hellaswag

    with pytest.raises(SystemExit) as stop:
        run_main_here(eval_hellaswag.main, ["--models", str(tiny_checkpoint), "--tasks", "suite", "--conventions",
                                            "none", "--limit", "2", "--out_dir", str(tmp_path / "o")])
    message = str(stop.value.code)
    assert "\n" not in message and "allenai/ai2_arc" in message and "--task_data" in message, message
    assert "Rowan/hellaswag" not in message


# ---------------------------------------------------------------------------------------------------- FineWeb-Edu


def gpt2_tokens(tokenizer, texts) -> int:
    """Tokens prepare_data.py's shards must hold for these documents: <|endoftext|> + GPT-2's BPE of each (here
    through `tokenizers`; prepare_data.py encodes with tiktoken)."""
    return sum(1 + len(ids) for ids in tokenizer(list(texts))["input_ids"])


def test_prepare_data_reads_only_the_configs_files_from_the_hub_and_from_a_snapshot(hub, hub_root, tmp_path,
                                                                                     tokenizer):
    import prepare_data

    rows = replicas.fineweb_rows()
    texts = lambda prefix: [r["text"] for path, part in rows.items() if path.startswith(prefix) for r in part]  # noqa: E731
    snapshot = hub_root / replicas.FINEWEB / "main"  # what `hf download HuggingFaceFW/fineweb-edu` leaves
    runs = (("hub", [], texts("sample/10BT/")),  # the default source: HuggingFaceFW/fineweb-edu, sample-10BT
            ("snapshot", ["--source", str(snapshot), "--source_config", "sample-10BT"], texts("sample/10BT/")),
            ("snapshot-default", ["--source", str(snapshot), "--source_config", "default"], texts("data/")),
            ("snapshot-card-default", ["--source", str(snapshot)], texts("data/")))  # the card's default config
    for name, source, documents in runs:
        argv = [*source, "--out_dir", str(tmp_path / name), "--val_tokens", "200", "--shard_size", "5000",
                "--num_proc", "1"]
        run_main_here(lambda a: prepare_data.main(prepare_data.parse_options(a)), argv)
        splits = json.loads((tmp_path / name / "manifest.json").read_text())["splits"]
        assert sum(s["documents"] for s in splits.values()) == len(documents), name
        assert sum(s["tokens"] for s in splits.values()) == gpt2_tokens(tokenizer, documents), name


# --------------------------------------------------------------------------------------------------- magpie-ultra


def magpie_kept() -> list[int]:
    """Source rows of the replica that sft.py with configs/sft-124m.yaml's filters should train or hold out,
    decided from the replica's own description of each row."""
    return [i for i, row in enumerate(replicas.magpie_rows())
            if replicas.magpie_kind(i) not in ("user_only", "unsafe")
            and row["quality"] in QUALITY_OK and row["difficulty"] in DIFFICULTY_OK]


@pytest.fixture(scope="module")
def sft_run(hub, tmp_path_factory, tiny_checkpoint):
    """sft.py on its default dataset with sft-124m.yaml's filters: (output folder, what it printed)."""
    import sft

    out = tmp_path_factory.mktemp("sft")
    argv = ["--model_name_or_path", str(tiny_checkpoint), "--output_dir", str(out), "--min_quality", "good",
            "--max_difficulty", "hard", "--eval_size", "6", "--max_length", "256", "--max_steps", "1",
            "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1", "--eval_strategy", "no",
            "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--bf16", "false",
            "--logging_steps", "1"]
    printed = run_main_here(sft.main, *sft.parse_args(argv))
    return out, printed


def test_sft_on_magpie_drops_and_counts_user_only_unsafe_and_overlong_rows(sft_run, hub):
    out, printed = sft_run
    rows = replicas.magpie_rows()
    record = json.loads((out / "sft_split.json").read_text())
    dropped = record["counts"]["dropped"]
    assert dropped["no assistant turn"] == sum(replicas.magpie_kind(i) == "user_only" for i in range(len(rows)))
    # unsafe rows that passed the label filters (filters run before the guard)
    assert dropped["flagged unsafe (guard)"] == sum(
        replicas.magpie_kind(i) == "unsafe" and r["quality"] in QUALITY_OK and r["difficulty"] in DIFFICULTY_OK
        for i, r in enumerate(rows))
    kept = magpie_kept()
    assert record["counts"]["kept"] == len(kept)
    long_rows = sum(replicas.magpie_kind(i) == "long" for i in kept)
    lengths = record["lengths"]
    assert lengths["train"]["dropped"] + lengths["eval"]["dropped"] == long_rows > 0
    assert lengths["train"]["truncated"] == lengths["eval"]["truncated"] == 0
    assert f"{dropped['no assistant turn']} no assistant turn" in printed and "longer than 256 tokens dropped" in printed
    # only the columns the filters read reached the Arrow cache: not the 1024-d embedding
    arrow = list((hub.cache / "datasets").rglob("*.arrow"))
    assert arrow and all("embedding" not in pa.ipc.open_stream(f.read_bytes()).schema.names for f in arrow)


class Judge:
    """An OpenAI-compatible judge that calls every game a tie and remembers the questions it saw."""

    def __init__(self):
        self.questions = []
        self.server = serve_json(self.respond)

    def respond(self, method, path, headers, body):
        user = json.loads(body)["messages"][-1]["content"]
        self.questions.append(user.split("[User Question]\n", 1)[1].split("\n\n[The Start", 1)[0])
        return 200, {"id": "j", "object": "chat.completion", "created": 0, "model": "judge",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "Equal. [[C]]"}}],
                     "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}}


def test_eval_chat_judges_only_prompts_sft_held_out_and_refuses_an_overlapping_set(sft_run, tmp_path):
    import eval_chat

    out, _ = sft_run
    record = json.loads((out / "sft_split.json").read_text())
    rows = replicas.magpie_rows()
    trained = {rows[i]["conversation"][0]["content"] for i in magpie_kept() if i not in set(record["eval_rows"])}
    judge = Judge()
    with judge.server:
        common = ["--model", str(out), "--base_url", judge.server.url + "/v1", "--judge_model", "j",
                  "--max_new_tokens", "4", "--concurrency", "2"]
        run_main_here(eval_chat.cli, [*common, "--output_dir", str(tmp_path / "held_out")])
        asked = {q.strip() for q in judge.questions}
        assert asked and not asked & trained
        assert asked == {rows[i]["conversation"][0]["content"] for i in record["eval_rows"]} - trained
        # The README's old command: the Hub id again, without sft.py's filters, so another split
        with pytest.raises(SystemExit) as stop:
            run_main_here(eval_chat.cli, [*common, "--prompts", replicas.MAGPIE, "--eval_size", "6", "--seed", "42",
                                          "--output_dir", str(tmp_path / "rebuilt")])
        assert "trained on" in str(stop.value.code) and "--allow_train_overlap" in str(stop.value.code)
        judge.questions.clear()
        run_main_here(eval_chat.cli, [*common, "--prompts", replicas.MAGPIE, "--eval_size", "6", "--seed", "42",
                                      "--allow_train_overlap", "true", "--output_dir", str(tmp_path / "told")])
    assert {q.strip() for q in judge.questions} & trained  # judged as told, overlap and all


def test_generate_synthetic_streams_only_the_prompts_it_needs(hub, fresh_caches, tmp_path):
    from trl import TrlParser

    import generate_synthetic

    def answer(method, path, headers, body):
        return 200, {"id": "a", "object": "chat.completion", "created": 0, "model": "m",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": "An answer."}}],
                     "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}

    seen_before = len(hub.requests)
    with serve_json(answer) as server:
        argv = ["--prompts", replicas.MAGPIE, "--prompt_column", "instruction", "--max_prompts", "3",
                "--base_url", server.url + "/v1", "--model", "m", "--output", str(tmp_path / "out.jsonl")]
        (options,) = TrlParser(generate_synthetic.SyntheticOptions).parse_args_and_config(argv)
        run_main_here(generate_synthetic.main, options)
    written = [json.loads(line)["messages"][0]["content"] for line in (tmp_path / "out.jsonl").open()]
    assert sorted(written) == sorted(row["instruction"] for row in replicas.magpie_rows()[:3])  # answered in any order
    # the first shard's rows were enough: the second was never read
    assert not any(replicas.MAGPIE_SHARDS[1] in path for path in hub.requests[seen_before:])
    assert not list((fresh_caches / "datasets").rglob("*.arrow"))  # streamed: nothing converted to Arrow


def test_split_record_rebuilds_the_same_held_out_rows_and_refuses_changed_data(tmp_path):
    from gpt2custom.sft_data import rebuild_split, select_conversations, split_record, train_eval_split

    path = tmp_path / "chat.parquet"
    conversation = lambda i: [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]  # noqa: E731
    Dataset.from_list([{"messages": conversation(i)} for i in range(20)]).to_parquet(path)
    settings = {"dataset": str(path), "config": None, "split": "train", "messages_column": None, "min_quality": None,
                "max_difficulty": None, "keep_unsafe": False, "max_samples": None, "eval_size": 5, "seed": 3}
    selection = select_conversations(str(path), seed=3)
    train, held_out = train_eval_split(selection.dataset, 5, seed=3)
    record = split_record(settings, selection, train, held_out)
    again_train, again_held = rebuild_split(record)
    assert sorted(again_held["row"]) == sorted(held_out["row"]) and len(again_train) == 15
    Dataset.from_list([{"messages": conversation(i)} for i in range(19)]).to_parquet(path)  # one row fewer
    with pytest.raises(ValueError, match="no longer gives the rows"):
        rebuild_split(record)
