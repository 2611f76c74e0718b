"""Imports point down only (tuneops -> finetune | evaluate | serve -> core), and project modules form no cycle.

Every .py under the project packages is parsed with `ast`, so an import inside a function or a
TYPE_CHECKING block counts for the layering; the cycle check follows only the imports that run when a
module is imported (module level, class bodies, top-level if/try/with; not functions, not TYPE_CHECKING).
scripts/ and tests/ may import anything.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "finetune", "evaluate", "serve", "tuneops")
ALLOWED = {
    "tuneops": {"tuneops", "finetune", "evaluate", "serve", "core"},
    "finetune": {"finetune", "core"},
    "evaluate": {"evaluate", "core"},
    "serve": {"serve", "core"},
    "core": {"core"},
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. serve.api
    path: str  # its file, relative to the root
    line: int
    text: str  # the statement as written
    target: str  # the most specific project module it names, e.g. serve.gateway
    at_import_time: bool  # runs when `module` is imported (not in a function or TYPE_CHECKING block)


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the project packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(body: list[ast.stmt], at_import_time: bool):
    """Yield (import statement, whether it runs at import time), descending into every nested block."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, at_import_time
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield from _statements(node.body, False)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _statements(node.body, False)
            yield from _statements(node.orelse, at_import_time)
        else:
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                children = getattr(node, field, None) or []
                yield from _statements(
                    [c for c in children if isinstance(c, ast.stmt)]
                    + [s for c in children if not isinstance(c, ast.stmt) for s in getattr(c, "body", [])],
                    at_import_time,
                )


def imports_of(module: str, path: Path, root: Path, known: set[str]) -> list[Import]:
    """The project imports of one file; relative imports are resolved to absolute names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    rel = str(path.relative_to(root))
    out = []
    for node, at_import_time in _statements(tree.body, True):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import sub` names the submodule when there is one, else the package itself
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        text = ast.unparse(node)
        for name in dict.fromkeys(names):
            if name.split(".")[0] not in PACKAGES:
                continue
            target = name
            while target not in known and "." in target:  # `import core.schema.Job`-style: nearest module
                target = target.rpartition(".")[0]
            out.append(Import(module, rel, node.lineno, text, target, at_import_time))
    return out


def all_imports(root: Path) -> list[Import]:
    files = module_files(root)
    return [i for module, path in files.items() for i in imports_of(module, path, root, set(files))]


def layer_violations(imports: list[Import]) -> list[str]:
    out = []
    for i in imports:
        stage, other = i.module.split(".")[0], i.target.split(".")[0]
        if other not in ALLOWED[stage]:
            out.append(f"{i.path}:{i.line}: `{i.text}` ({stage} may import only {', '.join(sorted(ALLOWED[stage]))})")
    return out


def cycles(imports: list[Import]) -> list[str]:
    """One description per import cycle (strongly connected component) among import-time edges."""
    edges: dict[str, dict[str, Import]] = {}
    for i in imports:
        if i.at_import_time and i.target != i.module:
            edges.setdefault(i.module, {}).setdefault(i.target, i)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graph is small, recursion depth is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    out = []
    for component in components:
        members = set(component)
        lines = [
            f"  {i.path}:{i.line}: `{i.text}`"
            for v in component
            for w, i in sorted(edges.get(v, {}).items())
            if w in members
        ]
        out.append(f"cycle between {', '.join(component)}:\n" + "\n".join(lines))
    return out


def test_imports_point_down_only():
    problems = layer_violations(all_imports(ROOT))
    assert not problems, "imports across stages:\n" + "\n".join(problems)


def test_no_import_cycles_at_import_time():
    problems = cycles(all_imports(ROOT))
    assert not problems, "import cycles:\n" + "\n".join(problems)


def test_the_checks_see_nested_relative_and_type_checking_imports(tmp_path):
    def write(rel: str, text: str) -> None:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    for package in PACKAGES:
        write(f"{package}/__init__.py", "")
    write(
        "core/low.py",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from serve.top import X\n",
    )
    write("core/deep.py", "def f():\n    try:\n        import evaluate.a\n    finally:\n        pass\n")
    write("serve/a.py", "from . import b\n")  # relative, module level
    write("serve/b.py", "from serve.a import thing\n")  # closes a -> b -> a
    write("serve/c.py", "def late():\n    from serve import d\n")  # function body: no cycle
    write("serve/d.py", "import serve.c\nfrom finetune import recipe\n")  # sideways
    write("tuneops/ok.py", "import core.low, serve.a, finetune\n")
    found = all_imports(tmp_path)
    layers = layer_violations(found)
    assert [p.split(": ")[0] for p in layers] == ["core/deep.py:3", "core/low.py:3", "serve/d.py:2"]
    assert "`from serve.top import X`" in layers[1]
    found_cycles = cycles(found)
    assert len(found_cycles) == 1 and found_cycles[0].startswith("cycle between serve.a, serve.b:")
    assert "serve/a.py:1: `from . import b`" in found_cycles[0]
    assert "serve/b.py:1: `from serve.a import thing`" in found_cycles[0]
