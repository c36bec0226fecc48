"""Mutation check (issue 17): each test below is shown to fail on a deliberately broken copy of what it guards.

Not collected by pytest (the name does not start with test_). Run it from anywhere:

    python tests/check_mutations.py                  # every mutation, one after the other (~19 min on 2 cores)
    python tests/check_mutations.py --only lr-warmup-off-by-one init-residual-scale
    python tests/check_mutations.py --list           # the list, each checked against the current files
    python tests/check_mutations.py --baseline ...   # also runs each selection on the unbroken copy (must pass)

For each mutation: the repository's tracked files (`git ls-files`, their working-tree content) are copied to
/tmp/mut-XXXX/main, the mutation's replacement(s) are applied there, and the mutation's tests run in the copy:
`python -m pytest -q -x -p no:cacheprovider -p no:randomly --basetemp /tmp/mut-XXXX/tmp <tests>` with cwd and
PYTHONPATH = the copy and OMP_NUM_THREADS=1. The working tree itself is never written.

A mutation is `caught` when pytest exits 1 (a test failed or errored), `MISSED` when it exits 0, and `error` for
anything else (a collection error, no test selected, a timeout): an error is not counted as caught. Each mutation's
`old` text must occur exactly once in its file, else the mutation is `refused` and nothing runs for it, so the list
cannot rot silently when the code moves. Exit status: 1 if any mutation is MISSED, else 2 if any was refused, ended
in error, or failed its baseline, else 0. Prints a Markdown table (and `--json PATH` writes the results).
"""

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TIMEOUT = 600


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str  # repo-relative
    old: str  # must occur exactly once in `file`
    new: str
    tests: tuple[str, ...]  # pytest arguments, each "path::test" or "path::test -k expr" (split with shlex)
    why: str  # the behaviour broken, and the test that guards it
    also: tuple[tuple[str, str, str], ...] = ()  # further (file, old, new) edits of the same mutation
    timeout: int = DEFAULT_TIMEOUT

    def edits(self) -> list[tuple[str, str, str]]:
        return [(self.file, self.old, self.new), *self.also]


R, M, S, F = "tests/test_recipe.py", "tests/test_metrics.py", "tests/test_sft.py", "tests/test_fsdp.py"

MUTATIONS = [
    # ------------------------------------------------------------------------------------------- 1. init
    Mutation(
        "init-residual-scale", "modeling_gpt2custom.py",
        "init.normal_(module.weight, mean=0.0, std=self.config.initializer_range / math.sqrt(2 * self.config.n_layer))",
        "init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)",
        (f"{R}::test_fresh_124m_model_has_the_gpt2_init_statistics",),
        "residual projections (c_proj) get N(0, 0.02) instead of 0.02/sqrt(2·n_layer)",
    ),
    Mutation(
        "init-residual-on-containers", "modeling_gpt2custom.py",
        """        if getattr(module, "is_residual_projection", False):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range / math.sqrt(2 * self.config.n_layer))
            if module.bias is not None:
                init.zeros_(module.bias)
""",
        """        if isinstance(module, (GPT2CustomAttention, GPT2CustomMLP)):  # nanoGPT's place for the rule
            init.normal_(module.c_proj.weight, mean=0.0, std=self.config.initializer_range / math.sqrt(2 * self.config.n_layer))
            if module.c_proj.bias is not None:
                init.zeros_(module.c_proj.bias)
""",
        (f"{R}::test_init_holds_when_the_model_is_built_from_remote_code",),
        "the residual-init rule keyed on the attention/MLP containers, which remote code skips",
    ),
    # ------------------------------------------------------------------------------------------- 2. mask
    Mutation(
        "mask-self-built-positions", "modeling_gpt2custom.py",
        """        mask = create_causal_mask(
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
""",
        """        if position_ids is None:
            position_ids = torch.arange(past, past + seq_len, device=inputs_embeds.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        kwargs["position_ids"] = position_ids  # flash-attention's varlen path reads them
""",
        (f"{R}::test_training_forward_gives_attention_no_mask",),
        "self-built position ids always reach the mask builder and attention: a full mask, no is_causal path",
    ),
    # ------------------------------------------------------------------------------------------- 3. LR
    Mutation(
        "lr-warmup-off-by-one", "gpt2custom/training.py",
        "        return (step + 1) / warmup_steps",
        "        return step / warmup_steps",
        (f"{R}::test_compiled_pretraining_equals_a_plain_nanogpt_reference",),
        "warmup LR off by one step (step 0 trains with LR 0), unlike build-nanogpt's get_lr",
    ),
    # ------------------------------------------------------------------------------------------- 4. host sync
    Mutation(
        "train-step-host-sync", "gpt2custom/training.py",
        "        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()",
        """        if not torch.isfinite(loss):  # fail fast on a diverged micro-step
            raise FloatingPointError("loss is not finite")
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()""",
        (f"{R}::test_train_step_never_waits_for_the_device",),
        "train_step reads a tensor on the host (a finiteness check per micro-step): the GPU waits every step",
    ),
    # ------------------------------------------------------------------------------------------- 5. loss grad
    Mutation(
        "chunked-ce-grad-scale", "modeling_gpt2custom.py",
        "    grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype) if ctx.needed[0] else None",
        "    grad_hidden = grad_hidden if ctx.needed[0] else None",
        (f"{R}::test_compiled_pretraining_equals_a_plain_nanogpt_reference",),
        "the chunked loss's hidden-state gradient not scaled by the incoming gradient (a sum's gradient for a mean)",
    ),
    Mutation(
        "chunked-ce-grads-under-no-grad", "modeling_gpt2custom.py",
        "    grad_on = torch.is_grad_enabled()",
        "    grad_on = True",
        ("tests/test_chunked_loss.py::test_evaluation_and_a_frozen_head_compute_only_the_matmuls_they_need",),
        "validation's no_grad forward computes both gradient matmuls it never uses (3x the head's work)",
    ),
    Mutation(
        "chunked-ce-all-ignored-nan", "modeling_gpt2custom.py",
        "    grad_loss = torch.where((targets != -100).any(), grad_loss, 0.0)\n",
        "",
        ("tests/test_chunked_loss.py::test_a_batch_with_every_label_ignored_gives_what_the_library_gives",),
        "a batch whose labels are all -100 gives NaN gradients in every parameter (0 · inf)",
    ),
    # ------------------------------------------------------------------------------------------- 6. last step
    Mutation(
        "last-step-not-evaluated", "pretrain.py",
        "        return bool(interval) and (step % interval == 0 or step == self.args.max_steps)",
        "        return bool(interval) and step % interval == 0",
        (f"{R}::test_evaluation_is_the_same_compiled_or_not_and_the_last_step_has_it",),
        "the last step gets no val loss / HellaSwag unless it is a multiple of the interval",
    ),
    # ------------------------------------------------------------------------------------------- 7. resume
    Mutation(
        "resume-loader-position-lost", "pretrain.py",
        "        acc.register_for_checkpointing(self.train_loader, self.progress)",
        "        acc.register_for_checkpointing(self.progress)",
        (f"{R}::test_compiled_run_resumes_without_compile",),
        "checkpoints no longer hold the data loader's position: a resumed run re-reads the first batches",
    ),
    Mutation(
        "resume-trusts-truncated-files", "gpt2custom/resume.py",
        """            if (path / name).stat().st_size != size:
                return f"{name} has {(path / name).stat().st_size} bytes, expected {size}"
""",
        "",
        ("tests/test_pretrain.py::test_resume_recovers_to_the_same_final_weights -k corrupt",),
        "a checkpoint file's size is not checked against checkpoint.json: a truncated newest checkpoint is trusted",
    ),
    # ------------------------------------------------------------------------------------------- 8. metrics
    Mutation(
        "flops-no-attention-term", "gpt2custom/metrics.py",
        "    return 6 * n_params + 12 * layer * config.n_embd * seq_len",
        "    return 6 * n_params",
        (f"{M}::test_flops_per_token_is_palm_formula_with_the_models_own_parameter_count",),
        "FLOPs per token without PaLM's attention term 12·L·H·Q·T",
    ),
    Mutation(
        "unigram-no-smoothing", "pretrain.py",
        "    logp = np.log((counts + 1) / (counts.sum() + len(counts)))",
        "    logp = np.log(counts / counts.sum())",
        (f"{M}::test_unigram_loss_is_the_cross_entropy_of_add_one_counts",),
        "unigram baseline without add-one smoothing (unseen val tokens: infinite loss)",
    ),
    Mutation(
        "dollars-one-gpu", "gpt2custom/metrics.py",
        "    return seconds / 3600 * num_gpus * price_per_gpu_hour if price_per_gpu_hour else None",
        "    return seconds / 3600 * price_per_gpu_hour if price_per_gpu_hour else None",
        (f"{M}::test_mfu_and_dollars_by_hand",),
        "the dollar cost ignores the number of GPUs",
    ),
    # ------------------------------------------------------------------------------------------- 9-11. SFT
    Mutation(
        "sft-rank-local-loss-average", "sft.py",
        "    trainer = SFTTrainer(\n",
        "    training_args.average_tokens_across_devices = False  # each rank averages its own tokens\n"
        "    trainer = SFTTrainer(\n",
        (f"{S}::test_two_gloo_ranks_train_the_weights_of_one_process_with_accumulation",),
        "each rank's loss averaged over its own tokens, not the tokens of all ranks",
    ),
    Mutation(
        "sft-generation-eos-not-set", "sft.py",
        "    trainer.model.generation_config.eos_token_id = stop_token_ids(tokenizer)\n",
        "",
        (f"{S}::test_two_gloo_ranks_fine_tune_and_save_a_model_folder",),
        "the saved generation_config does not stop at <|endoftext|> and the role markers",
    ),
    Mutation(
        "chat-template-role-line-trained", "gpt2custom/chat.py",
        """"{{- '<|assistant|>\\n' }}{% generation %}{{- message['content'] + eos_token }}{% endgeneration %}{{- '\\n' }}\"""",
        """"{% generation %}{{- '<|assistant|>\\n' }}{{- message['content'] + eos_token }}{% endgeneration %}{{- '\\n' }}\"""",
        (f"{S}::test_labels_keep_only_assistant_tokens_and_their_end_of_text",),
        "the assistant role line inside {% generation %}: the marker is trained on as if the model wrote it",
    ),
    Mutation(
        "chat-template-eos-not-trained", "gpt2custom/chat.py",
        """"{{- '<|assistant|>\\n' }}{% generation %}{{- message['content'] + eos_token }}{% endgeneration %}{{- '\\n' }}\"""",
        """"{{- '<|assistant|>\\n' }}{% generation %}{{- message['content'] }}{% endgeneration %}{{- eos_token + '\\n' }}\"""",
        (f"{S}::test_labels_keep_only_assistant_tokens_and_their_end_of_text",),
        "<|endoftext|> outside {% generation %}: the model is never taught to stop",
    ),
    Mutation(
        "chat-template-prompts-trained", "gpt2custom/chat.py",
        """    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}\"""",
        """    "{% generation %}{{- '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}{% endgeneration %}\"""",
        (f"{S}::test_trl_sft_cli_fine_tunes_our_checkpoint",),
        "system/user turns inside {% generation %}: `trl sft` trains on the prompts too",
    ),
    # ------------------------------------------------------------------------------------------- 12. HellaSwag
    Mutation(
        "hellaswag-title-kept", "gpt2custom/hellaswag.py",
        """    text = text.strip().replace(" [title]", ". ")""",
        "    text = text.strip()",
        ("tests/test_hellaswag.py::test_convention_equals_one_at_a_time_reference_on_every_example -k harness",),
        "harness preprocessing no longer turns ' [title]' into '. ' (lm-eval's process_docs does)",
    ),
    Mutation(
        "hellaswag-double-spaces-kept", "gpt2custom/hellaswag.py",
        """    return text.replace("  ", " ")""",
        "    return text",
        ("tests/test_lmeval.py::test_lm_eval_hellaswag_picks_equal_our_fast_scorer_on_every_example",),
        "harness preprocessing keeps the double spaces lm-eval collapses",
    ),
    # ------------------------------------------------------------------------------------------- 13. plots
    Mutation(
        "loss-plot-no-lines", "gpt2custom/plots.py",
        """            ax.plot(*zip(*pts), label=label, marker="o" if kind == "eval" else None, markersize=3)""",
        """            pass  # the curves are not drawn""",
        ("tests/test_pretrain.py::test_loss_falls_on_real_text_and_final_folder_loads",),
        "loss.png has axes, title and legend but no loss curve (conftest.assert_png)",
    ),
    Mutation(
        "comparison-plot-no-bars", "gpt2custom/evaluation.py",
        "        ys = [100 * (score_of(r, key, metric) or 0.0) for _, key, metric in columns]",
        "        ys = [0.0 for _, key, metric in columns]",
        ("tests/test_perplexity.py::test_comparison_outputs",),
        "the comparison chart's bars all have height 0 (conftest.assert_png)",
    ),
    # ------------------------------------------------------------------------------------------- 14. handler
    Mutation(
        "handler-truncate-ignored", "handler.py",
        """            ids = ids[-params["truncate"] :]""",
        "            ids = ids",
        ("tests/test_handler.py::test_oversized_input_is_refused_unless_truncated_then_fits_the_context",),
        "parameters.truncate accepted but ignored: an oversized input is refused anyway",
    ),
    # ------------------------------------------------------------------------------------------- 15. app
    Mutation(
        "app-system-prompt-dropped", "app.py",
        """    system = [{"role": "system", "content": system_prompt}] if system_prompt else []""",
        "    system = []",
        ("tests/test_app.py::test_build_messages_keeps_the_system_prompt_and_only_the_last_turns",),
        "build_messages drops the system prompt",
    ),
    Mutation(
        "app-system-prompt-not-wired", "app.py",
        "        messages = build_messages(message, history, system_prompt, args.max_history_turns)",
        """        messages = build_messages(message, history, "", args.max_history_turns)""",
        ("tests/test_app.py::test_demo_process_answers_a_gradio_client_request_through_the_endpoint",),
        "the demo's System prompt box is not sent to the endpoint",
    ),
    # ------------------------------------------------------------------------------------------- 16. shutdown
    Mutation(
        "shutdown-keeps-process-group", "gpt2custom/distributed.py",
        """    if end is not None:
        end()
""",
        """    for tracker in getattr(getattr(owner, "accelerator", owner), "trackers", []):  # trackers only
        tracker.finish()
""",
        (f"{S}::test_each_rank_ends_its_process_group_and_gloo_workers_before_exit",),
        "shutdown finishes the trackers but never destroys the process group",
        also=(("gpt2custom/distributed.py",
               """    if _distributed():  # owner None, or an end that left the group registered
        torch.distributed.destroy_process_group()
        gc.collect()
""", ""),),
    ),
    Mutation(
        "shutdown-keeps-ddp-wrapper", "gpt2custom/distributed.py",
        """        owner.model_wrapped = owner.model
        owner.optimizer = owner.lr_scheduler = None
""",
        "        pass\n",
        (f"{S}::test_each_rank_ends_its_process_group_and_gloo_workers_before_exit",),
        "the Trainer keeps its DDP wrapper: the reducer holds the gloo workers past shutdown (issue 14)",
    ),
    # ------------------------------------------------------------------------------------------- 17. model folder
    Mutation(
        "model-files-not-copied", "modeling_gpt2custom.py",
        """GPT2CustomForCausalLM.register_for_auto_class("AutoModelForCausalLM")\n""",
        "",
        ("tests/test_checkpoints.py::test_saved_folder_loads_in_a_clean_process_from_another_directory",),
        "save_model_folder writes no modeling_gpt2custom.py / auto_map entry (the model class is not registered)",
    ),
    # ------------------------------------------------------------------------------------------- 19. the rest
    Mutation(
        "two-ranks-read-the-same-batches", "pretrain.py",
        "seq_len=args.block_size, rank=acc.process_index,",
        "seq_len=args.block_size, rank=0,",
        (f"{R}::test_two_eager_ranks_then_one_compiled_process_continue_the_same_run",),
        "every rank reads rank 0's windows: two ranks no longer train on one process's batches",
    ),
    Mutation(
        "bf16-pure-weights", "pretrain.py",
        "        return model.to(torch.float64 if args.precision == \"fp64\" else torch.float32).train()",
        """        return model.to(torch.bfloat16 if args.precision == "bf16" else torch.float32).train()""",
        (f"{R}::test_bf16_run_learns_saves_fp32_weights_and_stays_close_to_fp32",),
        "precision bf16 trains (and saves) bf16 weights instead of fp32 master weights under autocast",
    ),
    Mutation(
        "multinode-single-copy", "gpt2custom/resume.py",
        "            accelerator.project_configuration.save_on_each_node = True",
        "            pass",
        ("tests/test_multinode.py::test_nodes_without_a_shared_disk_checkpoint_and_resume_together",),
        "without a shared disk only rank 0's node gets the checkpoint",
    ),
    Mutation(
        "fsdp-not-enabled-on-cpu", "pretrain.py",
        "        enable_fsdp_on_cpu(acc)  # an FSDP launch on CPU ranks shards as on GPUs (accelerate alone would use DDP)",
        "        pass",
        (f"{F}::test_each_rank_holds_half_of_every_block",),
        "an FSDP launch on CPU ranks silently runs as DDP (every rank holds every parameter)",
    ),
    Mutation(
        "fsdp-hellaswag-head-outside-forward", "gpt2custom/hellaswag.py",
        "    plain_head = model.config.model_type in PLAIN_HEAD_MODEL_TYPES and not is_fsdp_module(model)",
        "    plain_head = model.config.model_type in PLAIN_HEAD_MODEL_TYPES",
        (f"{F}::test_fsdp_trains_and_evaluates_as_one_process_does",),
        "HellaSwag calls a sharded model's base_model and lm_head directly, outside the root FSDP forward",
    ),
    Mutation(
        "fsdp-one-sample-logged", "pretrain.py",
        "                    for text in texts:",
        "                    for text in texts[:1]:",
        (f"{F}::test_samples_and_hellaswag_run_on_both_ranks",),
        "only the first of num_samples samples is logged",
    ),
    Mutation(
        "fsdp-final-untied", "pretrain.py",
        "                model.tie_weights()\n",
        "",
        (f"{F}::test_final_folder_is_gathered_and_loads_with_automodel",),
        "the final folder of an FSDP run is built from the gathered weights without re-tying lm_head to wte",
    ),
    Mutation(
        "checkpoint-sizes-top-level-only", "gpt2custom/resume.py",
        """for p in sorted(tmp.rglob("*")) if p.is_file()}""",
        """for p in sorted(tmp.glob("*")) if p.is_file()}""",
        (f"{F}::test_fsdp2_bf16_resume_is_exact_and_a_truncated_shard_is_skipped",),
        "checkpoint.json lists only top-level files: a truncated FSDP shard in a subfolder is not detected",
        timeout=900,
    ),
    # ------------------------------------------------------------------------------------------- 18. last
    Mutation(
        "retry-after-ignored", "gpt2custom/synthetic.py",
        "                await asyncio.sleep(policy.delay(attempt, retry_after_seconds(error)))",
        "                await asyncio.sleep(policy.delay(attempt))",
        ("tests/test_synthetic.py -k faults",),
        "generate_synthetic.py's client retries a 429 without waiting its Retry-After",
    ),
    Mutation(
        "retry-after-not-in-delay", "gpt2custom/synthetic.py",
        """        if retry_after is not None:
            return min(retry_after + rng.uniform(0, self.base_delay), self.max_delay)
""",
        "",
        ("tests/test_synthetic.py::test_backoff_grows_exponentially_with_bounded_jitter_and_honours_retry_after",),
        "RetryPolicy.delay ignores the server's Retry-After",
    ),
    # ------------------------------------------------------------------------- the real Hub datasets (replicas)
    Mutation(
        "hellaswag-hub-main-branch", "gpt2custom/hellaswag.py",
        "    rows = load_dataset(HUB_DATASET, split=split, revision=HUB_REVISION)\n",
        "    rows = load_dataset(HUB_DATASET, split=split)\n",
        ("tests/test_hub_datasets.py::test_hellaswag_loads_from_the_hub_parquet_export",),
        "HellaSwag read from Rowan/hellaswag's main branch, which holds only a loading script",
    ),
    Mutation(
        "sft-unsafe-rows-kept", "gpt2custom/sft_data.py",
        '    if "guard" in dataset.column_names and not keep_unsafe:\n',
        '    if "guard" in dataset.column_names and keep_unsafe:\n',
        (f"{S}::test_rows_llama_guard_flagged_unsafe_are_dropped_unless_kept",),
        "rows Llama Guard flagged unsafe are trained on by default",
    ),
    Mutation(
        "sft-long-conversations-kept", "gpt2custom/sft_data.py",
        "        return (dataset.select(np.flatnonzero(~long)) if long.any() else dataset), stats\n",
        "        return dataset, stats\n",
        (f"{S}::test_conversations_longer_than_max_length_are_dropped_or_counted_as_truncated",),
        "conversations longer than max_length are counted as dropped but still trained on (cut by TRL's packing)",
    ),
    Mutation(
        "eval-chat-overlap-not-refused", "eval_chat.py",
        "        if overlap:\n",
        "        if False:\n",
        ("tests/test_hub_datasets.py::test_eval_chat_judges_only_prompts_sft_held_out_and_refuses_an_overlapping_set",),
        "eval_chat.py judges a --prompts set that overlaps the model's training conversations",
    ),
    Mutation(
        "prepare-data-snapshot-config-ignored", "prepare_data.py",
        "    elif Path(opts.source).is_dir() and (opts.source_config is not None or card_configs(Path(opts.source))):\n",
        "    elif False:\n",
        ("tests/test_hub_datasets.py::test_prepare_data_reads_only_the_configs_files_from_the_hub_and_from_a_snapshot",),
        "prepare_data.py reads every file of a Hub snapshot folder, whatever --source_config says",
    ),
    Mutation(
        "pretrain-no-output-lock", "pretrain.py",
        '    return exclusive_lock(output_dir, "another --output_dir")\n',
        "    return None\n",
        ("tests/test_pretrain.py::test_a_second_start_on_a_folder_in_use_is_one_line_and_writes_nothing",),
        "a second pretrain.py on a folder that a running one holds starts and writes into it",
    ),
    Mutation(
        "task-data-columns-unchecked", "gpt2custom/evaluation.py",
        "    check_task_columns(task, data_file, builders[data_file.suffix], stock.columns)\n",
        "",
        ("tests/test_lmeval.py::test_bad_task_data_is_one_clear_error_before_any_model_loads -k hellaswag",),
        "--task_data in another layout fails only after the model loaded (lm-eval's template error)",
    ),
    Mutation(
        "chart-without-perplexity", "gpt2custom/evaluation.py",
        '    scored = [r for r in results if r.get("perplexity")]\n',
        "    scored = []\n",
        ("tests/test_perplexity.py::test_a_run_with_perplexity_only_charts_it_and_a_run_without_scores_writes_no_chart",),
        "the comparison chart leaves out perplexity (the smoke run's chart had no bars at all)",
    ),
    Mutation(
        "killed-attempt-time-lost", "gpt2custom/report.py",
        '    return max(0.0, attempt.get("last_seen_unix", attempt["start_unix"]) - attempt["start_unix"])\n',
        "    return 0.0\n",
        ("tests/test_pipeline.py::test_pipeline_end_to_end_skip_change_and_resume",),
        "a command whose pipeline was killed outright counts no time in the report",
    ),
]


# ----------------------------------------------------------------------------------------------------- machinery


@dataclass
class Result:
    id: str
    why: str
    tests: tuple[str, ...]
    result: str  # caught | MISSED | error | refused | timeout
    detail: str = ""
    first_failure: str = ""
    seconds: float = 0.0
    returncode: int | None = None
    baseline: str = ""  # "", "passed" or "FAILED: ..."
    extra: dict = field(default_factory=dict)


def problems(mutation: Mutation, root: Path = REPO) -> list[str]:
    """Why the mutation cannot be applied to the files under `root` (an `old` missing or not unique)."""
    out = []
    for file, old, _ in mutation.edits():
        path = root / file
        if not path.is_file():
            out.append(f"{file} does not exist")
            continue
        count = path.read_text(encoding="utf-8").count(old)
        if count != 1:
            first = old.strip().splitlines()[0][:60] if old.strip() else repr(old)
            out.append(f"{file}: `{first}` occurs {count} times, expected exactly once")
    return out


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name]


def make_copy(workdir: Path) -> Path:
    """The tracked files' working-tree content under workdir/main."""
    copy = workdir / "main"
    for name in tracked_files():
        source = REPO / name
        if not source.exists() and not source.is_symlink():  # deleted in the working tree
            continue
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    return copy


def apply(mutation: Mutation, copy: Path):
    for file, old, new in mutation.edits():
        path = copy / file
        text = path.read_text(encoding="utf-8")
        assert text.count(old) == 1, (mutation.id, file)
        path.write_text(text.replace(old, new, 1), encoding="utf-8")


