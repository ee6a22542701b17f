"""The one CLI style (lm/cli.py): installed entry points, their help, the one error contract, packaged data."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tomllib
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import entry_points
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lm import generate, prepare, train
from lm.cli import CONFIG_DIR, InputError, find_config
from lm.config import Config
from sweeps import continue_best, inspect_sweep, run_sweep
from sweeps.run_sweep import SPACE_DIR, find_space
from sweeps.space import load_space

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ("lm-train", "lm-generate", "lm-prepare", "lm-sweep", "lm-sweep-inspect", "lm-sweep-continue")


def script(name: str) -> str:
    """The installed entry point `name` (pip install -e . puts it beside the interpreter)."""
    for where in (Path(sysconfig.get_path("scripts")) / name, Path(sys.executable).parent / name):
        if where.is_file():
            return str(where)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `pip install -e .` (see README)")
    return found


def outside_env() -> dict[str, str]:
    """The environment of a user outside the checkout: nothing points Python at the repository."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    return {**env, "RAY_USAGE_STATS_ENABLED": "0"}


def run_script(name: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [script(name), *args], cwd=cwd, env=outside_env(), capture_output=True, text=True, timeout=timeout
    )


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# lm-train --help and --print-config
# ---------------------------------------------------------------------------------------------------------


def test_train_help_lists_every_config_field_from_anywhere(tmp_path):
    result = run_script("lm-train", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("usage: lm-train"), out[:200]
    for option in ("--config", "--resume-from", "--print-config", "--debug"):
        assert option in out
    config = Config()
    for section in dataclasses.fields(config):
        for f in dataclasses.fields(getattr(config, section.name)):
            assert f"{section.name}.{f.name}" in out, f"{section.name}.{f.name} missing from --help"
    assert list(tmp_path.iterdir()) == []  # help writes nothing


def test_print_config_round_trips(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--config", "tiny.yaml", "--optimizer.lr", "1e-3", "--model.d_model=64", "--print-config"]
    assert train.main(argv) == 0
    printed = capsys.readouterr().out
    expected = Config.from_file(CONFIG_DIR / "tiny.yaml", {"optimizer.lr": "1e-3", "model.d_model": "64"})
    assert Config.from_dict(yaml.safe_load(printed)) == expected
    # The printed YAML is a config file: loading it back prints the same text.
    (tmp_path / "printed.yaml").write_text(printed)
    assert train.main(["--config", "printed.yaml", "--print-config"]) == 0
    assert capsys.readouterr().out == printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["printed.yaml"]  # no run directory


def test_print_config_without_a_file_is_the_defaults_plus_overrides(capsys):
    assert train.main(["--train.max_tokens", "2e6", "--print-config"]) == 0
    assert Config.from_dict(yaml.safe_load(capsys.readouterr().out)) == Config().replace({"train.max_tokens": "2e6"})


# ---------------------------------------------------------------------------------------------------------
# Bad input: one `error:` line and exit 2, for every entry point
# ---------------------------------------------------------------------------------------------------------

BAD_INPUTS = [
    (train.main, ["--bogus"], "unexpected argument '--bogus'"),
    (train.main, ["--config"], "--config needs a value"),
    (train.main, ["--config", "no_such.yaml"], "no_such.yaml"),
    (train.main, ["--train.max_tokens", "lots"], "train.max_tokens"),
    (train.main, ["--model.nope", "1"], "model.nope"),
    (generate.main, [], "--checkpoint"),
    (generate.main, ["--checkpoint", "{tmp}/x.pt", "--top-p", "high"], "--top-p"),
    (generate.main, ["--checkpoint", "{tmp}/x.pt"], "x.pt"),
    (prepare.main, ["--out", "{tmp}/out"], "--input"),
    (prepare.main, ["--input", "{tmp}/none.txt", "--vocab-size", "ten", "--out", "{tmp}/out"], "--vocab-size"),
    (prepare.main, ["--input", "{tmp}/none.txt", "--vocab-size", "300", "--out", "{tmp}/out"], "none.txt"),
    (run_sweep.main, ["--num-samples", "many"], "--num-samples"),
    (run_sweep.main, ["--space", "no_such_space.yaml", "--storage-path", "{tmp}/store"], "no_such_space.yaml"),
    (run_sweep.main, ["--bogus"], "--bogus"),
    (inspect_sweep.main, [], "path"),
    (inspect_sweep.main, ["{tmp}"], "not a sweep directory"),
    (inspect_sweep.main, ["{tmp}", "--top", "x"], "--top"),
    (continue_best.main, [], "sweep_dir"),
    (continue_best.main, ["{tmp}", "stray"], "unexpected argument 'stray'"),
    (continue_best.main, ["{tmp}", "--train.max_tokens", "1e6"], "not a sweep directory"),
]


@pytest.mark.parametrize(
    "main, argv, fragment", BAD_INPUTS, ids=[f"{m.__module__}-{i}" for i, (m, _, _) in enumerate(BAD_INPUTS)]
)
def test_bad_input_is_one_error_line_and_exit_2(main, argv, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_sweep, "start_ray", lambda *a, **k: pytest.fail("Ray must not start on bad input"))
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    captured = capsys.readouterr()
    assert fragment in one_error_line(captured.err)
    assert captured.out == ""


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(InputError, match="not a sweep directory"):
        inspect_sweep.main([str(tmp_path), "--debug"])
    with pytest.raises(InputError, match="unexpected argument"):
        train.main(["stray", "--debug"])


def test_help_exits_0_for_every_entry_point(capsys):
    for main in (train.main, generate.main, prepare.main, run_sweep.main, inspect_sweep.main, continue_best.main):
        assert main(["--help"]) == 0, main.__module__
        assert capsys.readouterr().out.startswith("usage: "), main.__module__


def test_entry_points_are_installed():
    """Every [project.scripts] entry is installed and is its module's `main` (what the in-process tests run)."""
    mains = {
        "lm-train": train.main,
        "lm-generate": generate.main,
        "lm-prepare": prepare.main,
        "lm-sweep": run_sweep.main,
        "lm-sweep-inspect": inspect_sweep.main,
        "lm-sweep-continue": continue_best.main,
    }
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert sorted(declared) == sorted(mains) == sorted(SCRIPTS)
    installed = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name in mains}
    for name, main in mains.items():
        assert name in installed, f"{name} is not installed: run `pip install -e .`"
        assert installed[name].value == declared[name], (name, installed[name].value, "reinstall: pip install -e .")
        assert installed[name].load() is main
        assert Path(script(name)).is_file()


@pytest.mark.slow  # six interpreters (about 25 s on 2 cores); the in-process tests above cover each contract
def test_every_installed_script_reports_bad_input_in_one_line(tmp_path):
    """The [project.scripts] entry points, run as a user would from a directory outside the checkout."""
    with ThreadPoolExecutor(3) as pool:
        runs = {name: pool.submit(run_script, name, "--no-such-option", cwd=tmp_path) for name in SCRIPTS}
    assert list(tmp_path.iterdir()) == []
    for name, future in runs.items():
        result = future.result()
        assert result.returncode == 2, (name, result.stderr)
        assert one_error_line(result.stderr).startswith("error: command line: "), name
        assert result.stdout == "", name


# ---------------------------------------------------------------------------------------------------------
# The shipped configs and search spaces: package data, found from any directory
# ---------------------------------------------------------------------------------------------------------


def test_shipped_configs_and_spaces_resolve_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = CONFIG_DIR / "tiny.yaml"
    assert find_config("tiny.yaml") == find_config("configs/tiny.yaml") == tiny.resolve()
    lr_sweep = (SPACE_DIR / "lr_sweep.yaml").resolve()
    assert find_space("lr_sweep.yaml") == find_space("search_spaces/lr_sweep.yaml") == lr_sweep
    spec = load_space(find_space("lr_sweep.yaml"))  # its `base_config: configs/tiny.yaml` resolves too
    assert spec.base_config == str(tiny.resolve())
    assert spec.base == Config.from_file(tiny)
    # Nothing matches: the name comes back as given, for the loader's error to name.
    assert find_config("no_such.yaml") == Path("no_such.yaml")
    assert find_space("no_such.yaml") == Path("no_such.yaml")


def test_a_local_file_wins_over_a_shipped_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text("model: {d_model: 64}\n")
    (tmp_path / "search_spaces").mkdir()
    (tmp_path / "search_spaces" / "lr_sweep.yaml").write_text("name: mine\n")
    assert find_config("configs/tiny.yaml") == (tmp_path / "configs" / "tiny.yaml").resolve()
    assert find_space("lr_sweep.yaml") == (tmp_path / "search_spaces" / "lr_sweep.yaml").resolve()


@pytest.mark.parametrize("space", sorted(p.name for p in SPACE_DIR.glob("*.yaml")))
def test_every_shipped_space_finds_its_base_config_from_another_directory(space, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = yaml.safe_load((SPACE_DIR / space).read_text())["base_config"]
    assert find_config(base, SPACE_DIR, SPACE_DIR.parent).is_file(), (space, base)


def test_package_data_declares_every_shipped_file():
    """pyproject's package-data globs cover every shipped config and space (so a wheel carries them)."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = [*CONFIG_DIR.iterdir(), *SPACE_DIR.iterdir()]
    assert len(shipped) >= 5
    for path in shipped:
        package = path.parent.parent.name
        rel = path.relative_to(path.parent.parent)
        assert any(rel.match(pattern) for pattern in data.get(package, [])), f"{path} is not package data"


# ---------------------------------------------------------------------------------------------------------
# An installed copy runs a sweep from another directory (slow: a real Ray sweep)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lm_sweep_from_another_directory(tmp_path, ray_tmp):
    env = {**outside_env(), "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1"}
    args = [
        "--space", "lr_sweep.yaml", "--num-samples", "2", "--num-cpus", "2",
        "--set", "stop.max_tokens=120000",
        "--set", "scheduler.grace_period=40000",
        "--set", "parameters.train.eval_interval_tokens.value=40000",
    ]  # fmt: skip
    proc = subprocess.Popen(
        [script("lm-sweep"), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: killed whole if it overruns
    )
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"lm-sweep did not finish in 300 s\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    results = pd.read_csv(tmp_path / "sweep_results" / "lr_sweep" / "results.csv")
    assert len(results) == 2, results
