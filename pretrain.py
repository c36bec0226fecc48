"""Pretrain GPT2Custom on GPT-2 token shards with accelerate: one CPU core to several 8-GPU nodes.

The seed recipe (configs/gpt2-124m.yaml): 524,288 tokens per optimizer step, peak LR 6e-4 after 715 warmup steps,
cosine decay to 10 % over 10B tokens (19,073 steps), AdamW (0.9, 0.95), weight decay 0.1 on 2-D weights, clip 1.0,
TF32, bf16 autocast, SDPA flash attention, vocab 50304, torch.compile, fused AdamW, DDP.

    python prepare_data.py --source stdlib --out_dir data/smoke ...        # data first (see README)
    python pretrain.py --config configs/smoke.yaml                          # tiny model on the CPU
    accelerate launch --config_file accelerate_configs/ddp_8gpu.yaml pretrain.py --config configs/gpt2-124m.yaml
    accelerate launch ... pretrain.py --config configs/gpt2-124m.yaml --resume true   # continue the latest checkpoint
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 pretrain.py --config configs/smoke.yaml --cpu true

Writes to --output_dir: metrics.jsonl, tracker logs, checkpoints/step_NNNNNN (accelerate state), final/ (an HF model
folder that AutoModelForCausalLM loads with trust_remote_code=True), loss.png, hellaswag.png, run_summary.json.
"""

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm
from trl import TrlParser

from configuration_gpt2custom import GPT2CustomConfig
from gpt2custom.chat import add_chat_format
from gpt2custom.checkpoints import save_model_folder
from gpt2custom.data import ShardLoader, iter_eval_batches, list_shards, read_shard
from gpt2custom.metrics import detect_gpu, dollars, flops_per_token, mfu
from gpt2custom.plots import plot_training
from gpt2custom.tokenizer import load_tokenizer
from gpt2custom.training import build_optimizers, build_schedulers, device_batches, mixed_precision, train_step
from modeling_gpt2custom import GPT2CustomForCausalLM


@dataclass
class PretrainArgs:
    # model
    model_preset: str = field(default="gpt2", metadata={"help": "tiny | gpt2 (124M) | gpt2-medium | gpt2-large | gpt2-xl"})
    block_size: int = field(default=1024, metadata={"help": "context length = training sequence length"})
    dropout: float = 0.0
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa | eager | flash_attention_2"})
    # data
    data_dir: str = field(default="data/fineweb-edu", metadata={"help": "folder written by prepare_data.py"})
    seed: int = 1337
    # batch and schedule
    total_batch_size: int = field(default=524288, metadata={"help": "tokens per optimizer step (all ranks)"})
    micro_batch_size: int = field(default=64, metadata={"help": "sequences per forward per rank"})
    max_steps: int = field(default=19073, metadata={"help": "10B tokens / 524,288"})
    warmup_steps: int = 715
    learning_rate: float = 6e-4
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final LR as a fraction of the peak"})
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    optimizer: str = field(default="adamw", metadata={"help": "adamw | muon (Muon on hidden matrices + AdamW)"})
    # speed
    precision: str = field(default="auto", metadata={"help": "auto (bf16 on capable GPUs, else fp32) | bf16 | fp16 | fp32"})
    tf32: bool = True
    compile: bool = field(default=True, metadata={"help": "torch.compile the training forward (eval stays eager)"})
    fused_adamw: bool = True
    cpu: bool = field(default=False, metadata={"help": "Accelerator(cpu=True): gloo ranks on CPU"})
    # evaluation and logging
    eval_interval: int = 250
    eval_batches: int = field(default=20, metadata={"help": "validation batches per evaluation (0 = all)"})
    hellaswag_interval: int = field(default=250, metadata={"help": "0 disables"})
    hellaswag_path: str | None = field(default=None, metadata={"help": "local jsonl; None downloads to the cache"})
    hellaswag_limit: int | None = None
    sample_interval: int = 250
    sample_prompt: str = "Hello, I'm a language model,"
    num_samples: int = 2
    sample_tokens: int = 32
    log_interval: int = 1
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard | trackio | wandb | none"})
    # checkpoints
    output_dir: str = "runs/gpt2-124m"
    checkpoint_interval: int = 1000
    keep_checkpoints: int = 2
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in output_dir"})
    # cost
    gpu_price_per_hour: float | None = field(default=None, metadata={"help": "per GPU; default from the GPU's name"})
    peak_flops: float | None = field(default=None, metadata={"help": "per GPU, for MFU; default from the GPU's name"})
    unigram_baseline: bool = field(default=False, metadata={"help": "print the unigram val loss of the data"})


