"""Chat SFT: the conversations sft.py accepts, the labels TRL builds from our template, a real fine-tuning run on two
gloo ranks, the saved folder in a clean process, chat.py, and TRL's own `trl sft` CLI on our checkpoint."""

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from datasets import Dataset
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import (
    REPO,
    assert_remote_code_class,
    make_tiny_model,
    reset_process_state,
    run_in_clean_process,
    run_main_here,
    write_jsonl,
)
from gpt2custom.chat import CHAT_TEMPLATE, ROLE_TOKENS, add_chat_format, fit_to_context, load_chat_tokenizer
from gpt2custom.checkpoints import save_model_folder
from gpt2custom.distributed import run_with_deadline
from gpt2custom.hub import write_model_card
from gpt2custom.sft_data import (
    check_conversations,
    fit_to_max_length,
    load_conversations,
    select_conversations,
    train_eval_split,
)
from gpt2custom.tokenizer import EOT_ID, load_tokenizer

ANSWER = "Hello! I am a tiny model."
AGAIN = "Hello again!"
NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Olivia"]
STEPS = 20


def hello(name: str, two_turns: bool = False) -> list[dict]:
    messages = [{"role": "user", "content": f"Say hello to {name}."}, {"role": "assistant", "content": ANSWER}]
    if two_turns:
        messages += [{"role": "user", "content": "Again."}, {"role": "assistant", "content": AGAIN}]
    return messages


@pytest.fixture
def fresh_accelerate_state():
    """Trainers made in this process set accelerate's process-wide state; leave none behind for other tests."""
    yield
    reset_process_state()


def synthetic_row(messages, prompt_id, rejected=None) -> dict:
    """A row the way generate_synthetic.py writes it."""
    usage = {"completion_tokens": 9}
    return {"messages": messages, "model": "test", "prompt_id": prompt_id, "usage": usage, "rejection": rejected}


@pytest.fixture(scope="module")
def chat_jsonl(tmp_path_factory):
    """One- and two-turn greetings, plus one answer generate_synthetic.py flagged."""
    rows = [synthetic_row(hello(name, two), f"{name}-{two}") for name in NAMES for two in (False, True)]
    refusal = [{"role": "user", "content": "Say hello to Eve."}, {"role": "assistant", "content": "I'm sorry."}]
    rows.insert(5, synthetic_row(refusal, "Eve", rejected="refusal"))
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", rows)


def expected_tokens(tokenizer, messages):
    """input_ids and labels of one conversation written out from the chat format's spec (the gpt2custom.chat
    docstring), not from its Jinja template: role token, newline, content; assistant content and <|endoftext|> are
    the only labelled tokens."""
    ids, labels = [], []
    for message in messages:
        role = tokenizer.convert_tokens_to_ids(f"<|{message['role']}|>")
        if message["role"] == "assistant":
            head = [role, *tokenizer.encode("\n")]
            answer = [*tokenizer.encode(message["content"]), EOT_ID]
            tail = tokenizer.encode("\n")
            ids += head + answer + tail
            labels += [-100] * len(head) + answer + [-100] * len(tail)
        else:
            part = [role, *tokenizer.encode("\n" + message["content"] + "\n")]
            ids += part
            labels += [-100] * len(part)
    return ids, labels


# ---------------------------------------------------------------------------------------------------------- data


def test_magpie_conversation_column_becomes_messages_filtered_by_quality_and_difficulty(tmp_path):
    labels = [("excellent", "easy"), ("poor", "easy"), ("good", "very hard"), ("good", "hard"), ("average", "medium")]
    Dataset.from_list(
        [
            {"conversation": hello(f"n{i}"), "quality": quality, "difficulty": difficulty, "embedding": [0.1, 0.2]}
            for i, (quality, difficulty) in enumerate(labels)
        ]
    ).to_parquet(tmp_path / "magpie.parquet")
    dataset = load_conversations(str(tmp_path / "magpie.parquet"), min_quality="good", max_difficulty="hard")
    assert dataset.column_names == ["messages"]
    assert [row["messages"] for row in dataset] == [hello("n0"), hello("n3")]


