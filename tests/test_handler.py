"""handler.py as Inference Endpoints runs it: imported by file from the published folder in a fresh process."""

import json
import sys

import pytest

from conftest import (
    CHAT_STOP_IDS,
    assert_remote_code_class,
    chat_prompt_ids,
    greedy_reference,
    make_tiny_model,
    run_in_clean_process,
)
from gpt2custom.checkpoints import save_model_folder
from gpt2custom.hub import build_upload_folder

CONTEXT = 256  # the tiny preset's block_size
MAX_NEW_TOKENS_CAP = 40

# The body of a clean process (conftest.run_in_clean_process): the Inference Toolkit's loading sequence
# (huggingface_inference_toolkit.utils.check_and_register_custom_pipeline_from_directory), then one call per request;
# one folder after the other.
TOOLKIT_LOAD = """
    answers, facts = [], []
    for model_dir, requests in json.loads(sys.argv[1]):
        spec = importlib.util.spec_from_file_location("handler.EndpointHandler", Path(model_dir) / "handler.py")
        sys.path.insert(0, model_dir)
        handler = importlib.util.module_from_spec(spec)
        sys.modules["handler.EndpointHandler"] = handler
        spec.loader.exec_module(handler)
        endpoint = handler.EndpointHandler(model_dir)
        answers.append([endpoint(request) for request in requests])
        sys.path.remove(model_dir)  # the toolkit's own entry aside, the model files must not be importable by name
        facts.append(model_facts(endpoint.model))
    emit({"answers": answers, "facts": facts})
"""

LONG_TEXT = "the quick brown fox jumps over the lazy dog " * 100  # ~900 tokens, far over the context
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
GOOD = {
    "string": {"inputs": "Hello world, this is", "parameters": {"max_new_tokens": 12, "do_sample": False}},
    "messages": {"inputs": CHAT, "parameters": {"max_new_tokens": 12, "temperature": 0, "details": True}},
    "oversized_truncated": {
        "inputs": LONG_TEXT,
        "parameters": {"truncate": 230, "max_new_tokens": 1000, "do_sample": False, "details": True},
    },
    "capped": {"inputs": "Once", "parameters": {"max_new_tokens": 1000, "do_sample": False, "details": True}},
    "sampled_with_seed": {"inputs": "Once", "parameters": {"max_new_tokens": 6, "top_k": 20, "seed": 3}},
    "sampled_with_seed_again": {"inputs": "Once", "parameters": {"max_new_tokens": 6, "top_k": 20, "seed": 3}},
    "sampled_other_seed": {"inputs": "Once", "parameters": {"max_new_tokens": 6, "top_k": 20, "seed": 4}},
}
# request -> words the error must contain (the offending key or value and what was expected)
BAD = {
    "oversized": ({"inputs": LONG_TEXT}, ["context is 256", "truncate"]),
    "unknown_parameter": ({"inputs": "x", "parameters": {"max_tokens": 5}}, ["max_tokens", "allowed"]),
    "string_for_int": ({"inputs": "x", "parameters": {"max_new_tokens": "5"}}, ["max_new_tokens", "integer"]),
    "bool_for_int": ({"inputs": "x", "parameters": {"max_new_tokens": True}}, ["max_new_tokens", "integer"]),
    "top_p_out_of_range": ({"inputs": "x", "parameters": {"top_p": 0}}, ["top_p", "(0, 1]"]),
    "parameters_not_object": ({"inputs": "x", "parameters": [1]}, ["parameters", "object"]),
    "no_inputs": ({"prompt": "x"}, ['"inputs"']),
    "unknown_top_level_key": ({"inputs": "x", "options": {}}, ["options"]),
    "inputs_number": ({"inputs": 3}, ["inputs=3", "string or a list of messages"]),
    "message_without_content": ({"inputs": [{"role": "user"}]}, ["inputs[0]", "content"]),
    "unknown_role": ({"inputs": [{"role": "robot", "content": "hi"}]}, ["robot"]),
    "empty_messages": ({"inputs": []}, ["empty"]),
    "stream": ({"inputs": "x", "stream": True}, ["stream"]),
    "body_not_object": (["x"], ['"inputs"']),
}


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(seed=11)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model, tokenizer):
    root = tmp_path_factory.mktemp("handler")
    save_model_folder(model, root / "ckpt", tokenizer)
    return build_upload_folder(root / "ckpt", root / "published", repo_id="me/tiny")


