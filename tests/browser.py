"""Headless Chromium (Debian's chromium and chromium-driver) driven by Selenium, for the tests that look at pages
as a person does. Without Chromium the test is skipped on a developer's machine and fails where ``CI`` is set
(.ci/run installs it)."""
import os
import shutil
import time

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def chromium(width: int = 1600, height: int = 1200):
    """A headless Chromium session (quit it when done)."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    if missing:
        message = f"headless Chromium is needed ({', '.join(missing)} missing: apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}"):
        options.add_argument(argument)
    options.binary_location = CHROMIUM
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def wait_for(condition, timeout: float = 60.0, every: float = 0.5, what: str = "the page"):
    """Poll ``condition()`` until it returns something truthy; that value. AssertionError naming ``what`` on
    timeout."""
    deadline = time.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"{what} did not show within {timeout:.0f} s")
        time.sleep(every)


IMAGES = "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.src.slice(0, 40)])"
