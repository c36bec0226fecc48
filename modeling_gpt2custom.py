"""GPT-2 as a Hugging Face model: pre-LN transformer, learned positions, tanh-GELU, lm_head tied to wte.

The parameter names are nanoGPT's and GPT2LMHeadModel's (`transformer.h.0.attn.c_attn.weight`, ...), so OpenAI's
weights load after transposing the four Conv1D matrices (`import_gpt2` / `export_gpt2` in `gpt2custom/checkpoints.py`).

This file travels to the Hub as remote code: it imports only torch and transformers.

    model = GPT2CustomForCausalLM(GPT2CustomConfig.from_preset("gpt2"))
    out = model(input_ids, labels=input_ids)             # out.loss, out.logits
    out = model(input_ids, labels=input_ids, skip_logits=True)   # out.loss only: the (B·T × V) logits never exist
    model.generate(input_ids, max_new_tokens=32)          # KV cache through DynamicCache
"""

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep

try:  # inside transformers_modules.<repo>.<hash>, loaded with trust_remote_code
    from .configuration_gpt2custom import GPT2CustomConfig
except ImportError:  # flat checkout: `python pretrain.py`, `accelerate launch pretrain.py`
    from configuration_gpt2custom import GPT2CustomConfig


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax(QK^T)V; the reference the fused kernels are tested against. q, k, v are (B, H, T, D)."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:  # the additive float mask that create_causal_mask builds for eager
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class GPT2CustomAttention(nn.Module):
    def __init__(self, config: GPT2CustomConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.n_embd // config.n_head
        self.scaling = self.head_dim**-0.5
        self.is_causal = True  # read by the sdpa / flash kernels
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True  # read by _init_weights
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states, attention_mask=None, cache: Cache | None = None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query, key, value = self.c_attn(hidden_states).split(self.config.n_embd, dim=-1)
        query = query.view(hidden_shape).transpose(1, 2)
        key = key.view(hidden_shape).transpose(1, 2)
        value = value.view(hidden_shape).transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.resid_dropout(self.c_proj(attn_output))


class GPT2CustomMLP(nn.Module):
    def __init__(self, config: GPT2CustomConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True  # read by _init_weights
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class GPT2CustomBlock(GradientCheckpointingLayer):
    def __init__(self, config: GPT2CustomConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = GPT2CustomAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = GPT2CustomMLP(config)

    def forward(self, hidden_states, attention_mask=None, cache: Cache | None = None, **kwargs):
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states), attention_mask, cache, **kwargs)
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GPT2CustomPreTrainedModel(PreTrainedModel):
    config_class = GPT2CustomConfig
    config: GPT2CustomConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GPT2CustomBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    def _init_weights(self, module):
        """GPT-2 / nanoGPT init: weights N(0, 0.02), biases 0, LayerNorm (1, 0), and the projections into the
        residual stream N(0, 0.02/sqrt(2·n_layer)) (GPT-2 paper: two residual additions per block).

        The residual rule sits on the Linear itself (tagged in __init__), not on the attention/MLP containers:
        transformers 5 skips `_init_weights` for modules that own no parameters of their own under remote code."""
        if getattr(module, "is_residual_projection", False):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range / math.sqrt(2 * self.config.n_layer))
            if module.bias is not None:
                init.zeros_(module.bias)
        else:  # Linear/Embedding N(0, initializer_range), zero biases, LayerNorm (1, 0)
            super()._init_weights(module)


def _chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    grad_hidden_needed: bool,
    grad_weight_needed: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op: the sum of the cross-entropies of `hidden @ weight.T` against `targets` (-100 ignored), walking the
    rows in chunks, and, when asked, already its gradients (softmax − one-hot, as llm.c's fused classifier does): the
    same matmuls as the plain lm_head + loss, with one chunk of logits in memory instead of all of them. A gradient
    that is not needed (evaluation, a frozen head) is neither computed nor returned (an empty tensor stands in).

    The matmuls run in the operands' dtype (bf16 under autocast, see `chunked_linear_cross_entropy`, or under FSDP2's
    mixed precision; fp32; fp64 for gradcheck); softmax and the weight gradient's sum in at least fp32."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    acc_dtype = torch.promote_types(dtype, torch.float32)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    loss = hidden.new_zeros((), dtype=acc_dtype)
    grad_hidden = torch.empty_like(hidden) if grad_hidden_needed else hidden.new_empty(0)
    grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if grad_weight_needed else weight.new_empty(0)
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        logits = (h @ weight.t()).to(acc_dtype)
        valid = (t != -100).unsqueeze(1)
        t = t.clamp(min=0).unsqueeze(1)
        target_logits = logits.gather(1, t)
        # logsumexp by hand, in place: torch.logsumexp would hold a second (chunk × V) fp32 buffer
        top = logits.amax(dim=-1, keepdim=True)
        total = logits.sub_(top).exp_().sum(dim=-1, keepdim=True)
        loss = loss + ((top + total.log() - target_logits) * valid).sum()
        if grad_hidden_needed or grad_weight_needed:
            # d(sum of losses)/d(logits) = softmax − one-hot, still in the one chunk-sized buffer
            grad = logits.div_(total).scatter_add_(1, t, -valid.to(acc_dtype)).mul_(valid).to(dtype)
            if grad_hidden_needed:
                grad_hidden[start : start + chunk_size] = grad @ weight
            if grad_weight_needed:
                grad_weight += grad.t() @ h
            del grad
        del logits  # freed before the next chunk's logits exist
    return loss, grad_hidden, grad_weight.to(weight.dtype)


