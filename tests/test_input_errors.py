"""Bad input found beside the tested cases (issue 14, items 10 and 11), each through a real CLI entry point:
one line `error: FILE: FIELD: expected ...`, exit 2, before any model is built (or Ray started, or a tokenizer
trained). Also: every token id is checked (not a sample), once per file, with the result cached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_config
from support.experiment import make_space

import lm.generate
import lm.prepare
import lm.train
import sweeps.run_sweep
from lm import data
from lm.data import open_tokens, range_cache_path

# ---------------------------------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------------------------------


def tiny_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    """lm.train arguments: tests/conftest.py's tiny config on `corpus` (10 steps, an eval every 5), into `out`."""
    config = tiny_config(
        corpus,
        out,
        {
            "train.max_tokens": 8 * 32 * 10,
            "train.eval_interval_tokens": 8 * 32 * 5,
            "train.num_threads": 1,
            "train.device": "cpu",
        },
    )
    fields = {f"{s}.{k}": v for s, values in config.to_dict().items() for k, v in values.items() if v is not None}
    return [arg for key, value in fields.items() for arg in (f"--{key}", str(value))] + list(extra)


def one_line_error(capsys: pytest.CaptureFixture[str], code: int, *fragments: str) -> str:
    """Assert exit 2 with exactly one `error:` line on stderr holding every fragment; return the line."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if lm.train or lm.generate builds a model: the error must come before expensive work."""

    def built(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was built before the bad input was reported")

    monkeypatch.setattr(lm.train.TransformerLM, "from_config", built)


@pytest.fixture
def corpus(small_corpus, tmp_path) -> Path:
    """A private copy of the small corpus, free to damage."""
    return Path(shutil.copytree(small_corpus, tmp_path / "corpus"))


def age(path: Path, seconds: float = 60) -> None:
    """Make `path` look written `seconds` ago: the checked-range cache skips files written just now."""
    past = time.time() - seconds
    os.utime(path, (past, past))


# ---------------------------------------------------------------------------------------------------
# The sweep driver's --set and the space's constants (Ray must not start)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def no_ray(monkeypatch):
    def start_ray(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("Ray was started before the bad input was reported")

    monkeypatch.setattr(sweeps.run_sweep, "start_ray", start_ray)


def run_sweep(tmp_path: Path, space: Path, *extra: str) -> int:
    return sweeps.run_sweep.main(["--space", str(space), "--storage-path", str(tmp_path / "store"), *extra])


def test_set_value_that_is_not_yaml(tmp_path, small_corpus, capsys, no_ray):
    space = make_space(tmp_path, small_corpus)
    code = run_sweep(tmp_path, space, "--set", "num_samples=[1,")
    one_line_error(capsys, code, "--set num_samples", "expected a YAML value", "'[1,'")
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    ("parameters", "where"),
    [
        ([1, 2], "parameters: expected a mapping"),
        ({"optimizer.lr": 0.01}, "parameters.optimizer.lr: expected a mapping"),
    ],
    ids=["parameters-a-list", "entry-a-number"],
)
def test_set_inside_parameters_that_are_not_a_mapping(tmp_path, small_corpus, capsys, no_ray, parameters, where):
    space = make_space(tmp_path, small_corpus, parameters=parameters)
    code = run_sweep(tmp_path, space, "--set", "parameters.optimizer.lr.max=0.1")
    one_line_error(capsys, code, str(space), where)


def test_invalid_constant_is_named_not_the_parameter_probed_first(tmp_path, small_corpus, capsys, no_ray):
    parameters = {"data.batch_size": {"values": [8, 16]}, "optimizer.lr": {"value": 0}}
    space = make_space(tmp_path, small_corpus, parameters=parameters)
    err = one_line_error(capsys, run_sweep(tmp_path, space), str(space), "parameters.optimizer.lr: value 0")
    assert "data.batch_size" not in err and "optimizer.lr: expected a positive number" in err


def test_constants_invalid_together_name_the_one_that_breaks_the_config(tmp_path, small_corpus, capsys, no_ray):
    # Each is fine alone with the base (100 steps of 256 tokens); together the warmup outlasts the run.
    parameters = {"optimizer.warmup_iters": {"value": 50}, "data.batch_size": {"value": 64}}
    space = make_space(tmp_path, small_corpus, parameters=parameters)
    err = one_line_error(capsys, run_sweep(tmp_path, space), "parameters.data.batch_size: value 64")
    assert "optimizer.warmup_iters: expected an integer in [0, total steps" in err


def test_swept_value_still_blamed_on_its_parameter(tmp_path, small_corpus, capsys, no_ray):
    parameters = {"optimizer.lr": {"value": 0.01}, "optimizer.warmup_iters": {"values": [5, 500]}}
    space = make_space(tmp_path, small_corpus, parameters=parameters)
    one_line_error(capsys, run_sweep(tmp_path, space), "parameters.optimizer.warmup_iters: value 500")


# ---------------------------------------------------------------------------------------------------
# lm.train: meta.json, output directories, device, --resume-from
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("vocab_size", "257", "a positive integer"),
        ("vocab_size", 257.5, "a positive integer"),
        ("max_token_id", "x", "an integer >= 0"),
        ("max_token_id", True, "an integer >= 0"),
        ("entropy_floor_nats", "low", "a number"),
    ],
)
def test_meta_json_field_of_the_wrong_type(corpus, tmp_path, capsys, no_model, key, value, expected):
    meta_path = corpus / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta[key] = value
    meta_path.write_text(json.dumps(meta))
    code = lm.train.main(tiny_args(corpus, tmp_path / "run"))
    one_line_error(capsys, code, f"{meta_path}: {key}: expected {expected}, got {value!r}")


