import pytest

from distill.config import load_recipe
from distill.core.errors import DistillError
from distill.teachers.prompts import render


def test_template_renders_the_question():
    assert render("Q: {{ question }}\nA:", question="2 + 2 =") == "Q: 2 + 2 =\nA:"


@pytest.mark.parametrize(
    "template",
    [
        "{{ question.__class__.__mro__ }}",  # attribute escape towards object subclasses
        "{{ ''.__class__.__base__.__subclasses__() }}",
        "{% include '/etc/passwd' %}",  # the filesystem
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ undefined_variable }}",
    ],
)
def test_unsafe_or_broken_templates_fail_clearly(template):
    with pytest.raises(DistillError) as e:
        render(template, question="1")
    assert "not allowed" in str(e.value)


def test_recipe_with_an_unsafe_template_is_rejected_at_load():
    with pytest.raises(DistillError, match="prompt template"):
        load_recipe(None, ["teacher.prompt_template={{ question.__class__ }}"])
