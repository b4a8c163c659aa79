"""`recipe_keys` lists every recipe key from the config models; recipe errors point at it, and an
override that YAML turned into another type says so."""

import json
import shlex
import typing

import pytest
from pydantic import BaseModel

from distill.config import Recipe, load_recipe, recipe_keys
from distill.core.errors import DistillError


def _fields(model: type[BaseModel], prefix: str = ""):
    """(dotted key, model, field name, field) of every field of ``model`` and of the settings models it
    holds (sections, optional sections, list items as ``key[].field``), walked independently of config.py."""
    for name, field in model.model_fields.items():
        yield prefix + name, model, name, field
        ann = field.annotation
        for sub in (ann, *typing.get_args(ann)):
            if isinstance(sub, type) and not typing.get_args(sub) and issubclass(sub, BaseModel):
                yield from _fields(sub, prefix + name + ("[]." if typing.get_origin(ann) is list else "."))


FIELDS = list(_fields(Recipe))
ROWS = {r["key"]: r for r in recipe_keys()}


def test_every_field_of_every_model_appears_once_in_order():
    keys = [r["key"] for r in recipe_keys()]
    assert keys == [key for key, *_ in FIELDS]
    assert len(keys) == len(set(keys))
    json.dumps(recipe_keys())  # --json needs nothing but JSON values


@pytest.mark.parametrize(("key", "model", "name", "field"), FIELDS, ids=[f[0] for f in FIELDS])
def test_each_key_has_its_type_default_and_description(key, model, name, field):
    row = ROWS[key]
    assert set(row) == {"key", "type", "default", "required", "description"}
    assert isinstance(row["type"], str) and row["type"]
    assert row["required"] is field.is_required()
    if field.is_required():
        assert row["default"] is None
    else:  # the default a fresh model of that section takes (an optional section's keys: once it is on)
        assert row["default"] == model().model_dump(mode="json")[name]
    if field.description:
        assert row["description"] == field.description
    choices = [
        a for a in (field.annotation, *typing.get_args(field.annotation)) if typing.get_origin(a) is typing.Literal
    ]
    for choice in (str(c) for lit in choices for c in typing.get_args(lit)):
        assert choice in row["type"]


@pytest.mark.parametrize(
    ("key", "type_", "default"),
    [
        ("student.validation.patience", "int", 3),
        ("student.on_policy.lmbda", "float", 0.5),
        ("student.kd.loss", "one of forward_kl, jsd, uld", "forward_kl"),
        ("student.epochs", "float | auto", "auto"),
        ("student.format", "one of rationale, label, multitask, kd", "rationale"),
        ("student.on_policy", "section | null", None),
        ("student.lr_sweep.candidates", "list[float]", [5e-5, 1e-4, 2e-4, 4e-4]),
        ("student.lora.target_modules", "list[str] | all-linear", "all-linear"),
        ("export.keep_fp32_nodes", "list[str]", []),
        ("export.gate_size", "int | auto", "auto"),
        ("task.train_size", "int", 128),
        ("teacher.system_prompt", "str | null", None),
    ],
)
def test_nested_and_optional_keys_read_as_a_recipe_writer_expects(key, type_, default):
    assert (ROWS[key]["type"], ROWS[key]["default"]) == (type_, default)


def test_a_section_without_its_own_description_takes_its_models_summary():
    assert ROWS["task"]["description"] == "Where problems come from and how answers are checked."
    assert ROWS["teacher.demos[].question"]["required"] is True


@pytest.mark.parametrize("section", ["task", "student", "student.kd", "student.on_policy", "teacher.demos"])
def test_a_section_keeps_only_its_own_keys(section):
    keys = [r["key"] for r in recipe_keys(section)]
    assert keys[0] == section
    assert keys == [k for k in ROWS if k == section or k.startswith((section + ".", section + "[]"))]


def test_section_filtering_is_by_whole_names():
    assert [r["key"] for r in recipe_keys("student.kd")] == [
        "student.kd",
        "student.kd.loss",
        "student.kd.temperature",
        "student.kd.beta",
        "student.kd.weight",
        "student.kd.teacher",
        "student.kd.dtype",
    ]
    assert not any(r["key"].startswith("teacher") for r in recipe_keys("task"))
    assert recipe_keys("") == recipe_keys()


@pytest.mark.parametrize("section", ["nope", "stud", "student.kdx", "student.epochs.x"])
def test_an_unknown_section_is_one_error_listing_the_sections(section):
    with pytest.raises(DistillError) as e:
        recipe_keys(section)
    assert e.value.problem == f"no recipe section '{section}'"
    assert e.value.fix.startswith("sections: task, task.answer, teacher, ")
    assert "student.on_policy" in e.value.fix and "\n" not in str(e.value)


