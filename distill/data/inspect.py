"""One self-contained HTML page showing every row a generate stage wrote, and what became of it.

Why a static page: a run folder is often copied off the training box, so the page must open from
disk with no server and no network. Why so strict: the rows are model text, untrusted. They travel
as JSON in a ``<script type="application/json">`` block with ``< > &`` and U+2028/2029 escaped (a
``</script>`` in a rationale cannot end the block), the page's one script builds the DOM with
``textContent`` only, and a Content-Security-Policy allows that script by hash and nothing else
(no other script, no image, no network).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from distill.core.artifacts import CONFIG_FILE, atomic_write_bytes
from distill.core.errors import DistillError

# Display order, and each verdict's colour chip; the rules live in distill.teachers.rows.row_verdicts.
VERDICTS = {
    "kept": "#1a7f37",
    "wrong": "#cf222e",
    "unparsable": "#bc4c00",
    "filtered": "#9a6700",
    "failed": "#6e40c9",
    "eval-correct": "#0969da",
    "eval-wrong": "#bf3989",
}
PAGE_ROWS = 200  # cards rendered per page: a 10k-row run stays responsive, the counter counts all matches


def write_inspect_page(run_dir: Path, out: Path | None = None) -> Path:
    """Write the inspect page of ``run_dir`` (a run folder or its ``generate`` folder); returns its path.

    Default ``out``: ``<run>/generate/inspect.html``, written atomically. A missing or unfinished
    generate stage raises ``DistillError``.
    """
    gen = _generate_dir(Path(run_dir))
    rows, summary = _inspect_rows(gen)
    out = Path(out) if out is not None else gen / "inspect.html"
    atomic_write_bytes(out, render_page(rows, summary).encode())
    return out


def _generate_dir(run_dir: Path) -> Path:
    """The finished generate folder of ``run_dir``, or one clear error saying what to run."""
    gen = run_dir / "generate" if (run_dir / "generate").is_dir() else run_dir
    if not gen.is_dir():
        raise DistillError(f"no run folder at {run_dir}", "pass a run folder such as runs/quickstart")
    if not (gen / "shards.json").is_file():
        raise DistillError(f"{gen} holds no generated rows (no shards.json)", "run `distill generate <recipe>` first")
    if not (gen / "DONE.json").is_file() or not (gen / "dataset" / "train.parquet").is_file():
        raise DistillError(
            f"the generate stage in {gen} is unfinished (no DONE.json or dataset/train.parquet)",
            "rerun `distill generate <recipe>` to finish it (committed rows are kept)",
        )
    return gen


def _teacher_cfg(gen: Path) -> tuple[SimpleNamespace, bool]:
    """The teacher section the run used (its config dump), and whether it was found.

    A key an older run's dump lacks is a feature that did not exist then, so it takes its "off"
    value (``_FILTERS_OFF``); without the file at all the page says the defaults were assumed."""
    found = {}
    path = gen / CONFIG_FILE
    if path.is_file():
        config = json.loads(path.read_text())
        found = (config.get("recipe") or {}).get("teacher") or (config.get("stage_config") or {}).get("teacher") or {}
    return SimpleNamespace(**{**_FILTERS_OFF, **found}), bool(found)


# The teacher keys this page reads, each at the value that applies no filter and costs nothing.
_FILTERS_OFF = {
    "model": None,
    "keep": "correct",
    "min_confidence": 0.0,
    "min_rationale_words": 0,
    "max_rationale_words": 0,
    "rationales_per_question": 1,
    "rationale_choice": "first",
    "price_per_1k_input": 0.0,
    "price_per_1k_output": 0.0,
}


def _inspect_rows(gen: Path) -> tuple[list[dict], dict]:
    """Every row of the shards (the latest per id) with its verdict, reason and cost; and the summary."""
    import pyarrow.parquet as pq

    from distill.teachers.budget import cost_of
    from distill.teachers.rows import latest_rows, row_verdicts

    manifest = json.loads((gen / "shards.json").read_text())
    missing = [s["file"] for s in manifest["shards"] if not (gen / "shards" / s["file"]).is_file()]
    if missing:
        raise DistillError(f"{gen}/shards lacks {', '.join(missing[:3])}", "rerun `distill generate <recipe>`")
    table = latest_rows([pq.read_table(gen / "shards" / s["file"]) for s in manifest["shards"]])
    cfg, found_cfg = _teacher_cfg(gen)
    in_dataset = set(pq.read_table(gen / "dataset" / "train.parquet", columns=["id"])["id"].to_pylist())
    out, disagree = [], 0
    for r, (verdict, why) in zip(table.to_pylist(), row_verdicts(table, cfg)):
        # dataset/train.parquet is what training read: it wins if the filters and it ever disagree.
        if r["split"] == "train" and (verdict == "kept") != (r["id"] in in_dataset):
            disagree += 1
            if verdict == "kept":
                verdict, why = "filtered", "not in dataset/train.parquet, though the recipe's filters keep it"
            else:
                verdict, why = "kept", f"in dataset/train.parquet, though the recipe's filters say {verdict}: {why}"
        tokens_in, tokens_out = r["tokens_in"] or 0, r["tokens_out"] or 0
        out.append(
            {
                "id": r["id"],
                "split": r["split"],
                "v": verdict,
                "why": why,
                "q": r["question"],
                "r": r["rationale"],
                "pred": r["pred"],
                "raw": r["answer_raw"],
                "gold": r["gold"],
                "conf": r["confidence"],
                "tin": tokens_in,
                "tout": tokens_out,
                "cost": cost_of(tokens_in, tokens_out, cfg),
                "cached": bool(r["cached"]),
                "fin": r["finish_reason"],
                "teacher": r["teacher"],
                "src": r.get("source"),
                "srow": r.get("source_row"),
                "extra": r.get("extra"),
                "alts": len(r["alternatives"] or []),
            }
        )
    out.sort(key=lambda r: (r["split"] != "train", r["id"]))  # train rows first: they are what is trained
    metrics_path = gen / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    summary = {
        "run": gen.parent.name if gen.name == "generate" else gen.name,
        "teacher_model": ", ".join(t["name"] for t in metrics["teachers"])  # several teachers: their names
        if metrics.get("teachers")
        else getattr(cfg, "model", None) or metrics.get("teacher_model"),
        "counts": Counter(r["v"] for r in out),
        "tokens_in": sum(r["tin"] for r in out),
        "tokens_out": sum(r["tout"] for r in out),
        "cost": sum(r["cost"] for r in out),
        "estimated_cost": metrics.get("estimated_cost"),
        "filters": _filters_text(cfg, found_cfg),
        "disagree": disagree,
    }
    return out, summary


def _filters_text(cfg, found: bool) -> str:
    """The recipe's training filters in one line, as the page header states them."""
    parts = [f"keep={cfg.keep}"]
    if cfg.min_confidence > 0:
        parts.append(f"min_confidence={cfg.min_confidence:g}")
    if cfg.min_rationale_words or cfg.max_rationale_words:
        parts.append(f"words {cfg.min_rationale_words}–{cfg.max_rationale_words or '∞'}")
    if cfg.rationale_choice != "first":
        parts.append(f"rationale_choice={cfg.rationale_choice}")
    if cfg.rationales_per_question > 1:
        parts.append(f"rationales_per_question={cfg.rationales_per_question}")
    return ", ".join(parts) + ("" if found else f" (no {CONFIG_FILE}: default filters assumed)")


