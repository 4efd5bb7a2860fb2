"""FleetLM operator: reconciles LLMDeployment resources into serving pods.

Installed, this folder imports as `llm_operator`. But `python -m ...` run from a checkout puts the
repository root first on sys.path, where this folder would shadow the stdlib `operator` module
(and break `collections`, `pip`, `pytest` ...) in any interpreter that had not imported the stdlib
one at start-up, a fresh virtualenv for one. Imported under that name, it loads the stdlib
module in its own place instead, using nothing that itself imports `operator`.
"""

if __name__ == "operator":
    import os
    import sys
    from importlib.machinery import PathFinder

    _spec = PathFinder.find_spec("operator", [os.path.dirname(os.__file__)])
    _stdlib_operator = type(sys)("operator")
    _stdlib_operator.__spec__, _stdlib_operator.__loader__, _stdlib_operator.__file__ = _spec, _spec.loader, _spec.origin
    sys.modules["operator"] = _stdlib_operator
    _spec.loader.exec_module(_stdlib_operator)
