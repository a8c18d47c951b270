"""The import arrows of docs/architecture.md: web never imports torch or workers/."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["web", "web.wsgi", "kiln.cli", "db.models"])
def test_module_imports_neither_torch_nor_workers(module: str, tmp_path) -> None:
    probe = (
        f"import {module}, sys; "
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('workers'));"
        "print(','.join(bad))"
    )
    env = {"KILN_DATA_DIR": str(tmp_path), "KILN_REDIS_URL": "memory://", "PATH": ""}
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == ""
