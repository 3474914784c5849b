"""The built-in web pages in a real headless Chromium (Selenium, the system chromedriver) against a real
`ember serve`: the playground streams a reply, its stop button aborts the request on the server, and the
dashboard reads generation tokens/s from /metrics after traffic."""

from __future__ import annotations

import shutil
import threading

import httpx
import pytest

from server_helpers import API_KEY, running_server, wait_until

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="headless Chromium missing: `make setup` installs chromium and chromium-driver "
                                       "with apt-get")
FLAGS = ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "4"]
SYSTEM_PROMPT = "You are a concise assistant."


@pytest.fixture(scope="module")
def web_server(tmp_path_factory):
    with running_server(FLAGS, tmp_path_factory.mktemp("web")) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(condition, timeout_s: float = 60.0):
    """Poll `condition()` (exceptions count as not yet) until truthy; fail the test after `timeout_s`."""
    def check():
        try:
            return condition()
        except Exception:
            return False
    assert wait_until(check, timeout_s, 0.1), f"timed out after {timeout_s}s"


def open_playground(driver, base_url: str) -> None:
    """Load `/`; the server runs with --api-key, so the page asks for it (once: it keeps it in localStorage)
    before it finds the model."""
    driver.get(base_url + "/")
    has_model = lambda: driver.find_element(By.ID, "model-status").text.startswith("model:")  # noqa: E731
    wait_for(lambda: has_model() or driver.find_element(By.ID, "key-box").is_displayed())
    if not has_model():
        driver.find_element(By.ID, "api-key").send_keys(API_KEY)
        driver.find_element(By.ID, "save-key").click()
    wait_for(has_model)


def fill(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def send_message(driver, text: str, max_tokens: int, temperature: float = 0.0):
    """Set the sampling fields, send `text`, return the new assistant reply's element."""
    fill(driver, "system-prompt", SYSTEM_PROMPT)
    fill(driver, "temperature", str(temperature))
    fill(driver, "max-tokens", str(max_tokens))
    fill(driver, "seed", "0")
    fill(driver, "prompt", text)
    num_replies = len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant"))
    driver.find_element(By.ID, "send").click()
    wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant")) > num_replies)
    return driver.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]


def test_playground_streams_a_reply(web_server, browser):
    open_playground(browser, web_server.base_url)
    reply = send_message(browser, "What is the capital of France?", max_tokens=12)
    wait_for(lambda: reply.get_attribute("data-state") == "done", timeout_s=240)
    text = reply.find_element(By.CLASS_NAME, "content").text
    stats = reply.find_element(By.CLASS_NAME, "stats").text
    assert int(reply.get_attribute("data-num-chunks")) > 1  # streamed in pieces, not one body
    # greedy, so the same conversation asked without streaming gives the same words and token count
    expected = web_server.client().chat.completions.create(
        model=web_server.model, max_tokens=12, temperature=0.0, seed=0,
        messages=[{"role": "system", "content": SYSTEM_PROMPT},
                  {"role": "user", "content": "What is the capital of France?"}])
    assert text.split() == expected.choices[0].message.content.split()
    assert "TTFT" in stats and "tokens/s" in stats, stats
    assert f"{expected.usage.completion_tokens} tokens" in stats, stats


def test_stop_button_aborts_the_request_on_the_server(web_server, browser):
    open_playground(browser, web_server.base_url)
    num_aborted = _num_aborted(web_server)
    reply = send_message(browser, "Write a very long story about a dragon.", max_tokens=400, temperature=1.0)
    wait_for(lambda: int(reply.get_attribute("data-num-chunks")) >= 2, timeout_s=240)
    assert web_server.metric("ember:num_requests_running") == 1
    browser.find_element(By.ID, "stop").click()
    wait_for(lambda: reply.get_attribute("data-state") == "stopped", timeout_s=30)
    wait_for(lambda: web_server.metric("ember:num_requests_running") == 0, timeout_s=60)
    assert _num_aborted(web_server) == num_aborted + 1  # ended by the disconnect, not by its length or EOS
    assert "stopped" in reply.find_element(By.CLASS_NAME, "stats").text
    assert browser.find_element(By.ID, "send").is_enabled()


def test_dashboard_shows_tokens_per_second_after_traffic(web_server, browser):
    browser.get(web_server.base_url + "/dashboard?interval_ms=500")
    wait_for(lambda: browser.find_element(By.ID, "scrape-status").text.startswith("updated"))
    is_done = threading.Event()

    def traffic() -> None:
        client = web_server.client()
        while not is_done.is_set():
            client.chat.completions.create(model=web_server.model, max_tokens=8,
                                           messages=[{"role": "user", "content": "Say hello."}])

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        wait_for(lambda: float(browser.find_element(By.ID, "stat-gen-tps").text.split()[0]) > 0, timeout_s=240)
        wait_for(lambda: "ms" in browser.find_element(By.ID, "stat-ttft").text, timeout_s=60)
    finally:
        is_done.set()
        worker.join(timeout=240)
    assert "running" in browser.find_element(By.ID, "stat-requests").text


def _num_aborted(server) -> float:
    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ember:request_success_total{") and 'finished_reason="abort"' in line)
