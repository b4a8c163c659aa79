"""distill: knowledge distillation for language models — teacher rationales in Ray workers, small
students, quantized ONNX for edge runtimes.

The Python API (``distill.run``, one function per stage) is loaded on first use, so ``import
distill`` stays light: the libraries (``distill.teachers``, ``distill.students``,
``distill.export``) and ``distill --help`` do not pull in the recipe machinery, torch or Ray.
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = {
    "run": "distill.api",
    "generate": "distill.api",
    "train": "distill.api",
    "export_student": "distill.api",
    "evaluate": "distill.api",
    "recipe_of": "distill.api",
    "RunResult": "distill.pipeline",
    "StageResult": "distill.pipeline",
    "Recipe": "distill.config",
    "load_recipe": "distill.config",
    "DistillError": "distill.core.errors",
    "PartialRun": "distill.teachers.budget",
    "RunFolderBusy": "distill.core.locks",
    "set_env_defaults": "distill.core.env",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'distill' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
