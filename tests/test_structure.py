"""The package's import graph (every .py under wmjax/, pallas_kernels/ and train/, parsed with `ast`, imports inside
functions included): dependencies run one way, train -> wmjax -> pallas_kernels; no cycles among the modules; no
import inside a function or class except of an optional package (ALLOWED_LAZY)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("pallas_kernels", "wmjax", "train")
# may not be imported by a module of the key package, at any depth of the module
FORBIDDEN = {"pallas_kernels": ("wmjax", "train", "bench"), "wmjax": ("train", "bench"), "train": ("bench",),
             # inside the library: layers -> models -> convert (the converter reads the models' registry; a model
             # or layer never imports the converter or a model)
             "wmjax.layers": ("wmjax.models", "wmjax.convert", "wmjax.sampling", "wmjax.sample"),
             "wmjax.models": ("wmjax.convert", "wmjax.sampling", "wmjax.sample")}
# optional packages (not in pyproject's dependencies, or heavy and needed by one command only): the only imports
# allowed inside a function
ALLOWED_LAZY = ("torch", "transformers", "tokenizers", "matplotlib", "lm_eval")


def _modules(root):
    """{dotted name: (ast tree, is_package)} for every .py file of PACKAGES under root."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_package else parts)] = (ast.parse(path.read_text(), str(path)), is_package)
    return out


def _imports(name, tree, is_package, known):
    """[(imported module, line, inside a function or class)] of one module: `import a.b` -> a.b; `from a import b`
    -> a.b when that is a module of the tree, else a; relative imports resolved against the module's package."""
    package = name if is_package else name.rpartition(".")[0]
    found = []

    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, nested) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    found.append((full if full in known else base, child.lineno, nested))
            visit(child, inner)

    visit(tree, False)
    return found


def _graph(modules):
    return {name: _imports(name, tree, is_pkg, modules) for name, (tree, is_pkg) in modules.items()}


def _cycles(edges):
    """Strongly connected components with more than one module (or a module importing itself), by Tarjan."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def _layer_violations(graph):
    bad = []
    for name, imports in graph.items():
        for target, line, _ in imports:
            rules = [f for key, fs in FORBIDDEN.items() if name == key or name.startswith(key + ".") for f in fs]
            for forbidden in rules:
                if target == forbidden or target.startswith(forbidden + "."):
                    bad.append(f"{name}:{line} imports {target}")
    return bad


def _lazy_violations(graph):
    bad = [f"{name}:{line} imports {target} inside a function" for name, imports in graph.items()
           for target, line, nested in imports if nested and target.split(".")[0] not in ALLOWED_LAZY]
    return list(dict.fromkeys(bad))  # one line per import statement and module


def _in_tree_edges(graph):
    return {name: sorted({t for t, _, _ in imports if t in graph}) for name, imports in graph.items()}


@pytest.fixture(scope="module")
def graph():
    return _graph(_modules(ROOT))


def test_parses_the_whole_tree(graph):
    assert {n.split(".")[0] for n in graph} == set(PACKAGES)
    assert "pallas_kernels.dmattn.reference" in graph and "wmjax.ops.dmattn" in graph


def test_dependencies_run_one_way(graph):
    bad = _layer_violations(graph)
    assert not bad, "\n".join(bad)


def test_no_import_cycles(graph):
    assert _cycles(_in_tree_edges(graph)) == []


def test_no_imports_inside_functions(graph):
    bad = _lazy_violations(graph)
    assert not bad, "\n".join(bad)


def test_checks_catch_what_they_forbid(tmp_path):
    """The checks themselves, on a small fake tree: a kernel importing the library (also inside a function), a
    library module importing train, a two-module cycle and a lazy import of a required package are all found."""
    files = {
        "pallas_kernels/__init__.py": "",
        "pallas_kernels/k.py": "def f():\n    from wmjax import m\n",
        "wmjax/__init__.py": "",
        "wmjax/m.py": "from . import n\nimport train.t\n",
        "wmjax/n.py": "from wmjax.m import x\ndef g():\n    import torch\n    import numpy\n",
        "train/__init__.py": "",
        "train/t.py": "import wmjax\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    g = _graph(_modules(tmp_path))
    assert _layer_violations(g) == ["pallas_kernels.k:2 imports wmjax.m", "wmjax.m:2 imports train.t"]
    assert _cycles(_in_tree_edges(g)) == [["wmjax.m", "wmjax.n"]]
    assert _lazy_violations(g) == ["pallas_kernels.k:2 imports wmjax.m inside a function",
                                   "wmjax.n:4 imports numpy inside a function"]
