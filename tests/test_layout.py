"""The torch core does not import scikit-learn (the estimators are a thin face over it)."""

import ast
import importlib.util
from pathlib import Path

import pytest

CORE = [
    "sknvp.masks", "sknvp.nets", "sknvp.transforms", "sknvp.mixture", "sknvp.em",
    "sknvp.kernel", "sknvp.power", "sknvp.flows", "sknvp.multiscale", "sknvp.piecewise",
    "sknvp._backprop", "sknvp._reduce", "sknvp._adam",
]


def _imported_roots(path: str) -> set[str]:
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("name", CORE)
def test_core_module_does_not_import_scikit_learn(name):
    path = importlib.util.find_spec(name).origin
    assert "sklearn" not in _imported_roots(path)
