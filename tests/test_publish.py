"""publish.py: the exact upload folder (dry run), its model card, the stock export, and the upload requests."""

import base64
import json

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

import publish
from conftest import REPO, assert_remote_code_class, make_tiny_model, run_in_clean_process, serve_json
from gpt2custom.checkpoints import save_model_folder
from gpt2custom.hub import ENDPOINT_REQUIREMENTS, write_model_card

REPO_ID = "me/gpt2custom-tiny"
FAKE_TOKEN = "hf_TESTSECRETdoNotPrintMe0123456789"
INPUT_IDS = [[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 50256, 40, 1101]]
RUN_SUMMARY = {
    "tokens": 10_000_000,
    "steps": 100,
    "wall_time_s": 5400.0,
    "tokens_per_s": 1851.85,
    "mfu": 0.412,
    "gpu": "NVIDIA H100 80GB HBM3",
    "num_processes": 8,
    "dollars": 23.94,
    "val_loss": 3.2871,
    "config": {"learning_rate": 0.0006, "total_batch_size": 524288, "model_preset": "tiny"},
}
EVAL = {
    "hellaswag": {"split": "validation", "n": 500, "limit": 500, "source": "Rowan/hellaswag"},
    "results": [
        {
            "model": None,  # the checkpoint folder, filled in by the fixture
            "hellaswag_completion": {"acc": 0.2512, "acc_norm": 0.2634},
            "hellaswag_harness": {"acc": 0.2478, "acc_norm": 0.2701},
            "perplexity": {"dataset": "HuggingFaceFW/fineweb-edu", "loss": 5.01, "ppl": 149.9, "tokens": 65536},
        },
        {
            "model": "openai-community/gpt2",
            "hellaswag_completion": {"acc": 0.2859, "acc_norm": 0.2955},
            "hellaswag_harness": {"acc": 0.2892, "acc_norm": 0.3114},
        },
    ],
}
PUBLISH_ARGS = ["--repo_id", REPO_ID, "--datasets", "HuggingFaceFW/fineweb-edu", "--tags", "tiny"]
UPLOAD_FILES = {
    "README.md",
    "config.json",
    "configuration_gpt2custom.py",
    "modeling_gpt2custom.py",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "handler.py",
    "requirements.txt",
}


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(seed=5)


@pytest.fixture(scope="module")
def reference_logits(model):
    with torch.no_grad():
        return model(torch.tensor(INPUT_IDS)).logits.numpy()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model, tokenizer):
    """A checkpoint folder as pretrain.py leaves it (model folder plus run_summary.json), and its eval JSON."""
    root = tmp_path_factory.mktemp("publish")
    ckpt = root / "final"
    save_model_folder(model, ckpt, tokenizer)
    (ckpt / "run_summary.json").write_text(json.dumps(RUN_SUMMARY))
    eval_json = root / "eval.json"
    EVAL["results"][0]["model"] = str(ckpt)
    eval_json.write_text(json.dumps(EVAL))
    return ckpt, eval_json


@pytest.fixture(scope="module")
def dry_run(checkpoint, tmp_path_factory):
    ckpt, eval_json = checkpoint
    out = tmp_path_factory.mktemp("dry") / "upload"
    publish.main(["--model_dir", str(ckpt), "--eval_json", str(eval_json), "--dry_run", str(out), *PUBLISH_ARGS])
    return out


