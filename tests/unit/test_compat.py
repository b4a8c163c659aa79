"""Users' paid work stays valid across refactors: stage hashes, cache keys and dataset bytes of
unchanged recipes equal the values recorded on main at e892d24 (tests/data/compat_e892d24.json,
written by the code of that commit before the namespace refactor). The recipes are that commit's
copies (tests/data/recipes_e892d24/): the shipped ones may change, these must not."""

import pytest
from compat import RECORDED, ROOT, frozen  # noqa: E402

from distill.config import load_recipe
from distill.core.answers import Task
from distill.pipeline import STAGES, stage_hash
from distill.teachers.backends.base import Completion, render_chat
from distill.teachers.methods import METHODS

PROBLEMS = [
    {"id": "train-000000", "split": "train", "question": "What is 2 + 2?", "gold": "4"},
    {
        "id": "train-000001",
        "split": "train",
        "question": "Tom has 3 apples and eats 1. How many are left?",
        "gold": "2",
    },
]


# Defaults changed on purpose since the recording: (key, the old default). A recipe that leaves the key
# unset now trains differently, so its later stages' hashes change, but the teacher's paid work (the
# generate stage) keeps its hash, and the old default set explicitly gives every recorded hash back.
CHANGED_DEFAULTS = [
    ("student.epochs", 2),  # 2 -> auto: training sized by the dev split
    ("export.gate_size", 0),  # the eval split -> auto: at least 200 problems of their own
    ("export.gate_rule", "accuracy"),  # raw accuracy -> the paired interval's lower end
]


def _sets(recipe_path: str | None, overrides: list[str], key: str) -> bool:
    import yaml

    section, field = key.split(".")
    data = yaml.safe_load((ROOT / recipe_path).read_text()) if recipe_path else {}
    return field in (data.get(section) or {}) or any(o.startswith(key + "=") for o in overrides)


@pytest.mark.parametrize("entry", RECORDED["hashes"], ids=lambda e: f"{e['recipe']}:{' '.join(e['overrides'])}")
def test_stage_hashes_of_unchanged_recipes_are_the_recorded_ones(entry, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipe paths are relative to the project root
    path = frozen(entry["recipe"])
    recipe = load_recipe(path, entry["overrides"])
    assert stage_hash(recipe, "generate") == entry["stages"]["generate"]
    old = [f"{k}={v}" for k, v in CHANGED_DEFAULTS if not _sets(path, entry["overrides"], k)]
    recipe = load_recipe(path, entry["overrides"] + old)
    assert {s: stage_hash(recipe, s) for s in STAGES} == entry["stages"]


class RecordingTeacher:
    """Answers every request with the same text and keeps the cache key of each request."""

    model_id = "recorded-model"

    def __init__(self):
        self.keys: list[str] = []

    def chat_prompt(self, messages, assistant_prefix=""):
        return render_chat(None, messages, assistant_prefix)

    def generate(self, requests):
        self.keys += [r.key(self.model_id) for r in requests]
        return [Completion("Step one. 2 + 2 = 4.\nThe answer is 4.", 5, 5, "stop") for _ in requests]


@pytest.mark.parametrize("entry", RECORDED["cache_keys"], ids=lambda e: " ".join(e["overrides"]))
def test_cache_keys_of_every_method_are_the_recorded_ones(entry):
    recipe = load_recipe(None, entry["overrides"])
    teacher = RecordingTeacher()
    METHODS[recipe.teacher.method](teacher, PROBLEMS, recipe.teacher, Task("number"))
    assert teacher.keys == entry["keys"]
