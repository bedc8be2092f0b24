"""The report's building blocks and their two renderings: Markdown (``report.md``) and self-contained HTML.

Why: every section is written once, as a list of blocks (heading, paragraph, table, figure, …), and rendered
twice, so ``report.md`` and ``report.html`` always say the same thing. Text in blocks uses a tiny inline
Markdown (``code`` and **bold**) that both renderers understand. The HTML has inline CSS, figures embedded as
base64 PNG, ``<details>`` for long lists and no JavaScript, so it can be mailed or archived as one file.

``markdown_to_html`` converts the Markdown other commands write (``latents.md``, the demo's extra lines) into
the same HTML: headings, pipe tables, lists, code fences, images (embedded), paragraphs and raw
``<details>``/``<summary>`` lines. It is deliberately small: it handles what this project writes, nothing more.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    """A section heading; ``anchor`` becomes the HTML id (for the table of contents)."""

    level: int
    text: str
    anchor: str | None = None


@dataclass
class Para:
    """A paragraph of inline Markdown; ``kind`` styles it in HTML (``note``, ``warn``, ``missing``)."""

    text: str
    kind: str = ""


@dataclass
class Bullets:
    """A bulleted list of inline Markdown items."""

    items: list[str]
    kind: str = ""


@dataclass
class Table:
    """A table: header, rows of cells (inline Markdown), an optional CSV name under ``tables/``.

    ``csv_rows`` (default: the rows as shown) lets the CSV carry raw numbers where the cells are formatted.
    """

    header: list[str]
    rows: list[list[str]]
    csv: str | None = None
    csv_rows: list[list] | None = None
    csv_header: list[str] | None = None  #: the CSV's header when ``csv_rows`` differ from the shown cells
    caption: str | None = None
    numeric: bool = True  #: right-align every column after the first in HTML


@dataclass
class Figure:
    """A PNG written under ``figures/`` (path relative to the report folder) with a caption."""

    path: str
    caption: str = ""
    width: str = "100%"


@dataclass
class FigureRow:
    """Figures shown side by side in HTML (one after another in Markdown)."""

    figures: list[Figure]


@dataclass
class Details:
    """A collapsed group of blocks (``<details>`` in both renderings)."""

    summary: str
    blocks: list = field(default_factory=list)


@dataclass
class Raw:
    """Already rendered content: ``html`` for the HTML file, ``md`` (may be empty) for the Markdown file."""

    html: str
    md: str = ""


@dataclass
class Pre:
    """Preformatted text (a code block)."""

    text: str


@dataclass
class Included:
    """Markdown written by another command, included as is; images resolve against ``base`` (a folder)."""

    text: str
    base: Path
    demote: int = 0  #: heading levels to add (a ``##`` section inside a ``##`` section becomes ``###``)


Block = Heading | Para | Bullets | Table | Figure | FigureRow | Details | Raw | Pre | Included


# ---- inline Markdown --------------------------------------------------------------------------------------

_INLINE = re.compile(r"`([^`]+)`|\*\*([^*]+)\*\*|\[([^\]]+)\]\((#[\w-]+)\)")


def inline_html(text: str) -> str:
    """Inline Markdown → HTML: ``code``, **bold** and in-page links [text](#anchor); everything else escaped."""
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos : m.start()], quote=False))
        if m.group(1) is not None:
            out.append(f"<code>{html.escape(m.group(1), quote=False)}</code>")
        elif m.group(2) is not None:
            out.append(f"<strong>{html.escape(m.group(2), quote=False)}</strong>")
        else:
            out.append(f'<a href="{html.escape(m.group(4))}">{html.escape(m.group(3), quote=False)}</a>')
        pos = m.end()
    out.append(html.escape(text[pos:], quote=False))
    return "".join(out)


def md_cell(text: str) -> str:
    """A table cell safe in a Markdown pipe table."""
    return str(text).replace("\n", " ").replace("|", "\\|")


# ---- Markdown rendering ----------------------------------------------------------------------------------


def _md_table(t: Table) -> list[str]:
    lines = []
    if t.caption:
        lines += [t.caption, ""]
    lines.append("| " + " | ".join(md_cell(h) for h in t.header) + " |")
    lines.append("|" + "---|" * len(t.header))
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in t.rows]
    return lines


def _demote(text: str, by: int) -> str:
    if by <= 0:
        return text
    return re.sub(r"^(#{1,5}) ", lambda m: "#" * min(6, len(m.group(1)) + by) + " ", text, flags=re.M)


def _relink(text: str, rel: str) -> str:
    """Markdown ``text`` with its relative image links made relative to another folder (``rel`` away)."""
    return re.sub(
        r"!\[([^\]]*)\]\((?!https?:|/)([^)]+)\)",
        lambda m: f"![{m.group(1)}]({Path(rel, m.group(2)).as_posix()})",
        text,
    )


