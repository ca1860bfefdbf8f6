"""Tests of the ``kerntrace`` command and of the public names."""

from __future__ import annotations

import base64
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kerntrace
import kerntrace.cli
import kerntrace.demo
from kerntrace import evaluate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}


def run(*arguments: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kerntrace.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def stamps(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def png_images(html: str) -> list[bytes]:
    found = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    return [base64.b64decode(text) for text in found]


def test_demo_quick_writes_a_report_and_reuses_its_cache_on_a_second_run(tmp_path):
    out = tmp_path / "demo"

    first = run("demo", "--quick", "--quiet", "--out", str(out), timeout=600)

    assert first.returncode == 0, first.stderr
    assert re.search(
        r"LDS over 6 retrained half-subsets: -?\d\.\d{3} \(95% CI", first.stdout
    ), first.stdout
    assert "top proponents" in first.stdout
    page = (out / "report.html").read_text()
    sections = re.split(r'<section class="target" id="target-\d+">', page)[1:]
    assert len(sections) == 3
    for section in sections:
        proponents = section.split('<div class="proponents">')[1]
        proponents, opponents = proponents.split('<div class="opponents">')
        assert len(png_images(section)) >= 11  # the target, 5 + 5 train digits
        assert len(png_images(proponents)) == 5
        assert len(png_images(opponents)) == 5
    assert all(image.startswith(PNG_MAGIC) for image in png_images(page))

    (retrain_dir,) = out.glob("retrain-*")
    (store_dir,) = out.glob("store-*")
    checkpoints = stamps(out / "checkpoints")
    retrained = stamps(retrain_dir)
    train_features = {
        name: stamp
        for name, stamp in stamps(store_dir / "models").items()
        if name.endswith(("features.npy", "cholesky.npy", "out_to_loss.npy"))
    }
    assert len(checkpoints) == 2
    assert len([n for n in retrained if n.startswith("subset_")]) == 6

    second = run("demo", "--quick", "--quiet", "--out", str(out), timeout=600)

    assert second.returncode == 0, second.stderr
    assert stamps(out / "checkpoints") == checkpoints
    assert sorted(out.glob("retrain-*")) == [retrain_dir]
    after = stamps(retrain_dir)
    assert {n: after[n] for n in retrained if n.startswith("subset_")} == {
        n: s for n, s in retrained.items() if n.startswith("subset_")
    }
    models = stamps(store_dir / "models")
    assert {n: models[n] for n in train_features} == train_features
    lds_line = [line for line in first.stdout.splitlines() if "LDS" in line]
    assert lds_line and lds_line[0] in second.stdout


def test_help_lists_the_demo_command():
    done = run("--help")

    assert done.returncode == 0, done.stderr
    assert "demo" in done.stdout
    assert done.stdout.startswith("usage: kerntrace")


def test_demo_help_lists_its_options():
    done = run("demo", "--help")

    assert done.returncode == 0, done.stderr
    for option in ("--out", "--quick", "--quiet", "--checkpoints", "--proj-dim"):
        assert option in done.stdout


def test_console_script_is_installed():
    script = shutil.which("kerntrace", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the kerntrace console script is not installed beside python")

    done = subprocess.run(
        [script, "--help"], capture_output=True, text=True, timeout=60, env=ENV
    )

    assert done.returncode == 0, done.stderr
    assert "demo" in done.stdout


def test_unknown_command_exits_with_usage_error():
    done = run("frobnicate")

    assert done.returncode == 2
    assert "invalid choice: 'frobnicate'" in done.stderr


def test_every_demo_option_has_a_help_text():
    help_text = kerntrace.cli.build_parser()._subparsers._group_actions[0].choices

    for action in help_text["demo"]._actions:
        assert action.help, action.option_strings


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        (["--checkpoints", "0"], "argument --checkpoints: must be at least 1, got 0"),
        (["--subsets", "1"], "argument --subsets: must be at least 2, got 1"),
        (["--proj-dim", "x"], "argument --proj-dim: must be an integer, got 'x'"),
    ],
)
def test_demo_refuses_too_small_counts_naming_the_flag(arguments, words):
    done = run("demo", *arguments)

    assert done.returncode == 2
    assert words in done.stderr


def test_an_os_error_prints_one_line_and_exits_1(tmp_path, capsys):
    existing = tmp_path / "a-file"
    existing.write_text("")

    status = kerntrace.cli.main(["demo", "--quick", "--quiet", "--out", str(existing)])

    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("kerntrace: error: ") and "Traceback" not in err
    assert str(existing) in err


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, capsys, monkeypatch):
    def interrupted(settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(kerntrace.demo, "run_demo", interrupted)

    status = kerntrace.cli.main(["demo", "--quiet", "--out", str(tmp_path)])

    err = capsys.readouterr().err
    assert status == 130
    assert err.count("\n") == 1
    assert "interrupted" in err and "rerun" in err


# -- M6: public names ----------------------------------------------------------------


@pytest.mark.parametrize("name", kerntrace.__all__)
def test_every_public_name_imports(name):
    namespace: dict[str, object] = {}
    exec(f"from kerntrace import {name}", namespace)

    assert namespace[name] is getattr(kerntrace, name)


def test_star_import_gives_exactly_the_public_names():
    namespace: dict[str, object] = {}
    exec("from kerntrace import *", namespace)

    assert set(kerntrace.__all__) <= set(namespace)
    assert len(kerntrace.__all__) == len(set(kerntrace.__all__))


@pytest.mark.parametrize(
    "module",
    [
        "api",
        "checkpoints",
        "cli",
        "data",
        "demo",
        "errors",
        "evaluate",
        "featurize",
        "gradients",
        "kernel",
        "models",
        "outputs",
        "projection",
        "report",
        "scoring",
        "store",
    ],
)
def test_every_module_exports_what_it_lists(module):
    loaded = importlib.import_module(f"kerntrace.{module}")

    missing = [name for name in loaded.__all__ if not hasattr(loaded, name)]

    assert missing == []


# -- the commands ------------------------------------------------------------------


def test_audit_command_quick_prints_an_auc_and_the_suspects(tmp_path):
    done = run(
        "audit", "--quick", "--quiet", "--out", str(tmp_path / "audit"), timeout=300
    )

    assert done.returncode == 0, done.stderr
    match = re.search(r"detection AUC of self-influence .*: (\d\.\d{3})", done.stdout)
    assert match, done.stdout
    assert 0.0 <= float(match.group(1)) <= 1.0
    assert "given  original" in done.stdout
    rows = re.findall(r"^\s+\d+\s+\d+\s+\d\s+\d\s+\S+", done.stdout, re.MULTILINE)
    assert len(rows) == 10
    assert len(list((tmp_path / "audit" / "checkpoints").glob("*.pt"))) == 2


def _lds_files(tmp_path, *, masks_shape=None):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(20, 4))
    masks = evaluate.make_subsets(20, 12, seed=1)
    outputs = masks @ scores + 0.5 * rng.normal(size=(12, 4))
    if masks_shape is not None:
        masks = np.ones(masks_shape, dtype=bool)
    paths = {}
    for name, array in (("scores", scores), ("masks", masks), ("outputs", outputs)):
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], array)
    return paths, (scores, masks, outputs)


