"""The packages import on their own, and ``optimizers`` and ``kernels`` depend on each other one way only.

Why: the learned optimizer's step has two implementations (PyTorch in ``optimizers.learned``, Triton in
``kernels``) that must agree on one specification. When the kernels imported ``optimizers.learned`` and
``optimizers.learned`` imported the kernels, the cycle only held because both sides imported inside
functions; a change on either side could break the other at a distance. The rule checked here:

* ``optimizers.lo_spec`` (the specification) is a leaf: it imports torch and the standard library only;
* no module of ``kernels/`` imports a module of ``optimizers/`` other than the specification;
* of ``optimizers/``, only the front ends that dispatch a step to the kernels import ``kernels``.

Every ``import`` statement counts, including those inside functions (the AST is walked, not the
modules' imported state), so a function-local import cannot hide an edge.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("optimizers", "kernels", "meta", "tasks")
SPEC = "optimizers.lo_spec"
# the modules of optimizers/ that hand a step to the kernels (the learned optimizer's update and the
# torch.optim drop-in's in-place step); any other import of kernels from optimizers/ is a new edge
DISPATCHERS = {"optimizers.learned", "optimizers.torch_optim"}
REPO_PACKAGES = set(PACKAGES) | {"bench", "train", "tests"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file: ``from a import b`` counts as ``a.b`` when
    ``b`` is a submodule of the repository, else as ``a``."""
    return _imports_in(path.read_text(), _module_name(path), path.name == "__init__.py")


def _imports_in(source: str, name: str, is_package: bool) -> set[str]:
    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                parts = package.split(".")
                module = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [f"{module}.{alias.name}" for alias in node.names if alias.name != "*"]
            out.update(names)
            if not names or not all(_existing(n) for n in names):  # names defined by the module itself
                out.add(module)
    return out


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _existing(module: str) -> bool:
    """Whether ``module`` names a module of the repository (``from a import name`` adds ``a.name``,
    which is a module only when such a file or package exists)."""
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_in_isolation(package):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUROBOROS_KERNELS")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", f"import {package}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"import {package} failed:\n{proc.stderr[-3000:]}"


def test_spec_module_imports_nothing_else_of_the_repository():
    code = ("import sys, optimizers.lo_spec; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(REPO_PACKAGES)!r}))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # besides itself, only the user-error base class, a module that imports nothing at all
    assert proc.stdout.split() == ["['optimizers',", "'optimizers.errors',", "'optimizers.lo_spec']"], proc.stdout
    spec_imports = _imports(ROOT / "optimizers" / "lo_spec.py")
    assert {m for m in spec_imports if m.split(".")[0] in REPO_PACKAGES} <= {"optimizers.errors",
                                                                           "optimizers.errors.UserError"}, spec_imports
    assert not {m for m in _imports(ROOT / "optimizers" / "errors.py") if m.split(".")[0] in REPO_PACKAGES}


def test_kernels_import_only_the_specification_of_optimizers():
    offending = {}
    for path in _modules("kernels"):
        # the package itself counts too: its names load the learned optimizer and the drop-in
        bad = sorted(m for m in _imports(path) if _in(m, "optimizers") and m != SPEC and _existing(m))
        if bad:
            offending[_module_name(path)] = bad
    assert not offending, f"kernels/ modules importing optimizers/ beyond {SPEC}: {offending}"


def test_optimizers_import_kernels_only_where_they_dispatch_a_step():
    offending = {}
    for path in _modules("optimizers"):
        name = _module_name(path)
        kernel_imports = sorted(m for m in _imports(path) if _in(m, "kernels"))
        if kernel_imports and (name not in DISPATCHERS or name == SPEC):
            offending[name] = kernel_imports
    assert not offending, f"optimizers/ modules importing kernels/ (allowed: {sorted(DISPATCHERS)}): {offending}"


def test_the_import_walk_sees_function_local_and_relative_imports():
    """The checks above would pass vacuously if the walk missed imports inside functions."""
    source = (
        "import torch\n"
        "def step():\n"
        "    from optimizers.learned import LOConfig\n"
        "    if True:\n"
        "        import optimizers.torch_optim\n"
        "class K:\n"
        "    def f(self):\n"
        "        from ..optimizers import lo_spec\n"
        "        from . import lo_step_triton\n"
    )
    found = _imports_in(source, "kernels.probe", is_package=False)
    assert {"optimizers.learned", "optimizers.torch_optim", "optimizers.lo_spec",
            "kernels.lo_step_triton"} <= found, found
