"""Pretrain GPT2Custom on GPT-2 token shards with accelerate: one CPU core to several 8-GPU nodes.

The seed recipe (configs/gpt2-124m.yaml): 524,288 tokens per optimizer step, peak LR 6e-4 after 715 warmup steps,
cosine decay to 10 % over 10B tokens (19,073 steps), AdamW (0.9, 0.95), weight decay 0.1 on 2-D weights, clip 1.0,
TF32, bf16 autocast, SDPA flash attention, vocab 50304, torch.compile, fused AdamW, DDP.

    python prepare_data.py --source stdlib --out_dir data/smoke ...        # data first (see README)
    python pretrain.py --config configs/smoke.yaml                          # tiny model on the CPU
    accelerate launch --config_file accelerate_configs/ddp_8gpu.yaml pretrain.py --config configs/gpt2-124m.yaml
    accelerate launch --config_file accelerate_configs/fsdp_8gpu.yaml pretrain.py --config configs/gpt2-774m.yaml  # FSDP2
    accelerate launch ... pretrain.py --config configs/gpt2-124m.yaml   # run again: continues the latest checkpoint
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 pretrain.py --config configs/smoke.yaml --cpu true

Writes to --output_dir: metrics.jsonl, tracker logs, checkpoints/step_NNNNNN (accelerate state), final/ (an HF model
folder that AutoModelForCausalLM loads with trust_remote_code=True), loss.png, hellaswag.png, run_summary.json.

Exit codes: 0 done; 75 stopped for a preemption notice (SIGTERM / SIGUSR1) or --max_time after a complete checkpoint:
start it again to continue (gpt2custom/preemption.py; a torchrun launcher exits 128 + signal, 143 for SIGTERM);
1 an error.
"""

import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from transformers import AutoConfig
from trl import TrlParser

from configuration_gpt2custom import GPT2CustomConfig
from gpt2custom.chat import add_chat_format
from gpt2custom.checkpoints import import_gpt2, save_model_folder
from gpt2custom.data import ShardLoader, iter_eval_batches, list_shards, load_manifest, read_shard
from gpt2custom.distributed import shutdown
from gpt2custom.files import exclusive_lock, write_atomic
from gpt2custom.fsdp import block_parameter_counts, enable_fsdp_on_cpu, fsdp_requested, local_tensor
from gpt2custom.metrics import detect_gpu, flops_per_token
from gpt2custom.plots import plot_training
from gpt2custom.preemption import EXIT_PREEMPTED, Notice, Preempted, parse_signals, rewind_step, step_start
from gpt2custom.resume import Checkpointer, checkpoint_folders
from gpt2custom.runlog import RunLogger, RunProgress, format_summary
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
    init_from: str | None = field(default=None, metadata={
        "help": "start from these weights instead of a random init: our model folder, a GPT2LMHeadModel folder or "
                "a Hub id such as openai-community/gpt2 (the preset is then ignored)"})  # fmt: skip
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
    muon_learning_rate: float | None = field(default=None, metadata={
        "help": "Muon's peak LR (AdamW units: its update is scaled to AdamW's RMS); default learning_rate"})  # fmt: skip
    # speed
    precision: str = field(default="auto", metadata={
        "help": "auto (bf16 on capable GPUs, else fp32) | bf16 | fp16 | fp32 | fp64 (weights and math in float64: "
                "tells rounding from a bug when two runs are compared)"})  # fmt: skip
    tf32: bool = True
    compile: bool = field(default=True, metadata={"help": "torch.compile the training forward (eval stays eager)"})
    compile_backend: str = field(default="inductor", metadata={"help": "torch.compile backend (aot_eager: no C++ build)"})
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
    resume: str = field(default="auto", metadata={
        "help": "auto: continue the latest checkpoint in output_dir if there is one, else start (true: the same); "
                "false: start fresh, and refuse an output_dir that already holds a run"})  # fmt: skip
    # preemption
    max_time: float | None = field(default=None, metadata={
        "help": "seconds of wall clock for this start; then checkpoint and stop as on a notice (exit 75)"})
    preempt_signals: str = field(default="SIGTERM,SIGUSR1", metadata={
        "help": "signals that mean 'checkpoint and stop' (exit 75); a second one 2 s or more later stops at once"})
    preempt_deadline_s: float | None = field(default=None, metadata={
        "help": "seconds from the notice to the exit: a save that would overrun is skipped, the last complete "
                "checkpoint stays"})  # fmt: skip
    # cost
    gpu_price_per_hour: float | None = field(default=None, metadata={"help": "per GPU; default from the GPU's name"})
    peak_flops: float | None = field(default=None, metadata={"help": "per GPU, for MFU; default from the GPU's name"})
    unigram_baseline: bool = field(default=False, metadata={"help": "print the unigram val loss of the data"})


