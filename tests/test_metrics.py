"""The numbers every dollar figure rests on, against their published formulas and a hand count."""

import numpy as np
import pytest

from gpt2custom.metrics import dollars, flops_per_token, mfu


def test_flops_per_token_is_palm_formula_with_the_models_own_parameter_count():
    from configuration_gpt2custom import GPT2CustomConfig
    from modeling_gpt2custom import GPT2CustomForCausalLM

    config = GPT2CustomConfig.from_preset("gpt2")
    model = GPT2CustomForCausalLM(config)
    n = sum(p.numel() for name, p in model.named_parameters() if "wpe" not in name)  # tied lm_head counted once
    assert n == 123_689_472  # the README's N (vocab 50304)
    layers, heads, head_dim, seq = 12, 12, 64, 1024
    assert flops_per_token(config, seq) == 6 * n + 12 * layers * heads * head_dim * seq
    assert round(flops_per_token(config, seq) / 1e6) == 855


def test_mfu_and_dollars_by_hand():
    # 185k tok/s on one A100 (the seed) at 855 MFLOP/token against 312 TFLOP/s
    assert mfu(185_000, 855e6, 312e12) == pytest.approx(185_000 * 855e6 / 312e12)
    assert mfu(185_000, 855e6, None) is None
    assert dollars(3600 * 1.5, 8, 2.0) == pytest.approx(24.0)
    assert dollars(10, 1, None) is None


def test_unigram_loss_is_the_cross_entropy_of_add_one_counts(tmp_path):
    import pretrain
    from gpt2custom.data import write_shard

    train = np.array([1, 1, 2, 3, 3, 3], dtype=np.uint16)
    val = np.array([3, 1, 7], dtype=np.uint16)
    (tmp_path / "shards").mkdir()
    entries = {}
    for split, tokens in (("train", train), ("val", val)):
        name = f"{split}_000000.bin"
        write_shard(tmp_path / "shards" / name, tokens)
        entries[split] = {"shards": [{"file": name, "tokens": len(tokens)}]}
    import json

    from gpt2custom.data import MANIFEST, MANIFEST_FORMAT

    (tmp_path / "shards" / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "splits": entries}))
    total = len(train) + 65536
    p = {1: 3 / total, 3: 4 / total, 7: 1 / total}  # (count + 1) / (N + V)
    expected = -(np.log(p[3]) + np.log(p[1]) + np.log(p[7])) / 3
    assert pretrain.unigram_loss(tmp_path / "shards") == pytest.approx(expected, rel=1e-9)
