"""The docs stay true mechanically: links resolve, every result file is read from somewhere, the README stays short."""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def targets(path):
    """The local files a markdown file links to or shows (anchors dropped, web links skipped)."""
    for ref in LINK.findall(open(path).read()):
        if re.match(r"[a-z]+://", ref) or ref.startswith("#"):
            continue
        yield os.path.normpath(os.path.join(os.path.dirname(path), ref.split("#")[0]))


def test_every_relative_link_and_image_exists():
    broken = [(os.path.relpath(p, ROOT), t) for p in DOCS for t in targets(p) if not os.path.exists(t)]
    assert not broken, broken


def test_every_file_under_docs_and_results_is_referenced():
    linked = {t for p in DOCS for t in targets(p)}
    files = [f for d in ("docs", os.path.join("bench", "results")) for f in glob.glob(os.path.join(ROOT, d, "**", "*"), recursive=True)
             if os.path.isfile(f) and not f.endswith(".md") or f.endswith(os.sep + "table.md")]
    unread = [os.path.relpath(f, ROOT) for f in files if f not in linked]
    assert files and not unread, unread


def test_readme_is_a_front_page():
    text = open(DOCS[0]).read()
    assert len(text.splitlines()) <= 300 and len(text.encode()) <= 25 * 1024
    for section in ("## Install", "## Quick start", "## Results at a glance", "## Files, in reading order",
                    "## MSD on a CPU", "## The ImageNet-64 recipe", "## Differences from the paper", "## Tests"):
        assert section in text, section


def test_no_text_points_at_issues_or_sessions():
    paths = DOCS + glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "bench", "*.py"))
    bad = re.compile(r"\bissue\b|\bsession|(?<![\w/&])#\d+\b", re.I)
    hits = [(os.path.relpath(p, ROOT), m.group(0)) for p in paths for m in bad.finditer(open(p).read())]
    assert not hits, hits


def test_readme_line_counts_are_the_files():
    text = open(DOCS[0]).read()
    rows = re.findall(r"^\| `(\w+\.py)` \| (\d+) \|", text, re.M)
    assert len(rows) >= 9
    for name, n in rows:
        assert sum(1 for _ in open(os.path.join(ROOT, name))) == int(n), name
