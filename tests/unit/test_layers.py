"""The layout holds: one `distill` namespace, imports pointing down only, no cycles."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_import_contracts_hold():
    """import-linter's layers, stage-independence and acyclic contracts (pyproject.toml), as in `make lint`."""
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe)] if exe.exists() else [shutil.which("lint-imports") or "lint-imports"]
    out = subprocess.run([*cmd, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 3 kept, 0 broken." in out.stdout


def test_only_the_distill_namespace_is_importable_and_every_module_imports(tmp_path):
    """From outside the checkout: no top-level teachers/students/export, and every distill module
    (libraries included) imports under its distill.* name."""
    code = """
import importlib, importlib.util, pkgutil, sys
assert [importlib.util.find_spec(n) for n in ("teachers", "students", "export")] == [None] * 3
import distill
names = sorted(m.name for m in pkgutil.walk_packages(distill.__path__, "distill.") if m.name != "distill.__main__")
for n in names:
    importlib.import_module(n)
print(len(names), sorted({n.split(".")[1] for n in names}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    count, packages = out.stdout.split(" ", 1)
    assert int(count) > 50
    assert all(p in packages for p in ("'core'", "'teachers'", "'students'", "'export'", "'stages'"))


def test_importing_distill_or_a_library_does_not_load_the_app():
    """``import distill`` and the libraries stay light: no recipe, pipeline, torch or Ray until asked."""
    code = (
        "import sys, distill, distill.teachers.cache, distill.teachers.methods, distill.export.runtime\n"
        "print(sorted(m for m in ('distill.config', 'distill.pipeline', 'distill.api', 'torch', 'ray') if m in sys.modules))\n"
        "print(distill.__version__, distill.run.__module__, 'distill.pipeline' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    loaded, api = out.stdout.splitlines()
    assert loaded == "[]"
    from importlib.metadata import version

    assert api == f"{version('distill')} distill.api True"
