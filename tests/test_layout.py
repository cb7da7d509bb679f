"""The package's layers (README, "Layout"): a module imports only modules of lower layers, so
that data flows one way; scripts hold no library state."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fsdfm"

# Layer of each module; a module may import only modules of a strictly lower layer (a module of
# fsdfm.corpus only from the corpus or below).
LAYERS = {
    "_args": 0, "_io": 0, "options": 0, "progress": 0,
    "path": 1, "dilation": 1, "ops": 1, "tokenizer": 1, "corpus": 1,
    "model": 2, "head": 2,
    "checkpoint": 3, "data": 3,
    "solver": 4, "losses": 4, "optim": 4, "distill": 4,
    "generation": 5, "metrics": 5, "train_config": 5, "coupling": 5,
    "synthetic": 6,
    "training": 7, "scorer": 7, "evaluation": 7,
    "cli": 8,
    "__init__": 9, "__main__": 9,
}  # fmt: skip


def _module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return "corpus" if parts[0] == "corpus" else parts[0]


def _fsdfm_imports(path: Path) -> set[str]:
    """The fsdfm modules that a file imports, at any depth (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fsdfm"):
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:  # from fsdfm import ops, path
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "fsdfm":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
    return found


def test_every_module_has_a_layer():
    modules = {_module_of(p) for p in PACKAGE.rglob("*.py")}
    assert modules <= set(LAYERS), f"modules without a layer: {sorted(modules - set(LAYERS))}"


def test_imports_point_down():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _module_of(path)
        for imported in _fsdfm_imports(path):
            if imported == own or imported == "_C":
                continue
            if LAYERS[imported] >= LAYERS[own]:
                upward.append(f"{path.relative_to(ROOT)} imports fsdfm.{imported}")
    assert not upward, "imports that point up or sideways: " + "; ".join(upward)


def test_scripts_hold_no_library_state():
    """Scripts neither edit the library's tables nor its import path."""
    for path in sorted((ROOT / "scripts").glob("*.py")):
        text = path.read_text()
        assert "sys.path" not in text, f"{path.name} edits sys.path"
        assert "PRESETS[" not in text, f"{path.name} edits fsdfm.model.PRESETS"
