"""The training step is the seed recipe, checked against references that do not come from this project: the GPT-2
paper's init statistics, a plain nanoGPT-style GPT-2 trained in this file with build-nanogpt's `get_lr`, the
attention kernel's own view of its mask, and the host syncs a step makes. Then resume across a change of compile
flag and of world size, on the path users run (pretrain.py compiled with TorchInductor, the default backend: a
cold C++ build of the tiny model's graphs costs ~25 s on 2 cores)."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from conftest import REPO, run_main_here, run_script, text_shards
from gpt2custom.plots import read_metrics

# --------------------------------------------------------------------------- init


def test_fresh_124m_model_has_the_gpt2_init_statistics():
    from configuration_gpt2custom import GPT2CustomConfig
    from modeling_gpt2custom import GPT2CustomForCausalLM

    torch.manual_seed(0)
    model = GPT2CustomForCausalLM(GPT2CustomConfig.from_preset("gpt2"))
    n_layer = model.config.n_layer
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):  # GPT-2 paper: residual projections scaled by 1/sqrt(N), N = 2 per block
            assert abs(p.std().item() / (0.02 / math.sqrt(2 * n_layer)) - 1) < 0.03, name
        elif name.endswith(".bias"):
            assert torch.count_nonzero(p) == 0, name
        elif ".ln_" in name:
            assert torch.all(p == 1), name
        else:
            assert abs(p.std().item() / 0.02 - 1) < 0.03 and abs(p.mean().item()) < 1e-3, name
    assert model.lm_head.weight is model.transformer.wte.weight


def test_init_holds_when_the_model_is_built_from_remote_code(tmp_path):
    """transformers marks container modules initialised without calling _init_weights under remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from configuration_gpt2custom import GPT2CustomConfig

    GPT2CustomConfig.from_preset("tiny", n_layer=8, n_embd=256, n_head=4).save_pretrained(tmp_path)
    shutil.copy(REPO / "modeling_gpt2custom.py", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "modeling_gpt2custom.GPT2CustomForCausalLM"
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path, trust_remote_code=True),
                                             trust_remote_code=True)  # fmt: skip
    assert type(model).__module__.startswith("transformers_modules")
    std = torch.cat([b.mlp.c_proj.weight.flatten() for b in model.transformer.h]).std().item()
    assert abs(std / (0.02 / math.sqrt(16)) - 1) < 0.03


# --------------------------------------------------------------------------- the compiled forward and host syncs