@pytest.fixture(scope="module")
def stock_dry_run(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("dry_stock") / "upload"
    publish.main(["--model_dir", str(checkpoint[0]), "--dry_run", str(out), "--stock_gpt2", "true", *PUBLISH_ARGS])
    return out


# The body of a clean process (conftest.run_in_clean_process): each folder's logits go to <name>.npy in its cwd.
FRESH_LOAD = """
    import numpy as np, torch

    jobs, input_ids = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    facts = {}
    for name, folder, trust in jobs:
        model, _, facts[name] = load_folder(folder, trust_remote_code=trust)
        with torch.no_grad():
            np.save(f"{name}.npy", model(torch.tensor(input_ids)).logits.numpy())
    emit(facts)
"""


@pytest.fixture(scope="module")
def fresh_load(dry_run, stock_dry_run, tmp_path_factory):
    """Both folders loaded with AutoModelForCausalLM in a clean process, in another directory, without the repo on
    the path: the remote-code one with trust_remote_code=True, the stock export with False. {name: (facts, logits)}"""
    tmp = tmp_path_factory.mktemp("fresh")
    jobs = [["custom", str(dry_run), True], ["stock", str(stock_dry_run), False]]
    facts = run_in_clean_process(FRESH_LOAD, json.dumps(jobs), json.dumps(INPUT_IDS), cwd=tmp)
    return {name: (facts[name], np.load(tmp / f"{name}.npy")) for name in facts}


def test_dry_run_writes_exactly_the_upload_files(dry_run):  # and the upload test checks they are what gets sent
    assert {p.name for p in dry_run.iterdir()} == UPLOAD_FILES
    config = json.loads((dry_run / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_gpt2custom.GPT2CustomConfig",
        "AutoModelForCausalLM": "modeling_gpt2custom.GPT2CustomForCausalLM",
    }
    assert (dry_run / "requirements.txt").read_text() == ENDPOINT_REQUIREMENTS == "transformers>=5.24,<6\n"
    assert (dry_run / "handler.py").read_bytes() == (REPO / "handler.py").read_bytes()
    assert (dry_run / "modeling_gpt2custom.py").read_bytes() == (REPO / "modeling_gpt2custom.py").read_bytes()
    generation = json.loads((dry_run / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [50256, 50257, 50258, 50259]  # <|endoftext|> and the three role markers
    assert json.loads((dry_run / "tokenizer_config.json").read_text())["model_max_length"] == 256


@pytest.mark.slow
def test_dry_run_folder_loads_with_remote_code_in_a_fresh_process_with_the_same_logits(fresh_load, reference_logits):
    facts, logits = fresh_load["custom"]
    assert_remote_code_class(facts)
    np.testing.assert_allclose(logits, reference_logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_stock_export_loads_without_remote_code_with_the_same_logits(fresh_load, stock_dry_run, reference_logits):
    facts, logits = fresh_load["stock"]
    assert facts == {
        "repo_code_importable": False,
        "model_class": "transformers.models.gpt2.modeling_gpt2.GPT2LMHeadModel",
    }
    assert {p.name for p in stock_dry_run.glob("*.py")} == {"handler.py"}
    assert "auto_map" not in json.loads((stock_dry_run / "config.json").read_text())
    np.testing.assert_allclose(logits, reference_logits, rtol=0, atol=1e-4)


def test_model_card_parses_and_holds_the_eval_metrics_with_their_convention(dry_run):
    card = ModelCard.load(dry_run / "README.md")
    assert card.data.library_name == "transformers"
    assert "custom_code" in card.data.tags and "tiny" in card.data.tags
    assert card.data.datasets == ["HuggingFaceFW/fineweb-edu"]
    assert card.data.model_name == "gpt2custom-tiny"
    got = {(r.dataset_type, r.metric_type, r.metric_config): r for r in card.data.eval_results}
    ours = EVAL["results"][0]
    for key, config in (("hellaswag_completion", "completion"), ("hellaswag_harness", "lm-evaluation-harness")):
        for metric in ("acc", "acc_norm"):
            result = got.pop(("Rowan/hellaswag", metric, config))
            assert result.metric_value == ours[key][metric]
            assert result.dataset_split == "validation" and result.dataset_args == {"num_examples": 500}
            convention = "build-nanogpt/llm.c" if config == "completion" else "lm-evaluation-harness"
            assert convention in result.metric_name
    perplexity = got.pop(("HuggingFaceFW/fineweb-edu", "perplexity", None))
    assert perplexity.metric_value == 149.9
    assert not got  # nothing but our model's numbers in model-index: GPT-2's row is only in the table
    # The run summary and the comparison row are in the text.
    for text in ("10.00M", "1.50 h", "41.2%", "NVIDIA H100 80GB HBM3", "$23.94", "`learning_rate`", "0.3114"):
        assert text in card.text, text


def test_card_refuses_eval_results_of_another_model(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    other = {"hellaswag": EVAL["hellaswag"], "results": [EVAL["results"][1]]}
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((ckpt / "config.json").read_text())
    with pytest.raises(ValueError, match="openai-community/gpt2"):
        write_model_card(folder, model_id=REPO_ID, eval_json=other)
    assert not (folder / "README.md").exists()


def test_card_of_a_chat_model_without_hellaswag_or_decided_prompts(checkpoint, tmp_path):
    """The pipeline's smoke card: perplexities on two different texts, no HellaSwag, a judge that decided nothing,
    an SFT summary. Each figure says what it was measured on; nothing shows a rate of a count of zero as 0.000."""
    ckpt, _ = checkpoint
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((ckpt / "config.json").read_text())
    rows = [{"model": str(folder), "perplexity": {"dataset": "held-out chat answers", "loss": 6.12, "ppl": 455.0}},
            {"model": "runs/x/pretrain/final", "perplexity": {"dataset": "pretraining val shards", "loss": 4.89,
                                                              "ppl": 133.0, "tokens": 20000}}]
    undecided = {"rate": None, "ci95": [0.0, 1.0]}
    chat = {"rates": dict.fromkeys(("win", "tie", "loss"), undecided), "counts": {"win": 0, "tie": 0, "loss": 0},
            "decided": 0, "judge": {"model": "judge"}, "prompts": {"n": 2}, "baseline": "teacher", "examples": [],
            "position_consistency": None}
    training = {"steps": 10, "SFT": "150 steps", "config": {"pretrain.learning_rate": 0.01, "sft.learning_rate": 0.003}}
    card = write_model_card(folder, model_id=REPO_ID, eval_json={"hellaswag": {"split": "validation", "n": 0},
                                                                  "results": rows}, chat_eval=chat, training=training)
    text = card.text
    assert "0.000" not in text and "| win | 0 | - | - |" in text
    assert "HellaSwag" not in text.split("## Evaluation")[1].split("### Chat")[0]  # no HellaSwag paragraph or columns
    assert "| 455.00 | held-out chat answers |" in text and "| 133.00 | pretraining val shards (20,000 tokens) |" in text
    assert "only pretrained" not in text
    assert "`sft.learning_rate`" in text and "`pretrain.learning_rate`" in text
    names = [r.metric_name for r in card.data.eval_results]
    assert names == ["perplexity on held-out chat answers"]  # no "(? tokens)"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--repo_id", "no-slash"], "expected org/name"),
        (["--model_dir", "/nonexistent/ckpt"], "no config.json"),
        (["--eval_json", "/nonexistent/eval.json"], "eval.json"),
        (["--training_json", "/nonexistent/summary.json"], "/nonexistent/summary.json: no such run summary"),
    ],
)
def test_publish_refuses_bad_arguments_with_a_clear_message(checkpoint, tmp_path, extra, message):
    argv = ["--model_dir", str(checkpoint[0]), "--repo_id", REPO_ID, "--dry_run", str(tmp_path / "out"), *extra]
    with pytest.raises(SystemExit, match=message):
        publish.main(argv)
    assert not (tmp_path / "out").exists()


def test_dry_run_never_writes_into_a_non_empty_folder(checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty"):
        publish.main(["--model_dir", str(checkpoint[0]), "--repo_id", REPO_ID, "--dry_run", str(tmp_path / "out")])
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


class FakeHub:
    """The Hub API endpoints an upload touches, on 127.0.0.1: records every request and keeps committed files."""

    def __init__(self):
        self.requests, self.files = [], {}
        self.server = serve_json(self.respond)
        self.url = self.server.url

    def respond(self, method, path, headers, body):
        self.requests.append((method, path, headers, body))
        return self.route(path.split("?")[0], body)

    def route(self, path, body):
        model = f"/api/models/{REPO_ID}"
        if path == "/api/repos/create":
            request = json.loads(body)
            return 200, {"url": f"{self.url}/{request['organization']}/{request['name']}"}
        if path == f"{model}/branch/v1":
            return 200, {}
        if path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        if path == f"{model}/preupload/v1":
            files = json.loads(body)["files"]
            # "regular" puts every file's bytes in the commit itself, so the test can compare them.
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        if path == f"{model}/commit/v1":
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return 200, {"commitUrl": f"{self.url}/{REPO_ID}/commit/{'a' * 40}", "commitOid": "a" * 40}
        return 404, {"error": f"no route {path}"}


def test_upload_commits_the_dry_run_files_and_never_prints_the_token(checkpoint, dry_run, monkeypatch, capfd, caplog):
    ckpt, eval_json = checkpoint
    hub = FakeHub()
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    # What HF_ENDPOINT=http://127.0.0.1:port does at import time, for this process already importing huggingface_hub;
    # and conftest's offline mode would refuse even 127.0.0.1.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    args = ["--model_dir", ckpt, "--eval_json", eval_json, "--private", "true", "--revision", "v1", *PUBLISH_ARGS]
    with hub.server:  # stopped and closed at the end, also when publish fails
        publish.main([str(a) for a in args])

    out, err = capfd.readouterr()
    assert FAKE_TOKEN not in out + err + caplog.text
    assert f"uploaded to {hub.url}/{REPO_ID}/commit/" in out
    api_calls = [(method, path) for method, path, _, _ in hub.requests if path != "/api/agent-harnesses"]
    assert api_calls == [
        ("POST", "/api/repos/create"),
        ("POST", f"/api/models/{REPO_ID}/branch/v1"),
        ("POST", "/api/validate-yaml"),
        ("POST", f"/api/models/{REPO_ID}/preupload/v1"),
        ("POST", f"/api/models/{REPO_ID}/commit/v1"),
    ]
    create = next(json.loads(body) for _, path, _, body in hub.requests if path == "/api/repos/create")
    assert create == {"name": "gpt2custom-tiny", "organization": "me", "visibility": "private"}
    for _, path, headers, _ in hub.requests:
        if path != "/api/agent-harnesses":
            assert headers.get("authorization") == f"Bearer {FAKE_TOKEN}", path
    # Byte for byte what --dry_run wrote.
    assert hub.files == {p.name: p.read_bytes() for p in dry_run.iterdir()}


def test_upload_without_a_network_is_one_line(checkpoint, monkeypatch, capfd):
    """A Hub that cannot be reached (nothing listens on the port): one line naming the endpoint, not a traceback."""
    import socket

    ckpt, _ = checkpoint
    with socket.socket() as s:  # a port that was free a moment ago: connecting to it is refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", dead)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(SystemExit) as info:
        publish.main(["--model_dir", str(ckpt), "--repo_id", REPO_ID])
    assert str(info.value).startswith(f"publish.py: upload to {REPO_ID} failed: cannot reach {dead} (ConnectError")
    assert FAKE_TOKEN not in str(info.value) + "".join(capfd.readouterr())