def gradient_accumulation(args: PretrainArgs, world_size: int) -> int:
    tokens_per_micro_step = args.micro_batch_size * args.block_size * world_size
    if args.total_batch_size % tokens_per_micro_step:
        raise ValueError(
            f"total_batch_size={args.total_batch_size} is not divisible by micro_batch_size × block_size × world_size "
            f"= {args.micro_batch_size} × {args.block_size} × {world_size} = {tokens_per_micro_step}"
        )
    return args.total_batch_size // tokens_per_micro_step


def check_args(args: PretrainArgs):
    if args.optimizer == "muon" and args.precision == "fp16":
        # accelerate updates its GradScaler after each optimizer, so AdamW's gradients would be unscaled twice.
        raise ValueError("precision=fp16 with optimizer=muon is not supported (one GradScaler across two optimizers "
                         "unscales the second one's gradients twice): use precision bf16 or fp32")  # fmt: skip
    if args.optimizer == "muon" and fsdp_requested():
        # accelerate's save_state saves optimizer i with prepared model i: the second optimizer has no model.
        raise ValueError("optimizer=muon with an FSDP launch is not supported (accelerate's FSDP checkpoints pair "
                         "each optimizer with one model; Muon + AdamW are two): launch with DDP, or optimizer adamw")  # fmt: skip
    if args.max_steps < 1 or args.warmup_steps < 0:
        raise ValueError(f"max_steps={args.max_steps}, warmup_steps={args.warmup_steps}: expected max_steps >= 1, "
                         f"warmup_steps >= 0")  # fmt: skip
    args.resume = str(args.resume).lower()  # a YAML `resume: true` arrives as a bool
    if args.resume not in ("auto", "true", "false"):
        raise ValueError(f"resume={args.resume!r}: expected auto, true or false")
    for key in ("max_time", "preempt_deadline_s"):
        if getattr(args, key) is not None and getattr(args, key) <= 0:
            raise ValueError(f"{key}={getattr(args, key)}: expected a number of seconds > 0")
    parse_signals(args.preempt_signals)


def used_by(out: Path) -> str | None:
    """What shows that `out` already holds a run (checkpoints, metrics, a final model), or None."""
    for what in ("checkpoints/step_*", "metrics.jsonl", "final", "run_summary.json"):
        if found := sorted(out.glob(what)):
            return str(found[-1])
    return None


