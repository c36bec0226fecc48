"""GPT2CustomForCausalLM: attention kernels, KV-cache decoding, loss, checkpointing, compile, sizes, bad input."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from configuration_gpt2custom import GPT2CustomConfig
from conftest import greedy_reference, make_tiny_model
from modeling_gpt2custom import GPT2CustomForCausalLM

PAD = 0
VOCAB = 1024  # decoding tests: the lm_head over 50304 ids would dominate their run time and test nothing extra


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


PROMPTS = [[464, 329, 758, 218, 180, 625, 262], [154, 995], [40, 110, 257, 126]]


def small_vocab_model(seed=0):
    return make_tiny_model(seed, vocab_size=VOCAB)


# ---------------------------------------------------------------- attention kernels and the KV cache


def test_eager_and_sdpa_give_the_same_logits_with_and_without_padding():
    model = small_vocab_model()
    ids, mask = left_padded(PROMPTS)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        sdpa_plain = model(ids).logits
        sdpa_padded = model(ids, attention_mask=mask, position_ids=position_ids).logits
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        eager_plain = model(ids).logits
        eager_padded = model(ids, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(eager_plain, sdpa_plain, atol=1e-5, rtol=1e-5)
    valid = mask.bool()  # padded query rows are never read, and the kernels may fill them differently
    torch.testing.assert_close(eager_padded[valid], sdpa_padded[valid], atol=1e-5, rtol=1e-5)
    # The mask really changed something: padding must not leak into the real tokens.
    assert not torch.allclose(sdpa_plain[valid], sdpa_padded[valid], atol=1e-3)


def test_left_padded_row_equals_the_prompt_run_alone():
    model = small_vocab_model()
    ids, mask = left_padded(PROMPTS)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=position_ids).logits
        for row, prompt in enumerate(PROMPTS):
            alone = model(torch.tensor([prompt])).logits[0]
            torch.testing.assert_close(batch[row, -len(prompt) :], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_generate_equals_uncached_greedy_for_one_prompt(attn):
    model = small_vocab_model(seed=1)
    model.set_attn_implementation(attn)
    prompt = PROMPTS[0]
    expected = greedy_reference(model, prompt, 12)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    assert out[0, len(prompt) :].tolist() == expected
    assert len(set(expected)) > 1, "a constant continuation would not exercise the cache"


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_cached_generate_on_a_left_padded_batch_equals_each_prompt_decoded_alone(cache_implementation):
    model = small_vocab_model(seed=1)
    expected = [greedy_reference(model, p, 10) for p in PROMPTS]
    ids, mask = left_padded(PROMPTS)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=10,
        do_sample=False,
        pad_token_id=PAD,
        cache_implementation=cache_implementation,
    )
    assert out[:, ids.shape[1] :].tolist() == expected


class KernelMaskRecorder:
    """sdpa under another name that remembers the mask each call received."""

    name = "sdpa_mask_recorder"

    def __init__(self):
        self.masks = []
        AttentionInterface.register(self.name, self)
        ALL_MASK_ATTENTION_FUNCTIONS.register(self.name, sdpa_mask)

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        self.masks.append(attention_mask)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def test_sdpa_without_padding_passes_no_mask_so_the_is_causal_kernel_runs():
    recorder = KernelMaskRecorder()
    model = small_vocab_model()
    model.set_attn_implementation(recorder.name)
    ids = torch.tensor([PROMPTS[0], PROMPTS[0][::-1]])
    with torch.no_grad():
        reference = model(ids, attention_mask=torch.ones_like(ids)).logits
        assert recorder.masks == [None] * model.config.n_layer  # an all-ones mask is dropped too
        recorder.masks.clear()
        model.train()  # the training forward: no mask, no cache
        torch.testing.assert_close(model(ids).logits, reference)
        assert recorder.masks == [None] * model.config.n_layer
        recorder.masks.clear()
        model.eval()
        padded = torch.ones_like(ids)
        padded[1, :2] = 0
        model(ids, attention_mask=padded)
    assert all(isinstance(m, torch.Tensor) for m in recorder.masks), "padding must reach the kernel as a mask"


# ---------------------------------------------------------------- logits and loss


def test_logits_to_keep_one_returns_only_the_last_position():
    model = small_vocab_model()
    ids = torch.tensor(PROMPTS[:1])
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
    assert last.shape == (1, 1, model.config.vocab_size)
    torch.testing.assert_close(last, full[:, -1:])


def test_labels_loss_is_shifted_cross_entropy_ignoring_minus_100():
    model = make_tiny_model()
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt
    labels[1, -3:] = -100  # right padding
    out = model(ids, labels=labels)
    expected = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)
    unmasked = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert not torch.allclose(out.loss, unmasked), "the -100 positions must change the loss"

    shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)  # what the pretraining loader yields
    torch.testing.assert_close(model(ids, shift_labels=shift_labels).loss, expected)


def test_gradient_checkpointing_recomputes_blocks_and_gives_the_same_gradients():
    model = make_tiny_model(dropout=0.0, vocab_size=VOCAB).train()
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    calls = []
    model.transformer.h[0].attn.register_forward_pre_hook(lambda *_: calls.append(1))

    def grads():
        model.zero_grad()
        calls.clear()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = grads()
    model.gradient_checkpointing_enable()
    checkpointed, checkpointed_calls = grads()
    assert (plain_calls, checkpointed_calls) == (1, 2), "checkpointing must recompute the block in backward"
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_training_forward_compiles_as_one_graph():
    torch._dynamo.reset()
    model = small_vocab_model().train()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph=True raises on any graph break
    loss = compiled(ids, shift_labels=targets).loss  # the pretraining loader's already-shifted targets
    loss.backward()
    torch.testing.assert_close(loss, model(ids, shift_labels=targets).loss)


# ---------------------------------------------------------------- sizes


def gpt2_parameter_count(vocab: int, context: int, layers: int, width: int) -> int:
    """Tied embeddings counted once. A block: 2 LayerNorms (2C each), qkv (3C^2+3C), out proj (C^2+C),
    MLP up (4C^2+4C) and down (4C^2+C)."""
    per_block = 2 * 2 * width + 12 * width**2 + 9 * width
    return vocab * width + context * width + layers * per_block + 2 * width


SIZES = {  # name: (layers, width, OpenAI's published GPT2LMHeadModel parameter count)
    "gpt2": (12, 768, 124_439_808),
    "gpt2-medium": (24, 1024, 354_823_168),
    "gpt2-large": (36, 1280, 774_030_080),
    "gpt2-xl": (48, 1600, 1_557_611_200),
}


def test_124m_preset_has_exactly_124475904_parameters():
    with torch.device("meta"):
        model = GPT2CustomForCausalLM(GPT2CustomConfig.from_preset("124m"))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert sum(p.numel() for p in model.parameters()) == 124_475_904


@pytest.mark.parametrize("preset", sorted(SIZES))
def test_presets_match_openai_sizes_plus_the_padded_vocab(preset):
    layers, width, openai = SIZES[preset]
    assert gpt2_parameter_count(50257, 1024, layers, width) == openai  # the formula itself is right
    with torch.device("meta"):
        model = GPT2CustomForCausalLM(GPT2CustomConfig.from_preset(preset))
    assert sum(p.numel() for p in model.parameters()) == openai + (50304 - 50257) * width


# ---------------------------------------------------------------- bad input


def test_unknown_preset_names_it_and_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown preset 'gpt5'.*'gpt2-medium'.*'tiny'"):
        GPT2CustomConfig.from_preset("gpt5")


def test_unknown_config_key_names_it_and_the_expected_keys():
    with pytest.raises(ValueError) as info:
        GPT2CustomConfig.from_preset("tiny", n_layers=3)
    message = str(info.value)
    assert "'n_layers'" in message
    assert "'n_layer'" in message, f"the valid keys are not named: {message}"


def test_preset_accepts_the_keys_every_pretrained_config_takes():
    config = GPT2CustomConfig.from_preset("tiny", attn_implementation="eager", pad_token_id=0)
    assert config.pad_token_id == 0
    assert GPT2CustomForCausalLM(config).config._attn_implementation == "eager"


def test_input_longer_than_the_context_is_rejected_with_the_limit():
    model = small_vocab_model()  # block_size 256
    with pytest.raises(ValueError, match=r"input of 257 tokens .* expected at most block_size=256"):
        model(torch.zeros(1, 257, dtype=torch.long))


def test_cache_plus_new_tokens_past_the_context_is_rejected_with_the_limit():
    model = small_vocab_model()
    with torch.no_grad():
        cache = model(torch.zeros(1, 250, dtype=torch.long), use_cache=True).cache
        with pytest.raises(ValueError, match=r"257 tokens \(250 cached \+ 7 new\).*block_size=256"):
            model(torch.zeros(1, 7, dtype=torch.long), cache=cache, use_cache=True)
        with pytest.raises(ValueError, match=r"block_size=256"):
            model.generate(torch.zeros(1, 250, dtype=torch.long), max_new_tokens=10, do_sample=False, pad_token_id=PAD)
