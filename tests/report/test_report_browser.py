"""report.html opened in a real headless Chromium: the plots draw, nothing errors, the winner shows.

String checks cannot see an SVG that renders at zero size or a page that throws; a browser can.
Chromium is a system package (`make test` installs it), so its absence is a failure, not a skip.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from mahir.report.html import write_html
from mahir.report.schema import Report
from tests.report.test_report import example_report

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless=new --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run "
    "--disable-background-networking --disable-component-update --disable-sync"
).split()


@contextlib.contextmanager
def chromium(profile: Path, *, width: int = 1280, height: int = 1000) -> Iterator[webdriver.Chrome]:
    """A fresh headless Chromium with its own profile, recording the page's console."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(
            f"{CHROMIUM} or {CHROMEDRIVER} is missing: run `make test`, which installs them"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


BOXES = """
return ['scatter', 'speedup', 'latency'].map(name => {
  const svg = document.getElementById('plot-' + name);
  if (!svg) return {name, found: false};
  const box = svg.getBoundingClientRect();
  const style = getComputedStyle(svg);
  return {name, found: true, width: box.width, height: box.height,
          visible: style.visibility !== 'hidden' && style.display !== 'none'
                   && svg.checkVisibility()};
});
"""


def test_report_renders_in_chromium(tmp_path: Path) -> None:
    report: dict[str, Any] = example_report()
    page = tmp_path / "report.html"
    write_html(Report.from_dict(report), page)
    with chromium(tmp_path / "profile") as browser:
        browser.get(page.as_uri())
        _check_page(browser, report)


def test_missing_chromium_fails_and_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "no-chromium")
    with pytest.raises(pytest.fail.Exception, match="run `make test`"), chromium(tmp_path):
        pass


def _check_page(browser: webdriver.Chrome, report: dict[str, Any]) -> None:

    for plot in browser.execute_script(BOXES):
        assert plot["found"], plot
        assert plot["width"] > 100, plot
        assert plot["height"] > 50, plot
        assert plot["visible"], plot

    markers = browser.execute_script(
        "return [...document.querySelectorAll('#plot-scatter .mark')].map("
        "m => [m.querySelector('title').textContent, m.getBoundingClientRect().width])"
    )
    timed = [c for c in report["candidates"] if c["perf"] and c["quality"]]
    assert len(markers) == len(timed)
    titles = [title for title, _ in markers]
    assert all(any(t.startswith(f"{c['label']} (") for t in titles) for c in timed), titles
    assert all(width > 0 for _, width in markers)

    headline = browser.execute_script("return document.querySelector('h1').textContent")
    assert "OpenVINO + NNCF int8" in headline
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == []
