"""The offline GPT-2 tokenizer: OpenAI's ids, lossless round trips, the end-of-text token."""

import pytest

from gpt2custom.tokenizer import EOT_ID, load_tokenizer

# Ids from OpenAI's GPT-2 vocabulary (encoder.json), as every GPT-2 port reports them.
KNOWN_IDS = {
    "Hello world": [15496, 995],
    " Hello": [18435],
    "!": [0],
    " the": [262],
    "\n": [198],
}

AWKWARD_TEXTS = [
    "emoji 👩‍👩‍👧‍👦 🇫🇷 🤖!",
    "中文字符 和 日本語のテキスト, 한국어",
    "e\u0301 n\u0303 combining marks, Zalgo: Z\u0351\u0358a\u036b\u0343l\u0343g\u0310o",
    "control \x00\x01\x07\x1b[31m chars\t\ttabs\r\nCRLF \u200b zero-width \ufeff BOM",
    "   runs   of    spaces \n\n\n\n and trailing   ",
    'Hello , world . Don \'t clean up " tokenization " spaces !',
    "<|endoftext|> inside text <|endoftext",
]


@pytest.mark.parametrize("text", sorted(KNOWN_IDS))
def test_encodes_to_openai_gpt2_ids(tokenizer, text):
    assert tokenizer(text).input_ids == KNOWN_IDS[text]


@pytest.mark.parametrize("text", AWKWARD_TEXTS)
def test_decode_of_encode_is_the_original_text(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text


def test_real_text_round_trips_and_compresses_like_gpt2(tokenizer, real_text):
    sample = real_text[:100_000]
    ids = tokenizer(sample).input_ids
    assert tokenizer.decode(ids) == sample
    assert 2.0 < len(sample) / len(ids) < 6  # GPT-2 BPE: ~3-4.5 characters per token on English, ~2.3 on Python code


def test_endoftext_is_one_special_token_50256(tokenizer):
    assert EOT_ID == 50256
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 50256
    assert tokenizer("a<|endoftext|>b").input_ids == [64, 50256, 65]
    assert len(tokenizer) == 50257


def test_saved_tokenizer_reloads_identically(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(str(tmp_path))
    for text in AWKWARD_TEXTS:
        assert reloaded(text).input_ids == tokenizer(text).input_ids
