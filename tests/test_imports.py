"""No import cycles: the import graph of slimtorch (module level and inside functions) has no
cycle, every module imports on its own in a fresh interpreter, and the leaf modules stay leaves
(they import nothing heavy, so anything may import them)."""
import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import slimtorch

SRC = Path(slimtorch.__file__).parent
# leaf modules: what they may import from slimtorch (nothing else of it, and never torch)
LEAVES = {"slimtorch.errors": set(), "slimtorch._version": set(),
          "slimtorch.methods": {"slimtorch.errors"},
          "slimtorch.quant.granularity": set(),
          "slimtorch.quant.spec": {"slimtorch.quant.granularity"}}

# Each module in a fresh interpreter state as far as slimtorch goes: a child process imports
# the third-party libraries (not slimtorch), then forks once per module, so every module is
# imported with no other slimtorch module loaded, without paying torch's import each time.
CHILD = r"""
import importlib, os, sys, traceback
for lib in ("torch", "numpy", "pydantic", "yaml", "safetensors.torch", "tqdm.auto",
            "rich.console", "rich.table", "onnx"):
    try:
        importlib.import_module(lib)
    except ImportError:
        pass
assert not [m for m in sys.modules if m.startswith("slimtorch")]
bad = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        bad.append(name)
print("FAILED:" + ",".join(bad))
"""


def all_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(SRC)], "slimtorch."))


def test_every_module_imports_alone_in_a_fresh_interpreter():
    mods = all_modules()
    assert len(mods) > 50 and "slimtorch.algorithms.qdrop" in mods
    out = subprocess.run([sys.executable, "-c", CHILD, *mods], capture_output=True, text=True,
                         timeout=240, cwd=SRC.parent)
    failed = out.stdout.strip().rpartition("FAILED:")[2]
    assert out.returncode == 0 and failed == "", (failed, out.stderr[-3000:])


def import_graph() -> dict[str, set[str]]:
    """{module: slimtorch modules it names in an import statement, anywhere in the file}."""
    files = {(".".join(p.relative_to(SRC.parent).with_suffix("").parts)
              .removesuffix(".__init__")): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[:len(pkg.split(".")) - max(0, node.level - 1)]
                target = (".".join(base + [node.module] if node.module else base)
                          if node.level else node.module or "")
                deps |= {f"{target}.{a.name}" if f"{target}.{a.name}" in files else target
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_import_graph_has_no_cycle():
    graph, state, cycles = import_graph(), {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_leaf_modules_import_nothing_heavy():
    code = ("import sys, importlib; importlib.import_module(sys.argv[1]); "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('slimtorch', "
            "'torch')))))")
    for leaf, allowed in LEAVES.items():
        out = subprocess.run([sys.executable, "-c", code, leaf], capture_output=True,
                             text=True, timeout=60, cwd=SRC.parent, check=True)
        loaded = set(out.stdout.split()) - {leaf}
        parents = {p for m in allowed | {leaf} for p in _parents(m)} | {"slimtorch._version"}
        assert loaded <= allowed | parents, (leaf, loaded - allowed - parents)


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]
