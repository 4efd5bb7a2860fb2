"""The one-way layers of the design hold: the contracts in .importlinter (api -> engine -> models ->
config/logs; the downloader and the operator apart), checked by import-linter over the real import
graph, indirect and function-level imports included."""

from pathlib import Path

from importlinter.cli import lint_imports

REPO = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code = lint_imports(config_filename=str(REPO / ".importlinter"), no_cache=True, no_logo=True)
    assert code == 0, capsys.readouterr().out
