"""bench/gpu_check.sh off a GPU: valid bash, and a clear refusal (exit 3) where no CUDA
device is, before it installs or starts anything. Its GPU steps await a GPU machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _tool(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} is not on PATH"
    return found


def test_the_script_is_valid_bash() -> None:
    subprocess.run([_tool("bash"), "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_the_script_is_shellcheck_clean() -> None:
    subprocess.run([_tool("shellcheck"), str(SCRIPT)], check=True)


def _run_with(tmp_path: Path, nvidia_smi: str | None) -> subprocess.CompletedProcess[str]:
    """The script with a PATH whose only nvidia-smi (if any) is the stub given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "grep", "head", "mktemp", "rm", "dirname", "timeout", "tail", "cut"):
        (bin_dir / tool).symlink_to(_tool(tool))
    if nvidia_smi is not None:
        stub = bin_dir / "nvidia-smi"
        stub.write_text(f"#!{_tool('bash')}\n{nvidia_smi}\n")
        stub.chmod(0o755)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "PYTHON": sys.executable}
    return subprocess.run(
        [str(bin_dir / "bash"), str(SCRIPT)],
        capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path,
    )  # fmt: skip


def test_without_nvidia_smi_it_says_so_and_exits_3(tmp_path: Path) -> None:
    done = _run_with(tmp_path, None)
    assert done.returncode == 3, done.stderr
    assert "no CUDA device here" in done.stderr
    assert done.stdout == ""  # no table: nothing was checked


def test_a_driver_that_lists_no_gpu_is_no_cuda_device_either(tmp_path: Path) -> None:
    done = _run_with(tmp_path, 'echo "No devices were found"; exit 6')
    assert done.returncode == 3, done.stderr
    assert "no CUDA device here" in done.stderr


def test_the_helper_lists_its_steps() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--help"],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert "{kiln,ddp}" in done.stdout