def pytest_args(tests: tuple[str, ...]) -> list[str]:
    return [arg for spec in tests for arg in shlex.split(spec)]


def run_pytest(copy: Path, tests: tuple[str, ...], basetemp: Path, timeout: int) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, combined output, seconds) of pytest on `tests` in the copy."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly",
           "--basetemp", str(basetemp), *pytest_args(tests)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # pytest and every process it started (its own session)
        except ProcessLookupError:
            pass
        output, _ = proc.communicate()
        code = None
    return code, output, time.monotonic() - start


def first_failure(output: str) -> str:
    """The first failing test id (pytest's short summary) and the first `E ` line of its report."""
    test = next((line.split(" - ", 1)[0] for line in output.splitlines() if re.match(r"(FAILED|ERROR) ", line)), "")
    if "::" in test:  # "FAILED tests/x.py::name[param]" -> "name[param]" ("ERROR name[param]" for a setup error)
        kind, node = test.split(" ", 1)
        test = ("" if kind == "FAILED" else "ERROR ") + node.split("::", 1)[1]
    e_line = next((line[1:].strip() for line in output.splitlines() if re.match(r"E\s", line)), "")
    return f"{test}: {e_line}" if test and e_line else test or e_line


def tail_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_one(mutation: Mutation, baseline: bool, keep: bool, log_dir: Path | None) -> Result:
    result = Result(mutation.id, mutation.why, mutation.tests, "refused")
    if why := problems(mutation):
        result.detail = "; ".join(why)
        return result
    workdir = Path(tempfile.mkdtemp(prefix="mut-"))
    try:
        if baseline:
            copy = make_copy(workdir / "base")
            code, output, seconds = run_pytest(copy, mutation.tests, workdir / "base" / "tmp", mutation.timeout)
            result.baseline = "passed" if code == 0 else f"FAILED (exit {code}): {first_failure(output) or tail_line(output)}"
            if log_dir:
                (log_dir / f"{mutation.id}.baseline.log").write_text(output)
        copy = make_copy(workdir / "mut")
        apply(mutation, copy)
        code, output, seconds = run_pytest(copy, mutation.tests, workdir / "mut" / "tmp", mutation.timeout)
        if log_dir:
            (log_dir / f"{mutation.id}.log").write_text(output)
        result.returncode, result.seconds = code, seconds
        if code == 1:
            result.result, result.first_failure = "caught", first_failure(output)
        elif code == 0:
            result.result, result.detail = "MISSED", tail_line(output)
        elif code is None:
            result.result, result.detail = "error", f"timeout after {mutation.timeout} s"
            result.first_failure = first_failure(output)
        else:
            result.result, result.detail = "error", f"pytest exit {code}: {tail_line(output)}"
            result.first_failure = first_failure(output)
    finally:
        if keep:
            print(f"  kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


def cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def table(results: list[Result]) -> str:
    baseline = any(r.baseline for r in results)
    head = ["id", "behaviour broken", "test(s)", "result", "first failure line", "seconds"] + (
        ["baseline"] if baseline else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        tests = "<br>".join(cell(t.replace("tests/", ""), 120) for t in r.tests)
        shown = r.first_failure if r.result == "caught" else (r.detail + (f" ({r.first_failure})" if r.first_failure else ""))
        row = [f"`{r.id}`", cell(r.why, 120), tests, f"**{r.result}**" if r.result != "caught" else r.result,
               cell(shown), f"{r.seconds:.0f}"] + ([cell(r.baseline, 80)] if baseline else [])  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these mutations (in list order)")
    parser.add_argument("--list", action="store_true", help="list the mutations and whether each applies; run nothing")
    parser.add_argument("--baseline", action="store_true", help="also run each selection on the unmutated copy")
    parser.add_argument("--keep", action="store_true", help="keep the /tmp/mut-* copies")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--logs", metavar="DIR", help="write each pytest run's output to DIR/<id>.log")
    args = parser.parse_args(argv)

    ids = [m.id for m in MUTATIONS]
    assert len(ids) == len(set(ids)), "duplicate mutation ids"
    selected = MUTATIONS
    if args.only:
        unknown = sorted(set(args.only) - set(ids))
        if unknown:
            parser.error(f"unknown mutation id(s) {unknown}; known: {ids}")
        selected = [m for m in MUTATIONS if m.id in args.only]

    if args.list:
        for m in selected:
            why = problems(m)
            status = "applies" if not why else "REFUSED: " + "; ".join(why)
            print(f"{m.id:40} {m.file:28} {status}\n    {m.why}\n    tests: {' '.join(m.tests)}")
        return 2 if any(problems(m) for m in selected) else 0

    log_dir = Path(args.logs) if args.logs else None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    results, start = [], time.monotonic()
    for i, m in enumerate(selected, 1):
        print(f"[{i}/{len(selected)}] {m.id}: {' '.join(m.tests)}", file=sys.stderr, flush=True)
        r = run_one(m, args.baseline, args.keep, log_dir)
        print(f"    {r.result} in {r.seconds:.0f} s {r.first_failure or r.detail}"[:300], file=sys.stderr, flush=True)
        results.append(r)
    total = time.monotonic() - start

    print(table(results))
    counts = {k: sum(r.result == k for r in results) for k in ("caught", "MISSED", "error", "refused")}
    bad_baseline = [r.id for r in results if r.baseline and r.baseline != "passed"]
    print(f"\n{len(results)} mutations in {total / 60:.1f} min: " + ", ".join(f"{v} {k}" for k, v in counts.items())
          + (f"; baseline failed for {bad_baseline}" if bad_baseline else ""))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"total_seconds": total, "results": [r.__dict__ for r in results]},
                                              indent=1, default=list))  # fmt: skip
    if counts["MISSED"]:
        return 1
    return 2 if counts["error"] or counts["refused"] or bad_baseline else 0


if __name__ == "__main__":
    sys.exit(main())