def has_split(data_dir: str, split: str) -> bool:
    return bool(load_manifest(data_dir)["splits"].get(split, {}).get("shards"))


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
        self.accelerator = acc = Accelerator(
            cpu=args.cpu,
            mixed_precision=mixed_precision(args.precision, torch.device("cpu" if args.cpu or not cuda else "cuda")),
            log_with=None if args.report_to == "none" else args.report_to,
            project_dir=str(self.out),
            step_scheduler_with_optimizer=False,  # our schedule counts optimizer steps, not steps × world size
        )
        enable_fsdp_on_cpu(acc)  # an FSDP launch on CPU ranks shards as on GPUs (accelerate alone would use DDP)
        self.fsdp = acc.distributed_type == DistributedType.FSDP
        if acc.device.type == "cuda" and args.tf32:
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.cudnn.conv.fp32_precision = "tf32"
        set_seed(args.seed)
        self.notice = Notice(acc, parse_signals(args.preempt_signals), args.max_time, args.preempt_deadline_s)
        self.grad_accum = gradient_accumulation(args, acc.num_processes)
        loader_args = dict(batch_size=args.micro_batch_size, seq_len=args.block_size, rank=acc.process_index,
                           world_size=acc.num_processes)  # fmt: skip
        self.train_loader = ShardLoader(args.data_dir, "train", seed=args.seed, **loader_args)
        self.validate = has_split(args.data_dir, "val") and args.eval_interval > 0
        if self.validate:  # a truncated or too-small val split fails now, not at the first evaluation
            ShardLoader(args.data_dir, "val", shuffle=False, **loader_args)
        elif args.eval_interval > 0:
            acc.print(f"{args.data_dir} has no validation split: training without validation loss")

        self.model = self.build_model()  # the raw module: evaluation, sampling and saving use it
        self.tokenizer = add_chat_format(load_tokenizer())  # saved with the model, so `trl sft` can start from it
        prompt_tokens = len(self.tokenizer(args.sample_prompt)["input_ids"])
        if args.sample_interval and prompt_tokens >= args.block_size:
            raise ValueError(f"sample_prompt is {prompt_tokens} tokens, block_size={args.block_size}: expected a "
                             f"shorter prompt (or sample_interval 0)")  # fmt: skip
        self.optimizers = build_optimizers(
            self.model if self.fsdp else self.model.to(acc.device),  # fully_shard places each rank's shard
            optimizer=args.optimizer,
            lr=args.learning_rate,
            muon_lr=args.muon_learning_rate,
            weight_decay=args.weight_decay,
            betas=(args.beta1, args.beta2),
            fused=args.fused_adamw and acc.device.type == "cuda",
        )
        self.schedulers = build_schedulers(
            self.optimizers, warmup_steps=args.warmup_steps, max_steps=args.max_steps, min_lr_ratio=args.min_lr_ratio
        )
        if self.fsdp:
            # fully_shard works in place: self.model becomes the sharded root that every rank calls for evaluation,
            # sampling and saving. It is compiled after sharding, so what accelerate shards, saves and loads is our
            # module itself, not a compile wrapper.
            self.train_model, *rest = acc.prepare(self.model, *self.optimizers, *self.schedulers)
            if args.compile:
                self.train_model = torch.compile(self.train_model, backend=args.compile_backend)
            self.report_sharding()
        else:
            compiled = torch.compile(self.model, backend=args.compile_backend) if args.compile else self.model
            self.train_model, *rest = acc.prepare(compiled, *self.optimizers, *self.schedulers)  # DDP wrapped
        self.optimizers, self.schedulers = rest[: len(self.optimizers)], rest[len(self.optimizers) :]
        self.next_batch = device_batches(self.train_loader, acc.device)

        self.progress = RunProgress()
        acc.register_for_checkpointing(self.train_loader, self.progress)
        self.checkpoints = Checkpointer(acc, self.out / "checkpoints", self.model, keep=args.keep_checkpoints)
        gpu = detect_gpu(acc.device)
        self.gpu_name = torch.cuda.get_device_name(acc.device) if acc.device.type == "cuda" else "cpu"
        self.logger = RunLogger(
            self.out, acc, self.progress, tokens_per_step=args.total_batch_size, max_steps=args.max_steps,
            flops_per_token=flops_per_token(self.model.config, args.block_size),
            peak_flops=args.peak_flops or (gpu.peak_bf16_flops if gpu else None),
            price_per_gpu_hour=args.gpu_price_per_hour or (gpu.dollars_per_hour if gpu else None),
            log_interval=args.log_interval, max_time=args.max_time,
        )  # fmt: skip
        self.hellaswag = self.load_hellaswag() if args.hellaswag_interval else None

    def build_model(self) -> GPT2CustomForCausalLM:
        args = self.args
        if args.init_from:  # continue pretraining from a model folder or Hub id (ours or a stock GPT-2)
            try:
                model_type = AutoConfig.from_pretrained(args.init_from, trust_remote_code=True).model_type
            except (OSError, ValueError) as e:
                raise ValueError(f"init_from={args.init_from!r}: cannot read its config ({e})") from None
            if model_type == "gpt2custom":
                model = GPT2CustomForCausalLM.from_pretrained(args.init_from)
            elif model_type == "gpt2":
                model = import_gpt2(args.init_from)
            else:
                raise ValueError(f"init_from={args.init_from!r} is a {model_type!r} model: expected gpt2custom or gpt2")
            if model.config.block_size < args.block_size:
                raise ValueError(f"init_from={args.init_from} has a context of {model.config.block_size} tokens, "
                                 f"block_size={args.block_size} needs more")  # fmt: skip
            model.config.dropout = args.dropout
        else:
            config = GPT2CustomConfig.from_preset(args.model_preset, block_size=args.block_size, dropout=args.dropout)
            model = GPT2CustomForCausalLM(config)
        model.set_attn_implementation(args.attn_implementation)
        return model.to(torch.float64 if args.precision == "fp64" else torch.float32).train()

    # ---------------------------------------------------------------- helpers
    def load_hellaswag(self):
        try:
            from gpt2custom.hellaswag import load_hellaswag

            examples = load_hellaswag(self.args.hellaswag_path)
        except Exception as e:  # offline machines train on; the user sees why HellaSwag is off
            self.accelerator.print(f"HellaSwag disabled: {e}")
            return None
        return examples[: self.args.hellaswag_limit] if self.args.hellaswag_limit else examples

    def due(self, interval: int) -> bool:
        """Every `interval` steps and always at the last one (0 = never)."""
        step = self.progress.step
        return bool(interval) and (step % interval == 0 or step == self.args.max_steps)

    def stop_diverged(self, what: str):
        latest = checkpoint_folders(self.checkpoints.dir)
        raise FloatingPointError(
            f"{what}: stopping. The last good checkpoint is {latest[-1] if latest else None} (continue from it with "
            f"--resume true); try a lower learning_rate, grad_clip 1.0, or precision bf16 instead of fp16."
        )

    def report_sharding(self):
        """One line: how many elements of each block every rank holds (about 1/world size each under FSDP)."""
        per_rank = gather_object([block_parameter_counts(self.model)])
        blocks = [f"h.{i} {[counts[i][0] for counts in per_rank]} of {held[1]}" for i, held in enumerate(per_rank[0])]
        self.accelerator.print(f"FSDP2 sharding, block elements per rank: {'; '.join(blocks)}")

    def check_finite_weights(self):
        # Each rank checks what it holds (its shard under FSDP); one bad shard stops every rank. accelerate's reduce
        # knows sum, mean and max only (anything else sums), so the ranks take the max of "not finite".
        finite = torch.stack([torch.isfinite(local_tensor(p)).all() for p in self.model.parameters()]).all()
        if self.accelerator.reduce((~finite).float(), "max").item():
            self.stop_diverged(f"weights are not finite after step {self.progress.step}")

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss and HellaSwag, each when its interval is due, on the raw model, under the same autocast as
        training whether or not the training forward is compiled."""
        args, acc, model = self.args, self.accelerator, self.model
        model.eval()
        row = {"kind": "eval", "step": self.progress.step}
        if self.validate and self.due(args.eval_interval):
            batches = iter_eval_batches(args.data_dir, "val", args.micro_batch_size, args.block_size,
                                        rank=acc.process_index, world_size=acc.num_processes,
                                        max_batches=args.eval_batches or None)  # fmt: skip
            with acc.autocast():
                losses = [model(input_ids=x.to(acc.device), shift_labels=y.to(acc.device), use_cache=False,
                                skip_logits=True).loss for x, y in batches]  # fmt: skip
            row["val_loss"] = acc.reduce(torch.stack(losses).mean(), "mean").item()
        if self.hellaswag and self.due(args.hellaswag_interval):
            from gpt2custom.hellaswag import evaluate_hellaswag

            result = evaluate_hellaswag(model, self.tokenizer, self.hellaswag, accelerator=acc, show_progress=False)
            row["hellaswag_acc"], row["hellaswag_acc_norm"] = result["acc"], result["acc_norm"]
        model.train()
        return row

    @torch.no_grad()
    def samples(self) -> list[str]:
        """A few continuations, sampled with their own RNG so training's random stream is untouched. Every rank
        samples with the same seed, so they draw the same tokens and stop after the same number of forwards (a
        sharded model needs every rank in each forward; `synced_gpus` keeps them in step in any case)."""
        args, acc, model = self.args, self.accelerator, self.model
        model.eval()
        prompts = self.tokenizer([args.sample_prompt] * args.num_samples, return_tensors="pt").to(acc.device)
        devices = [acc.device] if acc.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), acc.autocast():
            torch.manual_seed(args.seed)
            new_tokens = min(args.sample_tokens, args.block_size - prompts["input_ids"].shape[1])  # fit the context
            out = model.generate(**prompts, do_sample=True, top_k=50, max_new_tokens=new_tokens,
                                 pad_token_id=self.tokenizer.eos_token_id,
                                 synced_gpus=self.fsdp and acc.num_processes > 1)  # fmt: skip
        model.train()
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    # ---------------------------------------------------------------- training
    def train(self) -> bool:
        """The run, or what is left of it; True when it stopped for a notice (checkpoint written)."""
        args, acc, progress, log = self.args, self.accelerator, self.progress, self.logger
        self.notice.install()  # from here on SIGTERM / SIGUSR1 is a notice: every rank stops at its next check
        acc.init_trackers("pretrain", config={k: v for k, v in asdict(args).items() if v is not None})
        if args.resume == "false" and (used := used_by(self.out)):
            raise ValueError(f"output_dir {self.out} already holds a run ({used}): continue it with --resume auto, "
                             f"or choose a new output_dir")  # fmt: skip
        if args.resume != "false" and (latest := self.checkpoints.resume()):
            acc.print(f"resumed from {latest} at step {progress.step}")
            if progress.step >= args.max_steps and (self.out / "run_summary.json").exists():
                acc.print(f"{self.out} finished at step {progress.step}: nothing to do")
                return False
        acc.print(
            f"{args.model_preset}: {sum(p.numel() for p in self.model.parameters()):,} parameters, "
            f"{acc.num_processes} process(es) on {self.gpu_name}, grad accumulation {self.grad_accum}, "
            f"{args.total_batch_size:,} tokens/step, {args.max_steps} steps, precision {acc.mixed_precision}"
        )
        log.start()
        if progress.after_step_pending:  # a notice cut this step's evaluation short: finish it first
            if self.fsdp:
                # FSDP2 allocates its unsharded parameters at the first forward; made under HellaSwag's inference
                # mode they would be inference tensors that training's all-gathers cannot write into.
                with torch.no_grad():
                    self.model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=acc.device), use_cache=False)
            if self.after_step():
                return self.stop_for_notice()
        while progress.step < args.max_steps:
            start = step_start(self.train_loader)
            result = train_step(
                self.train_model, self.next_batch, self.optimizers, self.schedulers, acc,
                grad_accum=self.grad_accum, grad_clip=args.grad_clip, stop=self.notice.should_stop,
            )  # fmt: skip
            if result is None:  # stopped between micro-steps: the step is redone from its start on resume
                rewind_step(self.train_loader, start)
                return self.stop_for_notice()
            loss_value = log.step(*result)
            if loss_value is not None and not math.isfinite(loss_value):
                self.stop_diverged(f"loss is {loss_value} at step {progress.step}")
            if self.after_step():
                return self.stop_for_notice()
        log.close()
        self.finish()
        if self.notice.should_stop():  # a notice during finish(): the run is complete, the code says why it ended
            self.notice.finish()
            return True
        return False

    def after_step(self) -> bool:
        """Validation, HellaSwag, samples and the periodic checkpoint, each when due (nothing else syncs with the
        device); True when a notice stopped them, with this step marked to finish them on resume."""
        args, progress, log = self.args, self.progress, self.logger
        evaluate = self.due(args.eval_interval) or (self.hellaswag and self.due(args.hellaswag_interval))
        sample, save = self.due(args.sample_interval), self.due(args.checkpoint_interval)
        if not (evaluate or sample or save):
            return False
        progress.after_step_pending = True
        with log.not_training():
            # Every forward checks the flag, so the ranks stop at the same one. The base model is what validation,
            # sampling and HellaSwag's plain-head scorer all call; a sharded model's root, before it gathers.
            hook = self.notice.watch(self.model if self.fsdp else self.model.base_model)
            try:
                if evaluate:
                    progress.last_eval = self.evaluate()
                    log.eval_row(progress.last_eval)
                if sample:
                    texts = self.samples()  # on every rank: a sharded model needs them all for its forwards
                    for text in texts:
                        log.write(f"sample: {text!r}")
            except Preempted:
                self.model.train()
                return True
            finally:
                hook.remove()
            progress.after_step_pending = False
            if save:
                self.check_finite_weights()  # never replace a good checkpoint with a broken one
                self.checkpoints.save(progress.step)
        return False

    def stop_for_notice(self) -> bool:
        """One complete checkpoint of the last finished step on every rank (unless it exists or would overrun the
        deadline), then the caller exits with EXIT_PREEMPTED."""
        acc, notice, step = self.accelerator, self.notice, self.progress.step
        self.logger.stop()
        acc.print(f"{notice.reason}: stopping at step {step}")
        if self.checkpoints.last_saved == step and not self.progress.after_step_pending:
            acc.print(f"checkpoint step {step} is already complete")
        elif not notice.save_fits(self.checkpoints.last_save_seconds):
            acc.print(f"a save takes ~{self.checkpoints.last_save_seconds:.1f} s: past preempt_deadline_s="
                      f"{notice.deadline_s:g}, so none; the last complete checkpoint stays", flush=True)  # fmt: skip
            os._exit(EXIT_PREEMPTED)  # at once, on every rank (they agreed): nothing left to do in order
        else:
            self.check_finite_weights()
            self.checkpoints.save(step)
            acc.print(f"checkpoint step {step} complete {notice.seconds_since_notice():.1f} s after the notice: "
                      f"start the same command again to continue (exit {EXIT_PREEMPTED})")  # fmt: skip
        notice.finish()
        return True

    def finish(self):
        """The HF model folder, plots and the run summary; run_summary.json last, so its presence means done."""
        args, acc = self.args, self.accelerator
        final, tmp = self.out / "final", self.out / ".final.tmp"
        model = self.model
        if self.fsdp:  # the full weights, gathered on rank 0 (every rank takes part)
            state_dict = acc.get_state_dict(self.model)
            # fully_shard changed the model's class, and save_pretrained writes the class name into config.json and
            # copies the file that defines it: save a plain GPT2CustomForCausalLM holding the gathered weights.
            if acc.is_main_process:
                with torch.device("meta"):
                    model = GPT2CustomForCausalLM(self.model.config)
                model.load_state_dict(state_dict, assign=True)
                model.tie_weights()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            save_model_folder(model, tmp, self.tokenizer)
        self.logger.update_wall()
        summary = {**self.logger.summary(), "gpu": self.gpu_name,
                   "val_loss": self.progress.last_eval.get("val_loss"),
                   "hellaswag_acc_norm": self.progress.last_eval.get("hellaswag_acc_norm"),
                   "config": asdict(args)}  # fmt: skip
        baselines = {}
        if args.unigram_baseline and self.validate:
            summary["unigram_val_loss"] = baselines["unigram"] = unigram_loss(args.data_dir)
        if acc.is_main_process:
            (tmp / "run_summary.json").write_text(json.dumps(summary, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            plot_training(self.out / "metrics.jsonl", self.out, baselines)
            atomic_write(self.out / "run_summary.json", json.dumps(summary, indent=2))
            acc.print(f"saved {final} and plots in {self.out}")
            acc.print(format_summary(summary))
        acc.wait_for_everyone()


def atomic_write(path: Path, text: str):
    write_atomic(path, text)


def output_lock(output_dir: str):
    """Rank 0 holds the output folder for the whole run (read before any process group exists: a launcher's RANK,
    none in one process), so a second pretrain.py on the same folder, a doubled job or a restart while the first still
    runs, stops with one line instead of both writing checkpoints there. The kernel frees it when rank 0 exits."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return exclusive_lock(output_dir, "another --output_dir")


