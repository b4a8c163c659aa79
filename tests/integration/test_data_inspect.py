"""The inspect page of a generate folder: verdicts that agree with the training filters, model text
that stays text, and the page working in a real headless Chromium (filter, search, counter).

The generate folder is built here with pyarrow, with a row of every verdict and hostile model text
(``<script>``, ``<img onerror>``, ``</script>`` in a question, U+2028)."""

import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from browser import MISSING, Browser, chromium_binary

from distill.core.errors import DistillError
from distill.data.inspect import write_inspect_page
from distill.teachers.budget import cost_of
from distill.teachers.rows import ROW_SCHEMA, row_verdicts, select_training_rows

pytestmark = pytest.mark.integration

SCRIPT = "<script>window.__pwned=1</script>"
IMG = '<img src=x onerror="window.__pwned=1">'
TEACHER = {
    "model": "hf:tiny/teacher",
    "keep": "correct",
    "min_confidence": 0.5,
    "min_rationale_words": 3,
    "max_rationale_words": 40,
    "rationales_per_question": 1,
    "rationale_choice": "first",
    "price_per_1k_input": 0.5,
    "price_per_1k_output": 2.0,
}
EXPECTED = {  # id -> verdict, for the latest row of each id
    "eval-0": "eval-correct",
    "eval-1": "eval-wrong",
    "eval-2": "failed",
    "train-kept-script": "kept",
    "train-kept-img": "kept",
    "train-retried": "kept",
    "train-wrong": "wrong",
    "train-unparsable": "unparsable",
    "train-low-agreement": "filtered",
    "train-short": "filtered",
    "train-long": "filtered",
    "train-failed": "failed",
}


def _row(id: str, **kw) -> dict:
    split = "eval" if id.startswith("eval") else "train"
    base = {
        "id": id,
        "split": split,
        "question": f"What is 2 + 2? ({id})",
        "gold": "4",
        "prompt": "p",
        "rationale": "Two plus two makes four, so the answer is 4.",
        "answer_raw": "4",
        "pred": "4",
        "confidence": 1.0,
        "correct": True,
        "parse_error": None,
        "finish_reason": "stop",
        "tokens_in": 100,
        "tokens_out": 50,
        "cached": False,
        "teacher": "tiny-teacher@abc",
        "error": None,
        "alternatives": [],
        "source": "gsm8k:main/train",
        "source_row": 7,
        "extra": '{"level": "easy"}',
    }
    return {**base, **kw}


def _rows() -> tuple[list[dict], list[dict]]:
    """Two shards (commit order): the first holds a failed row that the second retries."""
    failed = {"pred": None, "answer_raw": None, "rationale": None, "correct": None, "confidence": None}
    first = [
        _row("eval-0"),
        _row("eval-1", pred="5", correct=False, rationale="Two and two: five.\u2028Sure & certain."),
        _row("eval-2", error="HTTP 503: upstream overloaded", tokens_in=0, tokens_out=0, **failed),
        _row("train-retried", error="timeout after 120s", tokens_in=0, tokens_out=0, **failed),
        _row("train-kept-script", rationale=f"First {SCRIPT} then the sum is 4."),
    ]
    second = [
        _row("train-retried"),
        _row(
            "train-kept-img",
            question="Is </script><script>window.__pwned=1</script> text?",
            rationale=f"Yes {IMG} it is text.",
        ),
        _row("train-wrong", pred="5", correct=False),
        _row("train-unparsable", pred=None, correct=False, parse_error="no number after the answer trigger"),
        _row("train-low-agreement", confidence=0.4),
        _row("train-short", rationale="Four."),
        _row("train-long", rationale=" ".join(["word"] * 41)),
        _row("train-failed", error="ClientConnectorError: refused", tokens_in=0, tokens_out=0, **failed),
    ]
    return first, second


