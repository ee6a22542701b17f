"""lm.prepare: raw text to token files, meta.json and tokenizer files; re-runs, bad input, end to end."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lm.prepare import PrepareError, main, prepare
from lm.tokenizer import Tokenizer, bytes_to_unicode, load_tokenizer

EOT = "<|endoftext|>"
OUTPUTS = {"train.npy", "val.npy", "meta.json", "vocab.json", "merges.txt"}


def stories(seed: int, n: int) -> str:
    """Little generated stories separated by the end-of-text token, with some Unicode in them."""
    rng = random.Random(seed)
    names = ["Tom", "Lily", "Zoë", "Ben", "Mia"]
    words = "the a cat dog ball tree sun happy big little ran saw played found liked with and then".split()
    words += ["".join(rng.choice("bdfglmnprst") + rng.choice("aeiou") for _ in range(3)) for _ in range(100)]
    out = []
    for _ in range(n):
        sentences = [
            f"{rng.choice(names)} " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))
            for _ in range(rng.randint(2, 5))
        ]
        out.append("Once upon a time, " + ". ".join(sentences) + rng.choice([".", "!", " 😀."]) + "\n")
    return EOT.join(out)


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def run_main(*args: object) -> int:
    return main([str(a) for a in args] + ["--quiet"])


def stat_outputs(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.iterdir()}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write(tmp_path / "corpus.txt", stories(0, 600))


def test_prepare_writes_consistent_outputs(tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "data"
    assert run_main("--input", corpus, "--vocab-size", 400, "--special-token", EOT, "--out", out) == 0
    assert {p.name for p in out.iterdir()} == OUTPUTS  # and no temporary files left behind

    meta = json.loads((out / "meta.json").read_text())
    train = np.load(out / "train.npy", mmap_mode="r")
    val = np.load(out / "val.npy", mmap_mode="r")
    assert meta["vocab_size"] == 400
    assert meta["dtype"] == "uint16" == train.dtype.name == val.dtype.name
    assert meta["num_tokens"] == {"train": len(train), "val": len(val)}
    assert meta["max_token_id"] == max(int(train.max()), int(val.max())) < 400
    assert meta["tokenizer"] == {
        "type": "bpe",
        "vocab": "vocab.json",
        "merges": "merges.txt",
        "special_tokens": [EOT],
        "eot_token": 256,
    }
    assert meta["sources"]["train"]["sha256"] and meta["sources"]["train"]["bytes"] == corpus.stat().st_size

    # The validation split is the last ~1% of the text, cut at a safe position, and both files decode back
    # to exactly the original text.
    text = corpus.read_bytes()
    cut = meta["split"]["train_bytes"][1]
    assert meta["split"]["val_bytes"] == [cut, len(text)]
    assert 0.005 < (len(text) - cut) / len(text) < 0.02
    tok = load_tokenizer(out / "meta.json")
    assert tok.decode(train.tolist()) == text[:cut].decode()
    assert tok.decode(val.tolist()) == text[cut:].decode()
    assert train.tolist() == tok.encode(text[:cut].decode())
    assert int(np.count_nonzero(train == 256)) == text[:cut].decode().count(EOT)


def test_rerun_is_a_noop_until_inputs_or_arguments_change(
    tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "data"
    args = ["--input", corpus, "--vocab-size", 300, "--special-token", EOT, "--out", out]
    assert run_main(*args) == 0
    before = stat_outputs(out)
    capsys.readouterr()

    assert main([str(a) for a in args]) == 0  # not quiet: says why it does nothing
    assert "up to date" in capsys.readouterr().err
    assert stat_outputs(out) == before  # nothing rewritten

    assert run_main(*args[:3], 320, *args[4:]) == 0  # another vocabulary size: redone
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 320

    with open(corpus, "a", encoding="utf-8") as f:
        f.write("One more story about a cat.\n")
    old_sha = json.loads((out / "meta.json").read_text())["sources"]["train"]["sha256"]
    assert run_main(*args[:3], 320, *args[4:]) == 0  # changed input: redone
    assert json.loads((out / "meta.json").read_text())["sources"]["train"]["sha256"] != old_sha


def test_val_input_and_tokenizer_reuse(tmp_path: Path, corpus: Path) -> None:
    val_text = stories(1, 40)
    val_file = write(tmp_path / "val.txt", val_text)
    first = tmp_path / "first"
    assert run_main("--input", corpus, "--val-input", val_file, "--vocab-size", 350,
                    "--special-token", EOT, "--out", first) == 0  # fmt: skip
    tok = load_tokenizer(first / "meta.json")
    assert np.load(first / "val.npy").tolist() == tok.encode(val_text)
    assert "split" not in json.loads((first / "meta.json").read_text())

    # Reuse: no --vocab-size, and the special tokens come from the reused directory's meta.json.
    other = write(tmp_path / "other.txt", stories(2, 300))
    second = tmp_path / "second"
    assert run_main("--input", other, "--tokenizer", first, "--out", second) == 0
    meta = json.loads((second / "meta.json").read_text())
    assert meta["args"]["tokenizer"] == "reused"
    assert meta["tokenizer"]["special_tokens"] == [EOT] and meta["vocab_size"] == 350
    assert (second / "vocab.json").read_bytes() == (first / "vocab.json").read_bytes()
    assert (second / "merges.txt").read_bytes() == (first / "merges.txt").read_bytes()
    cut = meta["split"]["train_bytes"][1]
    assert np.load(second / "train.npy").tolist() == tok.encode(other.read_bytes()[:cut].decode())


def test_vocabulary_over_65536_tokens_is_stored_as_uint32(tmp_path: Path, corpus: Path) -> None:
    # A hand-made tokenizer whose ids go past 65535 (the extra tokens are unreachable but count).
    table = bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)} | {f"tok{i}": 256 + i for i in range(70_000 - 256)}
    tok_dir = tmp_path / "big-vocab"
    tok_dir.mkdir()
    (tok_dir / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tok_dir / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    out = tmp_path / "data"
    assert run_main("--input", corpus, "--tokenizer", tok_dir, "--out", out) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["vocab_size"], meta["dtype"]) == (70_000, "uint32")
    assert np.load(out / "train.npy", mmap_mode="r").dtype == np.uint32
    assert meta["max_token_id"] < 256  # no merges: every token is a byte


def test_parallel_preparation_matches_serial(tmp_path: Path) -> None:
    corpus = write(tmp_path / "big.txt", stories(3, 600) * 12)  # over 1 MB: worker processes are used
    assert corpus.stat().st_size > 1 << 20
    for n in (1, 2):
        args = ["--input", corpus, "--vocab-size", 300, "--special-token", EOT, "--out", tmp_path / f"p{n}"]
        assert run_main(*args, "--num-processes", n) == 0
    for name in OUTPUTS - {"meta.json"}:
        assert (tmp_path / "p1" / name).read_bytes() == (tmp_path / "p2" / name).read_bytes(), name


@pytest.mark.parametrize(
    ("setup", "extra", "message"),
    [
        (lambda d: d / "missing.txt", [], "missing.txt: no such file"),
        (lambda d: write(d / "empty.txt", ""), [], "empty.txt: file is empty"),
        (lambda d: (d / "in.bin").write_bytes(b"hello \xff world") and d / "in.bin", [], "byte offset 6"),
        (
            lambda d: (d / "cut.bin").write_bytes("héllo".encode()[:2]) and d / "cut.bin",
            [],
            "offset 1: incomplete",
        ),
        (lambda d: d, [], "not a regular file"),
        (
            lambda d: write(d / "ok.txt", "hello world"),
            ["--vocab-size", "256"],
            "below 256 bytes + 1 special",
        ),
        (lambda d: write(d / "ok.txt", "hello world"), ["--val-fraction", "1.5"], "--val-fraction"),
        (
            lambda d: write(d / "ok.txt", "hello world"),
            ["--tokenizer", "nowhere"],
            "vocab.json: no such file",
        ),
        (lambda d: write(d / "ok.txt", "helloworld"), [], "cannot split off a validation set"),
    ],
    ids=[
        "missing",
        "empty",
        "not-utf8",
        "truncated-utf8",
        "dir",
        "vocab-too-small",
        "fraction",
        "tok",
        "split",
    ],
)
def test_bad_input_is_one_line_with_exit_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup, extra: list[str], message: str
) -> None:
    path = setup(tmp_path)
    out = tmp_path / "out"
    base = ["--input", path, "--special-token", EOT, "--out", out]
    if "--vocab-size" not in extra and "--tokenizer" not in extra:
        base += ["--vocab-size", 300]
    assert run_main(*base, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not out.exists()  # input is checked before anything is written


def test_prepare_function_raises_prepare_error(tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match="no such file"):
        prepare(tmp_path / "nope.txt", tmp_path / "out", vocab_size=300)
    with pytest.raises(PrepareError, match="--vocab-size is required"):
        prepare(write(tmp_path / "a.txt", "hello"), tmp_path / "out")
    assert issubclass(PrepareError, ValueError)


def test_cli_subprocess_reports_bad_input_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café!".encode("latin-1"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm.prepare",
            "--input",
            str(bad),
            "--vocab-size",
            "300",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}: not valid UTF-8 (byte offset 3)"


def test_prepared_tokenizer_files_load_with_from_files(tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "data"
    assert run_main("--input", corpus, "--vocab-size", 300, "--special-token", EOT, "--out", out) == 0
    tok = Tokenizer.from_files(out / "vocab.json", out / "merges.txt", [EOT])
    assert len(tok.merges) == 300 - 257 and tok.eot_token == 256
    assert tok.decode(tok.encode(f"Once upon a time{EOT}Zoë 😀")) == f"Once upon a time{EOT}Zoë 😀"


@pytest.mark.slow
def test_end_to_end_prepare_train_generate(tmp_path: Path) -> None:
    corpus = write(tmp_path / "corpus.txt", stories(4, 1500))
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}

    def cli(*args: object) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    cli("lm.prepare", "--input", corpus, "--val-fraction", 0.05, "--vocab-size", 512,
        "--special-token", EOT, "--out", data)  # fmt: skip
    vocab_size = json.loads((data / "meta.json").read_text())["vocab_size"]
    run = tmp_path / "run"
    cli("lm.train", "--data.train_path", data / "train.npy", "--data.val_path", data / "val.npy",
        "--model.vocab_size", vocab_size, "--train.max_tokens", 20000, "--train.out_dir", run)  # fmt: skip
    checkpoint = run / "checkpoints" / "final.pt"
    assert checkpoint.is_file()
    proc = cli("lm.generate", "--checkpoint", checkpoint, "--prompt", "Once", "--max-new-tokens", 20, "--seed", 0)
    assert proc.stdout.startswith("Once")