def test_meta_json_of_the_wrong_type_before_ray(tmp_path, corpus, capsys, no_ray):
    meta = json.loads((corpus / "meta.json").read_text())
    (corpus / "meta.json").write_text(json.dumps({**meta, "vocab_size": "many"}))
    space = make_space(tmp_path, corpus)
    one_line_error(capsys, run_sweep(tmp_path, space), "meta.json: vocab_size: expected a positive integer")


def test_out_dir_that_cannot_be_created(small_corpus, tmp_path, capsys, no_model):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "run"
    code = lm.train.main(tiny_args(small_corpus, out))
    one_line_error(capsys, code, f"{out}: train.out_dir: expected a directory", "a_file is not a directory")


def test_checkpoint_dir_that_is_a_file(small_corpus, tmp_path, capsys, no_model):
    (tmp_path / "ckpt").write_text("")
    code = lm.train.main(tiny_args(small_corpus, tmp_path / "run", "--train.checkpoint_dir", str(tmp_path / "ckpt")))
    one_line_error(capsys, code, f"{tmp_path / 'ckpt'}: train.checkpoint_dir: expected a directory")
    assert not (tmp_path / "run").exists()  # found before anything is written, not at the first evaluation


def test_default_checkpoint_dir_that_is_a_file(small_corpus, tmp_path, capsys, no_model):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("")
    code = lm.train.main(tiny_args(small_corpus, tmp_path / "run"))
    one_line_error(capsys, code, "checkpoints: train.out_dir: expected a directory", "is not a directory")


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_train_seed_beyond_64_bits(small_corpus, tmp_path, capsys, no_model, seed):
    code = lm.train.main(tiny_args(small_corpus, tmp_path / "run", "--train.seed", seed))
    one_line_error(capsys, code, f"train.seed: expected an integer in [0, 2**64) (torch and numpy seeds), got {seed}")


def _missing_device() -> str:
    """A device this machine lacks: cuda on a CPU-only build, else the CUDA index past the last one."""
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize("device", ["banana", "CUDA", "meta", "missing"])
def test_train_device_this_machine_lacks(small_corpus, tmp_path, capsys, no_model, device):
    device = _missing_device() if device == "missing" else device
    code = lm.train.main(tiny_args(small_corpus, tmp_path / "run", "--train.device", device))
    one_line_error(capsys, code, 'train.device: expected "auto", "cpu", "cuda"', repr(device))


