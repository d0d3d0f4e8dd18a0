"""The packages import on their own, and ``optimizers`` and ``kernels`` depend on each other one way only.

Why: the learned optimizer's step has two implementations (PyTorch in ``optimizers.learned``, Triton in
``kernels``) that must agree on one specification. When the kernels imported ``optimizers.learned`` and
``optimizers.learned`` imported the kernels, the cycle only held because both sides imported inside
functions; a change on either side could break the other at a distance. The rule checked here:

* ``optimizers.lo_spec`` (the specification) is a leaf: it imports torch and the standard library only;
* no module of ``kernels/`` imports a module of ``optimizers/`` other than the specification;
* no module of ``optimizers/`` imports ``kernels``: the optimizers reach the fused step through the
  specification's interface (``StepBackend``) and its one accessor, ``optimizers.lo_spec.step_backend``,
  the only place that names the package (``importlib.import_module("kernels")``);
* without an importable ``kernels`` package, that accessor refuses the fused step with a reason and the
  learned optimizer takes its PyTorch step.

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


def test_no_module_of_optimizers_imports_kernels():
    offending = {}
    for path in _modules("optimizers"):
        kernel_imports = sorted(m for m in _imports(path) if _in(m, "kernels"))
        if kernel_imports:
            offending[_module_name(path)] = kernel_imports
    assert not offending, (f"optimizers/ modules importing kernels/ (use {SPEC}.step_backend() instead): "
                           f"{offending}")


def _dynamic_imports(source: str) -> list[tuple[str, str | None]]:
    """``(enclosing function, first argument if a string literal)`` of every ``import_module`` /
    ``__import__`` call in ``source`` (module level: enclosing function ``""``)."""
    out = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            if isinstance(child, ast.Call):
                f = child.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if called in ("import_module", "__import__"):
                    arg = child.args[0] if child.args else None
                    literal = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None
                    out.append((function, literal))
            visit(child, function)

    visit(ast.parse(source), "")
    return out


def test_the_one_dynamic_import_of_kernels_is_the_specification_accessor():
    """A dynamic import would hide an edge from the AST walk above: in optimizers/, the only one that
    names ``kernels`` is ``lo_spec.step_backend``, and the only one with a computed name is the
    package's lazy exports, whose table names modules of ``optimizers`` only."""
    found = {}
    for path in _modules("optimizers"):
        for function, literal in _dynamic_imports(path.read_text()):
            if literal is None or _in(literal, "kernels"):
                found.setdefault(_module_name(path), []).append((function, literal))
    assert found == {SPEC: [("step_backend", "kernels")], "optimizers": [("__getattr__", None)]}, found
    import optimizers

    assert all(_in(module, "optimizers") for module in optimizers._EXPORTS.values()), optimizers._EXPORTS
    # the scan itself sees such calls (else the assertion above could pass on an empty walk)
    probe = "import importlib\ndef f(name):\n    importlib.import_module('kernels.x')\n    __import__(name)\n"
    assert _dynamic_imports(probe) == [("f", "kernels.x"), ("f", None)]


def test_the_accessor_returns_the_kernels_backend():
    import torch

    import kernels
    from optimizers.lo_spec import StepBackend, step_backend

    backend = step_backend()
    assert backend is kernels.STEP_BACKEND
    for name in ("refusal", "unsupported", "step", "step_autograd"):  # the interface, all of it
        assert callable(getattr(backend, name)) and hasattr(StepBackend, name), name
    cpu = torch.device("cpu")
    assert backend.refusal(False, cpu) == kernels.kernel_refusal(False, cpu) == "kernels=False"


FALLBACK = """
import sys
sys.modules["kernels"] = None  # `import kernels` now raises ImportError, as without the package
import torch
from optimizers.learned import LearnedOptimizer, LOConfig
from optimizers.lo_spec import UnavailableBackend, step_backend

backend = step_backend()
assert isinstance(backend, UnavailableBackend), backend
cpu = torch.device("cpu")
for requested in (None, True):
    reason = backend.refusal(requested, cpu)
    assert reason and "kernels package cannot be imported" in reason, reason
assert backend.refusal(False, cpu) == "kernels=False"

def run(kernels):
    lopt = LearnedOptimizer(LOConfig())
    theta = lopt.init_theta(0)
    gen = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}
    bound = lopt.bind(theta, kernels=kernels)
    state = bound.init(params, total_steps=10)
    grads = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
    if kernels is not False:
        assert "kernels package cannot be imported" in bound.kernel_reason(grads, state, params)
    new_params, _ = bound.update(grads, state, params)
    assert all(not torch.equal(new_params[k], params[k]) for k in params)  # a step was taken
    return new_params

fallback = {k: run(k) for k in (None, True)}
assert "kernels" not in sys.modules or sys.modules["kernels"] is None
del sys.modules["kernels"]  # the package back: the PyTorch step with the kernels turned off must agree
import optimizers.lo_spec
optimizers.lo_spec._step_backend = None  # forget the fallback
import kernels
assert step_backend() is kernels.STEP_BACKEND
plain = run(False)
for got in fallback.values():
    assert got.keys() == plain.keys()
    for k in plain:
        assert torch.equal(got[k], plain[k]), k
print("ok")
"""


def test_without_the_kernels_package_the_learned_optimizer_takes_the_pytorch_step():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUROBOROS_KERNELS")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", FALLBACK], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


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
