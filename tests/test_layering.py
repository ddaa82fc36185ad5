"""The package's import structure: no import circle, and no module importing a layer above its own.

Every import in src/quantload is read with `ast` (module-level and function-local alike: a local import
that exists only to dodge a circle is still a circle). The layers, bottom to top, are the flow of
docs/architecture.md: a module may import its own layer and the layers below it, never one above.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "src"

# (layer name, module prefixes), bottom first. A module belongs to the first layer whose prefix matches
# it exactly or as a dotted parent.
LAYERS = [
    ("foundation", ["quantload.errors", "quantload.ggml_types", "quantload.report", "quantload.transfer"]),
    ("sources", ["quantload.sources"]),
    ("kernels", ["quantload.runtime.kernels"]),
    ("schemes", ["quantload.schemes", "quantload.config"]),
    ("architectures", ["quantload.architectures"]),
    ("runtime", ["quantload.runtime"]),
    ("stages", ["quantload.prepare", "quantload.placement", "quantload.checkpoint_weights", "quantload.engine",
                "quantload.finalize", "quantload.moe_load", "quantload.scheme_fit", "quantload.model_size",
                "quantload.gguf_tokenizer", "quantload.load_setup", "quantload.gguf_load", "quantload.writers",
                "quantload.quantize_model", "quantload.parallel"]),
    ("api", ["quantload.api", "quantload.inspection"]),
    ("surface", ["quantload.cli", "quantload.integrations", "quantload"]),
]


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for p in (ROOT / "quantload").rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _imports(name: str, path: pathlib.Path, mods) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in mods else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {t for t in found if t in mods and t != name}


def _layer(name: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{name} belongs to no layer: add it to LAYERS in {__file__}")


def _graph():
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def test_every_module_has_a_layer():
    for m in _graph():
        _layer(m)


def test_no_module_imports_a_layer_above_its_own():
    bad = [f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})"
           for m, deps in _graph().items() for d in sorted(deps) if _layer(d) > _layer(m)]
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    graph = _graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"