def test_device_error_in_a_real_process(small_corpus, tmp_path):
    args = tiny_args(small_corpus, tmp_path / "run", "--train.device", "banana")
    proc = subprocess.run([sys.executable, "-m", "lm.train", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: train.device: expected") and not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only torch build")
def test_cuda_on_a_cpu_only_build_says_so(small_corpus, tmp_path, capsys, no_model):
    code = lm.train.main(tiny_args(small_corpus, tmp_path / "run", "--train.device", "cuda"))
    one_line_error(capsys, code, "'cuda' (this torch build has no CUDA)")


@pytest.fixture(scope="module")
def trained(small_corpus, tmp_path_factory) -> Path:
    """The final training-state checkpoint of a tiny run on the small corpus."""
    out = tmp_path_factory.mktemp("run")
    assert lm.train.main(tiny_args(small_corpus, out)) == 0
    return out / "checkpoints" / "final.pt"


def _damaged(tmp_path: Path, trained: Path, change) -> Path:
    state = torch.load(trained, weights_only=True)
    change(state)
    path = tmp_path / "damaged.pt"
    torch.save(state, path)
    return path


DAMAGE = {
    "no-sampler": (lambda s: s.pop("sampler"), "sampler: expected the batch sampler's numpy PCG64 state"),
    "iteration-a-string": (lambda s: s.update(iteration="x"), "iteration: expected an integer >= 0 (the step), got"),
    "negative-tokens": (lambda s: s.update(tokens_seen=-5), "tokens_seen: expected an integer >= 0, got -5"),
    "foreign-sampler": (lambda s: s.update(sampler={"bit_generator": "MT19937"}), "sampler: expected"),
    "rng-a-list": (lambda s: s.update(rng=[1]), "rng: expected a mapping of RNG states"),
    "short-torch-rng": (lambda s: s["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)), "rng.torch: expected"),
    "no-python-rng": (
        lambda s: s["rng"].pop("python"),
        "rng.python: expected a python random state to resume from, missing",
    ),
    "loss-a-string": (lambda s: s.update(best_val_loss="low"), "best_val_loss: expected a number"),
    "weights-not-tensors": (lambda s: s.update(model={"w": 1}), "model: expected a mapping of parameter names"),
    "optimizer-a-list": (lambda s: s.update(optimizer=[]), "optimizer: expected an optimizer state"),
    "config-a-string": (lambda s: s.update(config="tiny"), "config: expected the run's config"),
    "cs336-without-optimizer": (
        lambda s: [s.pop(k) for k in list(s) if k not in ("model", "iteration")],
        "optimizer: expected an optimizer state (a mapping with 'state' and 'param_groups') to resume from, missing",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_resume_from_a_checkpoint_missing_or_mistyping_a_field(small_corpus, trained, tmp_path, capsys, case):
    change, expected = DAMAGE[case]
    damaged = _damaged(tmp_path, trained, change)
    args = tiny_args(small_corpus, tmp_path / "run", "--resume-from", str(damaged), "--train.max_tokens", "5120")

    def built(*a: Any, **k: Any) -> None:
        raise AssertionError("a model was built before the bad checkpoint was reported")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lm.train.TransformerLM, "from_config", built)
        code = lm.train.main(args)
    one_line_error(capsys, code, f"{damaged}: {expected}")


def test_a_whole_checkpoint_still_resumes(small_corpus, trained, tmp_path, capsys):
    args = tiny_args(small_corpus, tmp_path / "run", "--resume-from", str(trained), "--train.max_tokens", "5120")
    assert lm.train.main(args) == 0, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# lm.generate: temperature, seed, device
# ---------------------------------------------------------------------------------------------------


def _generate(capsys, trained: Path, *extra: str) -> tuple[int, str, str]:
    args = ["--checkpoint", str(trained), "--prompt", "Once", "--max-new-tokens", "30", "--device", "cpu"]
    code = lm.generate.main([*args, *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("temperature", ["1e-45", "5e-324", "1e-300"])
def test_tiny_temperature_samples_the_argmax(trained, capsys, temperature):
    code, greedy, err = _generate(capsys, trained, "--temperature", "0")
    assert code == 0, err
    code, out, err = _generate(capsys, trained, "--temperature", temperature, "--seed", "3")
    assert code == 0, err
    assert out == greedy  # the limit of the softmax as T -> 0, never inf/nan probabilities


@pytest.mark.parametrize("seed", [str(2**64), "-1", str(10**30)])
def test_seed_beyond_64_bits(trained, capsys, seed, monkeypatch):
    monkeypatch.setattr(lm.generate, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    code = lm.generate.main(["--checkpoint", str(trained), "--seed", seed])
    one_line_error(capsys, code, f"--seed: expected an integer in [0, 2**64), got {seed}")


def test_largest_seed_is_accepted(trained, capsys):
    code, out, err = _generate(capsys, trained, "--seed", str(2**64 - 1))
    assert code == 0 and out.startswith("Once"), err


@pytest.mark.parametrize("device", ["banana", "missing"])
def test_generate_device_this_machine_lacks(trained, capsys, monkeypatch, device):
    device = _missing_device() if device == "missing" else device
    monkeypatch.setattr(lm.generate, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    code = lm.generate.main(["--checkpoint", str(trained), "--device", device])
    one_line_error(capsys, code, '--device: expected "auto"', repr(device))


# ---------------------------------------------------------------------------------------------------
# lm.prepare: output directory, special tokens (before the tokenizer is trained)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "in.txt"
    path.write_text("Once upon a time there was a cat. " * 200)
    return path


@pytest.fixture
def no_training(monkeypatch):
    monkeypatch.setattr(lm.prepare, "train_bpe", lambda *a, **k: pytest.fail("tokenizer trained before the check"))


def test_prepare_out_that_cannot_be_created(tmp_path, text, capsys, no_training):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "data"
    code = lm.prepare.main(["--input", str(text), "--vocab-size", "300", "--out", str(out), "--quiet"])
    one_line_error(capsys, code, f"{out}: --out: expected a directory", "a_file is not a directory")


def test_prepare_out_that_is_a_file(tmp_path, text, capsys, no_training):
    (tmp_path / "a_file").write_text("")
    code = lm.prepare.main(["--input", str(text), "--vocab-size", "300", "--out", str(tmp_path / "a_file")])
    one_line_error(capsys, code, "a_file: --out: expected a directory")


def test_prepare_empty_special_token(tmp_path, text, capsys, no_training):
    out = tmp_path / "data"
    args = ["--input", str(text), "--vocab-size", "300", "--special-token", "", "--out", str(out), "--quiet"]
    one_line_error(capsys, lm.prepare.main(args), "--special-token: expected a non-empty string")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------
# Item 11: every token id is checked, once per file
# ---------------------------------------------------------------------------------------------------


def test_negative_id_after_the_first_million_tokens(corpus, tmp_path, capsys, no_model):
    tokens = np.zeros(1_100_000, dtype=np.int32)
    tokens[1_050_000] = -7  # past the first 1,048,576 tokens, where the sample used to stop
    np.save(corpus / "train.npy", tokens)
    (corpus / "meta.json").unlink()
    code = lm.train.main(tiny_args(corpus, tmp_path / "run"))
    one_line_error(capsys, code, f"{corpus / 'train.npy'}: data.train_path: negative token id -7")


def test_stale_max_token_id_with_bad_ids_between_the_sampled_ones(corpus, tmp_path, capsys, no_model):
    tokens = np.load(corpus / "train.npy")
    stride = max(1, len(tokens) // 65536)
    assert stride > 1 and tokens.max() < 257
    tokens[1] = 300  # between the strided sample's first two ids; meta.json still says 256
    np.save(corpus / "train.npy", tokens)
    code = lm.train.main(tiny_args(corpus, tmp_path / "run"))
    one_line_error(capsys, code, "data.train_path: token id 300 >= model.vocab_size 257")


@pytest.fixture
def scans(monkeypatch, tmp_path) -> list[int]:
    """A private range cache, and the lengths of the files the streaming pass reads."""
    monkeypatch.setenv("LM_SWEEPS_CACHE", str(tmp_path / "cache"))
    seen: list[int] = []
    scan = data._scan_range

    def counting(tokens: np.ndarray) -> tuple[int, int]:
        seen.append(len(tokens))
        return scan(tokens)

    monkeypatch.setattr(data, "_scan_range", counting)
    return seen


def test_range_is_cached_and_the_cache_invalidated_when_the_file_changes(tmp_path, scans):
    path = tmp_path / "train.npy"
    np.save(path, np.arange(1000, dtype=np.uint16) % 200)
    age(path)
    open_tokens(path, 257, 16)
    assert scans == [1000] and range_cache_path().is_file()
    open_tokens(path, 257, 16)
    open_tokens(path, 257, 16, field="data.val_path")
    assert scans == [1000]  # later runs (and every sweep trial) read the cache

    bad = np.arange(1000, dtype=np.uint16) % 200
    bad[500] = 999  # same size: only the mtime says the file changed
    np.save(path, bad)
    age(path, 30)
    with pytest.raises(data.DataError, match="token id 999 >= model.vocab_size 257"):
        open_tokens(path, 257, 16)
    assert scans == [1000, 1000]

    np.save(path, np.arange(2000, dtype=np.uint16) % 200)  # another size
    age(path, 10)
    open_tokens(path, 257, 16)
    assert scans == [1000, 1000, 2000]


def test_file_written_just_now_is_checked_but_not_cached(tmp_path, scans):
    path = tmp_path / "train.npy"
    np.save(path, np.arange(1000, dtype=np.uint16) % 200)  # may change again within one mtime tick
    open_tokens(path, 257, 16)
    open_tokens(path, 257, 16)
    assert scans == [1000, 1000] and not range_cache_path().exists()


def test_damaged_cache_is_ignored(tmp_path, scans):
    path = tmp_path / "train.npy"
    np.save(path, np.arange(1000, dtype=np.uint16) % 200)
    age(path)
    range_cache_path().parent.mkdir(parents=True)
    range_cache_path().write_text("{not json")
    assert len(open_tokens(path, 257, 16)) == 1000
    open_tokens(path, 257, 16)
    assert scans == [1000] and isinstance(json.loads(range_cache_path().read_text()), dict)


def test_a_run_after_a_checked_one_reads_the_cache(corpus, tmp_path, scans):
    for name in ("train.npy", "val.npy"):
        age(corpus / name)
    config = lm.train.Config().replace(
        {
            "model.vocab_size": 257,
            "model.context_length": 32,
            "data.train_path": str(corpus / "train.npy"),
            "data.val_path": str(corpus / "val.npy"),
        }
    )
    lm.train.open_data(config)
    assert len(scans) == 2
    lm.train.open_data(config)  # a sweep trial's setup after the driver's check
    assert len(scans) == 2
