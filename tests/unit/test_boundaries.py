"""The import arrows of docs/architecture.md, read from the source of every module.

web → db, kiln; workers → db, kiln; db → kiln; nothing imports web; web never imports
torch. The one exception is kiln/cli/server.py (the server commands), which may import db
and workers. Every import statement counts, module-level or inside a function, relative or
absolute; a second test loads the modules and checks what actually ends up in sys.modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("kiln", "db", "web", "workers")

#: package → the top-level packages its modules must never import.
FORBIDDEN = {
    "kiln": {"db", "web", "workers", "torch"},
    "db": {"web", "workers", "torch"},
    "web": {"workers", "torch"},
    "workers": {"web"},
}
#: Modules allowed more than their package (and which imports they may add).
EXCEPTIONS = {"kiln/cli/server.py": {"db", "workers"}}


def imported_modules(source: str, module: str, is_package: bool = False) -> Iterator[str]:
    """Every module an import statement anywhere in `source` names (relative ones resolved
    against `module`, the dotted name of the file)."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                yield ".".join([*base, *([node.module] if node.module else [])])
            else:
                yield node.module or ""


def violations(path: Path, root: Path = ROOT) -> list[str]:
    """The imports of the file at `path` that cross a forbidden arrow, as readable lines."""
    relative = path.relative_to(root).as_posix()
    parts = relative.removesuffix(".py").split("/")
    is_package = parts[-1] == "__init__"
    module = ".".join(parts[:-1] if is_package else parts)
    forbidden = FORBIDDEN[parts[0]] - EXCEPTIONS.get(relative, set())
    return [
        f"{relative} imports {name}"
        for name in imported_modules(path.read_text(), module, is_package)
        if name.split(".")[0] in forbidden
    ]


def source_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_the_tree_has_modules_to_check() -> None:
    files = {p.relative_to(ROOT).as_posix() for p in source_files()}
    assert {"kiln/cli/__init__.py", "kiln/cli/server.py", "db/jobs.py", "web/wsgi.py"} <= files


def test_no_module_imports_against_the_arrows() -> None:
    found = [line for path in source_files() for line in violations(path)]
    assert found == []


@pytest.mark.parametrize(
    ("relative", "source"),
    [
        ("kiln/cli/__init__.py", "from db.engine import make_engine\n"),
        ("kiln/cli/server.py", "import web.wsgi\n"),  # the exception covers db and workers only
        ("kiln/client_cli.py", "def f():\n    from workers.launch import run\n"),
        ("kiln/specs.py", "def f():\n    import torch\n"),
        ("db/jobs.py", "class C:\n    def m(self):\n        from web import submit\n"),
        ("db/registry.py", "from workers.runners import predict\n"),
        ("web/api/jobs.py", "from ...workers import tasks\n"),  # relative, three levels up
        ("web/ui/jobs.py", "def f():\n    import torch.nn\n"),
        ("workers/execute.py", "from web.dispatch import x\n"),
        ("workers/runners/__init__.py", "from .. import web\n"),  # `workers.web`: allowed
    ],
)
def test_an_upward_import_is_caught(tmp_path: Path, relative: str, source: str) -> None:
    """The checker, run on a synthetic tree that re-introduces one upward import each."""
    path = tmp_path / relative
    path.parent.mkdir(parents=True)
    path.write_text(source)
    found = violations(path, tmp_path)
    if relative == "workers/runners/__init__.py":
        assert found == []  # a sibling module named web is not the web package
    else:
        assert len(found) == 1, found


def test_the_exception_lets_server_commands_import_db_and_workers(tmp_path: Path) -> None:
    path = tmp_path / "kiln" / "cli" / "server.py"
    path.parent.mkdir(parents=True)
    path.write_text("def run():\n    from db import keys\n    from workers.launch import run\n")
    assert violations(path, tmp_path) == []


@pytest.mark.parametrize("module", ["web", "web.wsgi", "kiln.cli", "db.models"])
def test_module_imports_neither_torch_nor_workers(module: str, tmp_path) -> None:
    """What loading the module really imports (lazy imports in kiln.cli.server stay lazy)."""
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
