"""sail.py as an annotated page, docs/sail.html: prose and equations on the left, code on the right.

    python docs/annotate.py                # writes docs/sail.html from sail.py
    python docs/annotate.py --check        # exits 1 if docs/sail.html is not what sail.py gives
    python docs/annotate.py --screenshot   # and docs/sail.png: PART 1 in headless Chromium

The page is made from sail.py itself, so it cannot drift from the code (tests/test_page.py checks
that it is current). The layout is labml's annotated implementations: each row is a block of code
beside the comments above it, or beside the docstring of the function it opens. Comment lines
`# Eq. X: <maths>` become typeset equations: a few rules below turn sail.py's plain-text maths into
LaTeX, latex2mathml turns that into MathML, which browsers draw natively; a line the rules cannot
translate is shown as code, never as half-converted TeX. The page needs no network: no script, no
external stylesheet or font. Only regenerating needs the optional libraries:
pip install pygments markdown-it-py latex2mathml
"""

import argparse
import ast
import html
import io
import re
import shutil
import subprocess
import sys
import tempfile
import tokenize
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE, PAGE, SCREENSHOT = ROOT / "sail.py", ROOT / "docs" / "sail.html", ROOT / "docs" / "sail.png"
LIBRARIES = ("pygments", "markdown-it-py", "latex2mathml")
NEEDS = "pip install pygments markdown-it-py latex2mathml"


# =================================================================================================
# Plain-text maths -> LaTeX, the few rules sail.py's comments need
# =================================================================================================

GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "theta", "lambda", "mu", "pi", "sigma",
         "tau", "phi", "omega"}
# Words that are maths, not prose; any other word of two letters or more is a variable's name.
NAMED = {"eps": r"\epsilon", "log": r"\log", "exp": r"\exp", "sum": r"\sum",
         "mean": r"\operatorname{mean}", "argmax": r"\operatorname{argmax}",
         "argmin": r"\operatorname{argmin}", "sqrt": "sqrt"}
TOKEN = re.compile(r"""(?P<space>\s*)(?:
      (?P<number>\d+(?:\.\d+)?(?![A-Za-z]))   # not 1e-8 or 2x: those stay text
    | (?P<name>[A-Za-z][A-Za-z0-9]*)(?:_(?P<sub>\{[^{}]*\}|[A-Za-z0-9]+))?
    | \^(?P<sup>\{[^{}]*\}|[A-Za-z0-9]+)
    | (?P<op>\|\||[-+*/=<>|,;()\[\]]))""", re.X)
OPERATORS = {"*": r"\,", "-": "-", "+": "+", "=": "=", "<": "<", ">": ">", ",": ",", ";": ";",
             "/": "/"}


class Untranslatable(Exception):
    """The rules do not cover this text: it is shown as code instead."""


def symbol(word):
    """A name as sail.py spells it -> LaTeX: beta -> \\beta, x -> x, err -> \\text{err}."""
    if word in GREEK:
        return "\\" + word
    return word if len(word) == 1 else NAMED.get(word, r"\text{%s}" % word)


def to_latex(text):
    """`x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps` -> `x_{t} = \\sqrt{a_{t}} x_{0} + ...`.

    Rules: name_sub and name^sup are sub- and superscripts; Greek names are letters, eps is epsilon;
    sqrt(...) is a root; (a/b) is a fraction; ||...|| a norm; * a thin space; a | between spaces
    is "given". Two ordinary words in a row mean English, not maths: Untranslatable.
    """
    tokens, position = [], 0
    while position < len(text.rstrip()):
        match = TOKEN.match(text, position)
        if not match:
            raise Untranslatable(text[position:])
        tokens.append(match)
        position = match.end()
    items = parse(tokens, 0, None)[0]
    if "sqrt" in items:  # a root needs its (...)
        raise Untranslatable("sqrt")
    return " ".join(items)


