"""The report's content as plain blocks, and its two renderings from the same blocks.

A section is a title and a list of blocks: ``Text``, ``Table``, ``Figure`` (a PNG and the table
of the numbers it draws). ``render_html`` makes one self-contained page (Jinja2 template with
autoescape; figures as ``data:`` URIs; inline CSS; no script, no external asset);
``render_markdown`` the twin, where every figure is its table, so the Markdown file carries the
same numbers and reads in a terminal or a diff.
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Union


@dataclass
class Text:
    text: str                       # plain text; `code` spans are kept as code


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    png: bytes
    alt: str                        # what the figure shows (img alt text, Markdown heading)
    table: Table                    # the numbers it draws: the Markdown twin shows this


Block = Union[Text, Table, Figure]


@dataclass
class Section:
    id: str                         # HTML anchor
    title: str
    blocks: list[Block] = field(default_factory=list)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #555; } code { background: #f4f4f4; padding: 0 .2em; }
details { margin: .3em 0 1em; } nav a { margin-right: 1em; }
"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{{ title }}</title><style>{{ css }}</style></head>
<body>
<h1>{{ title }}</h1>
<p>{{ subtitle }}</p>
<nav>{% for s in sections %}<a href="#{{ s.id }}">{{ s.title }}</a>{% endfor %}</nav>
{% for s in sections %}
<section id="{{ s.id }}"><h2>{{ s.title }}</h2>
{% for b in s.blocks %}
{%- if b.kind == "text" %}<p>{{ b.html }}</p>
{%- elif b.kind == "table" %}{{ table(b.block) }}
{%- else %}<figure><img src="data:image/png;base64,{{ b.b64 }}" alt="{{ b.block.alt }}">
<figcaption>{{ b.block.alt }}</figcaption>
<details><summary>numbers</summary>{{ table(b.block.table) }}</details></figure>
{%- endif %}
{% endfor %}</section>
{% endfor %}
</body></html>
"""


def _is_number(s: str) -> bool:
    try:
        float(s.replace("×", "").replace("%", "").split(" ")[0])
        return True
    except ValueError:
        return False


def _code_spans(text: str) -> str:
    """Escape ``text`` and turn `x` spans into <code>x</code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(title: str, subtitle: str, sections: list[Section]) -> str:
    from jinja2 import Environment
    from markupsafe import Markup
    env = Environment(autoescape=True)

    def table(t: Table) -> Markup:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
        body = "".join("<tr>" + "".join(
            f'<td class="num">{html.escape(c)}</td>' if _is_number(c) else
            f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in t.rows)
        return Markup(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    views = [{"id": s.id, "title": s.title, "blocks": [_view(b) for b in s.blocks]}
             for s in sections]
    return env.from_string(_TEMPLATE).render(title=title, subtitle=subtitle, css=Markup(_CSS),
                                              sections=views, table=table)


def _view(b: Block) -> dict:
    from markupsafe import Markup
    if isinstance(b, Text):
        return {"kind": "text", "html": Markup(_code_spans(b.text))}
    if isinstance(b, Table):
        return {"kind": "table", "block": b}
    return {"kind": "figure", "block": b, "b64": base64.b64encode(b.png).decode("ascii")}


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def markdown_table(t: Table) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in t.header) + " |",
             "|" + "|".join("---:" if t.rows and _is_number(t.rows[0][i]) else "---"
                            for i in range(len(t.header))) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def render_markdown(title: str, subtitle: str, sections: list[Section]) -> str:
    out = [f"# {title}", "", subtitle, ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Text):
                out += [b.text, ""]
            elif isinstance(b, Table):
                out += [markdown_table(b), ""]
            else:
                out += [f"*Figure (in the HTML page): {b.alt}*", "", markdown_table(b.table), ""]
    return "\n".join(out).rstrip() + "\n"
