"""The package as a user installs it: `pip wheel .` builds a wheel holding every subpackage and the
package data, which installs into a fresh virtual environment and runs there, with no source tree
on the path, as the source tree does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib

from mlx_gemma3n import load
from mlx_gemma3n.decoding.sampling import SamplingParams
from mlx_gemma3n.generate import Session, prepare_prompt

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "what is the weather like"


def run(command: list, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, f"{command}: {result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the tree pip would see (a build writes build/ and egg-info beside the source)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "mlx_gemma3n", source / "mlx_gemma3n", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w", out], cwd=source)
    (built,) = out.glob("mlx_gemma3n-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh environment with the wheel installed; the dependencies (mlx, numpy, tokenizers, ...)
    come from this interpreter's site-packages through a path file, whose own path files (the
    editable install's finder among them) Python does not read."""
    folder = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", folder], cwd=folder)
    python = folder / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=folder).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=folder)
    return folder


def test_the_wheel_holds_the_package_and_its_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "mlx_gemma3n").rglob("__init__.py")}
    assert {f"{p}/__init__.py" for p in packages} <= names
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "mlx_gemma3n").rglob("*.py")}
    assert modules <= names, modules - names
    assert "mlx_gemma3n/data/matformer_configs.csv" in names
    page = {str(p.relative_to(ROOT)) for p in (ROOT / "mlx_gemma3n" / "server" / "ui").iterdir()}
    assert "mlx_gemma3n/server/ui/index.html" in page and page <= names, page - names  # the chat page
    assert not any(name.startswith(("tests/", "benchmarks/", "examples/")) for name in names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert all(f"{name} = {target}" in text for name, target in scripts.items()), text


def test_installed_wheel_runs_without_the_source_tree(venv, tiny_ckpt_a, tiny_tokenizer, tmp_path):
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    where = run([python, "-c", "import mlx_gemma3n; print(mlx_gemma3n.__file__)"], cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(venv), where
    assert run([bin_dir / "mlx_gemma3n.generate", "--help"], cwd=tmp_path).stdout.startswith("usage: mlx_gemma3n.generate ")
    assert "Config for official E2B Model" in run([bin_dir / "mlx_gemma3n.matformer", "--list"], cwd=tmp_path).stdout

    model, processor = load(tiny_ckpt_a.path)
    responses = Session(model, processor).stream(prepare_prompt(processor, PROMPT), SamplingParams(temperature=0.0), 16)
    expected = tiny_tokenizer.decode([r.token for r in responses if r.finish_reason != "stop"], skip_special_tokens=True)
    generated = run([bin_dir / "mlx_gemma3n.generate", "--model", tiny_ckpt_a.path, "-p", PROMPT, "-m", "16", "--temp", "0"], cwd=tmp_path)
    assert generated.stdout.rstrip("\n") == expected