def embed_json(obj) -> str:
    """JSON safe inside a ``<script>`` block: no ``<``, ``>`` or ``&`` (so no ``</script>`` or
    ``<!--``), and no U+2028/2029; ``JSON.parse`` reads the escapes back to the same text."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def render_page(rows: list[dict], summary: dict) -> str:
    """The page's HTML. Everything interpolated here is escaped; the rows go in as escaped JSON."""
    e = html.escape
    counts = summary["counts"]
    chips = "".join(
        f'<button type="button" class="chip{"" if counts.get(v) else " zero"}" data-verdict="{v}" style="--c:{c}">'
        f"{v} <b>{counts.get(v, 0)}</b></button>"
        for v, c in VERDICTS.items()
    )
    options = f'<option value="all">all verdicts ({len(rows)})</option>' + "".join(
        f'<option value="{v}">{v} ({counts.get(v, 0)})</option>' for v in VERDICTS
    )
    estimated = summary["estimated_cost"]
    cost = f"${summary['cost']:.4f}" + (f" (metrics.json: ${estimated:.4f})" if estimated is not None else "")
    warn = (
        f'<p class="warn">{summary["disagree"]} train rows disagree with dataset/train.parquet: '
        "the dataset wins (was the recipe changed after generating?)</p>"
        if summary["disagree"]
        else ""
    )
    colours = "".join(f".v-{v}{{--c:{c}}}" for v, c in VERDICTS.items())
    csp = f"default-src 'none'; script-src 'sha256-{_sha256(_SCRIPT)}'; style-src 'unsafe-inline'; img-src 'none'"
    csp += "; base-uri 'none'; form-action 'none'"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>distill inspect — {e(summary["run"])}</title>