def test_rows_generate_synthetic_flagged_as_rejected_are_dropped(chat_jsonl):
    # The magpie label filters of configs/sft-124m.yaml leave a dataset without those labels whole.
    dataset = load_conversations(str(chat_jsonl), min_quality="good", max_difficulty="hard")
    assert len(dataset) == 2 * len(NAMES)
    assert all(row["messages"][1]["content"] == ANSWER for row in dataset)


def test_unknown_role_is_one_error_naming_row_message_and_role(tmp_path):
    rows = [{"messages": hello(name)} for name in NAMES[:3]]
    rows[2]["messages"].append({"role": "tool", "content": "42"})
    with pytest.raises(ValueError, match=r"chat\.jsonl: row 2, message 2: role 'tool'.*knows system, user, assistant"):
        load_conversations(str(write_jsonl(tmp_path / "chat.jsonl", rows)))


@pytest.mark.parametrize(
    "rows, error",
    [
        ([{"text": "Hello"}], r"no conversation column 'messages' or 'conversation'; columns are \['text'\]"),
        ([{"messages": "Hello"}], r"column 'messages' has type string; expected a list of \{'role'"),
        ([{"messages": [{"from": "human", "value": "Hi"}]}], r"column 'messages' has type list<item: struct<from"),
        (
            [{"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]}],
            r"row 0, message 0: content is null",
        ),
    ],
    ids=["no-messages-column", "not-a-list", "sharegpt-keys", "null-content"],
)
def test_unusable_conversations_are_one_clear_error(tmp_path, rows, error):
    with pytest.raises(ValueError, match=error):
        load_conversations(str(write_jsonl(tmp_path / "data.jsonl", rows)))


def test_unreadable_or_missing_file_names_the_file(tmp_path):
    torn = tmp_path / "torn.jsonl"
    torn.write_text(json.dumps({"messages": hello("A")}) + '\n{"messages": [', encoding="utf-8")
    with pytest.raises(ValueError, match=r"torn\.jsonl cannot be read: JSON parse error"):
        load_conversations(str(torn))
    with pytest.raises(ValueError, match=r"missing\.jsonl does not exist"):
        load_conversations(str(tmp_path / "missing.jsonl"))


def test_rows_without_an_assistant_turn_are_dropped_and_counted(tmp_path):
    rows = [{"messages": hello(name)} for name in NAMES[:4]]
    rows[1]["messages"] = rows[1]["messages"][:1]  # a user turn only: nothing to train on
    selection = select_conversations(str(write_jsonl(tmp_path / "chat.jsonl", rows)))
    assert selection.dataset["row"] == [0, 2, 3] and selection.counts["dropped"] == {"no assistant turn": 1}


def test_rows_llama_guard_flagged_unsafe_are_dropped_unless_kept(tmp_path):
    guards = ["\n\nsafe", "\n\nunsafe\nS2", None, "\n\nunsafe\nS11", "\n\nsafe"]  # magpie-ultra's `guard`
    Dataset.from_list([{"conversation": hello(NAMES[i]), "guard": g} for i, g in enumerate(guards)]).to_parquet(
        tmp_path / "magpie.parquet")
    dropped = select_conversations(str(tmp_path / "magpie.parquet"))
    assert dropped.dataset["row"] == [0, 2, 4] and dropped.counts["dropped"] == {"flagged unsafe (guard)": 2}
    kept = select_conversations(str(tmp_path / "magpie.parquet"), keep_unsafe=True)
    assert kept.dataset["row"] == [0, 1, 2, 3, 4] and kept.counts["dropped"] == {}


def test_conversations_longer_than_max_length_are_dropped_or_counted_as_truncated():
    tokenizer = load_chat_tokenizer()
    long = [{"role": "user", "content": "Tell me everything."}, {"role": "assistant", "content": "word " * 60}]
    dataset = Dataset.from_list([{"messages": hello("A")}, {"messages": long}, {"messages": hello("B", True)}])
    sizes = [len(expected_tokens(tokenizer, row["messages"])[0]) for row in dataset]  # the format's spec, by hand
    limit = 40
    assert sizes[1] > limit >= max(sizes[0], sizes[2])
    kept, stats = fit_to_max_length(dataset, tokenizer, limit, "drop")
    assert kept["messages"] == [hello("A"), hello("B", True)] and stats["dropped"] == 1 and stats["truncated"] == 0
    same, stats = fit_to_max_length(dataset, tokenizer, limit, "truncate")
    assert len(same) == 3 and stats["truncated"] == 1 and stats["tokens_cut"] == sizes[1] - limit


def test_row_numbers_count_across_check_batches():
    dataset = Dataset.from_list([{"messages": hello(str(i))} for i in range(7)] + [{"messages": hello("x")[:1]}])
    assert check_conversations(dataset, batch_size=3).tolist() == [True] * 7 + [False]


def test_held_out_split_is_disjoint_and_covers_every_row():
    dataset = Dataset.from_list([{"messages": hello(name)} for name in NAMES])
    train, held_out = train_eval_split(dataset, 0.25, seed=1)
    names = lambda d: [row["messages"][0]["content"] for row in d]  # noqa: E731
    assert len(held_out) == 3 and sorted(names(train) + names(held_out)) == sorted(names(dataset))
    assert train_eval_split(dataset, 0)[1] is None
    with pytest.raises(ValueError, match="leaves no training rows"):
        train_eval_split(dataset, len(NAMES))


def test_unknown_quality_label_is_refused(chat_jsonl):
    with pytest.raises(ValueError, match=r"quality bound 'great': expected one of \['very poor'"):
        load_conversations(str(chat_jsonl), min_quality="great")


def test_sft_script_stops_on_a_bad_dataset_with_one_line(tiny_checkpoint, tmp_path, fresh_accelerate_state):
    import sft

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "robot", "content": "beep"}]}])
    args = sft.parse_args(
        f"--config configs/sft-smoke.yaml --model_name_or_path {tiny_checkpoint} --dataset_name {bad} "
        f"--output_dir {tmp_path / 'out'}".split()
    )
    with pytest.raises(SystemExit) as stop:
        sft.main(*args)
    assert str(stop.value.code) == (
        f"sft.py: {bad}: row 0, message 0: role 'robot' in column 'messages'; the chat template knows system, "
        "user, assistant"
    )
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ chat format


