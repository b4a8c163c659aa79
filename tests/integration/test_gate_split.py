"""The statistical gate through the Python API on tiny real models: a gate split disjoint from training
and evaluation, the paired interval and decision of every variant, variants scored in parallel
processes, and early rejection of a variant that is clearly worse."""

import json

import pytest
from tiny import write_recipe

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gated(tmp_path_factory, tiny_teacher, tiny_student, tiny_task_cfg):
    import distill

    root = tmp_path_factory.mktemp("gate")
    path = write_recipe(
        root,
        "gate",
        tiny_task_cfg,
        teacher={
            "model": f"hf:{tiny_teacher}",
            "max_new_tokens": 16,
            "batch_size": 6,
            "executor": "local",
            "dtype": "float32",
        },
        student={
            "model": f"hf:{tiny_student}",
            "epochs": 2,
            "lr": 3e-3,
            "batch_size": 4,
            "micro_batch_size": 2,
            "max_length": 128,
            "eval_max_new_tokens": 8,
            "eval_batch_size": 8,
        },
        export={
            "variants": ["int8", "int4"],
            "gate_size": 24,
            "gate_rule": "interval",
            "tolerance": 0.2,
            "gate_workers": 2,
        },
    )
    run = distill.run(path)
    return path, run


def test_gate_split_is_disjoint_and_every_variant_has_its_interval(gated, tiny_task_cfg):
    from distill.core.problems import load_problems
    from distill.export.gate import paired_gap

    _, run = gated
    exp = run.stages["export"].metrics
    assert exp["gate_split"] == {"split": "gate", "problems": 24} and exp["gate_rule"] == "interval"
    folder = run.stages["export"].dir / "gate"
    rows = {
        v["preset"]: [json.loads(x) for x in (folder / f"{v['preset']}.jsonl").read_text().splitlines()]
        for v in exp["variants"]
    }
    train, evals = load_problems(tiny_task_cfg)
    gate_questions = [r["question"] for r in rows["fp32"]]
    assert len(gate_questions) == len(set(gate_questions)) == 24
    assert not set(gate_questions) & {p["question"] for p in train + evals}
    ref = [r["correct"] for r in rows["fp32"]]
    for v in exp["variants"]:
        mine = [r["correct"] for r in rows[v["preset"]]]
        lost = sum(a and not b for a, b in zip(ref, mine))
        gained = sum(b and not a for a, b in zip(ref, mine))
        assert (v["lost"], v["gained"], v["n"]) == (lost, gained, len(mine))
        if v["preset"] != "fp32":
            _, low, high = paired_gap(lost, gained, len(mine))
            assert (v["gap_low"], v["gap_high"]) == (low, high)
            kept = low >= -0.2 and v.get("rejected_after") is None
            said = "within tolerance" if kept else "not shown within" if v.get("rejected_after") is None else "rejected"
            assert v["decision"].startswith(f"{v['preset']} {said}")
            print(v["decision"])
    # every variant scored alone in a fresh process: its latency and memory are its own
    for v in exp["variants"]:
        assert v["first_token_ms"] > 0 and 50e6 < v["peak_rss_bytes"] < 4e9, v
    # each its own: not one figure inherited from the parent (which holds the torch student too)
    import resource

    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert all(v["peak_rss_bytes"] < parent for v in exp["variants"]), (parent, exp["variants"])
    assert (
        f"{exp['variants'][0]['peak_rss_bytes'] / 1e6:.0f} MB"
        in (run.stages["export"].dir / "bundle" / "README.md").read_text()
    )
    chosen = next(v for v in exp["variants"] if v["chosen"])
    assert chosen["preset"] == exp["chosen"]
    # the evaluate stage scores the kept file on the eval split itself (the gate saw other problems)
    onnx = json.loads((run.stages["evaluate"].dir / "scores.json").read_text())["student_onnx"]
    assert onnx["n"] == len(evals) and onnx["preset"] == chosen["preset"]
    card = (run.stages["export"].dir / "bundle" / "README.md").read_text()
    assert "Gate (a variant is kept when its interval's lower end is within the tolerance):" in card
    assert all(v["decision"] in card for v in exp["variants"] if v["preset"] != "fp32")


def test_a_clearly_worse_variant_is_rejected_early(gated):
    """Scored against a reference that solved every problem, a tiny student that solves few is
    rejected at the first look (40 problems), without scoring the rest."""
    from distill.core.answers import Task
    from distill.export.gate import score_variant

    _, run = gated
    folder = run.stages["export"].dir / "variants"
    problems = [
        {"id": f"g{i}", "question": f"What is {i % 7} + {i % 5}?", "gold": str(i % 7 + i % 5)} for i in range(64)
    ]
    summary, rows = score_variant(folder, "model.onnx", problems, Task("number"), 8, 8, "fp32", [True] * 64, 0.05)
    assert summary["correct"] < 20
    assert summary["rejected_after"] == 40 and len(rows) == 40 and summary["n"] == 40
    full, rows = score_variant(folder, "model.onnx", problems, Task("number"), 8, 8, "fp32")
    assert "rejected_after" not in full and len(rows) == 64