def render_md(blocks: Sequence[Block], out_dir: Path) -> str:
    """The Markdown of ``blocks``; figures and included images are linked relative to ``out_dir``."""
    lines: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            lines += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            prefix = "> " if b.kind in ("warn", "missing") else ""
            lines += [prefix + b.text, ""]
        elif isinstance(b, Bullets):
            lines += [f"- {x}" for x in b.items] + [""]
        elif isinstance(b, Table):
            lines += [*_md_table(b), ""]
        elif isinstance(b, Figure):
            lines += [f"![{b.caption or Path(b.path).stem}]({b.path})", ""]
        elif isinstance(b, FigureRow):
            lines += [f"![{f.caption or Path(f.path).stem}]({f.path})\n" for f in b.figures]
        elif isinstance(b, Details):
            lines += [f"<details><summary>{html.escape(b.summary)}</summary>", ""]
            lines += [render_md(b.blocks, out_dir), "</details>", ""]
        elif isinstance(b, Raw):
            if b.md:
                lines += [b.md, ""]
        elif isinstance(b, Pre):
            lines += ["```", b.text.rstrip("\n"), "```", ""]
        elif isinstance(b, Included):
            text = _relink(b.text, os.path.relpath(b.base, out_dir))
            lines += [_demote(text, b.demote).rstrip("\n"), ""]
    return "\n".join(lines)


# ---- HTML rendering ---------------------------------------------------------------------------------------


