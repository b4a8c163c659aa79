"""Bad-input survey (issue #19): every broken input a user reported, through the real CLI, one
subprocess each; prints the case, the exit code, the number of `error:` lines, whether anything was
left in the run folder, and the line itself. Exits 1 when a case breaks the contract (exit 2, one
error line, nothing left behind), so it doubles as a check.

    python bench/bad_inputs.py            # markdown table on stdout

Replay teachers and files only: no model is loaded, the whole survey takes about a minute.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.core.env import set_env_defaults  # noqa: E402

set_env_defaults()


def _problems(n: int = 14) -> list[dict]:
    return [{"question": f"What is {i} plus {i % 3}?", "answer": str(i + i % 3)} for i in range(n)]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _recipe(root: Path, task: Path | None = None, teacher: Path | None = None, **top) -> Path:
    import yaml

    task = task or _jsonl(root / "task.jsonl", _problems())
    records = [
        {"question": p["question"], "rationale": f"It is {p['answer']}.", "answer": p["answer"]} for p in _problems()
    ]
    teacher = teacher or _jsonl(root / "teacher.jsonl", records)
    recipe = {
        "name": "bad",
        "output_dir": str(root / "runs"),
        "cache": str(root / "cache.sqlite"),
        "task": {"source": "file", "name": str(task), "train_size": 10, "eval_size": 4},
        "teacher": {"model": f"replay:{teacher}", "executor": "local", "keep": "all"},
        **top,
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def cases(root: Path) -> list[tuple[str, list[str]]]:
    """(what the user did, the distill command line) for every reported case."""
    out = []

    def case(name: str, make) -> None:
        folder = root / f"case{len(out)}"
        folder.mkdir()
        out.append((name, make(folder)))

    case("broken .json task file", lambda d: ["generate", str(_recipe(d, task=_write(d / "t.json", '{"examples": [')))])
    case(
        "JSONL task of bare numbers",
        lambda d: ["generate", str(_recipe(d, task=_jsonl(d / "t.jsonl", ["1", "2", "3"] * 6)))],
    )
    case(
        "task row without an answer",
        lambda d: ["generate", str(_recipe(d, task=_jsonl(d / "t.jsonl", [{"question": "q?"}] * 18)))],
    )
    case(
        "replay JSONL with one broken line",
        lambda d: [
            "generate",
            str(
                _recipe(
                    d,
                    teacher=_write(
                        d / "r.jsonl",
                        '{"question": "What is 0 plus 0?", "rationale": "x", "answer": "0"}\n{"question": \n',
                    ),
                )
            ),
        ],
    )
    case(
        "non-UTF-8 replay log",
        lambda d: ["generate", str(_recipe(d, teacher=_write_bytes(d / "r.log", b"Q: caf\xe9\nA: 1\n")))],
    )
    case(
        "replay covering none of the questions",
        lambda d: [
            "generate",
            str(_recipe(d, teacher=_jsonl(d / "r.jsonl", [{"question": "Q?", "rationale": "r", "answer": "1"}]))),
        ],
    )
    case("output_dir is a file", lambda d: ["generate", str(_recipe(d, output_dir=str(_write(d / "afile", "x"))))])
    case("empty recipe file", lambda d: ["generate", str(_write(d / "empty.yaml", ""))])
    case("YAML syntax error in the recipe", lambda d: ["generate", str(_write(d / "bad.yaml", "task:\n  name: [x\n"))])
    case("unknown recipe key", lambda d: ["generate", str(_recipe(d)), "student.epoch=1"])
    case(
        "override whose ':' made it a mapping",
        lambda d: ["generate", str(_recipe(d)), "teacher.system_prompt=Answer: short"],
    )
    case("task file that does not exist", lambda d: ["generate", str(_recipe(d, task=d / "missing.jsonl"))])
    return out


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def main() -> int:
    bad = 0
    rows = ["| case | exit | `error:` lines | left in runs/ | the line |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, argv in cases(root):
            folder = Path(argv[1]).parent
            r = subprocess.run(
                [sys.executable, "-m", "distill", *argv], capture_output=True, text=True, cwd=folder, timeout=300
            )
            lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("error:")]
            runs = folder / "runs"
            left = sorted(str(p.relative_to(runs)) for p in runs.rglob("*")) if runs.exists() else []
            ok = r.returncode == 2 and len(lines) == 1 and not left and "Traceback" not in r.stderr
            bad += not ok
            line = (lines[0] if lines else (r.stdout + r.stderr).strip().splitlines()[-1]).replace(str(root), "…")
            rows.append(
                f"| {name} | {r.returncode} | {len(lines)} | {', '.join(left) or 'nothing'} | {line.replace('|', '/')} |"
            )
    print("\n".join(rows))
    print(f"\n{len(rows) - 2 - bad} of {len(rows) - 2} cases keep the contract (exit 2, one line, nothing left)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