def parse(tokens, i, closer):
    """Tokens from i up to `closer` -> (LaTeX items, index after it)."""
    items, last_was_word = [], False
    while i < len(tokens):
        token = tokens[i]
        op, name = token["op"], token["name"]
        if op in (")", "]") or (op == "||" and closer == "||"):
            if op != closer:
                raise Untranslatable("unbalanced " + op)
            return items, i + 1
        i += 1
        word = name is not None and len(name) > 1 and name not in GREEK and name not in NAMED
        if word and last_was_word:
            raise Untranslatable("prose")  # "human seed pairs", not maths
        last_was_word = word
        if op in ("(", "[", "||"):
            inner, i = parse(tokens, i, {"(": ")", "[": "]", "||": "||"}[op])
            items.append(group(op, inner, items))
        elif name is not None:
            sub = token["sub"]
            items.append(symbol(name) + ("" if sub is None else "_{%s}" % subscript(sub)))
        elif token["number"] is not None:
            items.append(token["number"])
        elif token["sup"] is not None:
            if not items:
                raise Untranslatable("^ with nothing before it")
            items[-1] += "^{%s}" % subscript(token["sup"])
        elif op == "|":  # spaced: p(x | y); else |S|
            spaced = token["space"] and i < len(tokens) and tokens[i]["space"]
            items.append(r"\mid" if spaced else "|")
        else:
            items.append(OPERATORS[op])
    if closer is not None:
        raise Untranslatable("unclosed " + closer)
    return items, i


def group(bracket, inner, before):
    """A bracketed group, one item (a superscript after it raises all of it): sqrt(x) -> \\sqrt{x};
    (a/b) -> \\frac{a}{b}; ||x|| -> a norm; brackets around something tall grow with it."""
    if bracket == "(" and before and before[-1] == "sqrt":
        before.pop()
        return r"\sqrt{%s}" % " ".join(inner)
    if bracket == "(" and len(inner) == 3 and inner[1] == "/":
        return r"\frac{%s}{%s}" % (inner[0], inner[2])
    left, right = {"(": ("(", ")"), "[": ("[", "]"), "||": (r"\lVert", r"\rVert")}[bracket]
    if any(tall in item for item in inner for tall in (r"\frac", r"\sum", r"\sqrt")):
        left, right = r"\left" + left, r"\right" + right
    return "{%s %s %s}" % (left, " ".join(inner), right)


def subscript(text):
    """The text of x_t or x^{i-1}: a name, a number, or maths in braces."""
    if text.startswith("{"):
        return to_latex(text[1:-1])
    if text in GREEK or text in NAMED or len(text) == 1 or text.isdigit():
        return symbol(text)
    return r"\text{%s}" % text


def top_level(text, what):
    """Where `what` first occurs in text outside brackets, or -1."""
    depth = 0
    for i, char in enumerate(text):
        depth += (char in "([") - (char in ")]")
        if depth == 0 and text.startswith(what, i):
            return i
    return -1


def equation(text):
    """`<maths>[, <words>]` -> (LaTeX, words), or None when the maths is no equation the rules
    translate (no '=' outside brackets, English, an unknown sign)."""
    comma = top_level(text, ", ")
    maths, words = (text, "") if comma < 0 else (text[:comma], text[comma + 2:])
    maths = maths.rstrip(".")
    if top_level(maths, "=") < 0:
        return None
    try:
        return to_latex(maths), words
    except Untranslatable:
        return None


# =================================================================================================
# Prose: markdown, with the equations typeset
# =================================================================================================

MATHML = "http://www.w3.org/1998/Math/MathML"
LABELLED = re.compile(r"^Eq\. ([\w-]+): (.*)$")      # "Eq. 8: r = -(beta/2) * mean_k [...]"
ALONE = re.compile(r"^[A-Za-z]\w* = ")              # "v = sqrt(a_t) eps - ...", a bare equation