def make_run(root: Path, n_extra: int = 0) -> Path:
    """A finished generate folder under ``root/run``, as the generate stage leaves it."""
    gen = root / "run" / "generate"
    (gen / "shards").mkdir(parents=True)
    (gen / "dataset").mkdir()
    first, second = _rows()
    second += [_row(f"train-bulk-{i:05d}", question=f"Bulk problem {i}?") for i in range(n_extra)]
    shards = []
    for i, rows in enumerate((first, second)):
        name = f"part-{i:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), gen / "shards" / name)
        shards.append({"file": name, "rows": len(rows), "sha256": "-"})
    (gen / "shards.json").write_text(json.dumps({"shards": shards}))
    latest = {r["id"]: r for r in first + second}
    table = pa.Table.from_pylist([latest[k] for k in sorted(latest)], schema=ROW_SCHEMA)
    is_train = pa.array([s == "train" for s in table["split"].to_pylist()])
    kept, _ = select_training_rows(table.filter(is_train), SimpleNamespace(**TEACHER))
    pq.write_table(kept, gen / "dataset" / "train.parquet")
    pq.write_table(table.filter(pa.array([not t for t in is_train.to_pylist()])), gen / "dataset" / "eval.parquet")
    (gen / "metrics.json").write_text(json.dumps({"estimated_cost": 0.5}))
    (gen / "distill_config.json").write_text(json.dumps({"stage": "generate", "recipe": {"teacher": TEACHER}}))
    (gen / "DONE.json").write_text(json.dumps({"hash": "x", "finished": 0, "upstream": {}}))
    return gen


def _embedded_rows(page: str) -> list[dict]:
    block = re.search(r'<script id="rows" type="application/json">(.*?)</script>', page, re.S).group(1)
    return json.loads(block)["rows"]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"keep": "all"},
        {"min_confidence": 0.0, "min_rationale_words": 0, "max_rationale_words": 0},
        {"rationales_per_question": 2, "rationale_choice": "shortest", "max_rationale_words": 8},
        {"rationale_choice": "mixed", "min_rationale_words": 6},
    ],
)
def test_row_verdicts_keep_what_select_training_rows_keeps(overrides):
    first, second = _rows()
    latest = {r["id"]: r for r in first + second}
    latest["train-alts"] = _row(
        "train-alts", rationale=" ".join(["long"] * 12), alternatives=["short one here", "mid " * 5]
    )
    train = pa.Table.from_pylist([r for r in latest.values() if r["split"] == "train"], schema=ROW_SCHEMA)
    cfg = SimpleNamespace(**{**TEACHER, **overrides})
    kept, _ = select_training_rows(train, cfg)
    verdicts = row_verdicts(train, cfg)
    assert len(verdicts) == train.num_rows
    assert {i for i, (v, _) in zip(train["id"].to_pylist(), verdicts) if v == "kept"} == {
        i.split("#")[0] for i in kept["id"].to_pylist()
    }
    expanded = sum(
        int(m.group(1)) if (m := re.match(r"(\d+) training rows", why or "")) else 1
        for v, why in verdicts
        if v == "kept"
    )
    assert expanded == kept.num_rows  # the reason says how many training rows a kept row became


def test_page_verdicts_costs_and_escaping(tmp_path):
    gen = make_run(tmp_path)
    out = write_inspect_page(tmp_path / "run")  # the run folder; its generate folder works too
    assert out == gen / "inspect.html"
    assert write_inspect_page(gen, tmp_path / "other.html") == tmp_path / "other.html"
    page = out.read_text()
    rows = _embedded_rows(page)
    assert {r["id"]: r["v"] for r in rows} == EXPECTED
    by_id = {r["id"]: r for r in rows}
    assert by_id["train-wrong"]["why"] == "pred 5 ≠ gold 4"
    assert by_id["train-unparsable"]["why"] == "no answer: no number after the answer trigger"
    assert by_id["train-low-agreement"]["why"] == "low agreement: 0.40 < 0.5"
    assert by_id["train-short"]["why"] == "length: 1 words < min 3"
    assert by_id["train-long"]["why"] == "length: 41 words > max 40"
    assert by_id["train-failed"]["why"] == "ClientConnectorError: refused"
    assert by_id["train-kept-script"]["r"] == f"First {SCRIPT} then the sum is 4."  # the text itself, unaltered
    assert by_id["eval-1"]["r"].endswith("five.\u2028Sure & certain.")
    assert by_id["train-kept-img"]["src"] == "gsm8k:main/train" and by_id["train-kept-img"]["srow"] == 7
    assert by_id["eval-0"]["cost"] == pytest.approx(cost_of(100, 50, SimpleNamespace(**TEACHER)))
    for verdict in set(EXPECTED.values()):  # the counts at the top
        assert (
            f'data-verdict="{verdict}"' in page and f"{verdict} <b>{list(EXPECTED.values()).count(verdict)}</b>" in page
        )
    # Hostile text never appears raw: the only script tags are the page's two, and no <img>.
    assert page.count("<script") == 2 and page.count("</script>") == 2
    assert "<img" not in page and "\u2028" not in page and "Sure & certain" not in page
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    assert "default-src 'none'" in csp and "img-src 'none'" in csp and "unsafe-inline" not in csp.split("style-src")[0]
    assert not list(gen.glob(".*.tmp"))  # written atomically, no temp file left


