"""examples/app.py, the web demo, in a real headless browser: start it on a free port, type, click, read the page,
stop it. Skipped where gradio, selenium or chromium is missing (Debian: `apt install chromium chromium-driver`,
then `pip install "hf-reaugkd[app]" selenium`)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import pipeline_args

from hf_reaugkd.distill import main

pytest.importorskip("gradio")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromedriver")
APP = Path(__file__).parents[1] / "examples" / "app.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def app(task):
    """A tiny student (k = 1, β = 1: one added row decides the prediction) served by the app on a free port."""
    main(pipeline_args(task, task / "out", "--num_train_epochs", "1", "--store_kb_texts"))
    model_dir = task / "out" / "model"
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "knn_k": 1, "retrieval_weight": 1.0}))
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen(
        [sys.executable, str(APP), str(model_dir), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"the app did not start: {server.communicate()[1][-2000:]}")
            time.sleep(0.5)
    yield url, model_dir
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


class Page:
    """The app's page as a user sees it."""

    def __init__(self, driver, url: str):
        self.driver = driver
        driver.get(url)
        self.wait = WebDriverWait(driver, 60)
        self.wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#text textarea"))

    def type_text(self, text: str) -> None:
        box = self.driver.find_element(By.CSS_SELECTOR, "#text textarea")
        box.clear()
        self.driver.execute_script(  # a 10,000-word text: set at once, as a paste would, then announce it
            "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input', {bubbles: true}));",
            box,
            text,
        )

    def choose_label(self, label: str) -> None:
        box = self.driver.find_element(By.CSS_SELECTOR, "#label input")
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(label, Keys.ENTER)
        box.send_keys(Keys.TAB)

    def click(self, button: str) -> None:
        self.driver.find_element(By.CSS_SELECTOR, f"#{button}").click()

    def prediction(self) -> str:
        return self.driver.find_element(By.CSS_SELECTOR, "#prediction textarea").get_attribute("value")

    def message(self) -> str:
        return self.driver.find_element(By.CSS_SELECTOR, "#message").text

    def neighbour_rows(self) -> list[list[str]]:
        rows = self.driver.find_elements(By.CSS_SELECTOR, "#neighbors tbody tr")
        return [
            [cell.get_attribute("textContent").strip() for cell in row.find_elements(By.CSS_SELECTOR, "td")]
            for row in rows
        ]

    def neighbour_texts(self) -> list[str]:
        return [" ".join(cells) for cells in self.neighbour_rows()]

    def until(self, condition, what: str):
        try:
            return self.wait.until(lambda _: condition())
        except Exception as err:  # noqa: BLE001 (a timeout: say what was awaited and what the page shows)
            raise AssertionError(f"waited for {what}; page says {self.message()!r}, {self.prediction()!r}") from err


def test_type_predict_add_and_remove_in_a_browser(app, browser):
    url, model_dir = app
    page = Page(browser, url)
    text = "great fun great"
    page.type_text(text)
    page.click("predict")
    page.until(lambda: page.prediction(), "a prediction")
    before = page.prediction().split(" (")[0]
    assert before in ("negative", "positive") and not any(text in row for row in page.neighbour_texts())

    other = "negative" if before == "positive" else "positive"  # added with the other label, its row decides
    page.choose_label(other)
    page.click("add")
    page.until(lambda: "Added as knowledge-base row 96" in page.message(), "the row to be added")
    page.until(lambda: page.prediction().startswith(other), "the prediction to follow the added row")
    assert text in page.neighbour_texts()[0]

    page.click("remove")
    page.until(lambda: "Removed this session's rows (1)" in page.message(), "the row to be removed")
    page.until(lambda: page.prediction().startswith(before), "the prediction to be restored")
    assert json.loads((model_dir / "config.json").read_text())["kb_size"] == 96


def test_bad_input_gets_a_message_in_the_page(app, browser):
    url, _ = app
    page = Page(browser, url)
    page.click("predict")  # no text
    page.until(lambda: page.message() == "Type a text first.", "the empty-text message")
    page.type_text("great fun")
    page.choose_label("so-so")
    page.click("add")
    page.until(lambda: "Not added:" in page.message(), "the unknown-label message")
    assert "labels ['so-so'] that the model does not know" in page.message()
    page.type_text(" ".join(["great"] * 10_000))
    page.click("predict")
    page.until(lambda: "tokens long: the student read its first" in page.message(), "the long-text note")
    assert page.prediction()