<style>{_STYLE}{colours}</style></head>
<body>
<header class="top">
<h1>{e(summary["run"])} <small>generated rows</small></h1>
<p class="facts">{len(rows):,} rows · teacher {e(str(summary["teacher_model"]))} · {summary["tokens_in"]:,} tokens in,
{summary["tokens_out"]:,} out · cost {e(cost)} · filters: {e(summary["filters"])}</p>
{warn}<div class="chips">{chips}</div>
<div class="controls"><select id="verdict" aria-label="verdict">{options}</select>
<input id="search" type="search" placeholder="search question, rationale, answer…" aria-label="search">
<span id="shown" aria-live="polite"></span></div>
</header>
<main id="list"></main>
<button type="button" id="more" hidden></button>
<script id="rows" type="application/json">{embed_json({"rows": rows, "page": PAGE_ROWS})}</script>
<script>{_SCRIPT}</script>
</body></html>
"""


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


_STYLE = """
:root{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1f2328;background:#f6f8fa}
body{margin:0}h1{font-size:18px;margin:0 0 4px}h1 small{color:#656d76;font-weight:normal}
.top{position:sticky;top:0;z-index:1;background:#fff;border-bottom:1px solid #d0d7de;padding:10px 16px}
.facts{margin:0 0 8px;color:#656d76}.warn{margin:0 0 8px;color:#9a6700;font-weight:600}
.chips{display:flex;flex-wrap:wrap;gap:6px;margin-bottom:8px}
.chip{border:1px solid var(--c);color:var(--c);background:#fff;border-radius:12px;padding:1px 9px;font:inherit;
font-size:12px;cursor:pointer}.chip.on{background:var(--c);color:#fff}.chip.zero{opacity:.45}
.controls{display:flex;gap:8px;align-items:center}.controls select,.controls input{font:inherit;padding:3px 6px}
.controls input{flex:1;max-width:420px}#shown{color:#656d76}
main{padding:10px 16px;display:grid;gap:8px}
.row{background:#fff;border:1px solid #d0d7de;border-left:4px solid var(--c);border-radius:6px;padding:8px 12px}
.row header{display:flex;flex-wrap:wrap;gap:8px;align-items:baseline;font-size:12px;color:#656d76}
.row .tag{background:var(--c);color:#fff;border-radius:10px;padding:0 8px;font-weight:600}
.row .id{font-family:ui-monospace,Menlo,Consolas,monospace;color:#1f2328}
.row .teacher{max-width:28ch;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.why{margin-top:4px;color:var(--c);font-size:13px;white-space:pre-wrap;overflow-wrap:anywhere}
.q{margin-top:4px;font-weight:600;white-space:pre-wrap;overflow-wrap:anywhere}
.ans{display:flex;flex-wrap:wrap;gap:4px 16px;margin-top:4px;font-size:13px}.ans span{color:#656d76}
.ans code{font-family:ui-monospace,Menlo,Consolas,monospace;color:#1f2328;white-space:pre-wrap;overflow-wrap:anywhere}
pre{margin:6px 0 0;padding:6px 8px;background:#f6f8fa;border-radius:4px;font:12px/1.4 ui-monospace,Menlo,Consolas,
monospace;white-space:pre-wrap;overflow-wrap:anywhere}pre.clamp{max-height:11.2em;overflow:hidden;
-webkit-mask-image:linear-gradient(#000 75%,transparent);mask-image:linear-gradient(#000 75%,transparent)}
.toggle,#more{font:inherit;font-size:12px;margin-top:4px;background:none;border:0;color:#0969da;cursor:pointer;padding:0}
#more{display:block;margin:0 16px 24px}#more[hidden]{display:none}.empty{color:#656d76;padding:12px}
"""

# The page's only script (allowed by its hash). Row data reaches the DOM through textContent alone.
_SCRIPT = """
"use strict";
(() => {
  const data = JSON.parse(document.getElementById("rows").textContent);
  const rows = data.rows, page = data.page;
  const select = document.getElementById("verdict"), search = document.getElementById("search");
  const shown = document.getElementById("shown"), list = document.getElementById("list");
  const more = document.getElementById("more");
  const str = (x) => (x === null || x === undefined ? "" : String(x));
  const hay = rows.map((r) => [r.id, r.q, r.r, r.pred, r.raw, r.gold, r.why].map(str).join("\\n").toLowerCase());
  let matches = [], rendered = 0;

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = str(text);
    return node;
  }
  function field(parent, label, value) {
    const span = el("span", "", label + " ");
    span.appendChild(el("code", "", value === null || value === undefined ? "—" : value));
    parent.appendChild(span);
  }
  function card(r) {
    const art = el("article", "row v-" + r.v);
    const head = el("header");
    head.appendChild(el("span", "tag", r.v));
    head.appendChild(el("span", "id", r.id));
    const meta = [r.split];
    if (r.conf !== null) meta.push("confidence " + r.conf.toFixed(2));
    meta.push(r.tin + " → " + r.tout + " tokens" + (r.cached ? " (cached)" : ""));
    meta.push("$" + r.cost.toFixed(4));
    if (r.fin) meta.push("finish " + r.fin);
    if (r.src !== null || r.srow !== null) meta.push("source " + str(r.src) + (r.srow !== null ? ":" + r.srow : ""));
    if (r.alts) meta.push("+" + r.alts + " other paths");
    head.appendChild(el("span", "", meta.join(" · ")));
    if (r.teacher) {
      const t = el("span", "teacher", r.teacher);
      t.title = r.teacher;
      head.appendChild(t);
    }
    art.appendChild(head);
    if (r.why) art.appendChild(el("div", "why", r.why));
    art.appendChild(el("div", "q", r.q));
    const ans = el("div", "ans");
    field(ans, "pred", r.pred);
    field(ans, "gold", r.gold);
    if (r.raw) field(ans, "answer_raw", r.raw);
    if (r.extra) field(ans, "extra", r.extra);
    art.appendChild(ans);
    if (r.r) {
      const pre = el("pre", "", r.r);
      art.appendChild(pre);
      if (r.r.length > 700 || r.r.split("\\n").length > 8) {
        pre.classList.add("clamp");
        const toggle = el("button", "toggle", "show all");
        toggle.type = "button";
        toggle.addEventListener("click", () => {
          toggle.textContent = pre.classList.toggle("clamp") ? "show all" : "show less";
        });
        art.appendChild(toggle);
      }
    }
    return art;
  }
  function renderMore() {
    const end = Math.min(rendered + page, matches.length), frag = document.createDocumentFragment();
    for (let i = rendered; i < end; i++) frag.appendChild(card(rows[matches[i]]));
    list.appendChild(frag);
    rendered = end;
    more.hidden = rendered >= matches.length;
    more.textContent = "show " + Math.min(page, matches.length - rendered) + " more (" + rendered + " of " +
      matches.length + " rendered)";
  }
  function apply() {
    const verdict = select.value, needle = search.value.trim().toLowerCase();
    matches = [];
    for (let i = 0; i < rows.length; i++) {
      if ((verdict === "all" || rows[i].v === verdict) && (!needle || hay[i].includes(needle))) matches.push(i);
    }
    shown.textContent = matches.length + " of " + rows.length + " rows shown";
    shown.dataset.matched = String(matches.length);
    shown.dataset.total = String(rows.length);
    for (const chip of document.querySelectorAll(".chip")) chip.classList.toggle("on", chip.dataset.verdict === verdict);
    list.replaceChildren();
    rendered = 0;
    if (!matches.length) list.appendChild(el("div", "empty", "no row matches"));
    renderMore();
  }
  select.addEventListener("change", apply);
  search.addEventListener("input", apply);
  more.addEventListener("click", renderMore);
  for (const chip of document.querySelectorAll(".chip")) {
    chip.addEventListener("click", () => {
      select.value = select.value === chip.dataset.verdict ? "all" : chip.dataset.verdict;
      apply();
    });
  }
  new IntersectionObserver((seen) => {
    if (seen.some((s) => s.isIntersecting) && rendered < matches.length) renderMore();
  }, { rootMargin: "600px" }).observe(more);
  apply();
})();
"""