def _lds_arguments(paths):
    return [f"--{name}={path}" for name, path in paths.items()]


def test_lds_command_prints_the_value_of_evaluate_lds(tmp_path):
    paths, arrays = _lds_files(tmp_path)

    done = run("lds", *_lds_arguments(paths), timeout=60)

    expected = evaluate.lds(*arrays)
    assert done.returncode == 0, done.stderr
    low, high = expected.interval
    assert f"LDS {expected.value:.6f} (95% CI {low:.6f} to {high:.6f})" in done.stdout
    assert "over 4 of 4 targets and 12 subsets" in done.stdout


def test_lds_command_refuses_masks_of_the_wrong_shape(tmp_path):
    paths, _ = _lds_files(tmp_path, masks_shape=(12, 19))

    done = run("lds", *_lds_arguments(paths), timeout=60)

    assert done.returncode == 2
    assert "masks.npy" in done.stderr and "(12, 19)" in done.stderr
    assert "n_train=20" in done.stderr


def test_lds_command_refuses_outputs_of_the_wrong_shape(tmp_path):
    paths, (_, _, outputs) = _lds_files(tmp_path)
    np.save(paths["outputs"], outputs[:, :3])

    done = run("lds", *_lds_arguments(paths), timeout=60)

    assert done.returncode == 2
    assert "outputs.npy" in done.stderr and "(12, 3)" in done.stderr


def test_lds_command_refuses_a_missing_file(tmp_path):
    paths, _ = _lds_files(tmp_path)
    paths["scores"] = tmp_path / "absent.npy"

    done = run("lds", *_lds_arguments(paths), timeout=60)

    assert done.returncode == 2
    assert "--scores file" in done.stderr and "absent.npy" in done.stderr
    assert "does not exist" in done.stderr


def test_help_lists_the_audit_and_lds_commands():
    done = run("--help", timeout=60)

    assert done.returncode == 0, done.stderr
    assert "audit" in done.stdout and "lds" in done.stdout
    audit_help = run("audit", "--help", timeout=60).stdout
    for option in ("--out", "--fraction", "--checkpoints", "--proj-dim", "--quiet"):
        assert option in audit_help


def test_ill_conditioned_warning_lives_in_errors_and_is_re_exported():
    from kerntrace import errors, kernel

    assert "IllConditionedWarning" in errors.__all__
    assert kernel.IllConditionedWarning is errors.IllConditionedWarning
    assert kerntrace.IllConditionedWarning is errors.IllConditionedWarning


def test_readme_layout_lists_every_module():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```")[1]
    package = Path(kerntrace.__file__).parent

    for module in sorted(package.glob("*.py")):
        if module.name != "__init__.py":
            assert module.name in layout, module.name
