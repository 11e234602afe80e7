"""The command-line tools as installed: console scripts and `python -m` alike, `--version`, and the
conversion's progress bar (on a terminal only)."""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib
from tqdm import tqdm

from helpers import on_a_terminal

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["generate", "convert", "lora", "fuse", "server", "matformer", "transcribe"]
BAR = re.compile(r"converting: +100%\|.*\| *[\d.]+[kMG]?/[\d.]+[kMG]? \[\d\d:\d\d<\d\d:\d\d, +[\d.]+[kMG]?B/s\]")  # done/total [elapsed<left, rate]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_command_is_a_console_script():
    scripts = pyproject()["project"]["scripts"]
    assert sorted(scripts) == sorted(f"mlx_gemma3n.{name}" for name in COMMANDS)
    for name in COMMANDS:
        module, _, function = scripts[f"mlx_gemma3n.{name}"].partition(":")
        assert function == "main" and module.startswith(f"mlx_gemma3n.{name}")


@pytest.mark.parametrize("name", COMMANDS)
def test_version_flag(name):
    expected = f"mlx-gemma3n {pyproject()['project']['version']}"
    script = Path(sysconfig.get_path("scripts")) / f"mlx_gemma3n.{name}"
    for command in ([sys.executable, "-m", f"mlx_gemma3n.{name}"], [str(script)]):
        result = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=300)
        assert (result.returncode, result.stdout.strip(), result.stderr) == (0, expected, ""), command


def test_usage_names_the_command_as_it_was_run():
    script = Path(sysconfig.get_path("scripts")) / "mlx_gemma3n.convert"
    assert subprocess.run([str(script), "--help"], capture_output=True, text=True).stdout.startswith("usage: mlx_gemma3n.convert ")
    by_module = subprocess.run([sys.executable, "-m", "mlx_gemma3n.convert", "--help"], capture_output=True, text=True)
    assert by_module.stdout.startswith("usage: python -m mlx_gemma3n.convert ")


def source_bytes(folder: Path) -> int:
    from mlx_gemma3n.weights.mapped import read_header

    return sum(sum(e["data_offsets"][1] - e["data_offsets"][0] for e in read_header(f)[1].values()) for f in folder.glob("*.safetensors"))


def test_conversion_shows_progress_on_a_terminal_only(tiny_ckpt_a, tmp_path):
    convert = [sys.executable, "-m", "mlx_gemma3n.convert", "--hf-path", str(tiny_ckpt_a.path), "-q", "--q-group-size", "32"]
    code, shown = on_a_terminal([*convert, "--mlx-path", str(tmp_path / "tty")])
    assert code == 0, shown
    bar = BAR.search(shown)
    assert bar, shown
    assert f"/{tqdm.format_sizeof(source_bytes(tiny_ckpt_a.path), divisor=1024)} [" in bar.group(0)

    code, quiet = on_a_terminal([*convert, "--mlx-path", str(tmp_path / "quiet"), "--quiet"])
    assert code == 0 and "converting" not in quiet and "wrote" in quiet
    piped = subprocess.run([*convert, "--mlx-path", str(tmp_path / "pipe")], capture_output=True, text=True, timeout=600)
    assert piped.returncode == 0 and "converting" not in piped.stderr and "wrote" in piped.stderr


def test_fuse_and_export_go_through_the_same_bar(tiny_ckpt_a, tmp_path):
    code, shown = on_a_terminal([sys.executable, "-m", "mlx_gemma3n.fuse", "--model", str(tiny_ckpt_a.path), "--hf-format",
                                 "--save-path", str(tmp_path / "hf")])
    assert code == 0 and BAR.search(shown), shown
