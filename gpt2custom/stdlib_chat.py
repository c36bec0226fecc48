"""An offline chat data set made from real text that ships with Python: questions about standard-library functions,
answered by the first paragraph of their own docstrings.

    python -m gpt2custom.stdlib_chat --out data/synthetic/stdlib-docs.jsonl
    python -m gpt2custom.stdlib_chat --out x.jsonl --modules json math os.path --max_answer_chars 200

"What does json.dumps do?" -> "Serialize ``obj`` to a JSON formatted ``str``." The rows have the format of
`generate_synthetic.py`'s JSONL (`messages`, `model`, `prompt_id`, `response_index`, `finish_reason`, `usage`,
`rejection`), so `sft.py --dataset_name` and `gpt2custom.synthetic.file_counts` read them alike; `usage` counts
GPT-2 tokens of the rendered question and answer (nothing is billed: `model` is `python-stdlib-docstrings`).

Selection, in a fixed order (modules as listed, then names sorted): public functions, classes and methods with a
docstring whose first paragraph is prose (no `>>>` examples, no signature at its start), cut at the last sentence end
that fits `--max_answer_chars`; an answer that cannot be cut that way is skipped. The question wording rotates
through QUESTIONS by a hash of the name, so a re-run on the same Python writes the same bytes. The file is written
to a temporary name and renamed, so an interrupted run leaves no partial file and a finished one is the output.
With CPython 3.11.7 and the defaults: 1,577 rows, 25k answer tokens (measured).
"""

import argparse
import hashlib
import importlib
import inspect
import json
import re
import sys
from pathlib import Path

from .files import write_atomic

SOURCE_MODEL = "python-stdlib-docstrings"
DEFAULT_MODULES = (
    "builtins", "json", "math", "os", "os.path", "re", "string", "textwrap", "itertools", "functools", "collections",
    "random", "statistics", "shutil", "glob", "fnmatch", "heapq", "bisect", "copy", "difflib", "base64", "hashlib",
    "zlib", "gzip", "csv", "time", "calendar", "operator", "pathlib", "tempfile", "urllib.parse", "html", "uuid",
    "secrets", "fractions", "decimal", "datetime", "inspect", "typing", "enum", "dataclasses", "contextlib", "pprint",
    "struct", "array", "io", "sys", "platform", "locale", "getpass", "shlex", "argparse", "logging", "unicodedata",
)  # fmt: skip
QUESTIONS = (
    "What does {name} do?",
    "What is {name} for?",
    "Explain {name} in one sentence.",
    "In Python, what does {name} do?",
)
SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
SIGNATURE = re.compile(r"^[\w.\[\]]+\(|-->|->")  # "zip_longest(iter1 [,iter2 [...]]) --> zip_longest object"


def first_paragraph(doc: str | None) -> str | None:
    """The docstring's first paragraph on one line, or None when it is empty, a signature or holds examples."""
    if not doc:
        return None
    paragraph = doc.strip().split("\n\n", 1)[0]
    if ">>>" in paragraph or SIGNATURE.search(paragraph.splitlines()[0].strip()):
        return None
    return " ".join(paragraph.split())


def cut_to_sentences(text: str, max_chars: int) -> str | None:
    """`text` if it fits, else its longest prefix that ends a sentence and fits; None when no sentence fits."""
    if len(text) <= max_chars:
        return text
    ends = [m.end() for m in SENTENCE_END.finditer(text) if m.end() <= max_chars]
    return text[: ends[-1]] if ends else None


def public_members(module_name: str):
    """(qualified name, object) of a module's public functions and classes, and of those classes' public methods,
    sorted by name; names the module imports from elsewhere are left to their own module."""
    module = importlib.import_module(module_name)
    for name in sorted(dir(module)):
        if name.startswith("_"):
            continue
        obj = getattr(module, name)
        if not (inspect.isroutine(obj) or inspect.isclass(obj)):
            continue
        home = getattr(obj, "__module__", None)
        if module_name != "builtins" and home not in (module_name, None) and not module_name.startswith("os"):
            continue
        qualified = name if module_name == "builtins" else f"{module_name}.{name}"
        yield qualified, obj
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            for attr in sorted(vars(obj)):
                member = vars(obj)[attr]
                if not attr.startswith("_") and (inspect.isroutine(member) or isinstance(member, property)):
                    yield f"{qualified}.{attr}", member


