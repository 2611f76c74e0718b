"""The model card: data lineage, training summary, quality, bias and verdict, as Markdown and HTML.

The card is built once as a list of blocks and rendered twice, so both formats always say the same thing. A
shorter Markdown summary (verdict, gates, headline metrics) becomes the registered version's description, so
the MLflow UI shows it on the version's page; the registry caps descriptions at 5,000 characters.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any

from core.registry import Manifest
from evaluate.gates import KNOWN_METRICS
from evaluate.results import SuiteResult
from evaluate.verdict import Verdict

Block = tuple[str, Any]
SUBJECT_ORDER = ("model", "base", "production")
DESCRIPTION_LIMIT = 5000


@dataclass
class CardInputs:
    label: str
    manifest: Manifest
    training: dict[str, Any]
    results: dict[str, SuiteResult]
    sources: dict[str, str]
    verdict: Verdict
    production_label: str | None
    charts: list[tuple[str, str]] = field(default_factory=list)
    confidence: float = 0.95


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _metric_table(result: SuiteResult) -> Block:
    subjects = [s for s in SUBJECT_ORDER if s in result.metrics]
    names = sorted({n for m in result.metrics.values() for n in m}, key=list(KNOWN_METRICS).index)
    rows = [[n, *(_fmt(result.metrics[s][n].value) if n in result.metrics[s] else "" for s in subjects)] for n in names]
    return ("table", (["metric", *subjects], rows))


def _interval(ci: tuple[float, float] | None) -> str:
    return f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "n/a"


def _gate_blocks(card: CardInputs) -> list[Block]:
    v = card.verdict
    if not v.gates and not v.skipped:
        return [("p", "No gates configured.")]
    rows = [
        [
            g.gate,
            _fmt(g.value),
            _interval(g.ci),
            "n/a" if g.skipped else g.decided_on if g.decided_on == "value" else f"{g.decided_on} {_fmt(g.compared)}",
            _fmt(g.threshold),
            "skipped" if g.skipped else ("pass" if g.passed else "FAIL"),
            g.note,
        ]
        for g in v.gates + v.skipped
    ]
    level = f"{card.confidence:.0%}"
    head = ["gate", "value", f"{level} interval", "decided on", "threshold", "result", "note"]
    return [
        (
            "p",
            f"Value: the version's metric (for `(METRIC - base)`, the paired difference); interval: {level} "
            "bootstrap percentile interval over the evaluated items (paired with the other model where the gate "
            "compares with one); decided on: the number compared with the threshold.",
        ),
        ("table", (head, rows)),
    ]


def _breakdown_table(result: SuiteResult, prefix: str, names: tuple[str, ...]) -> Block | None:
    """Per-group values (e.g. BBQ per category) of the named metrics, model beside base."""
    subjects = [s for s in SUBJECT_ORDER if s in result.breakdown]
    groups = sorted({k.split(".", 1)[1] for s in subjects for k in result.breakdown[s] if k.startswith(prefix)})
    if not groups:
        return None
    head = ["group", *(f"{n} ({s})" for n in names for s in subjects)]
    rows = [
        [g, *(_fmt(result.breakdown[s].get(f"{n}.{g}", float("nan"))) for n in names for s in subjects)] for g in groups
    ]
    return ("table", (head, rows))


_SUITE_DETAIL: dict[str, tuple[str, tuple[str, ...]]] = {
    "crows": ("crows_pct_stereotype.", ("crows_pct_stereotype",)),
    "bbq": ("bbq_bias_ambig.", ("bbq_acc_ambig", "bbq_bias_ambig", "bbq_acc_disambig", "bbq_bias_disambig")),
}


def registry_description(card: CardInputs) -> str:
    """The card's summary for the registry: verdict, gates with intervals, headline metrics, where the rest is."""
    v = card.verdict
    blocks: list[Block] = [
        (
            "p",
            f"**{v.outcome.upper()}**: evaluation run `{v.evaluation_run}` (full card with lineage, per-group "
            f"results and charts: `runs:/{v.evaluation_run}/model_card.html`). Compared with the base model and "
            f"with production ({card.production_label or 'none'}).",
        ),
        *_gate_blocks(card)[1:],
    ]
    extra: list[Block] = [("table", (["suite", "items"], [[k, val] for k, val in card.sources.items()]))]
    for suite in ("quality", "crows", "bbq", "counterfactual"):
        if suite in card.results:
            extra.append(_metric_table(card.results[suite]))
    text = to_markdown(blocks)
    for block in extra:
        longer = text + "\n" + to_markdown([block])
        if len(longer) > DESCRIPTION_LIMIT:
            break
        text = longer
    if len(text) > DESCRIPTION_LIMIT:
        tail = f"\n... (cut; see runs:/{v.evaluation_run}/model_card.md)"
        text = text[: DESCRIPTION_LIMIT - len(tail)] + tail
    return text


