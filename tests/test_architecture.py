"""The one-way layers of the design hold: the contracts in .importlinter (api -> engine -> models ->
config/logs; the downloader and the operator apart), checked by import-linter over the real import
graph, indirect and function-level imports included. In a subprocess: import-linter reconfigures
logging in the process that runs it."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"


def test_import_contracts_are_kept():
    result = subprocess.run([sys.executable, "-c", LINT], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_benchmarks_import_only_names_that_exist():
    """bench/ imports some of serving's names lazily (inside main), where `--help` never reaches: a
    name that moved would break the benchmark only when run."""
    import ast
    import importlib

    for path in sorted((REPO / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("serving", "bench"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    is_package = hasattr(module, "__path__")
                    submodule = is_package and importlib.util.find_spec(f"{node.module}.{alias.name}") is not None
                    assert hasattr(module, alias.name) or submodule, (
                        f"{path.name}: {node.module} has no {alias.name}"
                    )