def main(argv=None):
    trainer = lock = None
    try:
        (args,) = TrlParser((PretrainArgs,)).parse_args_and_config(argv)
        check_args(args)  # before the lock, which makes the output folder: a refused start leaves nothing behind
        lock = output_lock(args.output_dir)
        trainer = Pretrainer(args)
        preempted = trainer.train()
    except Exception as e:
        if trainer is not None and trainer.notice.reason is not None and not isinstance(e, FloatingPointError):
            # Stopping for a notice, a peer has gone (its deadline, a hard kill): the last complete checkpoint stays.
            print(f"pretrain.py: stopping for a notice: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            os._exit(EXIT_PREEMPTED)
        if not isinstance(e, (ValueError, FileNotFoundError, FloatingPointError)):
            raise
        if torch.distributed.is_initialized():  # bad config, data or checkpoint: one line
            # No orderly teardown: a barrier would wait for ranks that never hit the error; the launcher ends them.
            print(f"pretrain.py: {e}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)
        sys.exit(f"pretrain.py: {e}")
    finally:
        if trainer is not None:
            trainer.notice.uninstall()
        if lock is not None:
            lock.close()
    trainer.train_model = None  # the DDP wrapper: its reducer must go before the process group
    shutdown(trainer.accelerator)
    if preempted:
        sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
    main()