def prose_html(text, markdown, mathml):
    """Docstring or comment text -> HTML. An `Eq. X: ...` line, a line that is only an equation,
    and an indented equation line (a docstring's displayed formula) are typeset; other indented
    runs are code blocks; the rest is markdown."""
    lines, source, equations = text.split("\n"), [], []

    def typeset(latex):
        """LaTeX -> MathML, or None where latex2mathml refuses what the rules wrote."""
        try:
            return mathml(latex, display="block").replace(f' xmlns="{MATHML}"', "")  # HTML knows it
        except Exception:
            return None

    def display(math, tag=""):
        """An equation on its own line (a placeholder in the markdown until it is rendered)."""
        tag = f'<span class="tag">Eq. {tag}</span>' if tag else ""
        equations.append(f'<div class="eq">{math}{tag}</div>')
        source.extend(["", f"@@EQ{len(equations) - 1}@@", ""])

    i = 0
    while i < len(lines):
        line = lines[i]
        if line[:1].isspace() and line.strip():  # an indented run, to its last indented line
            run = [j for j in range(i, len(lines)) if lines[j].strip()]
            run = run[:next((k for k, j in enumerate(run) if not lines[j][:1].isspace()), len(run))]
            block, i = lines[i:run[-1] + 1], run[-1] + 1
            found = [equation(row.strip()) for row in block if row.strip()]
            maths = [typeset(latex) for latex, words in filter(None, found) if not words]
            if len(maths) == len(found) and all(maths):  # each line an equation: typeset
                for math in maths:
                    display(math)
            else:
                source.extend(["", "```"] + dedent(block) + ["```", ""])
            continue
        i += 1
        labelled = LABELLED.match(line)
        found = equation(labelled[2] if labelled else line)
        math = found and typeset(found[0])
        if labelled and math:  # Eq. 8: r = ..., words
            display(math, labelled[1])
            source.append(escape(found[1]))
        elif labelled and top_level(labelled[2], "=") >= 0:  # maths the rules cannot translate
            maths = labelled[2].split(", ")[0]
            source.append(f"Eq. {labelled[1]}: `{maths}`" + escape(labelled[2][len(maths):]))
        elif ALONE.match(line) and math and not found[1]:  # v = sqrt(a_t) eps - ...
            display(math)
        else:  # prose, and "Eq. DPO: winner and loser share ...", which is no equation
            source.append(escape(line))
    rendered = markdown.render("\n".join(source))
    for n, block in enumerate(equations):
        rendered = rendered.replace(f"<p>@@EQ{n}@@</p>", block)
    return rendered


def escape(line):
    """A `*` between two characters is multiplication (N*K), not markdown's emphasis."""
    return re.sub(r"(?<=\S)\*(?=\S)", r"\\*", line)


def dedent(lines):
    """Lines less their common indentation."""
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    return [line[indent:] for line in lines]


# =================================================================================================
# sail.py -> parts -> sections -> rows (prose beside the code it explains)
# =================================================================================================

BANNER = re.compile(r"^#\s*([=#])\1{19,}\s*$")  # "# =====..." a section, "# #####..." a part


@dataclass
class Row:
    prose: list = field(default_factory=list)  # markdown lines
    code: list = field(default_factory=list)   # source lines


@dataclass
class Section:
    title: str = ""
    id: str = ""
    refs: str = ""  # "(Eq. F, Eq. RF, Eq. DPO)" at the end of a banner's title
    rows: list = field(default_factory=list)


@dataclass
class Part:
    title: str = ""
    id: str = ""
    sections: list = field(default_factory=lambda: [Section()])


def comment_text(line):
    """`    # --- a comment` -> `a comment` (one space after # kept off; decorations dropped)."""
    return re.sub(r"^[-=]{3,}\s*", "", re.sub(r"^\s*# ?", "", line))


def first_line(node):
    """A statement's first line, its decorators included."""
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])


