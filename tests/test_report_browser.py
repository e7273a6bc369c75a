"""Open a rendered, signed report in headless Chromium (Debian's chromium + chromium-driver, driven by
selenium): the verdict banner, the tables and the SVG charts are there and visible, the page loads
nothing from outside the file and logs no errors. Saves a full-page screenshot to test-output/report.png.

.ci/install-browser installs the browser; without it these tests skip and say why.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from qgate.report.render import render_run
from qgate.signoff import sign_off
from qgate.store import open_store
from tests.test_report import XSS, populate_store

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "test-output"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="chromium and chromedriver are not installed (run .ci/install-browser)")


@pytest.fixture()
def browser():
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="qgate-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # as root, offline, nothing phoning home; a fresh profile per test
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path: selenium must not try to download one
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _signed_report(tmp_path) -> Path:
    store = open_store(tmp_path / "qgate.db")
    try:
        run_id = populate_store(store)
        render_run(store, run_id, tmp_path / "unsigned.html")
        _row, path = sign_off(store, run_id, reviewer="Ana Lima", approve=True,
                              comment="fp8 fallback accepted for the 135M member", path=tmp_path / "report.html")
        return path
    finally:
        store.close()


def _full_page_screenshot(driver, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(int(height) + 40, 16000))
    driver.save_screenshot(str(target))


def assert_report_is_readable(driver, url: str, screenshot: Path, *, members: int, charts_at_least: int) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    driver.get(url)
    assert driver.title.startswith("qgate · ")
    banners = driver.find_elements(By.CSS_SELECTOR, "#verdict .banner[data-outcome]")
    assert len(banners) == members and all(b.is_displayed() for b in banners)
    assert all(b.get_attribute("data-outcome") in ("ships", "fallback", "blocked") for b in banners)
    for table in ("table.decisions", "table.memory", "table.flipcounts", "table.checkpoints"):
        element = driver.find_element(By.CSS_SELECTOR, table)
        assert element.is_displayed() and element.size["height"] > 20 and element.size["width"] > 300, table
    rows = driver.find_elements(By.CSS_SELECTOR, "table.decisions tbody tr")
    assert rows and all(r.is_displayed() for r in rows)
    charts = driver.find_elements(By.CSS_SELECTOR, "svg.chart")
    visible = [c for c in charts if c.is_displayed() and c.size["width"] > 100 and c.size["height"] > 40]
    assert len(visible) >= charts_at_least
    # drawn, not empty: the delta chart has its points, the heatmaps their cells
    assert driver.find_elements(By.CSS_SELECTOR, "#deltas svg circle.delta")
    # nothing loaded from outside the file, no script at all, no alert, no console errors
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert driver.execute_script("return document.scripts.length") == 0
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018
    errors = [e for e in driver.get_log("browser") if e.get("level") in ("SEVERE", "ERROR")]
    assert errors == []
    _full_page_screenshot(driver, screenshot)
    assert screenshot.stat().st_size > 20_000


def test_signed_report_in_headless_chromium(browser, tmp_path):
    from selenium.webdriver.common.by import By

    path = _signed_report(tmp_path)
    assert_report_is_readable(browser, path.as_uri(), SCREENSHOTS / "report.png", members=1, charts_at_least=7)
    banner = browser.find_element(By.CSS_SELECTOR, "#verdict .banner")
    assert "ships with fallback" in banner.text.lower() and "fp8" in banner.text
    assert "allowed -2.0" in banner.text  # the reason is on the banner, not only in the table
    fail_pill = browser.find_element(By.CSS_SELECTOR, "table.decisions tr.verdict-fail .pill.fail")
    assert fail_pill.is_displayed() and fail_pill.text == "fail"
    heat_cells = browser.find_elements(By.CSS_SELECTOR, "#needle svg rect.cell")
    assert len(heat_cells) == 3 * 9  # (baseline, nvfp4, fp8) x 3 lengths x 3 depths
    signoff = browser.find_element(By.CSS_SELECTOR, "#signoff")
    assert signoff.is_displayed() and "Ana Lima" in signoff.text and signoff.get_attribute("data-qgate-digest")
    # the model's "<script>" output is shown as text inside the flipped sample, never run
    flip = browser.find_element(By.CSS_SELECTOR, "details.flip.lost")
    flip.find_element(By.TAG_NAME, "summary").click()
    outputs = [o.text for o in flip.find_elements(By.CSS_SELECTOR, "pre.output")]
    assert XSS in outputs
    assert browser.execute_script("return document.scripts.length") == 0


def _mini_smoke_suite(path: Path) -> Path:
    """The smoke suite's own mmlu, needle and perplexity definitions with smaller caps (minutes -> about one)."""
    import yaml

    smoke = yaml.safe_load((REPO / "qgate" / "suites" / "smoke.yaml").read_text(encoding="utf-8"))
    tasks = {t["name"]: t for t in smoke["tasks"]}
    mmlu = dict(tasks["mmlu"], num_fewshot=0, limit=6)
    needle = dict(tasks["needle"], data=dict(tasks["needle"]["data"], lengths=[128, 256], depths=[0, 100]))
    perplexity = dict(tasks["perplexity"], data=dict(tasks["perplexity"]["data"], docs=2, max_chars=800))
    suite = {"suite": "smokemini", "description": "three smoke tasks, smaller caps", "defaults": smoke.get("defaults", {}),
             "tasks": [mmlu, needle, perplexity]}
    path.write_text(yaml.safe_dump(suite, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("QGATE_GATE_REPORT_TEST") != "1",
                    reason="a real gate run takes minutes on a CPU (quantizes SmolLM2 twice); set QGATE_GATE_REPORT_TEST=1")
def test_report_of_a_real_gate_run_in_chromium(browser, tmp_path):
    """The report `qgate run --family smollm2 --format nvfp4` leaves, on the real SmolLM2 (offline), opened
    in Chromium: it must hold real numbers, real heatmaps and real per-layer SQNR."""
    from selenium.webdriver.common.by import By

    from qgate.gate import run_gate

    result = run_gate("smollm2", ["nvfp4"], suite=str(_mini_smoke_suite(tmp_path / "suite.yaml")),
                      db=str(tmp_path / "qgate.db"), progress=False, report_path=tmp_path / "gate-report.html",
                      log=lambda line: None)
    assert result.report_path and Path(result.report_path).is_file()
    assert_report_is_readable(browser, Path(result.report_path).as_uri(), SCREENSHOTS / "report-gate.png",
                              members=1, charts_at_least=4)
    banner = browser.find_element(By.CSS_SELECTOR, "#verdict .banner")
    assert banner.get_attribute("data-outcome") == result.outcome
    decided = browser.find_elements(By.CSS_SELECTOR, "table.decisions tbody tr")
    assert len(decided) == len(result.tasks)
    # the needle grid of the real evaluation (2 lengths x 2 depths), for the baseline and each compared format
    formats = {t.format for t in result.tasks}
    assert len(browser.find_elements(By.CSS_SELECTOR, "#needle svg rect.cell")) == 4 * (1 + len(formats))
    # one SQNR point per quantized tensor of the 30 decoder layers (7 linear layers each)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#quantization svg circle")) >= 30 * 7
