"""Token shards (prepare_data.py, gpt2custom.data): round trip, kill-and-resume, the training loader, clear errors.

prepare_data.py runs in this process (its `main`) except where a real process must be killed.
"""

import hashlib
import json
import pickle
import random
import re
import shutil

import numpy as np
import pytest
import torch

from conftest import kill_when_frozen, run_script, start_then_freeze
from gpt2custom.data import (
    HEADER_BYTES,
    MAGIC,
    MANIFEST,
    MANIFEST_FORMAT,
    DocumentEncoder,
    ShardLoader,
    iter_eval_batches,
    list_shards,
    load_manifest,
    read_shard,
    read_stdlib_document,
    stdlib_corpus,
    verify_checksums,
    write_shard,
)
from prepare_data import main as prepare_main
from prepare_data import parse_options

EOT = 50256
SPECIAL_DOCS = ["a literal <|endoftext|> inside a document stays text", "", "naïve café — 🤖 ünïcödé\n\ttabs", None]
PREPARE_ARGS = ["--val_tokens", "5000", "--shard_size", "10000"]


# ----------------------------------------------------------------------------------------------------------------
# A small local corpus prepared once; every test that runs prepare_data.py compares against it


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, real_text):
    """Two .jsonl files: ~150k tokens of real text in ~1.5k-character documents, plus awkward ones (empty, null...)."""
    paragraphs = real_text[:450_000].split("\n\n")
    docs, current = [], ""
    for paragraph in paragraphs:
        current += paragraph + "\n\n"
        if len(current) > 1500:
            docs.append(current)
            current = ""
    docs[40:40] = SPECIAL_DOCS
    folder = tmp_path_factory.mktemp("corpus")
    half = len(docs) // 2
    for i, part in enumerate([docs[:half], docs[half:]]):
        with open(folder / f"part-{i}.jsonl", "w") as f:
            f.writelines(json.dumps({"id": n, "text": text}) + "\n" for n, text in enumerate(part))
    return folder, docs


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The corpus prepared in one uninterrupted run (2 processes, default engine)."""
    out = tmp_path_factory.mktemp("reference")
    prepare(corpus, out, "--num_proc", "2", *PREPARE_ARGS)
    return out


def prepare(corpus, out_dir, *args) -> dict:
    return prepare_main(parse_options(["--source", str(corpus[0] / "*.jsonl"), "--out_dir", str(out_dir), *args]))


def all_tokens(data_dir) -> np.ndarray:
    return np.concatenate([read_shard(p) for p in list_shards(data_dir, "val") + list_shards(data_dir, "train")])


def folder_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_shards_decode_to_the_documents_joined_by_endoftext(corpus, reference, tokenizer):
    docs = [d for d in corpus[1] if d]  # empty and null documents are skipped
    tokens = all_tokens(reference)
    # Independent reference: the HF tokenizer (the default engine is tiktoken), special tokens split as plain text.
    expected = [[EOT, *tokenizer(d, add_special_tokens=False, split_special_tokens=True).input_ids] for d in docs]
    np.testing.assert_array_equal(tokens, np.concatenate(expected))
    assert tokenizer.decode(tokens.tolist()) == "".join("<|endoftext|>" + d for d in docs)
    assert np.count_nonzero(tokens == EOT) == len(docs)  # the literal "<|endoftext|>" did not become token 50256


def test_manifest_counts_checksums_and_split_boundaries(reference):
    manifest = load_manifest(reference)
    val, train = manifest["splits"]["val"], manifest["splits"]["train"]
    val_tokens = np.concatenate([read_shard(p) for p in list_shards(reference, "val")])
    train_tokens = np.concatenate([read_shard(p) for p in list_shards(reference, "train")])
    # Validation = whole documents up to the first that reaches 5000 tokens; training starts with a new document.
    last_doc = len(val_tokens) - np.flatnonzero(val_tokens == EOT)[-1]
    assert len(val_tokens) >= 5000 > len(val_tokens) - last_doc
    assert train_tokens[0] == EOT
    for split, tokens in [("val", val_tokens), ("train", train_tokens)]:
        info = manifest["splits"][split]
        sizes = [s["tokens"] for s in info["shards"]]
        assert all(n == 10000 for n in sizes[:-1]) and 0 < sizes[-1] <= 10000
        assert info["tokens"] == sum(sizes) == len(tokens)
        assert info["documents"] == np.count_nonzero(tokens == EOT)
        assert [p.name for p in list_shards(reference, split)] == [f"{split}_{i:06d}.bin" for i in range(len(sizes))]
    assert len(train["shards"]) >= 10 and val["tokens"] < 10000
    verify_checksums(reference)
    assert sorted(p.name for p in reference.iterdir() if p.name.startswith(".")) == []  # no progress or temp files


@pytest.mark.parametrize("kind", ["parquet", "txt"])
def test_parquet_and_txt_sources_give_the_same_shards_as_jsonl(corpus, reference, tmp_path, kind):
    folder = tmp_path / kind
    folder.mkdir()
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": corpus[1]}), folder / "all.parquet", row_group_size=100)
    else:  # one document per file, read in name order
        for i, doc in enumerate(corpus[1]):
            (folder / f"doc-{i:05d}.txt").write_text(doc or "", encoding="utf-8")
    out = tmp_path / "out"
    prepare_main(parse_options(["--source", str(folder), "--out_dir", str(out), *PREPARE_ARGS]))
    shards = {name: data for name, data in folder_bytes(out).items() if name.endswith(".bin")}
    assert shards == {name: data for name, data in folder_bytes(reference).items() if name.endswith(".bin")}


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_gives_byte_identical_folder(corpus, reference, tmp_path):
    """Kill twice, each time after a random number of new shards plus a random delay; the finished folder equals the
    reference. The killed runs use 1 process and the HF engine (slower: a wider window to land in), the last run 2
    processes and tiktoken, so the equality also shows that the output depends on neither.
    """
    out = tmp_path / "killed"
    args = ["prepare_data.py", "--source", str(corpus[0] / "*.jsonl"), "--out_dir", str(out),
            "--num_proc", "1", "--engine", "hf", *PREPARE_ARGS]
    rng = random.Random(0)
    for _ in range(2):
        # One or two new shards, then a random moment inside the next ones (a few ms a shard here): the run stops
        # itself there, so however loaded the machine, the kill lands before the end (14 shards in all).
        proc = start_then_freeze(args, after="gpt2custom.data:write_shard", calls=rng.randint(1, 2),
                                 delay=rng.uniform(0, 0.004))
        kill_when_frozen(proc, timeout=120)
        assert not (out / MANIFEST).exists(), "the run finished before it could be killed"
    finished = run_script(*args[:5], "--num_proc", "2", *PREPARE_ARGS)  # engine and processes may change on resume
    assert "resuming after" in finished.stdout
    assert folder_bytes(out) == folder_bytes(reference)


def test_rerun_skips_a_finished_folder_and_refuses_other_settings(corpus, reference, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    prepare(corpus, out, *PREPARE_ARGS)
    assert "already complete" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=rf"{out / MANIFEST} was made with other settings .*'shard_size': \(10000, 20000\)"):
        prepare(corpus, out, "--val_tokens", "5000", "--shard_size", "20000")
    assert folder_bytes(out) == folder_bytes(reference)


def test_offline_stdlib_corpus_prepares_its_documents_in_order(tmp_path, tokenizer):
    prepare_main(parse_options(["--source", "stdlib", "--out_dir", str(tmp_path), "--max_tokens", "30000",
                                "--val_tokens", "5000", "--shard_size", "10000", "--num_proc", "1"]))
    docs = [read_stdlib_document(name) for name in stdlib_corpus()[:40]]
    expected = np.concatenate([[EOT, *tokenizer(d, add_special_tokens=False, split_special_tokens=True).input_ids]
                               for d in docs if d])[:30000]
    assert len(expected) == 30000  # 40 documents are more than enough
    np.testing.assert_array_equal(all_tokens(tmp_path), expected)
    assert load_manifest(tmp_path)["source"]["name"] == "stdlib"


def test_tiktoken_and_hf_engines_give_identical_ids(real_text):
    texts = [real_text[:60_000], *SPECIAL_DOCS[:3], "x" * 3000 + " 123456 ,.;'s 've\n\n\n  end"]
    tokens_tt, lengths_tt = DocumentEncoder(engine="tiktoken")(texts)
    tokens_hf, lengths_hf = DocumentEncoder(engine="hf")(texts)
    np.testing.assert_array_equal(tokens_tt, tokens_hf)
    np.testing.assert_array_equal(lengths_tt, lengths_hf)
    assert tokens_tt.dtype == np.uint16 and list(tokens_tt[np.cumsum(lengths_tt) - lengths_tt]) == [EOT] * len(texts)


# ----------------------------------------------------------------------------------------------------------------
# Shard format and clear errors


def test_write_shard_round_trip_and_llmc_header(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65536, size=12345).astype(np.uint16)
    path = tmp_path / "train_000000.bin"
    sha = write_shard(path, tokens)
    raw = path.read_bytes()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert list(header[:3]) == [20240520, 1, 12345] and not header[3:].any() and len(raw) == HEADER_BYTES + 2 * 12345
    np.testing.assert_array_equal(np.frombuffer(raw[HEADER_BYTES:], dtype="<u2"), tokens)
    np.testing.assert_array_equal(read_shard(path), tokens)
    assert sha == hashlib.sha256(raw).hexdigest()
    assert list(tmp_path.iterdir()) == [path]  # the temporary file was renamed


def test_write_shard_rejects_ids_that_do_not_fit_uint16(tmp_path):
    with pytest.raises(ValueError, match="fit in uint16"):
        write_shard(tmp_path / "x.bin", np.array([1, 70000]))


def test_bad_magic_is_a_clear_error(tmp_path):
    path = tmp_path / "train_000000.bin"
    write_shard(path, np.arange(100, dtype=np.uint16))
    raw = bytearray(path.read_bytes())
    raw[:4] = (1234).to_bytes(4, "little")
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=rf"{path}: magic number 1234, expected {MAGIC}"):
        read_shard(path)


@pytest.mark.parametrize("cut", [2, 200 + HEADER_BYTES - 10])
def test_truncated_shard_is_a_clear_error(tmp_path, cut):
    path = tmp_path / "val_000000.bin"
    write_shard(path, np.arange(100, dtype=np.uint16))
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(ValueError, match=rf"{path}: .*truncated"):
        read_shard(path)


def test_missing_manifest_and_missing_split_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path} has no manifest.json"):
        list_shards(tmp_path, "train")
    make_loader_dir(tmp_path, [50])
    with pytest.raises(ValueError, match=r"manifest.json lists no 'val' shards \(splits with shards: \['train'\]\)"):
        list_shards(tmp_path, "val")
    (tmp_path / "train_000000.bin").unlink()
    with pytest.raises(FileNotFoundError, match="train_000000.bin is listed in .* but missing"):
        list_shards(tmp_path, "train")


def test_missing_text_column_is_one_clear_error(corpus, tmp_path):
    with pytest.raises(SystemExit, match=r"part-0.jsonl: no column 'content' \(columns: \['id', 'text'\]\)"):
        prepare_main(parse_options(["--source", str(corpus[0] / "part-0.jsonl"), "--out_dir", str(tmp_path),
                                    "--text_column", "content"]))


# ----------------------------------------------------------------------------------------------------------------
# The training loader, on shards whose every token is unique, so a window is known by its first token

T = 16


def make_loader_dir(folder, sizes: list[int], split: str = "train") -> set[int]:
    """Shards of consecutive ids; returns the first tokens of all their (T+1)-token windows, computed independently."""
    shards, windows, offset = [], set(), 0
    for i, n in enumerate(sizes):
        name = f"{split}_{i:06d}.bin"
        write_shard(folder / name, np.arange(offset, offset + n, dtype=np.uint16))
        shards.append({"file": name, "tokens": n})
        windows |= {offset + T * k for k in range((n - 1) // T)}
        offset += n
    manifest = {"format": MANIFEST_FORMAT, "splits": {split: {"shards": shards}}}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return windows


def first_tokens(loader: ShardLoader, steps: int) -> list[list[int]]:
    out = []
    for _ in range(steps):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (loader.batch_size, T) and x.dtype == y.dtype == torch.int64
        assert (y == x + 1).all()  # y is x shifted by one: consecutive ids
        out.append(x[:, 0].tolist())
    return out


def test_ranks_are_disjoint_and_cover_every_window_of_each_epoch_in_a_new_order(tmp_path):
    windows = make_loader_dir(tmp_path, [1000, 1537, 801, 17, 5])  # 62 + 96 + 50 + 1 + 0 windows
    n, batch, world = len(windows), 4, 2
    loaders = [ShardLoader(tmp_path, "train", batch, T, rank=r, world_size=world, seed=7) for r in range(world)]
    steps = 2 * n // (batch * world) + 2
    per_rank = [first_tokens(loader, steps) for loader in loaders]
    # Global order: step s, then rank r, then row j.
    stream = [t for s in range(steps) for r in range(world) for t in per_rank[r][s]]
    epoch0, epoch1 = stream[:n], stream[n:2 * n]
    assert sorted(epoch0) == sorted(windows) and sorted(epoch1) == sorted(windows)
    assert epoch0 != epoch1
    for s in range(steps):
        assert not set(per_rank[0][s]) & set(per_rank[1][s])
    assert loaders[0].epoch == loaders[1].epoch == 2  # 54 steps x 8 windows = 432 = 2 x 209 + 14
    # Within an epoch the shards come one after another (the 4 with windows: 3 switches), each in a shuffled order.
    shard_of = np.searchsorted(np.cumsum([1000, 1537, 801, 17]), epoch0, side="right")
    assert np.count_nonzero(np.diff(shard_of)) == 3
    assert epoch0 != sorted(epoch0)


def test_resume_mid_epoch_yields_the_identical_batch_sequence(tmp_path):
    make_loader_dir(tmp_path, [1000, 1537, 801])
    loader = ShardLoader(tmp_path, "train", 4, T, rank=1, world_size=2)
    first_tokens(loader, 7)
    state = loader.state_dict()
    assert json.loads(json.dumps(state)) == state == pickle.loads(pickle.dumps(state))
    expected = [loader.next_batch() for _ in range(30)]  # crosses into the next epoch
    resumed = ShardLoader(tmp_path, "train", 4, T, rank=1, world_size=2)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for (x, y), (rx, ry) in zip(expected, (resumed.next_batch() for _ in range(30))):
        assert x.equal(rx) and y.equal(ry)


def test_resume_on_another_world_size_continues_the_same_window_sequence(tmp_path):
    make_loader_dir(tmp_path, [1000, 1537])
    two = [ShardLoader(tmp_path, "train", 4, T, rank=r, world_size=2) for r in range(2)]
    for loader in two:
        loader.next_batch()
    later = [first_tokens(loader, 1)[0] for loader in two]
    one = ShardLoader(tmp_path, "train", 8, T, rank=0, world_size=1)
    one.load_state_dict(two[0].state_dict() | {"windows_done": 8})
    assert first_tokens(one, 1)[0] == later[0] + later[1]
    with pytest.raises(ValueError, match="not a whole number of steps"):
        ShardLoader(tmp_path, "train", 3, T).load_state_dict(two[0].state_dict())
    with pytest.raises(ValueError, match="seed=1337 but this loader has 1"):
        ShardLoader(tmp_path, "train", 4, T, seed=1).load_state_dict(two[0].state_dict())


def test_eval_batches_are_the_same_windows_every_time_and_split_between_ranks(tmp_path):
    windows = make_loader_dir(tmp_path, [1000, 1537], split="val")
    runs = [[[x[:, 0].tolist() for x, _ in iter_eval_batches(tmp_path, "val", 4, T, r, 2)] for r in range(2)]
            for _ in range(2)]
    assert runs[0] == runs[1]
    per_rank = runs[0]
    assert len(per_rank[0]) == len(per_rank[1]) == len(windows) // 8
    seen = [t for rank in per_rank for batch in rank for t in batch]
    assert len(set(seen)) == len(seen) and set(seen) <= windows
    assert [t for s in range(len(per_rank[0])) for r in range(2) for t in per_rank[r][s]] == sorted(seen)
    assert len(list(iter_eval_batches(tmp_path, "val", 4, T, 0, 2, max_batches=3))) == 3


def test_loader_refuses_a_split_smaller_than_one_step(tmp_path):
    make_loader_dir(tmp_path, [100])  # 6 windows
    with pytest.raises(ValueError, match="holds 6 windows of 17 tokens, fewer than one step needs"):
        ShardLoader(tmp_path, "train", 4, T, rank=0, world_size=2)


# ----------------------------------------------------------------------------------------------------------------
# A source that cannot be read is refused before anything is written


@pytest.mark.parametrize("source, message", [
    ("{tmp}/corpus/missing.jsonl", r"'{tmp}/corpus/missing.jsonl': no such file or folder \(expected a Hub dataset id"),
    ("{tmp}/corpus/*.parquet", r"'{tmp}/corpus/\*.parquet': no .txt/.jsonl/.json/.parquet files found"),
    ("{tmp}/corpus/empty", r"'{tmp}/corpus/empty': no .txt/.jsonl/.json/.parquet files found"),
    ("{tmp}/corpus/ids.jsonl", r"ids.jsonl: no column 'text' \(columns: \['id'\]\); pick one with --text_column"),
    ("NoSuchOrg/no-such-dataset", r"'NoSuchOrg/no-such-dataset': .*offline\?"),  # HF_HUB_OFFLINE=1 (conftest)
], ids=["missing-file", "glob-matches-nothing", "folder-without-data", "no-text-column", "hub-id-offline"])
def test_bad_source_is_refused_before_out_dir_is_created(tmp_path, source, message):
    (tmp_path / "corpus" / "empty").mkdir(parents=True)
    (tmp_path / "corpus" / "ids.jsonl").write_text('{"id": 1}\n')
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=message.format(tmp=re.escape(str(tmp_path)))):
        prepare_main(parse_options(["--source", source.format(tmp=tmp_path), "--out_dir", str(out)]))
    assert not out.exists()


def test_bad_source_on_the_command_line_is_one_line_on_stderr(tmp_path):
    proc = run_script("prepare_data.py", "--source", tmp_path / "typo.jsonl", "--out_dir", tmp_path / "out",
                      check=False, timeout=120)
    assert proc.returncode == 1 and not (tmp_path / "out").exists()
    assert proc.stderr.splitlines() == [f"--source '{tmp_path / 'typo.jsonl'}': no such file or folder (expected a "
                                        "Hub dataset id, a local .txt/.jsonl/.json/.parquet file, folder or glob, "
                                        "or 'stdlib')"]