def read(source):
    """sail.py's text -> its parts. Comments above code, and a function's docstring, are the prose
    of a row; a def or class starts a row; banners start sections and parts."""
    tree, lines = ast.parse(source), source.split("\n")
    docstrings, starts = {}, set()  # first line -> (last line, text, module?); defs' first lines
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            starts.add(first_line(node))
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                and ast.get_docstring(node) is not None:
            expr = node.body[0]
            if not lines[expr.lineno - 1][:expr.col_offset].strip():  # not `def f(): """..."""`
                docstrings[expr.lineno] = (expr.end_lineno, ast.get_docstring(node),
                                           isinstance(node, ast.Module))
    # A top-level statement after a function or class starts a row (a constant after a def).
    for before, after in zip(tree.body, tree.body[1:]):
        if isinstance(before, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            starts.add(first_line(after))
    comments = {token.start[0] for token in tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT and not token.line[:token.start[1]].strip()
                and not token.string.startswith("#!")}  # full-line comments, not a #! line
    parts = [Part()]
    row = Row()

    def start_row():
        nonlocal row
        while row.code and not row.code[-1].strip():
            row.code.pop()
        if row.prose or row.code:
            parts[-1].sections[-1].rows.append(row)
        row = Row()

    n = 1
    while n <= len(lines):
        line = lines[n - 1]
        if n in comments and BANNER.match(line):
            title = []
            while n + len(title) + 1 in comments and not BANNER.match(lines[n + len(title)]):
                title.append(comment_text(lines[n + len(title)]).strip())
            closing = n + len(title) + 1
            start_row()
            if title and closing in comments and BANNER.match(lines[closing - 1]):
                name, refs = (re.split(r"\s{2,}", " ".join(title), maxsplit=1) + [""])[:2]
                if BANNER.match(line)[1] == "#":
                    parts.append(Part(title=name.strip()))
                else:
                    parts[-1].sections.append(Section(title=name.strip(), refs=refs.strip()))
                n = closing + 1
            else:  # a lone rule line: decoration
                n += 1
            continue
        if n in docstrings:
            last, text, module = docstrings[n]
            if module:
                for prose, code in split_module_docstring(text):
                    row.prose, row.code = prose, code
                    start_row()
            else:
                row.prose += ([""] if row.prose else []) + text.split("\n")
            n = last + 1
            continue
        if n in comments:
            if any(code.strip() for code in row.code):
                start_row()
            row.prose += [""] if row.prose else []
            while n in comments and not BANNER.match(lines[n - 1]):
                row.prose.append(comment_text(lines[n - 1]))
                n += 1
            continue
        if n in starts and any(code.strip() for code in row.code):
            start_row()
        if line.strip() or row.code:  # no blank lines at the top of a row
            row.code.append(line)
        n += 1
    start_row()
    for part in parts:  # a section with no rows (a part's title) is not drawn
        part.sections = [s for s in part.sections if s.rows or s.title]
    return parts


def split_module_docstring(text):
    """The header docstring -> [(prose lines, code lines)]: its indented blocks (the algorithm's
    pseudo-code, the equation map) go to the code column, beside the paragraph before them."""
    rows, prose, code = [], [], []
    for line in text.split("\n")[1:]:  # the first line is the page's title
        if line[:1].isspace() or (code and not line.strip()):
            code.append(line)
            continue
        if code:
            rows.append((prose, dedent(code)))
            prose, code = [], []
        prose.append(line)
    rows.append((prose, dedent(code) if code else []))
    return rows


# =================================================================================================
# The page
# =================================================================================================

STYLE = """
body { margin: 0; color: #1f2328; background: #fff;
       font: 15px/1.55 system-ui, "DejaVu Sans", "Liberation Sans", Arial, sans-serif; }
.row { display: flex; }
.docs { flex: 0 0 40%; min-width: 0; box-sizing: border-box; padding: 2px 28px; }
.code { flex: 1 1 60%; min-width: 0; box-sizing: border-box; padding: 2px 20px; overflow-x: auto;
        background: #f6f8fa; border-left: 1px solid #e1e4e8; }
.code pre, .docs pre { font: 12px/1.45 "DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas,
                       monospace; }
.code pre { margin: 10px 0; }
.docs pre { background: #f6f8fa; padding: 6px 10px; overflow-x: auto; }
.docs code { font-size: 13px; background: #f0f2f4; padding: 0 3px; border-radius: 3px; }
.docs pre code { background: none; padding: 0; font-size: 12px; }
.docs p { margin: 10px 0; }
.row + .row > div { border-top: 1px solid #eceef1; }
.eq { display: flex; flex-wrap: wrap; align-items: center; column-gap: 16px; margin: 10px 0; }
.eq math { flex: 1 1 auto; font-size: 15.5px; max-width: 100%; overflow-x: auto; }
.tag { color: #6a737d; font-size: 13px; white-space: nowrap; margin-left: auto; }
math { font-family: "Latin Modern Math", "STIX Two Math", "DejaVu Math TeX Gyre", "Cambria Math",
       math; }
h1 { font-size: 26px; margin: 24px 0 4px; }
h2 { font-size: 20px; margin: 26px 0 6px; }
.part h1 { font-size: 15px; letter-spacing: 0.08em; color: #57606a; margin: 30px 0 0; }
.refs { color: #6a737d; font-size: 14px; font-weight: normal; }
.subtitle { font-size: 17px; }
.note, nav { color: #57606a; font-size: 13.5px; }
nav a { color: #0969da; text-decoration: none; }
summary { display: block; cursor: pointer; }
summary::-webkit-details-marker { display: none; }
summary h1::before { content: "\\25B8  "; }
details[open] summary h1::before { content: "\\25BE  "; }
summary .docs { padding-top: 8px; padding-bottom: 8px; }
@media (max-width: 900px) { .row { flex-direction: column; } .docs, .code { flex: none; } }
"""


def slug(title, used):
    """A section's id, unique on the page: "1. Diffusion-DPO loss" -> "1-diffusion-dpo-loss"."""
    name = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"
    while name in used:
        name += "-"
    used.add(name)
    return name


def row_html(docs, code="", kind="row", anchor=""):
    """One row: prose on the left, the code it explains on the right."""
    anchor = f' id="{anchor}"' if anchor else ""
    return (f'<div class="{kind}"{anchor}><div class="docs">{docs}</div>'
            f'<div class="code">{code}</div></div>')


def made_with():
    """The libraries' versions, written in the page: another version may write other bytes."""
    return ", ".join(f"{name} {version(name)}" for name in LIBRARIES)


def stale(page):
    """One line: the page is not what sail.py gives, and what to do."""
    versions = "" if made_with() in page else f" (and was made with other than {made_with()})"
    return f"docs/sail.html is not current with sail.py{versions}: run python docs/annotate.py"


def generate(source, from_part_1=False):
    """sail.py's text -> the page's HTML. The same text and library versions give the same bytes.
    from_part_1: without the rows before PART 1 (the header, the settings), for the screenshot."""
    from latex2mathml.converter import convert
    from markdown_it import MarkdownIt
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer

    markdown = MarkdownIt("commonmark", {"html": False})  # docstrings' <...> are text, not HTML
    formatter, lexer = HtmlFormatter(nowrap=True), PythonLexer()
    parts, used = read(source), set()
    title = (ast.get_docstring(ast.parse(source)) or "sail.py").split("\n")[0]
    for item in [s for part in parts for s in [part, *part.sections] if s.title]:
        item.id = slug(item.title, used)

    def rows(part):
        for section in part.sections:
            if section.title:
                refs = section.refs and f' <span class="refs">{html.escape(section.refs)}</span>'
                yield row_html(f"<h2>{html.escape(section.title)}{refs}</h2>", anchor=section.id)
            for row in section.rows:
                prose = prose_html("\n".join(row.prose), markdown, convert) if row.prose else ""
                code = "\n".join(row.code)
                yield row_html(prose, f"<pre>{highlight(code, lexer, formatter).rstrip()}</pre>"
                               if code.strip() else "")

    # Contents: the sections before the first part and in it; the later parts by their titles.
    linked = [s for part in parts[:2] for s in part.sections] + parts[2:]
    contents = " &middot; ".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>'
                                 for s in linked if s.title)
    body = [row_html(
        f'<h1>sail.py</h1><p class="subtitle">{html.escape(title)}</p>'
        '<p class="note">This page is made from <code>sail.py</code> by '
        "<code>docs/annotate.py</code>: on the left its docstrings and comments, the equations "
        "typeset from its <code># Eq. X:</code> comments; on the right its code, beside them.</p>"
        f"<nav>{contents}</nav>")]
    body += [] if from_part_1 else rows(parts[0])
    for part in parts[1:2]:  # the algorithm: open
        body.append(row_html(f"<h1>{html.escape(part.title)}</h1>", kind="row part",
                             anchor=part.id))
        body += rows(part)
    for part in parts[2:]:  # the plumbing: folded, its section titles in the summary
        titles = " &middot; ".join(html.escape(s.title) for s in part.sections if s.title)
        summary = row_html(f'<h1>{html.escape(part.title)}</h1>'
                           f'<p class="note">Folded, click to open: {titles}</p>', kind="row part")
        body.append(f'<details id="{part.id}"><summary>{summary}</summary>')
        body += rows(part)
        body.append("</details>")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>sail.py, annotated</title>",
        f"<!-- Made from sail.py by docs/annotate.py with {made_with()} (other versions may change "
        "a few bytes). Do not edit: python docs/annotate.py -->",
        "<style>", STYLE.strip(), *formatter.get_token_style_defs(".code"), "</style>", "</head>",
        "<body>", *body, "</body>", "</html>", ""])


