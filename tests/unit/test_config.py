from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from distill.config import Recipe, content_hash, load_recipe
from distill.core.errors import DistillError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "path",
    sorted([*(ROOT / "recipes").glob("*.yaml"), *(ROOT / "bench" / "recipes").glob("*.yaml")]),
    ids=lambda p: p.name,
)
def test_every_shipped_recipe_validates_and_names_its_command(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    first_lines = path.read_text().splitlines()[:4]
    assert any(str(path.relative_to(ROOT)) in line or "make quickstart" in line for line in first_lines)
    assert recipe.name == path.stem


def test_unknown_key_suggests_closest(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("student:\n  epoch: 2\n")
    with pytest.raises(DistillError) as e:
        load_recipe(f)
    assert "student.epoch" in str(e.value) and "student.epochs" in str(e.value)


def test_wrong_type_and_range_name_the_key():
    with pytest.raises(DistillError, match=r"student.lr"):
        load_recipe(None, ["student.lr=2"])
    with pytest.raises(DistillError, match=r"teacher.executor"):
        load_recipe(None, ["teacher.executor=spark"])
    with pytest.raises(DistillError, match=r"micro_batch_size"):
        load_recipe(None, ["student.batch_size=6", "student.micro_batch_size=4"])


def test_overrides_parse_yaml_values():
    r = load_recipe(None, ["student.epochs=0.5", "task.params={min_terms: 2}", "teacher.executor=local"])
    assert r.student.epochs == 0.5 and r.task.params == {"min_terms": 2} and r.teacher.executor == "local"


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(DistillError, match="key=value"):
        load_recipe(None, ["student.epochs"])
    with pytest.raises(DistillError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_content_hash_ignores_batching_and_workers():
    a = load_recipe(None)
    b = load_recipe(None, ["teacher.batch_size=3", "teacher.workers=5", "teacher.executor=local"])
    c = load_recipe(None, ["teacher.max_new_tokens=17"])
    assert content_hash(a.teacher) == content_hash(b.teacher)
    assert content_hash(a.teacher) != content_hash(c.teacher)


@given(
    st.text(min_size=1, max_size=20).filter(
        lambda s: "=" not in s and "." not in s and s.strip() == s and s.isidentifier()
    )
)
def test_any_unknown_top_level_key_is_rejected(key):
    if key in Recipe.model_fields:
        return
    with pytest.raises(DistillError, match="unknown recipe key"):
        load_recipe(None, [f"{key}=1"])


@given(
    st.sampled_from(
        [
            "task.train_size",
            "task.answer_type",
            "teacher.samples",
            "teacher.temperature",
            "student.lr",
            "student.batch_size",
            "export.block_size",
            "export.variants",
            "teacher.method",
            "name",
        ]
    ),
    st.one_of(st.text(max_size=12), st.integers(-(10**6), 10**6), st.floats(allow_nan=True), st.booleans()),
)
@example("task.train_size", "\x1f\n")  # not YAML, with a newline: the message escapes it (one line)
def test_any_override_value_is_accepted_or_one_clear_error(key, value):
    """Whatever a user types for a known key: a valid recipe, or a DistillError naming that key."""
    try:
        recipe = load_recipe(None, [f"{key}={value}"])
    except DistillError as e:
        assert "\n" not in str(e) and (key in str(e) or "override" in str(e) or "name must" in str(e))
    else:
        assert isinstance(recipe, Recipe)


MALFORMED_VALUE = st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2))


@given(
    st.dictionaries(st.sampled_from(["task", "teacher", "student", "export", "bogus"]), MALFORMED_VALUE, min_size=1),
    st.one_of(st.none(), MALFORMED_VALUE),
)
def test_malformed_recipe_structure_is_one_clear_error(tmp_path_factory, data, name):
    """A section that is not a mapping, or an unknown key, is refused with one line naming the key."""
    import yaml

    if name is not None:
        data = {**data, "name": name}
    path = tmp_path_factory.mktemp("r") / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(DistillError, match=r"^(unknown )?recipe key '(task|teacher|student|export|bogus|name)'") as e:
        load_recipe(path)
    assert "\n" not in str(e.value)
