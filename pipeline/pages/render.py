"""Pages as HTML and Markdown from one list of sections: the report stage's page and the compare command's.

A `Section` collects its content twice, as HTML fragments and as Markdown blocks, so one piece of
code fills both formats; the page skeleton and its style are Jinja2 templates
(`pipeline/pages/templates/`: `page.html`, `style.css`, `page.md`). The HTML is self-contained: inline
style, images as base64 data URIs, no scripts or external files, so it opens offline.
"""
from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup


@dataclass
class Section:
    """One part of a page, rendered both as HTML and as Markdown."""
    title: str
    anchor: str
    html: list[str] = field(default_factory=list)
    md: list[str] = field(default_factory=list)

    def text(self, line: str) -> None:
        self.html.append(f"<p>{inline(line)}</p>")
        self.md.append(line + "\n")

    def note(self, line: str) -> None:
        self.html.append(f'<div class="note">{inline(line)}</div>')
        self.md.append(f"> {line}\n")

    def heading(self, line: str) -> None:
        """A sub-heading (h3 / ###)."""
        self.html.append(f"<h3>{html.escape(line)}</h3>")
        self.md.append(f"### {line}\n")

    def cards(self, cards: Sequence[tuple[str, Any]]) -> None:
        """Headline numbers: big cards in HTML, a bullet list in Markdown."""
        self.html.append('<div class="cards">' + "".join(
            f'<div class="card"><div class="v">{html.escape(fmt(v))}</div><div class="k">{html.escape(k)}</div></div>'
            for k, v in cards) + "</div>")
        self.md.append("".join(f"- **{k}**: {fmt(v)}\n" for k, v in cards))

    def table(self, header: Sequence[str], rows: Iterable[Sequence[Any]], current: int | None = None) -> None:
        """A table; numeric columns right-aligned, row `current` highlighted (HTML)."""
        rows = [[fmt(v) for v in row] for row in rows]
        numeric = [all(_is_number(r[i]) for r in rows) for i in range(len(header))]
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join(
            f"<tr{' class=current' if k == current else ''}>"
            + "".join(f"<td{' class=n' if numeric[i] else ''}>{html.escape(v)}</td>" for i, v in enumerate(row))
            + "</tr>" for k, row in enumerate(rows))
        self.html.append(f'<div class="tw"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')
        esc = lambda v: v.replace("|", "\\|")  # noqa: E731
        self.md.append("| " + " | ".join(map(esc, header)) + " |\n|" + "---|" * len(header) + "\n"
                       + "".join("| " + " | ".join(map(esc, row)) + " |\n" for row in rows))

    def image(self, png: bytes, alt: str, md_link: str | None = None) -> None:
        """Embed a PNG; the Markdown links to the stage's own file when there is one."""
        data = base64.b64encode(png).decode("ascii")
        self.html.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')
        self.md.append(f"![{alt}]({md_link})\n" if md_link else f"*{alt}: see index.html*\n")


def inline(line: str) -> str:
    """Escaped text with Markdown `code` spans as <code>, so one string serves both formats."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(line))


def fmt(value: Any) -> str:
    """Numbers for tables: 4 decimals for small floats, so Dice values line up."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (float, np.floating)):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return text == "—"


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested metrics and params as dotted table keys."""
    if not isinstance(data, dict):
        return {prefix: data} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


@lru_cache(maxsize=1)
def _templates() -> Environment:
    return Environment(loader=PackageLoader("pipeline.pages", "templates"), autoescape=select_autoescape(["html"]),
                       undefined=StrictUndefined, keep_trailing_newline=True)


def render_html(sections: Sequence[Section], *, title: str, heading: str, subtitle: str) -> str:
    """The whole page; `subtitle` may hold Markdown `code` spans."""
    return _templates().get_template("page.html").render(
        title=title, heading=heading, subtitle=Markup(inline(subtitle)),
        sections=[{"title": s.title, "anchor": s.anchor, "body": Markup("".join(s.html))} for s in sections])


def render_md(sections: Sequence[Section], *, heading: str, subtitle: str) -> str:
    return _templates().get_template("page.md").render(heading=heading, subtitle=subtitle, sections=sections)
