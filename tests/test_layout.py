"""The code's shape, checked so it stays: LoRA's package imports downward in its stated order (top-level and
in-function imports alike) and no file of it grows past about 700 lines."""

from __future__ import annotations

import ast
import pathlib

import graftkit.methods.lora as lora

PACKAGE = pathlib.Path(lora.__file__).parent
# The order the package's docstring states: each file imports only core and the files before it.
ORDER = ["inits", "config", "linear", "layers", "tokens", "parameters", "tying", "legacy", "method", "hotswap", "loftq",
         "data"]


def _relative_imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) of every ``from .x import`` / ``from . import x`` in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            found += [(node.lineno, name.split(".")[0]) for name in names]
    return found


def test_lora_package_imports_downward_only():
    files = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert sorted(ORDER) == files, "a file was added or removed: give it its place in ORDER and the docstring"
    upward = [f"{name}.py:{line} imports .{target}" for name in ORDER
              for line, target in _relative_imports(PACKAGE / f"{name}.py")
              if target not in ORDER or ORDER.index(target) >= ORDER.index(name)]
    assert not upward, upward
    assert [line.split()[0] for line in lora.__doc__.split("::")[1].strip().splitlines()[:len(ORDER)]] == ORDER


def test_no_lora_file_is_over_about_700_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert max(sizes.values()) <= 720, sizes


def test_the_check_sees_an_upward_import(tmp_path):
    (tmp_path / "config.py").write_text("def f():\n    from .method import Lora\n")
    assert _relative_imports(tmp_path / "config.py") == [(2, "method")]