def question_for(name: str) -> str:
    pick = int(hashlib.sha256(name.encode()).hexdigest(), 16) % len(QUESTIONS)
    return QUESTIONS[pick].format(name=name)


def build_rows(modules=DEFAULT_MODULES, max_answer_chars: int = 240, min_answer_chars: int = 20,
               max_rows: int | None = None) -> list[dict]:
    """The chat rows (see the module docstring), at most `max_rows`, without usage counts."""
    rows, seen = [], set()
    for module_name in modules:
        try:
            members = list(public_members(module_name))
        except ImportError:  # a module this build of Python lacks (e.g. no zlib): the others still make a data set
            continue
        for name, obj in members:
            answer = first_paragraph(inspect.getdoc(obj))
            answer = answer and cut_to_sentences(answer, max_answer_chars)
            if not answer or len(answer) < min_answer_chars or name in seen:
                continue
            seen.add(name)
            question = question_for(name)
            rows.append({
                "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                "model": SOURCE_MODEL,
                "prompt_id": hashlib.sha256(question.encode()).hexdigest()[:16],
                "response_index": 0,
                "finish_reason": "stop",
                "usage": None,
                "rejection": None,
            })  # fmt: skip
            if max_rows is not None and len(rows) >= max_rows:
                return rows
    return rows


def add_usage(rows: list[dict]) -> list[dict]:
    """`usage` per row in GPT-2 tokens of the chat-formatted question (prompt) and answer (completion)."""
    from .chat import add_chat_format
    from .tokenizer import load_tokenizer

    tokenizer = add_chat_format(load_tokenizer())
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["messages"][:1], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        full = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
        row["usage"] = {"prompt_tokens": len(prompt), "completion_tokens": len(full) - len(prompt)}
    return rows


def write_jsonl(rows: list[dict], out: "str | Path") -> Path:
    return write_atomic(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="python -m gpt2custom.stdlib_chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSONL to write (generate_synthetic.py's row format)")
    parser.add_argument("--modules", nargs="+", default=list(DEFAULT_MODULES), help="standard-library modules")
    parser.add_argument("--max_rows", type=int, default=None, help="stop after this many rows")
    parser.add_argument("--max_answer_chars", type=int, default=240, help="longest answer, cut at a sentence end")
    parser.add_argument("--min_answer_chars", type=int, default=20, help="shorter answers are skipped")
    args = parser.parse_args(argv)
    if args.max_rows is not None and args.max_rows < 1:
        parser.exit(2, f"{parser.prog}: error: --max_rows {args.max_rows}: expected >= 1\n")
    if args.max_answer_chars < args.min_answer_chars:
        parser.exit(2, f"{parser.prog}: error: --max_answer_chars {args.max_answer_chars} is below "
                       f"--min_answer_chars {args.min_answer_chars}\n")
    unknown = [m for m in args.modules if importlib.util.find_spec(m.split(".")[0]) is None]
    if unknown:
        parser.exit(2, f"{parser.prog}: error: --modules: no such module(s) {unknown}\n")
    rows = build_rows(args.modules, args.max_answer_chars, args.min_answer_chars, args.max_rows)
    if not rows:
        parser.exit(1, f"{parser.prog}: error: no documented functions in {args.modules}\n")
    path = write_jsonl(add_usage(rows), args.out)
    answers = sum(row["usage"]["completion_tokens"] for row in rows)
    print(f"wrote {path}: {len(rows)} questions about {len(args.modules)} modules, {answers:,} answer tokens",
          file=sys.stderr)


if __name__ == "__main__":
    main()
