"""The package's shape as assertions. The product never imports the lab: what the server loads
imports only serving modules, and the lab (ssjf_tools) and the client (ssjf_client) are separate
packages the product never names. Inside the product: a flat serving core (plus config, server
and cli) and three wings, `runners/` (batched generation behind one seam), `kernels/` (C kernels
and the matrix-product dispatcher) and `proxy/` (the length predictor and its learner), with no
import cycle anywhere, counting imports inside functions."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python_backend" / "ssjf"
TOOLS = ROOT / "tools" / "ssjf_tools"
WINGS = ("ssjf.runners", "ssjf.kernels", "ssjf.proxy")
# what tritonserver loads: the model.py files and the serving modules they reach
PRODUCT = {"ssjf", "ssjf.config", "ssjf.request", "ssjf.policy", "ssjf.scheduler", "ssjf.detokenizer", "ssjf.engine",
           "ssjf.serving", "ssjf.metrics", "ssjf.responder", "ssjf.cpus", "ssjf.assets", "ssjf.server", "ssjf.cli",
           "ssjf.gate", "ssjf.openai_api",
           "ssjf.runners", "ssjf.runners.base", "ssjf.runners.vllm", "ssjf.runners.torch", "ssjf.runners.torch.model", "ssjf.runners.torch.graphs",
           "ssjf.runners.torch.runner",
           "ssjf.kernels", "ssjf.kernels.linear",
           "ssjf.proxy", "ssjf.proxy.encoder", "ssjf.proxy.head", "ssjf.proxy.predictor", "ssjf.proxy.learner"}


def module_name(path: Path, root: Path = PACKAGE, top: str = "ssjf") -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([top, *parts])


def is_package(name: str) -> bool:
    return (PACKAGE.joinpath(*name.split(".")[1:]) / "__init__.py").exists() if name != "ssjf" else True


def imports(path: Path, package: str) -> set[str]:
    """The modules `path` imports anywhere in it (functions included), resolved to full names;
    `package` is the package a relative import is relative to."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for a in node.names:  # `from pkg import module` imports the module
                full = f"{base}.{a.name}"
                names.add(full if full in PRODUCT or (base.startswith("ssjf") and full.startswith("ssjf") and
                                                      (PACKAGE.joinpath(*full.split(".")[1:]).with_suffix(".py").exists()
                                                       or (PACKAGE.joinpath(*full.split(".")[1:]) / "__init__.py").exists()))
                          else base)
    return names


def package_of(path: Path) -> str:
    name = module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def product_graph() -> dict[str, set[str]]:
    return {module_name(p): {n for n in imports(p, package_of(p)) if n.startswith("ssjf.") or n == "ssjf"}
            for p in PACKAGE.rglob("*.py")}


def product_files() -> list[Path]:
    return sorted(ROOT.glob("model_repository/*/1/model.py")) + sorted(PACKAGE.rglob("*.py"))


def test_the_serving_package_holds_only_the_product():
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    assert modules == PRODUCT, modules ^ PRODUCT


def test_the_product_imports_nothing_from_the_lab_or_the_client():
    for path in product_files():
        found = imports(path, package_of(path) if PACKAGE in path.parents else "ssjf")
        bad = {n for n in found if n.split(".")[0] in ("ssjf_tools", "ssjf_client")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
        unknown = {n for n in found if n.startswith("ssjf.") and n not in PRODUCT}
        assert not unknown, f"{path.relative_to(ROOT)} imports {sorted(unknown)}"


def test_no_import_cycle_in_the_product():
    graph = product_graph()
    done, path = set(), []

    def visit(name):
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        path.append(name)
        for dep in sorted(graph.get(name, ())):
            if dep != name and not name.startswith(dep + "."):  # a module's own package runs first, not an edge
                visit(dep)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_the_wings_keep_to_their_rooms():
    """The core reaches a runner only through the registry and the seam; a runner never imports
    the proxy, nor the proxy a runner; the kernels import neither; the proxy serves only (its
    training and the lab's embedding cache live in ssjf_tools)."""
    graph = product_graph()
    wing = lambda n: next((w for w in WINGS if n == w or n.startswith(w + ".")), "core")  # noqa: E731
    for name, deps in graph.items():
        for dep in deps:
            if wing(name) == "core" and dep.startswith("ssjf.runners."):
                assert dep == "ssjf.runners.base", f"{name} imports {dep}: the core goes through ssjf.runners"
            if wing(name) == "ssjf.runners":
                assert wing(dep) != "ssjf.proxy", f"{name} imports {dep}"
            if wing(name) == "ssjf.proxy":
                assert wing(dep) != "ssjf.runners", f"{name} imports {dep}"
            if wing(name) == "ssjf.kernels":
                assert wing(dep) not in ("ssjf.runners", "ssjf.proxy"), f"{name} imports {dep}"
    for path in (PACKAGE / "proxy").glob("*.py"):
        text = path.read_text()
        for training in ("torch.optim", "requires_grad = True", "save_artifact", "encode_cached", "LoRALinear"):
            assert training not in text, f"{path.relative_to(ROOT)} holds training code ({training})"


def test_the_lab_is_a_package_of_its_own():
    assert (TOOLS / "__init__.py").exists()
    for path in TOOLS.glob("*.py"):
        found = imports(path, "ssjf_tools")
        assert not {n for n in found if n.startswith("ssjf.") and n not in PRODUCT}, path.name


def test_nothing_finds_files_relative_to_the_source_tree():
    for path in [*PACKAGE.rglob("*.py"), *TOOLS.glob("*.py"), *ROOT.glob("client/ssjf_client/*.py")]:
        assert "parents[" not in path.read_text(), f"{path.relative_to(ROOT)} finds files through parents[...]"


def test_only_the_config_module_reads_the_environment():
    readers = []
    for path in [*PACKAGE.rglob("*.py"), *ROOT.glob("model_repository/*/1/model.py"), ROOT / "loadtest" / "locustfile.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "getenv") \
                    and isinstance(node.func.value, (ast.Attribute, ast.Name)) \
                    and getattr(node.func.value, "attr", getattr(node.func.value, "id", "")) in ("environ", "os"):
                readers.append(path.name)
            elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "environ" \
                    and isinstance(node.ctx, ast.Load):
                readers.append(path.name)
    assert set(readers) <= {"config.py"}, readers


def test_no_function_in_the_product_is_over_60_lines():
    long = []
    for path in product_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_no_block_of_six_lines_is_repeated_in_the_product():
    """Six or more lines of code (stripped, blank and comment lines left out) that occur twice,
    in one file or two, Python and C alike: say it once."""
    trivial = {"", "}", ")", "]", "{", "else:", "try:", "return", "return out", "@property", "@staticmethod"}
    seen: dict[tuple, str] = {}
    repeated = []
    for path in sorted(p for p in (ROOT / "python_backend").rglob("*") if p.suffix in (".py", ".c", ".h")):
        lines = [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), 1)]
        code = [(n, s) for n, s in lines if s not in trivial and not s.startswith(("#", "//", "*", "/*", '"""'))]
        for i in range(len(code) - 5):
            block = tuple(s for _, s in code[i : i + 6])
            where = f"{path.relative_to(ROOT)}:{code[i][0]}"
            if block in seen:
                repeated.append(f"{where} repeats {seen[block]}")
            seen.setdefault(block, where)
    assert not repeated, repeated
