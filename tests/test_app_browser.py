"""The web demo in a real browser: Debian's headless Chromium driven by Selenium and chromedriver.

A person opens the page, types a prompt, picks a size and clicks Generate; the test waits for both
images and the timing line, checks what the page shows, and saves a screenshot (``docs/demo.png`` with
LINFUSION_UPDATE_SCREENSHOT=1).
Then it checks the visible messages for an empty prompt and for Cancel. Skipped when Gradio,
Selenium, chromium or chromedriver is missing (``.ci/run`` installs them).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the web demo needs Gradio: pip install 'linfusion[app]'")
pytest.importorskip("selenium", reason="the browser test needs Selenium: pip install selenium")

CHROMIUM = os.environ.get("LINFUSION_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = os.environ.get("LINFUSION_CHROMEDRIVER") or shutil.which("chromedriver")
if not CHROMIUM or not CHROMEDRIVER:
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from test_app import USE_MINI, start_demo  # noqa: E402

#: the README's screenshot, rewritten only on request (LINFUSION_UPDATE_SCREENSHOT=1) so a test run
#: leaves the working tree clean; otherwise the screenshot goes to the test's temporary folder
README_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "demo.png"
#: on LinFusion-Mini: a prompt of its world at its native size, with enough steps for a real picture
PROMPT, WIDTH, HEIGHT, STEPS = (("a red circle above a blue square on a white background", 128, 128, 12) if USE_MINI
                                else ("a red fox in the snow, golden hour", 96, 64, 2))


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    engine, demo, url = start_demo(tmp_path_factory.mktemp("models"))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for drivers online
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        driver.get(url)
        # every test can run alone: the page's components exist before the first one looks for them
        wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#prompt textarea"), message="page did not load")
        yield driver, engine
    finally:
        driver.quit()
        demo.close()


def find(driver, css):
    return driver.find_element(By.CSS_SELECTOR, css)


def wait_for(driver, condition, timeout=60, message=""):
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d), message)


def set_field(driver, css, value):
    box = find(driver, css)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(str(value))
    box.send_keys(Keys.TAB)


def image_size(driver, elem_id):
    """(natural width, height) of the image shown in component ``elem_id``, or None."""
    return driver.execute_script(
        "const img = document.querySelector(arguments[0]);"
        "return img && img.complete && img.naturalWidth ? [img.naturalWidth, img.naturalHeight] : null;",
        f"#{elem_id} img",
    )


def status_text(driver):
    return find(driver, "#status").text


def test_a_person_generates_and_sees_both_images(page, tmp_path):
    driver, engine = page
    screenshot = README_SCREENSHOT if os.environ.get("LINFUSION_UPDATE_SCREENSHOT") == "1" else tmp_path / "demo.png"
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#prompt textarea"), message="page did not load")
    assert "LinFusion: original vs accelerated" in driver.find_element(By.TAG_NAME, "body").text
    find(driver, "#prompt textarea").send_keys(PROMPT)
    set_field(driver, "#width input", WIDTH)
    set_field(driver, "#height input", HEIGHT)
    set_field(driver, "#steps input", STEPS)
    find(driver, "#generate").click()

    wait_for(driver, lambda d: image_size(d, "original") and image_size(d, "accelerated"), timeout=90,
             message="the two images never appeared")
    assert image_size(driver, "original") == [WIDTH, HEIGHT]
    assert image_size(driver, "accelerated") == [WIDTH, HEIGHT]
    wait_for(driver, lambda d: "Done" in status_text(d), message="the status never said Done")
    timing = find(driver, "#timing").text
    assert "Original:" in timing and "LinFusion linear:" in timing and "speedup" in timing
    assert f"{WIDTH}×{HEIGHT} px, {STEPS} steps" in timing
    body = driver.find_element(By.TAG_NAME, "body").text
    assert "Original (softmax attention)" in body and "Accelerated (LinFusion)" in body
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery img"), message="no gallery entry")
    assert find(driver, "#generate").is_enabled() and find(driver, "#cancel").is_displayed()
    assert find(driver, "#highres input").is_enabled() and "refinement" in find(driver, "#highres").text
    # the whole page, from the top, as a person scrolling through it would see it
    for _ in range(2):  # grow the window to the page, which reflows, then measure again
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, min(max(height + 140, 900), 2400))
        time.sleep(0.5)
    driver.execute_script("window.scrollTo(0, 0); document.activeElement && document.activeElement.blur();")
    wait_for(driver, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#gallery img')].some(i => i.complete && i.naturalWidth > 0)"),
        message="the gallery thumbnail never loaded")
    time.sleep(0.5)
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000


def test_empty_prompt_shows_a_message(page):
    driver, _ = page
    set_field(driver, "#prompt textarea", " ")
    find(driver, "#generate").click()
    wait_for(driver, lambda d: "prompt" in status_text(d) and "empty" in status_text(d),
             message="no visible message for an empty prompt")
    assert "Error" in status_text(driver)


def test_cancel_stops_generation_and_the_next_run_works(page):
    driver, engine = page
    set_field(driver, "#prompt textarea", "a very long generation")
    set_field(driver, "#steps input", 150)
    find(driver, "#generate").click()
    wait_for(driver, lambda d: any(not j.done.is_set() and j.step >= 2 for j in list(engine._jobs.values())),
             message="the long job never started")
    find(driver, "#cancel").click()
    try:
        wait_for(driver, lambda d: "Cancelled" in status_text(d))
    except TimeoutException:
        pytest.fail(f"no visible 'Cancelled' message; the status says {status_text(driver)!r}")
    assert "of 150" in status_text(driver)
    assert all(j.done.is_set() for j in list(engine._jobs.values()))

    set_field(driver, "#prompt textarea", "after the cancel")
    set_field(driver, "#steps input", 2)
    find(driver, "#generate").click()
    wait_for(driver, lambda d: "Done" in status_text(d) and "2 steps" in find(d, "#timing").text, timeout=90,
             message="the run after the cancel did not finish")