def _chunked_linear_cross_entropy_shapes(hidden, weight, targets, chunk_size, grad_hidden_needed, grad_weight_needed):
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return (
        hidden.new_empty((), dtype=torch.promote_types(dtype, torch.float32)),
        hidden.new_empty(hidden.shape, dtype=dtype) if grad_hidden_needed else hidden.new_empty(0, dtype=dtype),
        weight.new_empty(weight.shape, dtype=dtype) if grad_weight_needed else weight.new_empty(0, dtype=dtype),
    )


def _save_gradients(ctx, inputs, output):
    _, grad_hidden, grad_weight = output
    ctx.save_for_backward(grad_hidden, grad_weight, inputs[2])
    ctx.mark_non_differentiable(grad_hidden, grad_weight)
    ctx.needed = inputs[4:6]


def _scale_gradients(ctx, grad_loss, _grad_hidden, _grad_weight):
    grad_hidden, grad_weight, targets = ctx.saved_tensors
    # A batch with no target left (every label -100): the library's loss gives zero gradients, not 0 · inf = NaN.
    grad_loss = torch.where((targets != -100).any(), grad_loss, 0.0)
    grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype) if ctx.needed[0] else None
    grad_weight = grad_weight * grad_loss.to(grad_weight.dtype) if ctx.needed[1] else None
    return grad_hidden, grad_weight, None, None, None, None


# A custom op, not an autograd.Function: under torch.compile the partitioner sees one opaque node, so what is saved for
# backward is what _save_gradients saves (the two gradients), and Inductor cannot move a gradient matmul into the
# backward graph and keep every chunk's (chunk × V) gradient alive for it. The op runs eagerly inside the compiled
# graph, so its Python loop over the rows fixes no shape. Registered once per process (the flat checkout and the
# Hub's copy of this file can both be imported).
if not hasattr(torch.ops.gpt2custom, "chunked_linear_cross_entropy"):
    _op = torch.library.custom_op("gpt2custom::chunked_linear_cross_entropy", mutates_args=())(
        _chunked_linear_cross_entropy
    )
    _op.register_fake(_chunked_linear_cross_entropy_shapes)
    _op.register_autograd(_scale_gradients, setup_context=_save_gradients)


def chunked_linear_cross_entropy(hidden, weight, targets, divisor, chunk_size: int):
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, divided by `divisor`, without the (N × V) logits.
    Gradients are computed in the forward only for the inputs that need one, and only when autograd records."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # custom ops are not autocast: cast as autocast does for lm_head
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    grad_on = torch.is_grad_enabled()
    loss, _, _ = torch.ops.gpt2custom.chunked_linear_cross_entropy(
        hidden, weight, targets, chunk_size, grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    )
    return loss / divisor


class GPT2CustomModel(GPT2CustomPreTrainedModel):
    """The backbone: embeddings, blocks, final LayerNorm. Returns hidden states (TRL calls it as `base_model`)."""

    def __init__(self, config: GPT2CustomConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([GPT2CustomBlock(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,  # the 4.x name, still sent by older callers
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if use_cache is None:  # a cache only helps decoding; training pays nothing for it
            use_cache = self.config.use_cache and not self.training
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        seq_len = inputs_embeds.shape[1]
        # TRL's padding-free packing sends one row of many documents, each restarting its positions at 0:
        # the longest document, not the row, must fit the context.
        longest = kwargs.get("max_length_q", seq_len)
        if past + longest > self.config.block_size:
            raise ValueError(
                f"input of {past + longest} tokens ({past} cached + {longest} new) is longer than the context: "
                f"expected at most block_size={self.config.block_size}"
            )
        # None for sdpa/flash without padding, so the kernels take their is_causal fast path. Only positions the
        # caller gave (TRL's packed rows, generate) go to the mask: given self-built ones, transformers looks for
        # packed documents in them, a host sync eagerly and a full (B, 1, T, T) mask under torch.compile.
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        if position_ids is not None:
            kwargs["position_ids"] = position_ids  # flash-attention's varlen path reads them
        else:
            position_ids = torch.arange(past, past + seq_len, device=inputs_embeds.device).unsqueeze(0)
        hidden_states = self.drop(inputs_embeds + self.wpe(position_ids))
        for block in self.h:
            hidden_states = block(hidden_states, mask, cache=cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(hidden_states), cache=cache if use_cache else None)


class GPT2CustomForCausalLM(GPT2CustomPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    loss_chunk_tokens = 1024  # skip_logits: tokens per chunk (1024 × 50304 fp32 logits = 0.2 GB at a time)

    def __init__(self, config: GPT2CustomConfig):
        super().__init__(config)
        self.transformer = GPT2CustomModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`labels` are shifted inside the loss (-100 ignored); `shift_labels=` (in kwargs) passes targets that
        are already shifted, as the pretraining loader yields them. `skip_logits=True` returns only the loss,
        computed chunk by chunk (`chunked_linear_cross_entropy`): what a training step needs, without the logits."""
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        if skip_logits:
            loss = self.chunked_loss(outputs.last_hidden_state, labels, **kwargs)
            return CausalLMOutputWithPast(loss=loss, logits=None, cache=outputs.cache)
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None or kwargs.get("shift_labels") is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)

    def chunked_loss(self, hidden_states, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        """The library loss (shift, -100 ignored, mean or sum / num_items_in_batch) without materialising logits."""
        if shift_labels is None:
            if labels is None:
                raise ValueError("skip_logits=True computes only the loss: pass labels or shift_labels")
            shift_labels = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
        targets = shift_labels.reshape(-1).to(hidden_states.device)
        divisor = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
        divisor = torch.as_tensor(divisor, device=hidden_states.device, dtype=torch.float32)
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        return chunked_linear_cross_entropy(hidden, self.lm_head.weight, targets, divisor, self.loss_chunk_tokens)


GPT2CustomForCausalLM.register_for_auto_class("AutoModelForCausalLM")