class RunProgress:
    """Step and counters, saved with each checkpoint through accelerate's register_for_checkpointing."""

    def __init__(self):
        self.step, self.tokens, self.train_seconds = 0, 0, 0.0

    def state_dict(self):
        return {"step": self.step, "tokens": self.tokens, "train_seconds": self.train_seconds}

    def load_state_dict(self, state):
        self.step, self.tokens, self.train_seconds = state["step"], state["tokens"], state["train_seconds"]


def gradient_accumulation(args: PretrainArgs, world_size: int) -> int:
    tokens_per_micro_step = args.micro_batch_size * args.block_size * world_size
    if args.total_batch_size % tokens_per_micro_step:
        raise ValueError(
            f"total_batch_size={args.total_batch_size} is not divisible by micro_batch_size × block_size × world_size "
            f"= {args.micro_batch_size} × {args.block_size} × {world_size} = {tokens_per_micro_step}"
        )
    return args.total_batch_size // tokens_per_micro_step


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())  # ".step_*.tmp" are unfinished saves
    return done[-1] if done else None


def save_checkpoint(accelerator: Accelerator, ckpt_dir: Path, step: int, keep: int):
    """accelerate's save_state into a temporary folder, renamed once every rank has written: a kill mid-save
    leaves the previous checkpoint as the latest."""
    final, tmp = ckpt_dir / f"step_{step:06d}", ckpt_dir / f".step_{step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def unigram_loss(data_dir: str, max_tokens: int = 100_000_000) -> float:
    """Cross-entropy on the val split of a unigram model fitted on (the start of) the train split, add-one smoothed:
    the loss a model that ignores context would reach."""
    counts = np.zeros(65536, dtype=np.float64)
    seen = 0
    for path in list_shards(data_dir, "train"):
        tokens = read_shard(path)[: max_tokens - seen]
        counts += np.bincount(tokens, minlength=65536)
        seen += len(tokens)
        if seen >= max_tokens:
            break
    logp = np.log((counts + 1) / (counts.sum() + len(counts)))
    val = np.concatenate([read_shard(p) for p in list_shards(data_dir, "val")])
    return float(-logp[val].mean())


