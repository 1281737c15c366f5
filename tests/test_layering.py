"""The product never imports the lab: what the server loads imports only serving modules, and the
lab (ssjf_tools) and the client (ssjf_client) are separate packages the product never names."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python_backend" / "ssjf"
TOOLS = ROOT / "tools" / "ssjf_tools"
# what tritonserver loads: the model.py files and the serving modules they reach
PRODUCT = {"ssjf", "ssjf.config", "ssjf.request", "ssjf.policy", "ssjf.scheduler", "ssjf.runner", "ssjf.model_runner",
           "ssjf.vllm_runner", "ssjf.detokenizer", "ssjf.engine", "ssjf.serving", "ssjf.metrics", "ssjf.responder",
           "ssjf.cpus", "ssjf.kernels", "ssjf.proxy", "ssjf.assets", "ssjf.server", "ssjf.cli", "ssjf.learner", "ssjf.gate", "ssjf.openai_api"}


def imports(path: Path, package: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = package + ("." + base if base else "")
                names.update(f"{base}.{a.name}" if f"{base}.{a.name}" in PRODUCT else base for a in node.names)
            else:
                names.add(base)
    return names


def product_files() -> list[Path]:
    files = sorted(ROOT.glob("model_repository/*/1/model.py"))
    files += [PACKAGE / ("__init__.py" if m == "ssjf" else m.split(".", 1)[1] + ".py") for m in PRODUCT]
    return files


def test_the_serving_package_holds_only_the_product():
    modules = {"ssjf" if p.stem == "__init__" else f"ssjf.{p.stem}" for p in PACKAGE.glob("*.py")}
    assert modules == PRODUCT, modules ^ PRODUCT


def test_the_product_imports_nothing_from_the_lab_or_the_client():
    for path in product_files():
        found = imports(path, "ssjf")
        bad = {n for n in found if n.split(".")[0] in ("ssjf_tools", "ssjf_client")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
        unknown = {n for n in found if n.startswith("ssjf.") and n not in PRODUCT}
        assert not unknown, f"{path.relative_to(ROOT)} imports {sorted(unknown)}"


def test_the_lab_is_a_package_of_its_own():
    assert (TOOLS / "__init__.py").exists()
    for path in TOOLS.glob("*.py"):
        found = imports(path, "ssjf_tools")
        assert not {n for n in found if n.startswith("ssjf.") and n not in PRODUCT}, path.name


def test_nothing_finds_files_relative_to_the_source_tree():
    for path in [*PACKAGE.glob("*.py"), *TOOLS.glob("*.py"), *ROOT.glob("client/ssjf_client/*.py")]:
        assert "parents[" not in path.read_text(), f"{path.relative_to(ROOT)} finds files through parents[...]"


def test_only_the_config_module_reads_the_environment():
    readers = []
    for path in [*PACKAGE.glob("*.py"), *ROOT.glob("model_repository/*/1/model.py"), ROOT / "loadtest" / "locustfile.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "getenv") \
                    and isinstance(node.func.value, (ast.Attribute, ast.Name)) \
                    and getattr(node.func.value, "attr", getattr(node.func.value, "id", "")) in ("environ", "os"):
                readers.append(path.name)
            elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "environ" \
                    and isinstance(node.ctx, ast.Load):
                readers.append(path.name)
    assert set(readers) <= {"config.py"}, readers
