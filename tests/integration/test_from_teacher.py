"""A student that is a smaller copy of the teacher (student.from_teacher) trains with logit KD through
the Python API; its size and speed next to the teacher's are in the metrics and the report."""

import json

import pytest
from tiny import write_recipe

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, tiny_teacher, tiny_task_cfg):
    root = tmp_path_factory.mktemp("from_teacher")
    f = write_recipe(
        root,
        "shrunk",
        tiny_task_cfg,
        teacher={
            "model": f"hf:{tiny_teacher}",
            "max_new_tokens": 16,
            "batch_size": 6,
            "executor": "local",
            "dtype": "float32",
            "topk_logprobs": 5,
            "keep": "all",
        },
        student={
            "from_teacher": {"layers": [0], "num_heads": 2, "intermediate_size": 96},
            "format": "kd",
            "epochs": 2,
            "lr": 3e-3,
            "batch_size": 4,
            "micro_batch_size": 2,
            "max_length": 128,
            "eval_max_new_tokens": 8,
        },
        export={"enabled": False},
        eval={"models": ["student_base", "student"]},
    )
    return f


def test_a_shrunk_teacher_copy_trains_with_kd_and_reports_its_size(recipe_file, tiny_teacher):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import distill
    from distill.stages.report import training_lines

    distill.generate(recipe_file)
    result = distill.train(recipe_file)
    m = json.loads((result.dir / "metrics.json").read_text())
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    vocab = len(AutoTokenizer.from_pretrained(tiny_teacher))
    # qwen2, hidden 96, head_dim 24: 2 query heads + 1 KV head with q/k/v biases, MLP 96, one layer, tied head
    layer = 96 * 48 * 2 + 96 * 24 * 2 + (48 + 24 + 24) + 3 * 96 * 96 + 2 * 96
    assert m["parameters"] == vocab * 96 + layer + 96
    ft = m["from_teacher"]
    assert ft["student_parameters"] == m["parameters"]
    assert ft["teacher_parameters"] == sum(p.numel() for p in teacher.parameters())
    assert ft["parameter_ratio"] == pytest.approx(m["parameters"] / ft["teacher_parameters"])
    assert ft["parameter_ratio"] < 0.8
    assert ft["student_tokens_per_second"] > 0 and ft["teacher_tokens_per_second"] > 0
    assert ft["decode_tokens"] == 16 and ft["threads"] == 1
    assert m["steps"] > 0
    saved = AutoConfig.from_pretrained(result.dir / "model")
    assert (saved.num_hidden_layers, saved.num_attention_heads, saved.num_key_value_heads) == (1, 2, 1)
    assert (saved.head_dim, saved.intermediate_size) == (24, 96)
    assert (
        AutoTokenizer.from_pretrained(result.dir / "model").get_vocab()
        == AutoTokenizer.from_pretrained(tiny_teacher).get_vocab()
    )
    line = next(x for x in training_lines(m, []) if x.startswith("Student built from the teacher"))
    assert f"{m['parameters']:,} parameters vs {ft['teacher_parameters']:,}" in line

    scores = distill.evaluate(recipe_file).metrics["scores"]
    # the untrained row is the same shrunk copy, before training
    assert scores["student_base"]["parameters"] == scores["student"]["parameters"] == m["parameters"]


def test_a_replay_teacher_with_from_teacher_is_one_clear_error(recipe_file, tmp_path):
    import distill

    with pytest.raises(distill.DistillError) as e:
        distill.train(recipe_file, [f"teacher.model=replay:{tmp_path / 'rows.jsonl'}"])
    assert e.value.problem.startswith("student.from_teacher copies the teacher's weights, and teacher replay:")
    assert "use a local model teacher (hf:/gguf:/embedded:) or set student.from_teacher=null" in e.value.problem