class Pretrainer:
    def __init__(self, args: PretrainArgs):
        self.args = args
        self.out = Path(args.output_dir)
        cuda = torch.cuda.is_available()
        self.accelerator = Accelerator(
            cpu=args.cpu,
            mixed_precision=mixed_precision(args.precision, torch.device("cpu" if args.cpu or not cuda else "cuda")),
            log_with=None if args.report_to == "none" else args.report_to,
            project_dir=str(self.out),
            step_scheduler_with_optimizer=False,  # our schedule counts optimizer steps, not steps × world size
        )
        acc = self.accelerator
        if acc.device.type == "cuda" and args.tf32:
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.cudnn.conv.fp32_precision = "tf32"
        set_seed(args.seed)
        self.grad_accum = gradient_accumulation(args, acc.num_processes)
        list_shards(args.data_dir, "train")  # fail now, with the folder named, if the data is missing

        config = GPT2CustomConfig.from_preset(args.model_preset, block_size=args.block_size, dropout=args.dropout)
        self.model = GPT2CustomForCausalLM(config)
        self.model.set_attn_implementation(args.attn_implementation)
        self.raw_model = self.model  # eval, sampling and saving use the uncompiled module
        self.tokenizer = add_chat_format(load_tokenizer())  # saved with the model, so `trl sft` can start from it
        self.optimizers = build_optimizers(
            self.model.to(acc.device),
            optimizer=args.optimizer,
            lr=args.learning_rate,
            weight_decay=args.weight_decay,
            betas=(args.beta1, args.beta2),
            fused=args.fused_adamw and acc.device.type == "cuda",
        )
        self.schedulers = build_schedulers(
            self.optimizers, warmup_steps=args.warmup_steps, max_steps=args.max_steps, min_lr_ratio=args.min_lr_ratio
        )
        train_model = torch.compile(self.model) if args.compile else self.model
        self.model, *rest = acc.prepare(train_model, *self.optimizers, *self.schedulers)
        self.optimizers, self.schedulers = rest[: len(self.optimizers)], rest[len(self.optimizers) :]

        self.train_loader = ShardLoader(
            args.data_dir, "train", args.micro_batch_size, args.block_size,
            rank=acc.process_index, world_size=acc.num_processes, seed=args.seed,
        )  # fmt: skip
        self.next_batch = device_batches(self.train_loader, acc.device)
        self.progress = RunProgress()
        self.last_eval: dict = {}
        acc.register_for_checkpointing(self.train_loader, self.progress)

        self.flops_token = flops_per_token(config, args.block_size)
        gpu = detect_gpu(acc.device)
        self.gpu_name = torch.cuda.get_device_name(acc.device) if acc.device.type == "cuda" else "cpu"
        self.peak = args.peak_flops or (gpu.peak_bf16_flops if gpu else None)
        self.price = args.gpu_price_per_hour or (gpu.dollars_per_hour if gpu else None)
        self.hellaswag = self.load_hellaswag() if args.hellaswag_interval else None

    # ---------------------------------------------------------------- helpers
    def print(self, *a):
        self.accelerator.print(*a)

    def log(self, row: dict):
        """One JSON line in metrics.jsonl and the tracker (main process only)."""
        if self.accelerator.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, int | float) and k != "step"}
        self.accelerator.log(scalars, step=row["step"])

    def load_hellaswag(self):
        try:
            from gpt2custom.hellaswag import load_hellaswag

            examples = load_hellaswag(self.args.hellaswag_path)
        except Exception as e:  # offline machines train on; the user sees why HellaSwag is off
            self.print(f"HellaSwag disabled: {e}")
            return None
        return examples[: self.args.hellaswag_limit] if self.args.hellaswag_limit else examples

    def stop_diverged(self, what: str, ckpt_dir: Path):
        raise FloatingPointError(
            f"{what}: stopping. The last good checkpoint is {latest_checkpoint(ckpt_dir)} (continue from it with "
            f"--resume true); try a lower learning_rate, grad_clip 1.0, or precision bf16 instead of fp16."
        )

    def check_finite_weights(self, step: int, ckpt_dir: Path):
        finite = torch.stack([torch.isfinite(p).all() for p in self.raw_model.parameters()]).all()
        if not self.accelerator.reduce(finite.float(), "min").item():
            self.stop_diverged(f"weights are not finite after step {step}", ckpt_dir)

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        args, acc, model = self.args, self.accelerator, self.raw_model
        model.eval()
        row = {"kind": "eval", "step": step}
        losses = [
            model(input_ids=x.to(acc.device), shift_labels=y.to(acc.device)).loss
            for x, y in iter_eval_batches(
                args.data_dir, "val", args.micro_batch_size, args.block_size,
                rank=acc.process_index, world_size=acc.num_processes, max_batches=args.eval_batches or None,
            )
        ]  # fmt: skip
        if losses:
            row["val_loss"] = acc.reduce(torch.stack(losses).mean(), "mean").item()
        if self.hellaswag and step % args.hellaswag_interval == 0:
            from gpt2custom.hellaswag import evaluate_hellaswag

            result = evaluate_hellaswag(model, self.tokenizer, self.hellaswag, accelerator=acc, show_progress=False)
            row["hellaswag_acc"], row["hellaswag_acc_norm"] = result["acc"], result["acc_norm"]
        model.train()
        return row

    @torch.no_grad()
    def samples(self) -> list[str]:
        """A few continuations, sampled with their own RNG so training's random stream is untouched."""
        args, model = self.args, self.raw_model
        model.eval()
        prompts = self.tokenizer([args.sample_prompt] * args.num_samples, return_tensors="pt").to(self.accelerator.device)
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(args.seed + self.accelerator.process_index)
            out = model.generate(
                **prompts, do_sample=True, top_k=50, max_new_tokens=args.sample_tokens,
                pad_token_id=self.tokenizer.eos_token_id,
            )  # fmt: skip
        model.train()
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    # ---------------------------------------------------------------- training
    def train(self):
        args, acc, progress = self.args, self.accelerator, self.progress
        ckpt_dir = self.out / "checkpoints"
        if acc.is_main_process:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        acc.init_trackers("pretrain", config={k: v for k, v in asdict(args).items() if v is not None})
        if args.resume and (latest := latest_checkpoint(ckpt_dir)):
            acc.load_state(str(latest))
            self.print(f"resumed from {latest} at step {progress.step}")
        tokens_per_step = args.total_batch_size
        self.print(
            f"{args.model_preset}: {sum(p.numel() for p in self.raw_model.parameters()):,} parameters, "
            f"{acc.num_processes} process(es) on {self.gpu_name}, grad accumulation {self.grad_accum}, "
            f"{tokens_per_step:,} tokens/step, {args.max_steps} steps, precision {acc.mixed_precision}"
        )
        self.raw_model.train()
        bar = tqdm(total=args.max_steps, initial=progress.step, disable=not acc.is_local_main_process, desc="pretrain")
        window_start, window_steps = None, 0  # timing window: the training steps since the last log line
        while progress.step < args.max_steps:
            if window_start is None:
                window_start = time.perf_counter()
            loss, grad_norm = train_step(
                self.model, self.next_batch, self.optimizers, self.schedulers, acc,
                grad_accum=self.grad_accum, grad_clip=args.grad_clip,
            )  # fmt: skip
            progress.step += 1
            progress.tokens += tokens_per_step
            window_steps += 1
            step = progress.step
            last = step == args.max_steps
            if step % args.log_interval == 0 or last:
                loss_value = acc.reduce(loss, "mean").item()  # the one host sync per logged step
                if not math.isfinite(loss_value):
                    self.stop_diverged(f"loss is {loss_value} at step {step}", ckpt_dir)
                if acc.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - window_start
                progress.train_seconds += seconds
                tok_s = tokens_per_step * window_steps / seconds
                window_start, window_steps = None, 0
                row = {
                    "kind": "train", "step": step, "loss": loss_value, "lr": self.schedulers[-1].get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else None, "tokens": progress.tokens,
                    "tokens_per_s": tok_s, "elapsed_s": progress.train_seconds,
                }  # fmt: skip
                util = mfu(tok_s / acc.num_processes, self.flops_token, self.peak)
                spent = dollars(progress.train_seconds, acc.num_processes, self.price)
                row.update({k: v for k, v in (("mfu", util), ("dollars", spent)) if v is not None})
                self.log(row)
                postfix = {"loss": f"{loss_value:.4f}", "lr": f"{row['lr']:.2e}", "tok/s": f"{tok_s:,.0f}"}
                if util is not None:
                    postfix["mfu"] = f"{util:.1%}"
                if spent is not None:
                    postfix["$"] = f"{spent:.2f}"
                bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if step % args.eval_interval == 0 or last:
                row = self.last_eval = self.evaluate(step)
                self.log(row)
                bar.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            if args.sample_interval and (step % args.sample_interval == 0 or last) and acc.is_main_process:
                for text in self.samples():
                    bar.write(f"sample: {text!r}")
            if step % args.checkpoint_interval == 0 or last:
                self.check_finite_weights(step, ckpt_dir)  # never replace a good checkpoint with a broken one
                save_checkpoint(acc, ckpt_dir, step, args.keep_checkpoints)
        bar.close()
        self.finish()

    def finish(self):
        """The HF model folder, plots and the run summary."""
        args, acc, progress = self.args, self.accelerator, self.progress
        final = self.out / "final"
        fsdp = acc.distributed_type == DistributedType.FSDP  # only FSDP needs the shards gathered
        save_model_folder(
            self.raw_model, final, self.tokenizer, is_main_process=acc.is_main_process,
            state_dict=acc.get_state_dict(self.model) if fsdp else None,
        )  # fmt: skip
        last_eval = self.last_eval
        tok_s = progress.tokens / max(progress.train_seconds, 1e-9)
        summary = {
            "tokens": progress.tokens,
            "steps": progress.step,
            "wall_time_s": progress.train_seconds,
            "tokens_per_s": tok_s,
            "mfu": mfu(tok_s / acc.num_processes, self.flops_token, self.peak),
            "flops_per_token": self.flops_token,
            "gpu": self.gpu_name,
            "num_processes": acc.num_processes,
            "dollars": dollars(progress.train_seconds, acc.num_processes, self.price),
            "val_loss": last_eval.get("val_loss"),
            "hellaswag_acc_norm": last_eval.get("hellaswag_acc_norm"),
            "config": asdict(args),
        }
        baselines = {}
        if args.unigram_baseline:
            summary["unigram_val_loss"] = baselines["unigram"] = unigram_loss(args.data_dir)
        if acc.is_main_process:
            (final / "run_summary.json").write_text(json.dumps(summary, indent=2))
            shutil.copyfile(final / "run_summary.json", self.out / "run_summary.json")
            plot_training(self.out / "metrics.jsonl", self.out, baselines)
            self.print(f"saved {final} and plots in {self.out}")
            self.print(f"val loss {summary['val_loss']:.4f}" + (
                f" (unigram baseline {summary['unigram_val_loss']:.4f})" if args.unigram_baseline else ""))
            self.print(f"{progress.tokens:,} tokens in {progress.train_seconds:.1f} s = {tok_s:,.0f} tok/s" + (
                f", MFU {summary['mfu']:.1%}" if summary["mfu"] else "") + (
                f", ${summary['dollars']:.2f}" if summary["dollars"] is not None else ""))
        acc.end_training()


def main(argv=None):
    try:
        (args,) = TrlParser((PretrainArgs,)).parse_args_and_config(argv)
        trainer = Pretrainer(args)
    except (ValueError, FileNotFoundError) as e:  # bad config, batch sizes or data: one line, no traceback
        sys.exit(f"pretrain.py: {e}")
    try:
        trainer.train()
    except FloatingPointError as e:
        sys.exit(f"pretrain.py: {e}")


if __name__ == "__main__":
    main()
