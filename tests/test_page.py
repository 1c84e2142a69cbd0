"""docs/sail.html, sail.py's annotated page: it is what sail.py gives today, its rules typeset the
equations or leave them as code, and a real browser draws both columns and the maths.

Run: python -m pytest -q tests/test_page.py (about 5 s; without pygments, markdown-it-py and
latex2mathml, or without Chromium, the tests that need them skip and say why).
"""

import re
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "docs")]
import annotate  # noqa: E402  (docs/annotate.py: the standard library only, until it generates)

PAGE = ROOT / "docs" / "sail.html"
TEX = re.compile(r"\$|\\(frac|sqrt|left|right|text|operatorname|beta|sigma|epsilon|theta|lVert|"
                 r"rVert|mid|sum)\b")  # what the rules write, and must never be left on the page


def needs_libraries():
    for module in ("pygments", "markdown_it", "latex2mathml"):
        pytest.importorskip(module, reason=f"regenerating the page needs: {annotate.NEEDS}")


def test_page_is_current_with_sail_py():
    needs_libraries()
    committed = PAGE.read_bytes()
    if annotate.made_with() not in committed.decode("utf-8"):  # CI installs the page's versions
        pytest.skip(f"the page was made with other library versions than {annotate.made_with()}: "
                    "its bytes are compared where those are installed (.ci/run)")
    made = annotate.generate((ROOT / "sail.py").read_text(encoding="utf-8"))
    assert made.encode("utf-8") == committed, annotate.stale(committed.decode("utf-8"))


def test_page_needs_no_network():
    page = PAGE.read_text(encoding="utf-8")
    assert not re.search(r"<script|<link|<img|<iframe|@import|url\(|src=", page)
    # an address may only be a plain link's
    assert len(re.findall(r"https?://", page)) == len(re.findall(r'<a href="https?://', page))


def test_rules_typeset_sail_py_maths_and_refuse_prose():
    needs_libraries()
    assert annotate.equation("x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, the forward process") == (
        r"x_{t} = \sqrt{a_{t}} x_{0} + \sqrt{1 - a_{t}} \epsilon", "the forward process")
    assert annotate.equation("r = -(beta/2) * mean_k [err_theta - err_ref]") == (
        r"r = - \frac{\beta}{2} \, \operatorname{mean}_{k} "
        r"{[ \text{err}_{\theta} - \text{err}_{\text{ref}} ]}", "")
    assert annotate.equation("D_init = human seed pairs (y, x_w, x_l)") is None    # English
    assert annotate.equation("winner and loser share the same t and eps") is None  # no '='
    from latex2mathml.converter import convert
    from markdown_it import MarkdownIt
    page = annotate.prose_html("Eq. 8: r = a ~ b, a sign no rule knows\nEq. F: x_t = sqrt(a_t) x_0",
                               MarkdownIt("commonmark", {"html": False}), convert)
    assert "<code>r = a ~ b</code>" in page and "<math" in page and not TEX.search(page)


class Columns(HTMLParser):
    """A rendered DOM's columns: how many of each, the maths and the text in the prose column."""

    def __init__(self):
        super().__init__()
        self.open, self.count, self.prose = [], {"docs": 0, "code": 0, "math": 0}, []

    def column(self):
        return next((kind for kind in reversed(self.open) if kind), None)

    def handle_starttag(self, tag, attrs):
        if tag == "div":
            kind = dict(attrs).get("class")
            self.open.append(kind if kind in ("docs", "code") else None)
            if kind in ("docs", "code"):
                self.count[kind] += 1
        elif tag == "math" and self.column() == "docs":
            self.count["math"] += 1

    def handle_endtag(self, tag):
        if tag == "div" and self.open:
            self.open.pop()

    def handle_data(self, data):
        if self.column() == "docs":
            self.prose.append(data)


def test_chromium_draws_prose_code_and_typeset_maths(tmp_path):
    if not shutil.which("chromium"):
        pytest.skip("needs Chromium for a real browser: apt-get install chromium")
    Image = pytest.importorskip("PIL.Image", reason="the screenshot check needs Pillow")
    columns = Columns()
    columns.feed(annotate.chromium(PAGE, "--dump-dom"))
    assert columns.count["docs"] > 50 and columns.count["code"] > 50, columns.count
    assert columns.count["math"] >= 5, "the equations are not typeset as MathML in the prose column"
    prose = "".join(columns.prose)
    assert "Diffusion-DPO" in prose and not TEX.search(prose), TEX.search(prose)
    screenshot = tmp_path / "sail.png"  # never docs/sail.png: the committed picture stays
    annotate.chromium(PAGE, f"--screenshot={screenshot}")
    image = Image.open(screenshot).convert("L")
    width, height = image.size
    assert (width, height) == (1400, 2000)
    # The prose column is the left 40 percent; each half must hold text (dark pixels), not blank.
    for name, box in (("prose", (0, 0, int(0.4 * width), height)),
                      ("code", (int(0.4 * width), 0, width, height))):
        half = image.crop(box)
        dark = sum(half.histogram()[:128]) / (half.width * half.height)
        assert dark > 0.002, f"the {name} column of the screenshot is blank ({dark:.4f} dark)"