def test_an_unknown_key_points_at_recipe_keys_of_its_section(tmp_path):
    with pytest.raises(DistillError) as e:
        load_recipe(None, ["student.x=1"])
    assert "unknown recipe key 'student.x'" in str(e.value)
    assert "see `distill recipe keys student`" in e.value.fix

    f = tmp_path / "r.yaml"
    f.write_text("student:\n  kd:\n    los: jsd\n")
    with pytest.raises(DistillError) as e:
        load_recipe(f)
    assert e.value.fix == "did you mean 'student.kd.loss'? (see `distill recipe keys student.kd`)"  # suggestion kept

    with pytest.raises(DistillError) as e:
        load_recipe(None, ["studnet.epochs=1"])
    assert e.value.fix == "did you mean 'student'? (see `distill recipe keys`)"


def test_the_hinted_section_of_a_list_item_is_one_recipe_keys_knows():
    with pytest.raises(DistillError) as e:
        load_recipe(None, ["teacher.demos=[{question: q, rationale: r, answer: a, why: x}]"])
    assert "unknown recipe key 'teacher.demos.0.why'" in str(e.value)
    assert "see `distill recipe keys teacher.demos`" in e.value.fix
    assert recipe_keys("teacher.demos")


@pytest.mark.parametrize(
    ("override", "made", "meant"),
    [
        ("teacher.system_prompt=Answer: short", "a mapping (the ': ' does that)", "Answer: short"),
        ("task.name=yes", "the boolean true (YAML reads yes, no, on, off, true and false as booleans)", "yes"),
        ("teacher.trigger=[step one]", "a list (the '[' does that)", "[step one]"),
        ("teacher.api_key_env=123", "a number (YAML reads 123 as one)", "123"),
        ("task.name=#3", "null (the '#' starts a YAML comment)", "#3"),
    ],
)
def test_an_override_yaml_made_into_another_type_says_so_and_how_to_quote_it(override, made, meant):
    with pytest.raises(DistillError) as e:
        load_recipe(None, [override])
    assert e.value.problem == f"{override} was read as YAML, which made it {made}"
    assert e.value.fix.startswith("quote the value: ")
    (quoted,) = shlex.split(e.value.fix.removeprefix("quote the value: "))  # as the shell passes it
    key = override.split("=", 1)[0]
    section, name = key.split(".")
    assert getattr(getattr(load_recipe(None, [quoted]), section), name) == meant


def test_the_brief_example_reads_exactly():
    with pytest.raises(DistillError) as e:
        load_recipe(None, ["teacher.system_prompt=Answer: short"])
    assert str(e.value) == (
        "teacher.system_prompt=Answer: short was read as YAML, which made it a mapping (the ': ' does that)"
        " — quote the value: 'teacher.system_prompt=\"Answer: short\"'"
    )


@pytest.mark.parametrize("override", ["student.layers=[0, 2", "export.gate_size=[1", "student.kd={loss: jsd"])
def test_an_override_that_is_not_yaml_says_it_stayed_text(override):
    with pytest.raises(DistillError) as e:
        load_recipe(None, [override])
    raw = override.split("=", 1)[1]
    assert e.value.problem.startswith(f"{override} is not valid YAML (")
    assert e.value.problem.endswith(f"so it was read as the text {raw!r}")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "student.epochs=-1",
            "recipe key 'student.epochs': epochs must be a positive number or auto (got -1) — fix the recipe or the override",
        ),
        (  # yes is a boolean, but "yes" is no executor either: quoting would not help
            "teacher.executor=yes",
            "recipe key 'teacher.executor': Input should be 'ray' or 'local' (got True) — fix the recipe or the override",
        ),
        (  # a number where a list goes is wrong however it is written
            "student.layers=3",
            "recipe key 'student.layers': Input should be a valid list (got 3) — fix the recipe or the override",
        ),
    ],
)
def test_a_plain_wrong_override_keeps_todays_message(override, message):
    with pytest.raises(DistillError) as e:
        load_recipe(None, [override])
    assert str(e.value) == message


def test_a_bad_template_that_is_not_yaml_keeps_the_template_error():
    with pytest.raises(DistillError) as e:
        load_recipe(None, ["teacher.prompt_template={{ question"])
    assert "not valid YAML" not in str(e.value) and "prompt template" in str(e.value)


def test_only_overrides_are_explained_not_recipe_files(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("teacher:\n  system_prompt: {Answer: short}\n")
    with pytest.raises(DistillError) as e:
        load_recipe(f)
    assert (
        str(e.value)
        == "recipe key 'teacher.system_prompt': Input should be a valid string — fix the recipe or the override"
    )


def test_the_last_override_of_a_key_is_the_one_explained():
    with pytest.raises(DistillError) as e:
        load_recipe(None, ["task.name=fine", "task.name=no"])
    assert e.value.problem.startswith("task.name=no was read as YAML, which made it the boolean false")
