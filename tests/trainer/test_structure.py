"""The trainer's shape: the loop and the shared parts name no model family and compare no
method; those live in their own modules (families/, methods/)."""

import ast
from pathlib import Path

import difftrain.trainer
from difftrain.trainer import families

TRAINER = Path(difftrain.trainer.__file__).parent
SHARED = sorted(p for p in TRAINER.glob("*.py"))


def _method_comparisons(tree: ast.AST) -> list[int]:
    """Lines comparing something's ``.method`` (``spec.method == "lora"``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(side, ast.Attribute) and side.attr == "method" for side in sides):
                found.append(node.lineno)
    return found


def _family_names(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines with a family's name as a string constant."""
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in names
    ]


def test_shared_modules_compare_no_method_and_name_no_family():
    names = {family.name for family in families.all_families()}
    names |= {preset for family in families.all_families() for preset in family.presets}

    found = {}
    for path in SHARED:
        tree = ast.parse(path.read_text())
        lines = _method_comparisons(tree) + _family_names(tree, names)
        if lines:
            found[path.name] = lines

    assert found == {}


def test_the_checker_finds_what_it_looks_for():
    tree = ast.parse('if spec.method == "lora" or family == "sdxl":\n    pass\n')

    assert _method_comparisons(tree) == [1]
    assert _family_names(tree, {"sdxl"}) == [1]


def test_the_loop_stays_short():
    source = (TRAINER / "loop.py").read_text()
    functions = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]

    assert len(source.splitlines()) < 350
    assert max(node.end_lineno - node.lineno + 1 for node in functions) <= 60
