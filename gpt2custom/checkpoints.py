"""Model folders in and out: our HF-format checkpoints, and weight exchange with OpenAI's GPT2LMHeadModel.

Our parameter names equal GPT2LMHeadModel's; only the four Conv1D matrices are stored transposed there.
"""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from configuration_gpt2custom import GPT2CustomConfig
from modeling_gpt2custom import GPT2CustomForCausalLM

from .tokenizer import load_tokenizer

# GPT2LMHeadModel keeps these as Conv1D (in, out); ours are nn.Linear (out, in).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _transposed(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.t().contiguous() if k.endswith(CONV1D_SUFFIXES) else v) for k, v in state_dict.items()}


def import_gpt2(source: "str | Path | GPT2LMHeadModel") -> GPT2CustomForCausalLM:
    """A GPT2CustomForCausalLM holding the weights of a GPT2LMHeadModel (an object, a local folder or a Hub id
    such as "openai-community/gpt2"). The vocabulary keeps the source's size (50257 for OpenAI's models)."""
    hf = source if isinstance(source, GPT2LMHeadModel) else GPT2LMHeadModel.from_pretrained(str(source))
    c = hf.config
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation_function={c.activation_function!r}: expected GPT-2's tanh GELU ('gelu_new')")
    config = GPT2CustomConfig(
        vocab_size=c.vocab_size,
        block_size=c.n_positions,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_embd=c.n_embd,
        dropout=c.resid_pdrop,
        layer_norm_epsilon=c.layer_norm_epsilon,
        initializer_range=c.initializer_range,
    )
    model = GPT2CustomForCausalLM(config)
    state = {k: v for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    missing, unexpected = model.load_state_dict(_transposed(state), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to wte
    if missing or unexpected:
        raise ValueError(f"GPT-2 weights do not fit: missing {missing}, unexpected {unexpected}")
    return model.to(hf.dtype)


def export_gpt2(model: GPT2CustomForCausalLM, out_dir: "str | Path", tokenizer: PreTrainedTokenizerBase | None = None):
    """Write a stock GPT2LMHeadModel folder (no remote code: TGI, vLLM and default endpoints serve it)."""
    c = model.config
    if not c.bias:
        raise ValueError("export to GPT2LMHeadModel needs bias=True (GPT-2 has biases everywhere)")
    hf_config = GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        activation_function="gelu_new",
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        layer_norm_epsilon=c.layer_norm_epsilon,
        initializer_range=c.initializer_range,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        tie_word_embeddings=True,
    )
    hf = GPT2LMHeadModel(hf_config)
    hf.load_state_dict(_transposed(model.state_dict()), strict=True)
    hf = hf.to(model.dtype)
    hf.save_pretrained(out_dir)
    (tokenizer or load_tokenizer()).save_pretrained(out_dir)
    return hf


def save_model_folder(model, out_dir: "str | Path", tokenizer: PreTrainedTokenizerBase | None = None, **kwargs):
    """`save_pretrained` (weights, config with auto_map, the two model files) plus the tokenizer, so that
    AutoModelForCausalLM / AutoTokenizer / pipeline all load from the folder."""
    model.save_pretrained(out_dir, **kwargs)
    if kwargs.get("is_main_process", True):
        (tokenizer or load_tokenizer()).save_pretrained(out_dir)


def load_model(name_or_path: str, **kwargs):
    """Any causal LM folder or Hub id: ours (remote code), a stock GPT-2 export, or another Hub model."""
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=True, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a causal LM from {name_or_path!r}: {e}") from e