def build(card: CardInputs) -> list[Block]:
    m, t, v = card.manifest, card.training, card.verdict
    blocks: list[Block] = [
        ("h1", f"Model card: {card.label}"),
        (
            "p",
            f"Verdict: **{v.outcome.upper()}** (evaluation run `{v.evaluation_run}`). "
            f"Compared with the base model and with production ({card.production_label or 'none'}).",
        ),
        ("h2", "Data lineage"),
        (
            "table",
            (
                ["item", "value"],
                [
                    ["base model", m.base_model],
                    ["base weights digest", m.base_digest],
                    ["job", m.job_name or "n/a"],
                    ["config hash", m.config_hash or "n/a"],
                    ["git commit", m.git_commit or "n/a"],
                    ["training run", t.get("run_id", "n/a")],
                    *[
                        [f"dataset: {d['name']}", f"digest {d['digest']} from {d['source']}"]
                        for d in t.get("datasets", [])
                    ],
                ],
            ),
        ),
        ("h2", "Training summary"),
        (
            "table",
            (["item", "value"], [[k, _fmt(val)] for k, val in t.get("summary", {}).items()] or [["-", "-"]]),
        ),
        ("h2", "Evaluation data"),
        ("table", (["suite", "source"], [[k, val] for k, val in card.sources.items()])),
    ]
    for suite, title in (
        ("quality", "Quality"),
        ("crows", "Bias: CrowS-Pairs"),
        ("bbq", "Bias: BBQ"),
        ("counterfactual", "Bias: counterfactual fairness"),
    ):
        if suite in card.results:
            blocks += [("h2", title), _metric_table(card.results[suite])]
            detail = _SUITE_DETAIL.get(suite)
            table = _breakdown_table(card.results[suite], detail[0], detail[1]) if detail else None
            if table is not None:
                blocks.append(table)
    blocks.append(("h2", "Gates"))
    blocks += _gate_blocks(card)
    if card.charts:
        blocks.append(("h2", "Charts"))
        blocks += [("img", chart) for chart in card.charts]
    return blocks


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for kind, body in blocks:
        if kind == "h1":
            out.append(f"# {body}\n")
        elif kind == "h2":
            out.append(f"## {body}\n")
        elif kind == "p":
            out.append(f"{body}\n")
        elif kind == "table":
            head, rows = body
            cell = lambda x: str(x).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            out.append("| " + " | ".join(map(cell, head)) + " |")
            out.append("|" + "---|" * len(head))
            out += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
            out.append("")
        elif kind == "img":
            title, path = body
            out.append(f"![{title}]({path})\n")
    return "\n".join(out)


def _inline(text: str) -> str:
    """Escape, then render the two inline marks the card uses: **bold** and `code`."""
    parts = html.escape(text).split("**")
    text = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def to_html(blocks: list[Block]) -> str:
    out = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Model card</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}</style></head><body>",
    ]
    for kind, body in blocks:
        if kind in {"h1", "h2"}:
            out.append(f"<{kind}>{_inline(body)}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline(body)}</p>")
        elif kind == "table":
            head, rows = body
            out.append("<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in head) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows]
            out.append("</table>")
        elif kind == "img":
            title, path = body
            out.append(
                f"<figure><img src='{html.escape(path)}' alt='{html.escape(title)}'>"
                f"<figcaption>{html.escape(title)}</figcaption></figure>"
            )
    out.append("</body></html>")
    return "\n".join(out)
