"""Model folders: save_pretrained with remote code, loading from a clean process, GPT2LMHeadModel import/export."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from conftest import REPO, assert_remote_code_class, make_tiny_model, run_in_clean_process
from gpt2custom.checkpoints import export_gpt2, import_gpt2, load_model, save_model_folder
from modeling_gpt2custom import GPT2CustomForCausalLM

PROMPT = "Hello world, the quick brown fox"

# The body of a clean process (conftest.run_in_clean_process): only the folder's own copies of the model files load.
CLEAN_LOAD = """
    import torch
    from transformers import pipeline

    folder, reference = sys.argv[1], torch.load(sys.argv[2])
    model, tokenizer, facts = load_folder(folder)
    with torch.no_grad():
        logits = model(reference["ids"]).logits
    pipe = pipeline("text-generation", model=folder, trust_remote_code=True)
    text = pipe(reference["prompt"], max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    emit({
        "facts": facts,
        "pipeline_facts": model_facts(pipe.model),
        "max_abs_logit_diff": (logits - reference["logits"]).abs().max().item(),
        "lm_head_tied": model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(),
        "prompt_ids": tokenizer(reference["prompt"]).input_ids,
        "pipeline_text": text,
    })
"""


def randomize_(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Every parameter random (biases and LayerNorms too), so a dropped or mis-transposed tensor shows in the logits."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = ".ln_" in name and name.endswith(".weight")
            p.copy_(torch.randn(p.shape, generator=generator) * std + (1.0 if is_norm_scale else 0.0))
    return model.eval()


def random_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50257, n_positions=128, n_embd=64, n_layer=2, n_head=2, activation_function="gelu_new"
    )
    return randomize_(GPT2LMHeadModel(config))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.slow
def test_saved_folder_loads_in_a_clean_process_from_another_directory(tmp_path, tokenizer):
    model = make_tiny_model()
    folder = tmp_path / "model"
    save_model_folder(model, folder, tokenizer)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    torch.save({"ids": ids, "logits": logits(model, ids), "prompt": PROMPT}, tmp_path / "reference.pt")
    expected_ids = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    # the clean process runs with this process's thread count: the matmuls reduce in the same order, the logits match
    result = run_in_clean_process(CLEAN_LOAD, folder, tmp_path / "reference.pt", cwd=tmp_path)

    assert_remote_code_class(result["facts"])
    assert_remote_code_class(result["pipeline_facts"])
    assert result["max_abs_logit_diff"] == 0.0
    assert result["lm_head_tied"]
    assert result["prompt_ids"] == ids[0].tolist()
    assert result["pipeline_text"] and result["pipeline_text"] == tokenizer.decode(expected_ids[0, ids.shape[1] :])


def test_saved_folder_has_auto_map_both_model_files_and_one_embedding_copy(tiny_checkpoint):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "gpt2custom"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_gpt2custom.GPT2CustomConfig",
        "AutoModelForCausalLM": "modeling_gpt2custom.GPT2CustomForCausalLM",
    }
    for name in ("configuration_gpt2custom.py", "modeling_gpt2custom.py"):
        assert (tiny_checkpoint / name).read_text() == (REPO / name).read_text()
    assert (tiny_checkpoint / "tokenizer.json").exists()
    with safe_open(str(tiny_checkpoint / "model.safetensors"), "pt") as f:
        assert "transformer.wte.weight" in f.keys() and "lm_head.weight" not in f.keys()


def test_import_from_gpt2lmheadmodel_gives_the_same_logits():
    hf = random_gpt2()
    ours = import_gpt2(hf).eval()
    assert isinstance(ours, GPT2CustomForCausalLM)
    assert ours.config.vocab_size == 50257 and ours.lm_head.weight is ours.transformer.wte.weight
    ids = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(ours, ids), logits(hf, ids), atol=1e-5, rtol=1e-5)


def test_export_to_gpt2lmheadmodel_loads_without_remote_code_and_gives_the_same_logits(tmp_path, tokenizer):
    ours = randomize_(make_tiny_model(vocab_size=50257))
    export_gpt2(ours, tmp_path, tokenizer)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and "auto_map" not in config
    assert not list(tmp_path.glob("*.py"))

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # no trust_remote_code
    assert type(loaded) is GPT2LMHeadModel
    ids = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(loaded.eval(), ids), logits(ours, ids), atol=1e-5, rtol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path)("Hello world").input_ids == [15496, 995]


def test_import_of_an_export_restores_every_tensor(tmp_path, tokenizer):
    ours = randomize_(make_tiny_model(vocab_size=50257))
    export_gpt2(ours, tmp_path, tokenizer)
    back = import_gpt2(tmp_path).state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back[name], tensor), name


def test_import_rejects_a_gpt2_with_another_activation():
    config = GPT2Config(vocab_size=100, n_positions=16, n_embd=16, n_layer=1, n_head=2, activation_function="relu")
    with pytest.raises(ValueError, match=r"activation_function='relu'.*gelu_new"):
        import_gpt2(GPT2LMHeadModel(config))


def test_load_model_names_the_path_it_cannot_load(tmp_path):
    with pytest.raises(ValueError, match=r"cannot load a causal LM from '.*no_such_model'"):
        load_model(str(tmp_path / "no_such_model"))


def test_a_resave_killed_between_its_renames_leaves_the_old_checkpoint_to_resume_from(tmp_path):
    """Saving a step that exists (a resumed run finishing the step a notice interrupted) moves the old folder aside,
    renames the new one in, then deletes the old one. Killed between the two renames, the next start puts the old
    one back and continues from it."""
    from accelerate import Accelerator

    from conftest import reset_process_state
    from gpt2custom.resume import Checkpointer

    reset_process_state()
    try:
        model = make_tiny_model()
        accelerator = Accelerator(cpu=True)
        accelerator.prepare(model)
        checkpointer = Checkpointer(accelerator, tmp_path, model)
        checkpointer.save(3)
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        (tmp_path / "step_000003").rename(tmp_path / ".step_000003.old")  # the moment between the two renames
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        assert checkpointer.resume() == tmp_path / "step_000003"
        assert not list(tmp_path.glob(".step_*"))
        assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    finally:
        reset_process_state()
