"""The package's import rules (docs/architecture.md): layers only import downward.

models never import data / train / the CLIs; data never imports train or the CLIs; train never
imports the chat CLI. Checked on the source (every import statement, deferred ones included)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mmjax"

FORBIDDEN = {
    "models": ("mmjax.data", "mmjax.train", "mmjax.chat"),
    "data": ("mmjax.train", "mmjax.chat"),
    "train": ("mmjax.chat",),
}


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downward(layer):
    files = sorted((PKG / layer).rglob("*.py"))
    assert files
    bad = [f"{f.relative_to(PKG.parent)} imports {m}" for f in files for m in sorted(imported_modules(f))
           if any(m == p or m.startswith(p + ".") for p in FORBIDDEN[layer])]
    assert not bad, bad


def test_the_check_sees_deferred_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from mmjax.train.run import train\n    import mmjax.chat\n")
    assert {"mmjax.train.run", "mmjax.chat"} <= imported_modules(f)