def test_role_tokens_fill_spare_ids_without_resizing(tiny_checkpoint):
    tokenizer = load_chat_tokenizer(str(tiny_checkpoint))
    assert tokenizer.convert_tokens_to_ids(ROLE_TOKENS) == [50257, 50258, 50259]
    assert len(tokenizer) == 50260 <= make_tiny_model().config.vocab_size


def test_fit_to_context_drops_oldest_turns_and_keeps_the_system_prompt():
    chat_tokenizer = add_chat_format(load_tokenizer())
    system = {"role": "system", "content": "Be brief."}
    history = [system, *hello("Alice", two_turns=True), {"role": "user", "content": "Bye."}]

    def length(messages):
        return len(
            chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        )

    assert fit_to_context(chat_tokenizer, history, length(history)) == history
    # One token short: the first user/assistant exchange goes, and the conversation restarts at a user turn.
    assert fit_to_context(chat_tokenizer, history, length(history) - 1) == [system, *history[3:]]
    with pytest.raises(ValueError, match="does not fit in 5 tokens"):
        fit_to_context(chat_tokenizer, history, 5)


def cpu_sft_config(tmp_path, **overrides):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        assistant_only_loss=True,
        activation_checkpointing=False,
        report_to="none",
        **overrides,
    )


def test_labels_keep_only_assistant_tokens_and_their_end_of_text(tiny_checkpoint, tmp_path, fresh_accelerate_state):
    from trl import SFTTrainer

    messages = [{"role": "system", "content": "You are terse."}, *hello("Alice", two_turns=True)]
    tokenizer = load_chat_tokenizer(str(tiny_checkpoint))
    args = cpu_sft_config(tmp_path, packing=False)
    trainer = SFTTrainer(
        model=make_tiny_model(),
        args=args,
        train_dataset=Dataset.from_list([{"messages": messages}]),
        processing_class=tokenizer,
    )
    ids, labels = expected_tokens(tokenizer, messages)
    row = trainer.train_dataset[0]
    assert row["input_ids"] == ids
    assert row["labels"] == labels
    trained = tokenizer.decode([t for t in labels if t != -100])
    assert trained == f"{ANSWER}<|endoftext|>{AGAIN}<|endoftext|>"