# =================================================================================================
# Headless Chromium: the screenshot here, the same call in tests/test_page.py
# =================================================================================================

CHROMIUM = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", "--window-size=1400,2000"]


def chromium(page, *flags, timeout=60):
    """Open `page` in headless Chromium with a throwaway profile -> its stdout (--dump-dom: the
    DOM). Always at the page's top: a screenshot of a page opened at an #anchor came back blank."""
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([shutil.which("chromium"), *CHROMIUM, f"--user-data-dir={profile}",
                               *flags, Path(page).resolve().as_uri()],
                              capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr.strip()[-600:]}")
    return done.stdout


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write docs/sail.html, sail.py annotated.")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if docs/sail.html is not what sail.py gives; write nothing")
    parser.add_argument("--screenshot", action="store_true",
                        help="also write docs/sail.png: the page from PART 1 on, in Chromium")
    args = parser.parse_args(argv)
    try:
        page = generate(SOURCE.read_text(encoding="utf-8"))
    except ImportError as missing:
        sys.exit(f"docs/annotate.py needs {missing.name}: {NEEDS}")
    if args.check:
        committed = PAGE.read_bytes().decode("utf-8") if PAGE.exists() else ""
        if committed != page:
            sys.exit(stale(committed))
        return
    PAGE.write_bytes(page.encode("utf-8"))
    print(f"wrote {PAGE.relative_to(ROOT)} ({len(page.encode()) // 1024} KB)")
    if args.screenshot:  # the algorithm's first screen: the title, then PART 1
        if not shutil.which("chromium"):
            sys.exit("--screenshot needs Chromium: apt-get install chromium")
        with tempfile.TemporaryDirectory() as folder:
            part_1 = Path(folder) / "sail.html"
            part_1.write_text(generate(SOURCE.read_text(encoding="utf-8"), from_part_1=True),
                              encoding="utf-8")
            chromium(part_1, f"--screenshot={SCREENSHOT}")
        from PIL import Image  # Pillow comes with diffusers; 128 colours: a third of the bytes
        Image.open(SCREENSHOT).convert("RGB").quantize(128).save(SCREENSHOT, optimize=True)
        print(f"wrote {SCREENSHOT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