def test_missing_or_unfinished_run_is_one_clear_error(tmp_path):
    with pytest.raises(DistillError, match="no run folder"):
        write_inspect_page(tmp_path / "nope")
    gen = make_run(tmp_path)
    (gen / "DONE.json").unlink()
    with pytest.raises(DistillError, match="unfinished") as err:
        write_inspect_page(gen)
    assert "\n" not in str(err.value) and err.value.fix


def _artifact(path: Path) -> None:
    if folder := os.environ.get("DISTILL_TEST_ARTIFACTS"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(folder) / path.name)


needs_chromium = pytest.mark.skipif(chromium_binary() is None, reason=MISSING)
SHOWN = "document.getElementById('shown').textContent"


def _select(b: Browser, verdict: str) -> None:
    b.evaluate(
        f"(() => {{ const s = document.getElementById('verdict'); s.value = {json.dumps(verdict)};"
        " s.dispatchEvent(new Event('change')); })()"
    )


def _type(b: Browser, text: str) -> None:
    b.evaluate(
        f"(() => {{ const i = document.getElementById('search'); i.value = {json.dumps(text)};"
        " i.dispatchEvent(new Event('input')); })()"
    )


@needs_chromium
def test_page_in_headless_chromium(tmp_path):
    gen = make_run(tmp_path)
    page = write_inspect_page(gen)
    n = len(EXPECTED)
    with Browser(page.as_uri()) as b:
        assert b.wait_for(SHOWN) == f"{n} of {n} rows shown"  # the script ran: CSP allows it by hash
        assert b.evaluate("document.querySelectorAll('article').length") == n
        assert b.evaluate("document.getElementById('more').offsetParent") is None  # all rendered: no "more"
        _select(b, "filtered")
        assert b.evaluate(SHOWN) == f"3 of {n} rows shown"
        assert b.evaluate("document.querySelectorAll('article').length") == 3
        b.evaluate("document.querySelector('.chip[data-verdict=\"kept\"]').click()")
        assert b.evaluate(SHOWN) == f"3 of {n} rows shown"
        assert b.evaluate("document.getElementById('verdict').value") == "kept"
        _type(b, "window.__pwned")  # both hostile kept rows (the rationale and the question)
        assert b.evaluate(SHOWN) == f"2 of {n} rows shown"
        _type(b, "SUM IS 4")  # case-insensitive, over the rationale
        assert b.evaluate(SHOWN) == f"1 of {n} rows shown"
        _select(b, "all")
        _type(b, "")
        assert b.evaluate(SHOWN) == f"{n} of {n} rows shown"
        # Nothing ran, nothing was parsed as markup: the hostile text shows as text.
        assert b.evaluate("typeof window.__pwned") == "undefined"
        assert b.evaluate("document.images.length") == 0
        assert b.evaluate("document.scripts.length") == 2
        text = b.evaluate("document.body.innerText")
        assert SCRIPT in text and IMG in text and "Is </script><script>window.__pwned=1</script> text?" in text
        shot = b.screenshot(tmp_path / "inspect.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _artifact(shot)


@needs_chromium
def test_large_page_renders_in_pages(tmp_path):
    gen = make_run(tmp_path, n_extra=10_000)
    page = write_inspect_page(gen)
    n = len(EXPECTED) + 10_000
    with Browser(page.as_uri()) as b:
        assert b.wait_for(SHOWN) == f"{n} of {n} rows shown"
        assert b.evaluate("document.querySelectorAll('article').length") == 200  # rendered lazily
        assert b.evaluate("document.getElementById('more').offsetParent") is not None
        b.evaluate("document.getElementById('more').click()")
        assert b.evaluate("document.querySelectorAll('article').length") == 400
        _type(b, "bulk problem 99")  # 99, 990-999, 9900-9999
        assert b.evaluate(SHOWN) == f"111 of {n} rows shown"
        ms = b.evaluate(
            "(() => { const t = performance.now(); document.getElementById('search').value = 'bulk';"
            " document.getElementById('search').dispatchEvent(new Event('input'));"
            " return performance.now() - t; })()"
        )
        assert b.evaluate(SHOWN) == f"10000 of {n} rows shown"
        assert ms < 1000, f"filtering {n} rows took {ms:.0f} ms"
        _artifact(b.screenshot(tmp_path / "inspect_large.png", full_page=False))
