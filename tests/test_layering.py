"""The product never imports the lab: what the server loads imports only serving modules."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python_backend" / "ssjf"
# what tritonserver loads: the model.py files and the serving modules they reach
PRODUCT = {"ssjf", "ssjf.config", "ssjf.request", "ssjf.policy", "ssjf.scheduler", "ssjf.runner", "ssjf.model_runner",
           "ssjf.vllm_runner", "ssjf.detokenizer", "ssjf.engine", "ssjf.serving", "ssjf.metrics", "ssjf.responder",
           "ssjf.cpus", "ssjf.proxy", "ssjf.assets", "ssjf.server", "ssjf.cli"}
LAB = {"ssjf.train_proxy", "ssjf.eval_proxy", "ssjf.profile", "ssjf.bench_engine", "ssjf.data", "ssjf.report"}


def imports(path: Path, package: str = "ssjf") -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = package + ("." + base if base else "")
                names.update(f"{base}.{a.name}" if f"{base}.{a.name}" in PRODUCT | LAB else base for a in node.names)
            else:
                names.add(base)
    return names


def product_files() -> list[Path]:
    files = sorted(ROOT.glob("model_repository/*/1/model.py"))
    files += [PACKAGE / ("__init__.py" if m == "ssjf" else m.split(".", 1)[1] + ".py") for m in PRODUCT]
    return files


def test_every_module_is_either_product_or_lab():
    modules = {"ssjf" if p.stem == "__init__" else f"ssjf.{p.stem}" for p in PACKAGE.glob("*.py")}
    assert modules == PRODUCT | LAB, modules ^ (PRODUCT | LAB)


def test_the_product_imports_nothing_from_the_lab():
    for path in product_files():
        found = imports(path)
        bad = {n for n in found if n.startswith("ssjf_client") or n in LAB}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
        unknown = {n for n in found if n.startswith("ssjf.") and n not in PRODUCT}
        assert not unknown, f"{path.relative_to(ROOT)} imports {sorted(unknown)}"
