"""report.md as one self-contained HTML page, for MLflow's artifact viewer (which renders
.html but shows .md as plain text): the figures are embedded as base64 PNGs, the tables are
HTML tables whose headers never wrap, inside a horizontally scrollable box.

`markdown_html` reads only the markdown `report.write_report` writes: `#` headings,
paragraphs, `- ` bullet lists, pipe tables, `> ` blockquotes, `**bold**`, `` `code` `` and
images `![alt](file.png)`. It is not a general markdown converter. (Not named `html.py`: run as a script from this
folder, that would shadow the standard library's `html` for every module.)
"""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; font-size: 14px;
       line-height: 1.45; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; border-bottom: 1px solid #ddd; margin-top: 1.6em; }
code { font-family: SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.9em;
       background: #f3f3f3; padding: 0 0.2em; border-radius: 3px; }
.table-wrap { overflow-x: auto; margin: 0.6em 0 1em; border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.5em; vertical-align: top; text-align: left; }
th { white-space: nowrap; background: #f6f6f6; position: sticky; top: 0; }
th:first-child, td:first-child { position: sticky; left: 0; background: #fafafa; white-space: nowrap; }
tbody tr:nth-child(even) td { background-color: #fcfcfc; }
blockquote { margin: 1em 0; padding: 0.4em 1em; border-left: 4px solid #d33; background: #fff4f4; }
img { max-width: 100%; height: auto; display: block; margin: 0.8em 0; }
"""

IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
INLINE = re.compile(r"`([^`]+)`|" + IMAGE.pattern + r"|\*\*(.+?)\*\*")
HEADING = re.compile(r"(#{1,6})\s+(.*)")
CELL_SPLIT = re.compile(r"(?<!\\)\|")
SEPARATOR = re.compile(r"\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?")


def markdown_html(markdown_text: str, figure_dir: Path) -> str:
    """The whole HTML document for `markdown_text`; images are read from `figure_dir` and
    embedded (a missing one stays a link to its file name)."""
    figure_dir = Path(figure_dir)
    lines = markdown_text.splitlines()
    body: list[str] = []
    title = "nc-study analysis"
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        heading = HEADING.fullmatch(line.strip())
        if heading:
            level = len(heading.group(1))
            if level == 1:
                title = heading.group(2)
            body.append(f"<h{level}>{inline(heading.group(2), figure_dir)}</h{level}>")
            i += 1
            continue
        block, i = _take(lines, i, _kind(line))
        body.append(_render(_kind(line), block, figure_dir))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def _kind(line: str) -> str:
    text = line.strip()
    if text.startswith("|"):
        return "table"
    if text.startswith("- ") or text == "-":
        return "list"
    if text.startswith(">"):
        return "quote"
    if IMAGE.fullmatch(text):
        return "image"
    return "paragraph"


def _take(lines: list[str], start: int, kind: str) -> tuple[list[str], int]:
    """The lines of one block of `kind` from `start`: up to a blank line, a heading or a
    line of another kind (a paragraph also takes plain continuation lines)."""
    end = start + 1
    while end < len(lines) and lines[end].strip() and not HEADING.fullmatch(lines[end].strip()):
        if _kind(lines[end]) != kind or kind == "image":
            break
        end += 1
    return [l.strip() for l in lines[start:end]], end


def _render(kind: str, block: list[str], figure_dir: Path) -> str:
    if kind == "table":
        return _table(block, figure_dir)
    if kind == "list":
        items = "\n".join(f"<li>{inline(l[1:].strip(), figure_dir)}</li>" for l in block)
        return f"<ul>\n{items}\n</ul>"
    if kind == "quote":
        text = " ".join(l[1:].strip() for l in block)
        return f"<blockquote><p>{inline(text, figure_dir)}</p></blockquote>"
    if kind == "image":
        return f"<figure>{inline(block[0], figure_dir)}</figure>"
    return f"<p>{inline(' '.join(block), figure_dir)}</p>"


def _cells(row: str) -> list[str]:
    row = row.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    return [c.strip().replace("\\|", "|") for c in CELL_SPLIT.split(row)]


def _table(block: list[str], figure_dir: Path) -> str:
    """A pipe table: the first row is the header when the second is a `|---|` separator."""
    has_header = len(block) > 1 and SEPARATOR.fullmatch(block[1]) is not None
    head, rows = (block[0], block[2:]) if has_header else (None, block)
    out = ['<div class="table-wrap"><table>']
    if head is not None:
        out.append("<thead><tr>" + "".join(f"<th>{inline(c, figure_dir)}</th>" for c in _cells(head))
                   + "</tr></thead>")
    out.append("<tbody>")
    out += ["<tr>" + "".join(f"<td>{inline(c, figure_dir)}</td>" for c in _cells(r)) + "</tr>" for r in rows]
    out.append("</tbody></table></div>")
    return "\n".join(out)


def inline(text: str, figure_dir: Path) -> str:
    """`code`, images and **bold** in one line of text; everything else HTML-escaped."""
    out, at = [], 0
    for match in INLINE.finditer(text):
        out.append(html.escape(text[at:match.start()], quote=False))
        code, alt, src, bold = match.groups()
        if code is not None:
            out.append(f"<code>{html.escape(code, quote=False)}</code>")
        elif src is not None:
            out.append(_image(alt, src, figure_dir))
        else:
            out.append(f"<strong>{inline(bold, figure_dir)}</strong>")
        at = match.end()
    out.append(html.escape(text[at:], quote=False))
    return "".join(out)


def _image(alt: str, src: str, figure_dir: Path) -> str:
    path = figure_dir / src
    if path.suffix.lower() == ".png" and path.is_file():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
    return f'<a href="{html.escape(src)}">{html.escape(alt or src)}</a>'
