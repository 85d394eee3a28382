"""The package's two layers: the library never imports the experiment harness, and no module
imports another that (directly or not) imports it back."""
import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ptq4vit"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Modules of the package imported by ``path`` (absolute and relative, at any depth in the file)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("ptq4vit"):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ptq4vit"))
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    return {m: {t for t in _imports(p) if t in files and t != m} for m, p in files.items()}


def test_library_never_imports_the_harness():
    offenders = {m: sorted(t for t in deps if t.startswith("ptq4vit.harness"))
                 for m, deps in _graph().items()
                 if not m.startswith("ptq4vit.harness") and m != "ptq4vit.__main__"}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_import_ptq4vit_loads_no_harness_module():
    code = ("import sys, ptq4vit, ptq4vit.export; "
            "print(sorted(m for m in sys.modules if m.startswith('ptq4vit.harness')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_import_cycle_between_modules():
    graph = _graph()
    # a package's __init__ re-exporting its children is not a cycle of meaning; leave it out
    edges = {m: {t for t in deps if not m.startswith(t + ".") and not t.startswith(m + ".")} for m, deps in graph.items()}
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for t in sorted(edges[m]):
            visit(t)
        stack.pop()

    for m in sorted(edges):
        visit(m)
    assert cycles == []