@pytest.fixture(scope="module")
def toolkit(folder, tmp_path_factory):
    """The published folder's handler, loaded the toolkit's way in a clean process that runs in another directory and
    cannot see the repo: {"answers": [responses], "facts": [model_facts]}, one entry per folder."""
    requests = list(GOOD.values()) + [req for req, _ in BAD.values()]
    env = {"GPT2CUSTOM_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS_CAP)}
    jobs = json.dumps([[str(folder), requests]])
    return run_in_clean_process(TOOLKIT_LOAD, jobs, cwd=tmp_path_factory.mktemp("toolkit"), env=env)


@pytest.fixture(scope="module")
def answers(toolkit):
    """{name: response} from the published folder's handler."""
    (folder_answers,) = toolkit["answers"]
    return dict(zip(list(GOOD) + list(BAD), folder_answers, strict=True))


@pytest.mark.slow
def test_handler_runs_the_folders_own_model_code(toolkit):
    (facts,) = toolkit["facts"]
    assert_remote_code_class(facts)


@pytest.mark.slow
def test_string_request_gets_the_greedy_continuation(answers, model, tokenizer):
    responses = answers
    prompt = tokenizer(GOOD["string"]["inputs"])["input_ids"]
    expected = tokenizer.decode(greedy_reference(model, prompt, 12, CHAT_STOP_IDS), skip_special_tokens=True)
    assert responses["string"] == [{"generated_text": expected}]


@pytest.mark.slow
def test_messages_request_is_rendered_with_the_chat_template(answers, model, tokenizer):
    responses = answers
    prompt = chat_prompt_ids(tokenizer, CHAT)  # the chat format built by hand from its spec
    new = greedy_reference(model, prompt, 12, CHAT_STOP_IDS)
    (answer,) = responses["messages"]
    # The plain GPT-2 tokenizer decodes the role ids to nothing, as skip_special_tokens does with them.
    assert answer["generated_text"] == tokenizer.decode(new, skip_special_tokens=True)
    assert answer["details"]["prompt_tokens"] == len(prompt)
    assert answer["details"]["generated_tokens"] == len(new)


@pytest.mark.slow
def test_oversized_input_is_refused_unless_truncated_then_fits_the_context(answers):
    responses = answers
    assert "error" in responses["oversized"]
    (answer,) = responses["oversized_truncated"]
    assert answer["details"]["prompt_tokens"] == 230
    assert 1 <= answer["details"]["generated_tokens"] <= CONTEXT - 230 < MAX_NEW_TOKENS_CAP
    if answer["details"]["finish_reason"] == "length":
        assert answer["details"]["generated_tokens"] == CONTEXT - 230


@pytest.mark.slow
def test_max_new_tokens_is_capped_by_the_server_limit(answers, model, tokenizer):
    (answer,) = answers["capped"]
    # the reference decodes at most the server's cap: its length and last token say how the handler must finish
    new = greedy_reference(model, tokenizer("Once")["input_ids"], MAX_NEW_TOKENS_CAP, CHAT_STOP_IDS)
    assert answer["details"]["generated_tokens"] == len(new) <= MAX_NEW_TOKENS_CAP
    assert answer["details"]["finish_reason"] == ("stop" if new[-1] in CHAT_STOP_IDS else "length")


@pytest.mark.slow
def test_sampling_is_reproducible_with_a_seed(answers):
    responses = answers
    assert responses["sampled_with_seed"] == responses["sampled_with_seed_again"]
    assert responses["sampled_with_seed"] != responses["sampled_other_seed"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_request_gets_an_error_naming_the_problem(answers, name):
    responses = answers
    response = responses[name]
    assert isinstance(response, dict) and set(response) == {"error"}, response
    for word in BAD[name][1]:
        assert word in response["error"], (word, response["error"])


def test_handler_module_imports_only_torch_transformers_and_stdlib():
    import ast

    from gpt2custom.hub import HANDLER_FILE

    tree = ast.parse(HANDLER_FILE.read_text())
    roots = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert roots - {"torch", "transformers"} <= set(sys.stdlib_module_names), roots
