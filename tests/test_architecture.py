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