@pytest.fixture
def mask_probe():
    """An attention kernel registered under its own name that records the mask it is given."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    seen = []

    def probe(module, query, key, value, attention_mask, **kwargs):
        seen.append(None if attention_mask is None else tuple(attention_mask.shape))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("mask_probe", probe)
    AttentionMaskInterface.register("mask_probe", sdpa_mask)  # masks built exactly as for "sdpa"
    return seen


@pytest.mark.parametrize("compiled", [False, True])
def test_training_forward_gives_attention_no_mask(mask_probe, compiled):
    from conftest import make_tiny_model

    model = make_tiny_model().train()
    model.set_attn_implementation("mask_probe")
    forward = torch.compile(model, backend="aot_eager") if compiled else model
    x = torch.randint(0, 50257, (2, 64))
    forward(input_ids=x, shift_labels=x, skip_logits=True).loss.backward()
    assert mask_probe == [None, None]  # is_causal: the flash path on a GPU
    mask_probe.clear()
    # TRL's packed row (positions restarting per document) still gets its block mask: the probe can see one.
    positions = torch.cat([torch.arange(32), torch.arange(32)]).unsqueeze(0)
    model(input_ids=x[:1], position_ids=positions, shift_labels=x[:1], skip_logits=True)
    assert mask_probe == [(1, 1, 64, 64)] * 2


def test_train_step_never_waits_for_the_device(monkeypatch):
    """Every way a tensor reaches a Python value (item, bool, int, float, tolist) is counted during a step with
    clipping, except reads of the optimizer's step counters, which torch keeps on the host on GPUs too."""
    from accelerate import Accelerator

    from conftest import make_tiny_model
    from gpt2custom.training import build_optimizers, build_schedulers, train_step

    accelerator = Accelerator(cpu=True)
    model = make_tiny_model().train()
    optimizers = build_optimizers(model, fused=False)
    schedulers = build_schedulers(optimizers, warmup_steps=2, max_steps=10)
    prepared, *rest = accelerator.prepare(model, *optimizers, *schedulers)
    batches = iter([(torch.randint(0, 50257, (2, 32)), torch.randint(0, 50257, (2, 32))) for _ in range(6)])
    step = lambda: train_step(prepared, lambda: next(batches), rest[:1], rest[1:], accelerator,  # noqa: E731
                              grad_accum=2, grad_clip=1.0)  # fmt: skip
    step()  # the optimizer's state exists from here on
    counters = {id(s["step"]) for s in optimizers[0].state.values()}
    syncs = []
    for name in ("item", "__bool__", "__int__", "__float__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            if id(self) not in counters:
                syncs.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    loss, grad_norm, lr = step()
    monkeypatch.undo()
    assert syncs == []
    assert torch.isfinite(loss) and torch.isfinite(grad_norm) and isinstance(lr, float)


# --------------------------------------------------------------------------- an independent GPT-2 and its training


class RefAttention(nn.Module):
    def __init__(self, c, n_head):
        super().__init__()
        self.c_attn, self.c_proj, self.n_head = nn.Linear(c, 3 * c), nn.Linear(c, c), n_head

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class RefMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class RefBlock(nn.Module):
    def __init__(self, c, n_head):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = nn.LayerNorm(c), RefAttention(c, n_head), nn.LayerNorm(c), RefMLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class RefGPT(nn.Module):
    """nanoGPT's model.py in miniature, with its init: N(0, 0.02), residual projections 0.02/sqrt(2L)."""

    def __init__(self, vocab=50304, block=256, n_layer=2, n_head=2, c=64):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, c), wpe=nn.Embedding(block, c),
            h=nn.ModuleList([RefBlock(c, n_head) for _ in range(n_layer)]), ln_f=nn.LayerNorm(c)))  # fmt: skip
        self.lm_head = nn.Linear(c, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        t = self.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1]))
        for block in t.h:
            x = block(x)
        logits = self.lm_head(t.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def get_lr(it, max_lr, warmup_steps, max_steps, min_lr):
    """build-nanogpt's train_gpt2.py, verbatim in substance."""
    if it < warmup_steps:
        return max_lr * (it + 1) / warmup_steps
    if it > max_steps:
        return min_lr
    decay_ratio = (it - warmup_steps) / (max_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (max_lr - min_lr)


B, T, ACCUM, STEPS, LR, WARMUP = 4, 32, 2, 20, 3e-3, 5
RECIPE = [
    "--model_preset", "tiny", "--block_size", str(T), "--micro_batch_size", str(B),
    "--total_batch_size", str(B * T * ACCUM), "--max_steps", str(STEPS), "--warmup_steps", str(WARMUP),
    "--learning_rate", str(LR), "--min_lr_ratio", "0.1", "--weight_decay", "0.1", "--grad_clip", "1.0",
    "--precision", "fp32", "--cpu", "true", "--seed", "3",
    "--eval_interval", "7", "--eval_batches", "0", "--hellaswag_interval", "7", "--sample_interval", "0",
    "--checkpoint_interval", "10", "--keep_checkpoints", "3", "--report_to", "none",
]  # fmt: skip


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory, real_text):
    """Shards of real text, a tiny HellaSwag-format file, and a reference model's initial weights as a model folder."""
    from configuration_gpt2custom import GPT2CustomConfig
    from gpt2custom.checkpoints import save_model_folder
    from modeling_gpt2custom import GPT2CustomForCausalLM

    root = tmp_path_factory.mktemp("recipe")
    text_shards(root, real_text[:200_000])
    lines = [ln.strip() for ln in real_text.splitlines() if 4 <= len(ln.split()) <= 6 and len(ln) < 40][:80]  # fit T=32
    rows = [{"ind": i, "activity_label": "Reading", "ctx_a": lines[i], "ctx_b": "", "ctx": lines[i],
             "endings": lines[20 + i : 24 + i], "label": i % 4, "split": "val", "split_type": "indomain",
             "source_id": f"r~{i}"} for i in range(12)]  # fmt: skip
    (root / "hellaswag.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    reference = RefGPT(block=T)
    ours = GPT2CustomForCausalLM(GPT2CustomConfig.from_preset("tiny", block_size=T))
    ours.load_state_dict(reference.state_dict(), strict=True)
    save_model_folder(ours, root / "init")
    return root


def pretrain(data, out, *extra) -> str:
    """pretrain.py's `main` with these flags, in this process; returns what it printed. The distributed runs launch
    the script itself."""
    import pretrain as script

    argv = ["--data_dir", data / "shards", "--hellaswag_path", data / "hellaswag.jsonl", "--init_from",
            data / "init", "--output_dir", out, *RECIPE, *extra]  # fmt: skip
    return run_main_here(script.main, [str(a) for a in argv])


def rows(out, kind):
    """metrics.jsonl's rows of `kind` by step (after a resume the later row for a step wins)."""
    return [row for row in read_metrics(out / "metrics.jsonl") if row["kind"] == kind]


def final_weights(out):
    return load_file(out / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def compiled_run(recipe_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled")
    pretrain(recipe_data, out, "--compile", "true")
    return out


@pytest.fixture(scope="module")
def eager_run(recipe_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eager")
    pretrain(recipe_data, out, "--compile", "false")
    return out


@pytest.mark.slow
def test_compiled_pretraining_equals_a_plain_nanogpt_reference(recipe_data, compiled_run):
    from gpt2custom.data import ShardLoader

    torch.manual_seed(0)
    model = RefGPT(block=T)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=LR, betas=(0.9, 0.95), eps=1e-8, fused=False)  # fmt: skip
    loader = ShardLoader(recipe_data / "shards", "train", B, T, seed=3)
    losses, lrs = [], []
    for step in range(STEPS):
        loss_accum = 0.0
        for _ in range(ACCUM):
            x, y = loader.next_batch()
            loss = model(x, y) / ACCUM
            loss_accum += loss.item()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        lr = get_lr(step, LR, WARMUP, STEPS, LR * 0.1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss_accum)
        lrs.append(lr)

    train = rows(compiled_run, "train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["lr"] for r in train] == pytest.approx(lrs, rel=1e-12)
    assert lrs[0] > 0
    assert max(abs(r["loss"] - ref) for r, ref in zip(train, losses)) < 1e-5
    reference = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to wte, saved once
    assert_weights_close(final_weights(compiled_run), reference)


@pytest.mark.slow
def test_evaluation_is_the_same_compiled_or_not_and_the_last_step_has_it(compiled_run, eager_run):
    compiled, eager = rows(compiled_run, "eval"), rows(eager_run, "eval")
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == [7, 14, 20]
    for a, b in zip(compiled, eager):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
        assert (a["hellaswag_acc"], a["hellaswag_acc_norm"]) == (b["hellaswag_acc"], b["hellaswag_acc_norm"])
    summary = json.loads((compiled_run / "run_summary.json").read_text())
    assert summary["val_loss"] == compiled[-1]["val_loss"]
    assert summary["hellaswag_acc_norm"] == compiled[-1]["hellaswag_acc_norm"]
    assert summary["wall_time_s"] >= summary["train_time_s"] > 0


def continue_run(recipe_data, done, tmp_path, *extra):
    out = tmp_path / "resumed"
    shutil.copytree(done, out)
    shutil.rmtree(out / "checkpoints" / "step_000020")
    shutil.rmtree(out / "final")
    (out / "run_summary.json").unlink()
    printed = pretrain(recipe_data, out, *extra, "--resume", "true")
    assert "resumed from" in printed and "step_000010" in printed
    return out


def assert_weights_close(ours: dict, reference: dict, atol=1e-5):
    """Every weight within `atol` (< 1e-6 measured for most), but two that AdamW moves by rounding noise: the key bias
    (softmax ignores a shift of the scores, so its exact gradient is 0 and what remains is rounding, which Adam scales
    to full-size steps) and the rows of wte whose tokens never occur (a gradient of ~1/V from the tied lm_head). Inductor
    rounds differently from eager kernels: 1.2e-5 and 1.4e-5 there after 20 steps (measured)."""
    assert ours.keys() == reference.keys()
    for name, p in reference.items():
        noisy = name.endswith("attn.c_attn.bias") or name == "transformer.wte.weight"
        assert (ours[name] - p).abs().max().item() < (5 * atol if noisy else atol), name


def assert_same_run(a, b, atol=1e-5):
    la, lb = rows(a, "train"), rows(b, "train")
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, STEPS + 1))
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(la, lb)) < atol
    assert_weights_close(final_weights(a), final_weights(b), atol)


@pytest.mark.slow
def test_compiled_run_resumes_without_compile(recipe_data, compiled_run, eager_run, tmp_path):
    out = continue_run(recipe_data, compiled_run, tmp_path, "--compile", "false")
    assert_same_run(out, eager_run)


@pytest.mark.slow
def test_two_eager_ranks_then_one_compiled_process_continue_the_same_run(recipe_data, eager_run, tmp_path):
    """A change of world size (same total batch) and of compile flag (eager -> compiled) in one resume."""
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    two = tmp_path / "two"
    run_script(*launch, "pretrain.py", "--data_dir", recipe_data / "shards", "--hellaswag_path",
               recipe_data / "hellaswag.jsonl", "--init_from", recipe_data / "init", "--output_dir", two, *RECIPE,
               "--compile", "false", env={"ACCELERATE_USE_CPU": "1"})  # fmt: skip
    assert_same_run(two, eager_run)
    # HellaSwag split across ranks and summed: the single process's numbers. Validation is reduced across ranks
    # over whole steps of both ranks, so it sees 88 of the 92 windows one process sees: close, not equal.
    for a, b in zip(rows(two, "eval"), rows(eager_run, "eval"), strict=True):
        assert (a["hellaswag_acc"], a["hellaswag_acc_norm"]) == (b["hellaswag_acc"], b["hellaswag_acc_norm"])
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)
    out = continue_run(recipe_data, two, tmp_path, "--compile", "true")
    assert_same_run(out, eager_run)


@pytest.mark.slow
def test_bf16_run_learns_saves_fp32_weights_and_stays_close_to_fp32(recipe_data, eager_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    pretrain(recipe_data, out, "--compile", "false", "--precision", "bf16", "--hellaswag_interval", "0")
    bf16, fp32 = rows(out, "train"), rows(eager_run, "train")
    assert all(math.isfinite(r["loss"]) for r in bf16)
    assert sum(r["loss"] for r in bf16[-3:]) / 3 < bf16[0]["loss"] - 1.0
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(bf16, fp32)) < 0.05  # bf16 matmuls, fp32 master weights
    assert all(t.dtype == torch.float32 for t in final_weights(out).values())
    x = torch.randint(0, 50257, (1, T), generator=torch.Generator().manual_seed(0))
    logits = [AutoModelForCausalLM.from_pretrained(run / "final", trust_remote_code=True)(x).logits
              for run in (out, eager_run)]  # fmt: skip
    assert (logits[0] - logits[1]).abs().max() < 0.5

