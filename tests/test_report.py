"""The report page: built from a tiny pipeline's reports, opened from disk in a real headless browser.

Debian's chromium (deploy/setup-chromium.sh; .ci/run installs it): the page loads with no console message, every
picture on it decodes (the page's own check writes `data-images="<all> <broken>"` on <body>), and a screenshot
is not blank. The checks are shown to fail on a page with a broken picture and a script error.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_imagefolder, tiny_params

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
HOSTILE = '<img src=x onerror="document.title=1">&'


@pytest.fixture(scope="module")
def reported(tmp_path_factory, backbone_dir):
    """prepare -> features -> audit -> train -> evaluate -> export -> report on 31 generated images, one of them in
    the wrong class folder and one a re-encoded copy of another (so the audit has an issue and a pair to show)."""
    from conftest import Workdir

    base = tmp_path_factory.mktemp("report")
    root = make_imagefolder(base / "images", per_class=10)
    (root / "circles" / "circles_04.jpg").rename(root / "squares" / "circles_04.jpg")
    with Image.open(root / "stripes" / "stripes_02.jpg") as im:
        im.save(root / "stripes" / "copy_reencoded.jpg", quality=80)
    w = Workdir(base / "work", backbone_dir)
    params = tiny_params(root)
    w.prepare(params)
    w.features_(params)
    w.run("audit", params)
    w.train(params)
    w.evaluate(params)
    w.export(params)
    result = w.run("report", params)
    return w, params, result


def browser(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        pytest.fail("no chromium: install it with `sudo deploy/setup-chromium.sh` (Debian's chromium package)")
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                           "--virtual-time-budget=5000", *args, page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)


def load_page(page: Path, tmp: Path) -> tuple[tuple[int, int], list[str]]:
    """((pictures, broken pictures) as the page counted them after load, console messages)."""
    r = browser(page, tmp, "--dump-dom")
    m = re.search(r'<body[^>]*data-images="(\d+) (\d+)"', r.stdout)
    assert m, f"the page's load check did not run: {r.stdout[:500]} {r.stderr[-2000:]}"
    console = [line for line in r.stderr.splitlines() if ":CONSOLE" in line]
    return (int(m.group(1)), int(m.group(2))), console


def test_the_page_holds_every_part_and_is_self_contained(reported):
    w, _, result = reported
    page = w.layout.reports / "index.html"
    doc = page.read_text()
    assert result.path == w.layout.report_page == page
    for section in ("summary", "metrics", "evaluation", "audit"):
        assert f'<section id="{section}">' in doc, section
    assert "confusion.png" in doc and "Per class" in doc and "learning curve" in doc
    assert "Label issues" in doc and "Near-duplicates, leaks and conflicts" in doc and "Class balance" in doc
    metrics = json.loads(w.layout.metrics.read_text())
    assert f"{metrics['accuracy']:.4f}" in doc  # the headline number, from metrics.json
    # nothing outside the file: every picture inline, no link to a file or a server
    srcs = re.findall(r'src="([^"]*)"', doc)
    assert 'given <b>' in doc and 'class="pair"' in doc  # thumbnails: a label issue, a pair side by side
    assert len(srcs) == result.images > 8 and all(s.startswith("data:image/") for s in srcs)
    assert not re.search(r'(href|src)="(?!data:|#)', doc)


def test_text_from_the_data_is_escaped(reported, tmp_path):
    from tasks import report

    w, params, _ = reported
    audit_file = w.layout.audit_report
    original = audit_file.read_text()
    audit = json.loads(original)
    audit["label_issues"]["issues"][0]["given"] = HOSTILE
    try:
        audit_file.write_text(json.dumps(audit))
        doc, _ = report.render(params, w.layout)
    finally:
        audit_file.write_text(original)
    assert HOSTILE not in doc and "&lt;img src=x onerror=&quot;document.title=1&quot;&gt;&amp;" in doc


def test_the_page_loads_in_chromium_with_every_picture_decoded(reported, tmp_path):
    w, _, result = reported
    page = w.layout.report_page
    (total, broken), console = load_page(page, tmp_path)
    assert total == result.images and broken == 0
    assert console == [], console
    shot = tmp_path / "shot.png"
    r = browser(page, tmp_path, "--window-size=1280,1600", f"--screenshot={shot}")
    assert shot.is_file(), r.stderr[-2000:]
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (1600, 1280)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # text, tables, plots


def test_the_browser_checks_catch_a_broken_picture_and_a_script_error(reported, tmp_path):
    w, _, _ = reported
    doc = w.layout.report_page.read_text()
    bad = doc.replace('src="data:image/jpeg;base64,', 'src="data:image/jpeg;base64,AAAA', 1)
    bad = bad.replace("</main>", "<script>notDefined()</script></main>", 1)
    page = tmp_path / "bad.html"
    page.write_text(bad)
    (total, broken), console = load_page(page, tmp_path)
    assert broken == 1 and total > 1
    assert any("notDefined" in line for line in console), console


def test_missing_reports_leave_a_page_that_says_what_is_missing(tmp_path):
    from tasks import report
    from tasks.layout import Layout

    root = make_imagefolder(tmp_path / "images", per_class=2)
    layout = Layout(tmp_path / "work")
    result = report.run(tiny_params(root), layout)
    doc = result.path.read_text()
    assert "reports/metrics.json is missing" in doc and "reports/audit.json is missing" in doc
    assert result.images == 0 and not list(layout.reports.glob(".*.tmp"))
