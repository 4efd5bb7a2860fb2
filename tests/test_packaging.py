import importlib
import operator
import subprocess
import sys
from pathlib import Path


def test_operator_folder_does_not_shadow_stdlib():
    assert hasattr(operator, "itemgetter"), "stdlib operator must stay importable"
    pkg = importlib.import_module("llm_operator")
    assert pkg.__file__.replace("\\", "/").endswith("operator/__init__.py")


def test_demo_model_ships_inside_the_package():
    from importlib.resources import files

    demo = files("serving") / "demo" / "stories260k"
    assert (demo / "model.safetensors").is_file()
    assert (demo / "tokenizer.json").is_file()


def test_python_dash_m_from_the_checkout_keeps_the_stdlib_operator():
    # -S: no site-packages .pth files, which in some installs import the stdlib operator early and
    # would hide the shadowing; a fresh virtualenv has none of them either.
    root = Path(__file__).resolve().parent.parent
    code = "import operator, collections; print(operator.__file__, operator.itemgetter(1)([0, 7]))"
    run = subprocess.run([sys.executable, "-S", "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    location, item = run.stdout.split()
    assert not location.startswith(str(root)) and item == "7"
    run = subprocess.run([sys.executable, "-S", "-m", "json.tool"], input='{"a": 1}', cwd=root, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and '"a": 1' in run.stdout, run.stderr
