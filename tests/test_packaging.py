import importlib
import operator


def test_operator_folder_does_not_shadow_stdlib():
    assert hasattr(operator, "itemgetter"), "stdlib operator must stay importable"
    pkg = importlib.import_module("llm_operator")
    assert pkg.__file__.replace("\\", "/").endswith("operator/__init__.py")


def test_demo_model_ships_inside_the_package():
    from importlib.resources import files

    demo = files("serving") / "demo" / "stories260k"
    assert (demo / "model.safetensors").is_file()
    assert (demo / "tokenizer.json").is_file()
