"""Other decoding loops (speculative decoding, drafters, self-speculation, early exit) and the
tests use a Generator through its public interface only (:mod:`tokenfx.runtime.generate`'s
docstring lists it): no module but ``generate.py`` reads or writes a Generator's private
member. Checked with ``ast`` over the package and the tests, like the import layering."""

from __future__ import annotations

import ast
import pathlib

import tokenfx

PACKAGE = pathlib.Path(tokenfx.__file__).parent
TESTS = pathlib.Path(__file__).resolve().parents[1]
GENERATE = PACKAGE / "runtime" / "generate.py"


def _private_members() -> set[str]:
    """The Generator's private methods and the private attributes it assigns on itself."""
    tree = ast.parse(GENERATE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Generator")
    names = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    for node in ast.walk(cls):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            names.add(node.attr)
    names |= {c.value for c in ast.walk(cls) if isinstance(c, ast.Constant) and isinstance(c.value, str)
              and c.value.startswith("_") and c.value.isidentifier()}  # self.__dict__["_x"] caches
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_generator_private_members_stay_in_generate_py():
    private = _private_members()
    assert {"_runners", "_buffers", "_source", "_allocate"} <= private  # the reader sees them
    found = []
    for path in sorted(list(PACKAGE.rglob("*.py")) + list(TESTS.rglob("*.py"))):
        if path == GENERATE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            outside_self = not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                                and node.value.id in ("self", "cls"))
            if isinstance(node, ast.Attribute) and node.attr in private and outside_self:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} .{node.attr}")
    assert found == [], "a Generator's private member used outside generate.py:\n" + "\n".join(found)