def png_data_uri(path: Path) -> str | None:
    """``data:image/png;base64,...`` of a PNG file, or None when it is missing."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _html_table(t: Table) -> str:
    cls = ' class="num"' if t.numeric else ""
    head = "".join(f"<th>{inline_html(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{inline_html(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    cap = f"<caption>{inline_html(t.caption)}</caption>" if t.caption else ""
    return (
        f'<div class="tw"><table{cls}>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    )


def png_width(path: Path) -> int | None:
    """Pixel width of a PNG file from its header (None if it is not a PNG)."""
    try:
        head = Path(path).read_bytes()[:24]
    except OSError:
        return None
    return int.from_bytes(head[16:20], "big") if head[:8] == b"\x89PNG\r\n\x1a\n" else None


#: figures are drawn at 150 dpi and shown at 100 CSS pixels per inch, so all text has one size on the page
SHOW_SCALE = 1.5


def _html_figure(f: Figure, out_dir: Path) -> str:
    uri = png_data_uri(out_dir / f.path)
    if uri is None:
        return f'<p class="missing">figure {html.escape(f.path)} was not drawn</p>'
    cap = f"<figcaption>{inline_html(f.caption)}</figcaption>" if f.caption else ""
    alt = html.escape(f.caption or Path(f.path).stem)
    px = png_width(out_dir / f.path)
    width = f"width:{px / SHOW_SCALE:.0f}px;" if px else ""
    return (
        f'<figure style="max-width:{f.width}"><img style="{width}max-width:100%" src="{uri}" alt="{alt}">'
        f"{cap}</figure>"
    )


def render_html(blocks: Sequence[Block], out_dir: Path) -> str:
    """The HTML body of ``blocks``, figures embedded from files under ``out_dir``."""
    parts: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            anchor = f' id="{html.escape(b.anchor)}"' if b.anchor else ""
            parts.append(f"<h{b.level}{anchor}>{inline_html(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            cls = f' class="{b.kind}"' if b.kind else ""
            parts.append(f"<p{cls}>{inline_html(b.text)}</p>")
        elif isinstance(b, Bullets):
            cls = f' class="{b.kind}"' if b.kind else ""
            parts.append(f"<ul{cls}>" + "".join(f"<li>{inline_html(x)}</li>" for x in b.items) + "</ul>")
        elif isinstance(b, Table):
            parts.append(_html_table(b))
        elif isinstance(b, Figure):
            parts.append(_html_figure(b, out_dir))
        elif isinstance(b, FigureRow):
            parts.append(
                '<div class="figs">' + "".join(_html_figure(f, out_dir) for f in b.figures) + "</div>"
            )
        elif isinstance(b, Details):
            inner = render_html(b.blocks, out_dir)
            parts.append(f"<details><summary>{inline_html(b.summary)}</summary>{inner}</details>")
        elif isinstance(b, Raw):
            parts.append(b.html)
        elif isinstance(b, Pre):
            parts.append(f"<pre>{html.escape(b.text)}</pre>")
        elif isinstance(b, Included):
            parts.append(markdown_to_html(_demote(b.text, b.demote), b.base))
    return "\n".join(parts)


def write_csvs(blocks: Sequence[Block], folder: Path) -> list[str]:
    """Write every table that names a CSV (also inside ``Details``) to ``folder``; returns the file names."""
    written: list[str] = []
    for b in blocks:
        if isinstance(b, Details):
            written += write_csvs(b.blocks, folder)
        if not isinstance(b, Table) or not b.csv:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(b.csv_header or b.header)
        w.writerows(b.csv_rows if b.csv_rows is not None else b.rows)
        (folder / b.csv).write_text(buf.getvalue(), encoding="utf-8")
        written.append(b.csv)
    return written


# ---- Markdown written elsewhere → HTML --------------------------------------------------------------------

_IMAGE_LINE = re.compile(r"^\s*!\[([^\]]*)\]\(([^)]+)\)\s*$")
_RAW_LINE = re.compile(r"^\s*</?(?:details|summary)\b", re.I)
_TABLE_RULE = re.compile(r"^\|?\s*:?-{3,}:?\s*(?:\|\s*:?-{3,}:?\s*)*\|?\s*$")


def _cells(line: str) -> list[str]:
    s = line.strip()
    s = s[1:] if s.startswith("|") else s
    s = s[:-1] if s.endswith("|") and not s.endswith("\\|") else s
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", s)]


def _raw_details(line: str) -> str:
    """A ``<details><summary>…</summary>`` line with its summary text escaped (tags kept)."""
    return re.sub(
        r"(<summary>)(.*?)(</summary>)", lambda m: m.group(1) + html.escape(m.group(2)) + m.group(3), line
    )


def markdown_to_html(text: str, base: Path | None = None) -> str:
    """HTML of the Markdown this project writes (see the module docstring); images under ``base`` embedded."""
    lines = text.splitlines()
    out: list[str] = []
    para: list[str] = []
    i = 0

    def flush() -> None:
        if para:
            out.append("<p>" + inline_html(" ".join(para)) + "</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        s = line.strip()
        if not s:
            flush()
            i += 1
        elif s.startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            out.append("<pre>" + html.escape("\n".join(lines[i + 1 : j])) + "</pre>")
            i = j + 1
        elif m := re.match(r"^(#{1,6})\s+(.*)$", s):
            flush()
            n = len(m.group(1))
            out.append(f"<h{n}>{inline_html(m.group(2))}</h{n}>")
            i += 1
        elif _RAW_LINE.match(s):
            flush()
            out.append(_raw_details(s))
            i += 1
        elif m := _IMAGE_LINE.match(s):
            flush()
            src = m.group(2)
            uri = png_data_uri(Path(base or ".") / src) if not src.startswith(("http:", "https:")) else None
            if uri is None:
                out.append(f'<p class="missing">image {html.escape(src)} not found</p>')
            else:
                out.append(f'<figure><img src="{uri}" alt="{html.escape(m.group(1))}"></figure>')
            i += 1
        elif s.startswith("|") and i + 1 < len(lines) and _TABLE_RULE.match(lines[i + 1].strip()):
            flush()
            header = _cells(s)
            rows = []
            j = i + 2
            while j < len(lines) and lines[j].strip().startswith("|"):
                rows.append(_cells(lines[j]))
                j += 1
            out.append(_html_table(Table(header, rows, numeric=False)))
            i = j
        elif re.match(r"^\s*[-*] ", line):
            flush()
            items = []
            while i < len(lines) and re.match(r"^\s*[-*] ", lines[i]):
                items.append(re.sub(r"^\s*[-*] ", "", lines[i]))
                i += 1
            out.append("<ul>" + "".join(f"<li>{inline_html(x)}</li>" for x in items) + "</ul>")
        else:
            para.append(s)
            i += 1
    flush()
    return "\n".join(out)


# ---- the page ---------------------------------------------------------------------------------------------

CSS = """
:root{--fg:#1d232b;--mute:#5b6673;--line:#dde2e8;--bg:#fff;--soft:#f5f7fa;--warn:#fff6dd;--warnl:#e5b73b;
--miss:#eef3fb;--missl:#6c93c9}
*{box-sizing:border-box}
body{margin:0;font:14px/1.5 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--fg);
background:var(--bg)}
main{max-width:1180px;margin:0 auto;padding:18px 28px 60px}
header.top{border-bottom:3px solid #1f77b4;margin-bottom:10px;padding-bottom:6px}
header.top h1{margin:0;font-size:24px}
header.top .sub{color:var(--mute);font-size:13px}
nav.toc{font-size:13px;margin:8px 0 4px;display:flex;flex-wrap:wrap;gap:4px 14px}
nav.toc a{color:#1f5fa8;text-decoration:none}
h2{font-size:19px;margin:30px 0 8px;padding-top:6px;border-top:1px solid var(--line)}
header.top+h2{border-top:none;margin-top:10px}
h3{font-size:15.5px;margin:20px 0 6px}
h4{font-size:14px;margin:14px 0 4px}
p{margin:6px 0 10px}
code{font:12.5px/1.4 SFMono-Regular,Menlo,Consolas,monospace;background:var(--soft);padding:0 3px;border-radius:3px}
pre{font:12px/1.45 SFMono-Regular,Menlo,Consolas,monospace;background:var(--soft);padding:10px;border-radius:5px;
overflow:auto;white-space:pre-wrap}
.tw{overflow-x:auto;margin:6px 0 12px}
table{border-collapse:collapse;font-size:13px}
caption{caption-side:top;text-align:left;color:var(--mute);padding:2px 0 4px}
th,td{border-bottom:1px solid var(--line);padding:4px 9px;text-align:left;vertical-align:top}
th{background:var(--soft);font-weight:600;white-space:nowrap}
table.num td:not(:first-child){text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tbody tr:hover{background:#fafbfd}
figure{margin:8px 0 14px}
figure img{display:block;height:auto;border:1px solid var(--line);border-radius:4px}
figcaption{color:var(--mute);font-size:12.5px;margin-top:3px}
.figs{display:flex;flex-wrap:wrap;gap:10px 18px;align-items:flex-start}
.figs figure{flex:0 1 auto;margin:4px 0}
p.warn,ul.warn li{background:var(--warn);border-left:4px solid var(--warnl)}
p.warn{padding:6px 10px}
ul.warn{list-style:none;padding:0}ul.warn li{padding:5px 10px;margin:4px 0}
p.missing{background:var(--miss);border-left:4px solid var(--missl);padding:6px 10px}
p.note{color:var(--mute);font-size:13px}
details{margin:6px 0 10px}
summary{cursor:pointer;color:#1f5fa8}
.cfg{display:grid;grid-template-columns:repeat(auto-fill,minmax(270px,1fr));gap:2px 18px;font-size:13px;
background:var(--soft);border-radius:6px;padding:10px 14px}
.cfg div{display:flex;gap:8px;border-bottom:1px dotted var(--line);padding:2px 0;min-width:0}
.cfg b{font-weight:600;color:var(--mute);white-space:nowrap}
.cfg span{overflow-wrap:anywhere;font-family:SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
.glance{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.glance div{background:var(--soft);border-radius:6px;padding:6px 12px;border-top:3px solid var(--c,#888)}
.glance b{display:block;font-size:17px}
.glance small{color:var(--mute)}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.card{border:1px solid var(--line);border-radius:7px;margin:12px 0 18px;overflow:hidden}
.card>header{display:flex;flex-wrap:wrap;gap:4px 14px;align-items:baseline;background:var(--soft);
padding:7px 12px;font-size:13px}
.card>header .cat{font-weight:700;text-transform:uppercase;font-size:12px;letter-spacing:.04em}
.card .fixed{color:#2a9d4a}.card .broken{color:#c0392b}
.card .body{padding:6px 12px 10px}
.strip{position:relative;height:16px;background:#eef1f5;border-radius:3px;margin:6px 0 2px}
.strip i{position:absolute;top:2px;width:2px;height:12px;background:#d8853b}
.strip b{position:absolute;top:-2px;width:3px;height:20px;background:#1d232b}
.legend{font-size:12px;color:var(--mute)}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:12px}
.cols h5{margin:6px 0 3px;font-size:12.5px;color:var(--mute)}
.txt{white-space:pre-wrap;font:12.5px/1.5 SFMono-Regular,Menlo,Consolas,monospace;background:#fbfcfd;
border:1px solid var(--line);border-radius:4px;padding:6px 8px;max-height:360px;overflow:auto;word-break:break-word}
.txt .div{background:#ffe08a;outline:1px solid #d9a400;border-radius:2px}
.txt .ev{text-decoration:underline 2px #d8853b;text-underline-offset:2px}
.chip{display:inline-block;font:600 10px/1.2 -apple-system,Arial,sans-serif;color:#fff;border-radius:8px;
padding:1px 6px;margin:0 2px;vertical-align:1px;white-space:nowrap}
@media print{details{display:block}}
"""


def page(title: str, subtitle: str, toc: Sequence[tuple[str, str]], body: str) -> str:
    """The whole HTML document: head with inline CSS, a header with the table of contents, the body."""
    nav = " ".join(f'<a href="#{html.escape(a)}">{html.escape(t)}</a>' for a, t in toc)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body><main>"
        f'<header class="top"><h1>{html.escape(title)}</h1><div class="sub">{inline_html(subtitle)}</div>'
        f'<nav class="toc">{nav}</nav></header>\n{body}\n</main></body></html>\n'
    )
