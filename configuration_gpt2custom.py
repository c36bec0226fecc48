"""GPT2CustomConfig: the hyperparameters of a GPT-2 style model.

This file travels to the Hub as remote code beside `modeling_gpt2custom.py`: it imports only transformers.

    config = GPT2CustomConfig.from_preset("gpt2")            # 124M, vocab padded to 50304
    config = GPT2CustomConfig.from_preset("tiny", n_layer=3)  # presets take overrides
"""

import inspect

from transformers import PretrainedConfig

# The four OpenAI GPT-2 sizes, plus a tiny one for tests and the CPU smoke run.
PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=256),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1.5B
}
PRESET_ALIASES = {"124m": "gpt2", "350m": "gpt2-medium", "774m": "gpt2-large", "1.5b": "gpt2-xl"}

# The GPT-2 tokenizer has 50257 ids; 50304 = 64 * 786 keeps the embedding and lm_head matmuls on fast
# tile sizes (the seed measured ~4 % faster steps). The 47 spare ids are never produced by the tokenizer.
PADDED_VOCAB_SIZE = 50304
EOT_TOKEN_ID = 50256


class GPT2CustomConfig(PretrainedConfig):
    model_type = "gpt2custom"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    # The HF names that generic code (caches, masks, FSDP, TRL) reads, mapped onto nanoGPT's names.
    attribute_map = {
        "hidden_size": "n_embd",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
        "max_position_embeddings": "block_size",
    }

    def __init__(
        self,
        vocab_size: int = PADDED_VOCAB_SIZE,
        block_size: int = 1024,  # context length
        n_layer: int = 12,
        n_head: int = 12,
        n_embd: int = 768,
        dropout: float = 0.0,  # embedding, attention and residual dropout (0 for pretraining, as in the seed)
        bias: bool = True,  # biases in Linear layers and LayerNorms, as in GPT-2
        layer_norm_epsilon: float = 1e-5,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        bos_token_id: int = EOT_TOKEN_ID,
        eos_token_id: int = EOT_TOKEN_ID,
        **kwargs,
    ):
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        for name, value in (("vocab_size", vocab_size), ("block_size", block_size), ("n_layer", n_layer)):
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_embd = n_embd
        self.dropout = dropout
        self.bias = bias
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        # transformers 5 no longer declares these two on the base class; generate() and weight tying read them.
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPT2CustomConfig":
        """A named size ("tiny", "gpt2"/"124m", "gpt2-medium"/"350m", "gpt2-large"/"774m", "gpt2-xl"/"1.5b")."""
        key = PRESET_ALIASES.get(name.lower(), name.lower())
        if key not in PRESETS:
            allowed = sorted(PRESETS) + sorted(PRESET_ALIASES)
            raise ValueError(f"unknown preset {name!r}; expected one of {allowed}")
        own = sorted(set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"})
        # keys every transformers config takes (dtype, attn_implementation, pad_token_id, ...) pass through
        generic = set(PretrainedConfig().to_dict()) | set(inspect.signature(PretrainedConfig.__init__).parameters)
        generic |= {"attn_implementation", "pad_token_id", "output_attentions"} | set(cls.attribute_map)
        unknown = sorted(set(overrides) - set(own) - generic)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown} for GPT2CustomConfig; expected one of {own}")
        return cls(**{**PRESETS[key], **overrides})


GPT2CustomConfig.register_for_auto_class()
