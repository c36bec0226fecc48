"""Publish a checkpoint folder (pretrain.py's final/ or sft.py's output) as a Hugging Face model repo.

The uploaded folder holds: model.safetensors, config.json with auto_map plus modeling_gpt2custom.py and
configuration_gpt2custom.py (loaded with trust_remote_code=True), generation_config.json (role markers stop
generation), the tokenizer with the chat template, handler.py and requirements.txt for a custom Inference Endpoint,
and README.md: a model card whose `model-index` holds eval_hellaswag.py's results (and eval_chat.py's judged win rate,
`--chat_eval`) and whose training section shows the checkpoint folder's run_summary.json (pretrain.py's: tokens,
time, throughput, MFU, GPU, cost; sft.py's: steps, tokens, time, data, settings), or `--training_json` (pipeline.py
passes the whole journey's).

    python publish.py --model_dir runs/gpt2-124m/final --repo_id me/gpt2custom-124m --dry_run out/publish  # look first
    python publish.py --model_dir runs/gpt2-124m/final --repo_id me/gpt2custom-124m --eval_json eval.json \\
        --datasets HuggingFaceFW/fineweb-edu --private true --revision v1
    python publish.py --model_dir runs/gpt2-124m/final --repo_id me/gpt2custom-124m-hf --stock_gpt2 true

`--stock_gpt2 true` publishes the weights as a stock GPT2LMHeadModel instead (no remote code: TGI, vLLM and the
default endpoint containers serve it). The token comes from HF_TOKEN or `hf auth login` and is never printed.
"""

import sys
import tempfile
from dataclasses import dataclass, field

import httpx2  # huggingface_hub's HTTP client: its transport errors are "no network"
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from trl import TrlParser

from gpt2custom.hub import build_upload_folder, read_training_json, upload_folder


@dataclass
class PublishArgs:
    model_dir: str = field(
        metadata={"help": "checkpoint folder: weights, config, tokenizer (run_summary.json is read)"}
    )
    repo_id: str = field(metadata={"help": "Hub repo id, org/name"})
    private: bool = field(default=False, metadata={"help": "create the repo private (an existing repo keeps its own)"})
    revision: str | None = field(
        default=None, metadata={"help": "branch to commit to, created if missing (default main)"}
    )
    dry_run: str | None = field(
        default=None, metadata={"help": "write the folder that would be uploaded here; no upload"}
    )
    stock_gpt2: bool = field(
        default=False, metadata={"help": "publish a stock GPT2LMHeadModel export (no remote code)"}
    )
    eval_json: str | None = field(
        default=None, metadata={"help": "eval_hellaswag.py's JSON for the card's model-index"}
    )
    chat_eval: str | None = field(
        default=None, metadata={"help": "eval_chat.py's chat_eval.json: judged win rate and examples on the card"}
    )
    training_json: str | None = field(
        default=None, metadata={"help": "the card's training section (a run summary); default: the model folder's "
                                        "run_summary.json"}
    )
    base_model: str | None = field(default=None, metadata={"help": "Hub id of the model this one was fine-tuned from"})
    datasets: list[str] = field(default_factory=list, metadata={"help": "Hub ids of the training data sets"})
    tags: list[str] = field(default_factory=list, metadata={"help": "extra card tags"})
    commit_message: str = "Upload model with gpt2custom publish.py"


def main(argv=None):
    (args,) = TrlParser((PublishArgs,)).parse_args_and_config(argv)
    if args.repo_id.count("/") != 1:
        sys.exit(f"publish.py: --repo_id {args.repo_id!r}: expected org/name")
    build = dict(
        repo_id=args.repo_id,
        stock_gpt2=args.stock_gpt2,
        eval_json=args.eval_json,
        chat_eval=args.chat_eval,
        base_model=args.base_model,
        datasets=args.datasets,
        tags=args.tags,
    )
    try:
        if args.training_json:
            build["training"] = read_training_json(args.training_json)
        if args.dry_run:
            folder = build_upload_folder(args.model_dir, args.dry_run, **build)
            print(f"wrote {folder} ({', '.join(sorted(p.name for p in folder.iterdir()))}); nothing uploaded")
            return
        with tempfile.TemporaryDirectory(prefix="publish-") as tmp:
            folder = build_upload_folder(args.model_dir, f"{tmp}/upload", **build)
            info = upload_folder(
                folder, args.repo_id, private=args.private, revision=args.revision, commit_message=args.commit_message
            )
    except ValueError as e:
        sys.exit(f"publish.py: {e}")
    except (HfHubHTTPError, OfflineModeIsEnabled) as e:  # the URL and the server's reason, never the token
        sys.exit(f"publish.py: upload to {args.repo_id} failed: {e}")
    except httpx2.TransportError as e:  # no network, refused, DNS, timeout: nothing was uploaded
        sys.exit(f"publish.py: upload to {args.repo_id} failed: cannot reach {constants.ENDPOINT} "
                 f"({type(e).__name__}: {e}); the folder was built and nothing was uploaded")
    print(f"uploaded to {info.commit_url}")


if __name__ == "__main__":
    main()