def test_packed_batch_attends_only_within_each_conversation(tiny_checkpoint, tmp_path, fresh_accelerate_state):
    """Padding-free packing (sft.py's default) flattens a batch of packed rows into one row longer than the
    context; each conversation in it must get exactly the logits it gets alone."""
    from trl import SFTTrainer

    tokenizer = load_chat_tokenizer(str(tiny_checkpoint))
    model = make_tiny_model()
    args = cpu_sft_config(tmp_path, packing=True, max_length=128, per_device_train_batch_size=4)
    rows = [{"messages": hello(" ".join(NAMES[: 1 + i % len(NAMES)]), two_turns=True)} for i in range(40)]
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[1] > model.config.block_size
    bounds = batch["cu_seq_lens_q"].tolist()
    with torch.no_grad():
        packed = model(**batch).logits[0]
        for start, end in zip(bounds[:-1], bounds[1:]):
            alone = model(input_ids=batch["input_ids"][:, start:end]).logits[0]
            torch.testing.assert_close(packed[start:end], alone, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ fine-tuning on two gloo ranks


def sft_args(model, dataset, out) -> list[str]:
    """The fine-tuning run of the tests: the smoke config, a higher LR and fewer steps (paths have no spaces). Six
    held-out conversations leave 18 that pack into 4 rows: whole epochs for both two ranks and two accumulated
    micro-batches, so the one-process run sees the same rows at every step."""
    return (
        f"--config configs/sft-smoke.yaml --model_name_or_path {model} --dataset_name {dataset} --output_dir {out} "
        f"--max_steps {STEPS} --gradient_accumulation_steps 1 --learning_rate 1e-2 --warmup_steps 3 --eval_size 6 "
        "--eval_steps 1000 --logging_steps 5"
    ).split()


# Several times what the launch takes on a loaded 2-core machine (~30 s idle): a rank stuck at exit fails fast.
LAUNCH_TIMEOUT = 240

# sft.py's own `main(*parse_args())`, with its teardown call observed: after it, does this rank still have gloo
# worker threads (named by torch) or a process group? Threads left to interpreter teardown are where a rank
# deadlocked (issue 14): DDP's reducer kept the group alive past Trainer.end().
EXIT_PROBE = textwrap.dedent(
    """
    import json, os
    import torch
    import sft

    after = []

    def observed(owner):
        shutdown(owner)
        names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
        after.append({"gloo_threads": names.count("pt_gloo_runloop"), "group": torch.distributed.is_initialized()})

    shutdown, sft.shutdown = sft.shutdown, observed
    sft.main(*sft.parse_args())
    print("EXIT-PROBE " + json.dumps({"rank": int(os.environ["RANK"]), "after_teardown": after}), flush=True)
    """
)


@pytest.fixture(scope="module")
def sft_run(tiny_checkpoint, chat_jsonl, tmp_path_factory):
    """sft.py with the smoke config on two real ranks (gloo), from the tiny checkpoint, on the greetings; its main
    runs under EXIT_PROBE, which reports each rank's state after the teardown."""
    out = tmp_path_factory.mktemp("sft") / "out"
    probe = out.parent / "sft_exit_probe.py"
    probe.write_text(EXIT_PROBE)
    launch = f"-m accelerate.commands.launch --multi_gpu --num_processes 2 --main_process_port 0 {probe}"
    cmd = [sys.executable, *launch.split(), *sft_args(tiny_checkpoint, chat_jsonl, out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONFAULTHANDLER": "1"}  # a rank that gets SIGABRT prints its Python stacks
    try:
        proc = run_with_deadline(cmd, LAUNCH_TIMEOUT, cwd=REPO, env=env)
    except subprocess.TimeoutExpired as e:  # the stuck ranks' stacks, not a bare timeout
        pytest.fail(f"2-rank sft.py still running after {LAUNCH_TIMEOUT} s; its stacks and output:\n"
                    f"{e.stderr[-12000:]}\nstdout:\n{e.output[-2000:]}", pytrace=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc.stdout + proc.stderr


# A launcher whose worker never ends, as a rank deadlocked at exit does; torchrun too starts each rank in a session
# of its own, out of reach of a kill sent to the launcher's process group.
STUCK_LAUNCH = textwrap.dedent(
    """
    import subprocess, sys
    worker = "import time\\ndef stuck_in_teardown():\\n    time.sleep(600)\\nstuck_in_teardown()"
    subprocess.run([sys.executable, "-c", worker], start_new_session=True)
    """
)


def test_a_launch_past_its_deadline_fails_fast_with_the_stuck_process_stack(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no py-spy: the faulthandler path that CI takes
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    with pytest.raises(subprocess.TimeoutExpired) as hung:
        run_with_deadline([sys.executable, "-c", STUCK_LAUNCH], 3, env=env)
    assert "Fatal Python error: Aborted" in hung.value.stderr
    assert 'line 4 in <module>' in hung.value.stderr and "stuck_in_teardown" in hung.value.stderr
    assert "sent SIGABRT to [" in hung.value.stderr


def token_loss(model, tokenizer, conversations, part="assistant") -> float:
    """Mean cross-entropy, computed here from expected_tokens: on the assistant tokens (the labelled ones), or with
    part="other" on the rest, which assistant_only_loss leaves out of training (role markers aside)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for messages in conversations:
            ids, labels = expected_tokens(tokenizer, messages)
            logits = model(torch.tensor([ids])).logits[0, :-1]
            targets, labelled = torch.tensor(ids[1:]), torch.tensor(labels[1:]) != -100
            keep = labelled if part == "assistant" else ~labelled & (targets < 50257)
            total += torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


@pytest.fixture(scope="module")
def one_process_run(tiny_checkpoint, chat_jsonl, tmp_path_factory):
    """sft.py in this process, as `python sft.py` runs it on one device: the arguments of sft_run except that two
    accumulated micro-batches stand in for the two ranks, so each optimizer step sees the same packed rows."""
    import sft

    out = tmp_path_factory.mktemp("sft_one") / "out"
    argv = sft_args(tiny_checkpoint, chat_jsonl, out)
    argv[argv.index("--gradient_accumulation_steps") + 1] = "2"
    run_main_here(sft.main, *sft.parse_args(argv))
    return out


def saved_weights(folder) -> dict:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_two_gloo_ranks_train_the_weights_of_one_process_with_accumulation(sft_run, one_process_run):
    """DDP's gradient average over two ranks, with the Trainer's token counting across devices, is the gradient of
    one process that accumulates the same two packed rows: same losses, same final weights."""
    two, one = saved_weights(sft_run[0]), saved_weights(one_process_run)
    assert two.keys() == one.keys()
    for name in two:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6, msg=name)  # measured: bitwise
    logs = lambda folder: [(log["step"], log["epoch"], log["loss"]) for log in json.loads(  # noqa: E731
        (folder / "trainer_state.json").read_text())["log_history"] if "loss" in log]
    (steps_two, epochs_two, losses_two), (steps_one, epochs_one, losses_one) = zip(*logs(sft_run[0])), zip(
        *logs(one_process_run))
    assert steps_two == steps_one == (5, 10, 15, 20) and epochs_two == epochs_one  # the same rows at every step
    assert losses_two == pytest.approx(losses_one, rel=1e-5)
    eval_two, eval_one = (json.loads((folder / "eval_results.json").read_text())["eval_loss"]
                          for folder in (sft_run[0], one_process_run))
    assert eval_two == pytest.approx(eval_one, rel=1e-5)


@pytest.mark.slow
def test_two_gloo_ranks_fine_tune_and_save_a_model_folder(sft_run, tiny_checkpoint):
    out, log = sft_run
    assert "2 process(es), DistributedType.MULTI_CPU" in log
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    assert state["train_batch_size"] == 1  # per rank; the two ranks together take two packed rows a step
    # What a Hub user loads: every file with the content its reader expects, not only present.
    base = saved_weights(tiny_checkpoint)
    weights = saved_weights(out)
    assert weights.keys() == base.keys() and all(w.dtype == torch.float32 for w in weights.values())
    assert not torch.equal(weights["transformer.wte.weight"], base["transformer.wte.weight"])
    config, base_config = (json.loads((folder / "config.json").read_text()) for folder in (out, tiny_checkpoint))
    assert config["auto_map"] == base_config["auto_map"] and config["model_type"] == "gpt2custom"
    assert {k: config[k] for k in ("vocab_size", "n_embd", "n_layer", "block_size")} == {
        k: base_config[k] for k in ("vocab_size", "n_embd", "n_layer", "block_size")}
    for name in ("modeling_gpt2custom.py", "configuration_gpt2custom.py"):
        assert (out / name).read_bytes() == (REPO / name).read_bytes(), name
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert tokenizer("Hello world").input_ids == [15496, 995]  # GPT-2's BPE, from tokenizer.json
    assert tokenizer.convert_tokens_to_ids(ROLE_TOKENS) == [50257, 50258, 50259]
    # generate() (and chat.py) stop at the end of an answer or where the model starts the next turn, as in publish.py's folder
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [EOT_ID, 50257, 50258, 50259]


@pytest.mark.slow
def test_each_rank_ends_its_process_group_and_gloo_workers_before_exit(sft_run):
    _, log = sft_run
    probes = sorted((json.loads(line.split(" ", 1)[1]) for line in log.splitlines() if line.startswith("EXIT-PROBE ")),
                    key=lambda probe: probe["rank"])
    assert probes == [{"rank": rank, "after_teardown": [{"gloo_threads": 0, "group": False}]} for rank in (0, 1)]


@pytest.mark.slow
def test_loss_on_assistant_tokens_falls(sft_run, tiny_checkpoint):
    out, _ = sft_run
    tokenizer = load_chat_tokenizer(str(out))
    conversations = [hello(name, two_turns=True) for name in NAMES[:6]]
    before = token_loss(
        AutoModelForCausalLM.from_pretrained(tiny_checkpoint, trust_remote_code=True), tokenizer, conversations
    )
    after = token_loss(AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True), tokenizer, conversations)
    assert after < 0.3 and after < before / 10, (before, after)
    losses = [
        log["loss"] for log in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in log
    ]
    assert losses[-1] < losses[0] / 10, losses
    assert json.loads((out / "eval_results.json").read_text())["eval_loss"] < 0.3


@pytest.mark.slow
def test_model_card_for_a_pushed_run_shows_data_recipe_and_held_out_loss(sft_run, chat_jsonl):
    """The card sft.py puts on the Hub after trainer.push_to_hub (from the run_summary.json it writes, which
    publish.py shows too), written here without the network."""
    out, _ = sft_run
    eval_metrics = json.loads((out / "eval_results.json").read_text())
    record = json.loads((out / "sft_split.json").read_text())
    summary = json.loads((out / "run_summary.json").read_text())  # sft.py wrote it: what publish.py shows too
    assert summary["SFT"].startswith(f"{STEPS} steps from ") and summary["val_loss"] == eval_metrics["eval_loss"]
    # a base model given as a local folder (no Hub id for base_model): still described as fine-tuned
    write_model_card(out, model_id="org/tiny-sft", training=summary)
    assert "only pretrained" not in (out / "README.md").read_text()
    write_model_card(
        out,
        model_id="org/tiny-sft",
        base_model="org/tiny",
        datasets=["org/chat"],
        training=summary,
        tags=("trl", "sft", "chat"),
    )
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "org/tiny" and card.data.datasets == ["org/chat"]
    assert {"trl", "sft", "chat", "custom_code"} <= set(card.data.tags)
    assert f"| Optimizer steps | {STEPS} |" in card.text
    assert f"| Final validation loss | {eval_metrics['eval_loss']:.4f} |" in card.text
    # what was trained on and dropped: the chat JSONL's one row generate_synthetic.py flagged as rejected
    source_rows = record["counts"]["source_rows"]
    assert f"| SFT data | {source_rows} rows in {chat_jsonl}; dropped: 1 rejected by generate_synthetic.py" in card.text
    for key, value in (
        ("learning_rate", "0.01"),
        ("assistant_only_loss", "True"),
        ("packing", "True"),
        ("max_length", "128"),
    ):
        assert f"| `{key}` | `{value}` |" in card.text


# The folder as a Hub user meets it (conftest.run_in_clean_process: no repo code importable, another directory).
ANSWER_IN_CLEAN_PROCESS = """
    folder = sys.argv[1]
    model, tokenizer, facts = load_folder(folder)
    messages = [{"role": "user", "content": "Say hello to Zoe."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    emit({**facts, "prompt": tokenizer.decode(inputs["input_ids"][0]), "new_ids": new,
          "answer": tokenizer.decode(new, skip_special_tokens=True)})
"""


@pytest.mark.slow
def test_saved_folder_answers_in_a_clean_process_and_stops_at_end_of_text(sft_run, tmp_path):
    out, _ = sft_run
    result = run_in_clean_process(ANSWER_IN_CLEAN_PROCESS, out, cwd=tmp_path)
    assert_remote_code_class(result)
    assert result["prompt"] == "<|user|>\nSay hello to Zoe.\n<|assistant|>\n"
    assert result["answer"] == ANSWER  # a name it never saw in training
    assert result["new_ids"][-1] == EOT_ID and len(result["new_ids"]) < 40  # stopped on <|endoftext|>


class Writes(io.StringIO):
    """stdout that remembers each write: a streamed answer arrives in several pieces."""

    def __init__(self):
        super().__init__()
        self.pieces = []

    def write(self, text):
        self.pieces.append(text)
        return super().write(text)


@pytest.mark.slow
def test_chat_streams_answers_and_carries_the_conversation(sft_run, monkeypatch):
    import chat

    out, _ = sft_run
    stdout = Writes()
    monkeypatch.setattr("sys.stdin", io.StringIO("Say hello to Zoe.\nAgain.\n/reset\nAgain.\n"))
    monkeypatch.setattr("sys.stdout", stdout)
    chat.main(chat.ChatArgs(model_name_or_path=str(out), temperature=0, repetition_penalty=1.0))
    answers = stdout.getvalue().split(">>> ")
    assert answers[:4] == ["", f"{ANSWER}\n", f"{AGAIN}\n", ""] and answers[-1] == ""  # "" before: /reset, EOF
    # The model learned "Hello again!" only after a greeting: without the conversation, "Again." gets another answer.
    assert len(answers) == 6 and answers[4] != f"{AGAIN}\n"
    first_answer = stdout.pieces[1 : stdout.pieces.index(">>> ", 1)]
    assert len(first_answer) >= 4 and "".join(first_answer) == f"{ANSWER}\n"  # word by word, not at the end


# ------------------------------------------------------------------------------------------- TRL's own CLI


@pytest.mark.slow
def test_trl_sft_cli_fine_tunes_our_checkpoint(chat_jsonl, tmp_path):
    base = tmp_path / "base"  # a pretrained checkpoint whose tokenizer has our chat format, as publish.py ships it
    save_model_folder(make_tiny_model(), base, add_chat_format(load_tokenizer()))
    config = tmp_path / "data.yaml"
    # `columns`: TRL needs only the conversations; the other columns of generate_synthetic.py's rows are metadata.
    config.write_text(
        yaml.safe_dump({"datasets": [{"path": "json", "data_files": str(chat_jsonl), "columns": ["messages"]}]})
    )
    trl = shutil.which("trl") or pytest.fail("the trl CLI (installed with the trl package) is not on PATH")
    command = (
        f"sft --config {config} --model_name_or_path {base} --output_dir {tmp_path / 'out'} --trust_remote_code true "
        "--use_cpu true --bf16 false --max_steps 6 --per_device_train_batch_size 2 --max_length 128 "
        "--learning_rate 1e-2 --assistant_only_loss true --activation_checkpointing false --report_to none "
        "--save_strategy no --seed 0"
    )
    proc = subprocess.run(
        [trl, *command.split()],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert type(tuned).__name__ == "GPT2CustomForCausalLM"
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    # It learned the answers, measured on the assistant tokens by the chat format's spec (expected_tokens), and only
    # them: the user turns, which assistant_only_loss leaves out of the loss, stay as unlikely as before.
    tokenizer = load_chat_tokenizer(str(base))
    conversations = [hello(name, two_turns=True) for name in NAMES[:6]]
    untrained = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True)
    before, after = token_loss(untrained, tokenizer, conversations), token_loss(tuned, tokenizer, conversations)
    assert after < before / 4, (before, after)  # measured: 13.3 -> 0.96
    before_user, after_user = (token_loss(m, tokenizer, conversations, "other") for m in (untrained, tuned))
    assert after_user > 0.8 * before_user, (before_user, after_user)  # measured: 12.9 -> 12.6; trained on: 2.8
