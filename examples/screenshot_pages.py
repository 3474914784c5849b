"""Screenshots of the built-in web pages (docs/img/playground.png, docs/img/dashboard.png) from a running
`ember serve`, in headless Chromium: a short chat in the playground, then the dashboard under some traffic.

    ember serve --port 8000 &
    python examples/screenshot_pages.py --base-url http://127.0.0.1:8000 [--api-key KEY]
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def create_browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def chat(driver, base_url: str, api_key: str | None, question: str) -> None:
    driver.get(base_url + "/")
    wait = WebDriverWait(driver, 600, poll_frequency=0.2)
    if api_key:
        driver.execute_script("localStorage.setItem('ember-api-key', arguments[0]); location.reload();", api_key)
    wait.until(lambda d: d.find_element(By.ID, "model-status").text.startswith("model:"))
    driver.find_element(By.ID, "system-prompt").send_keys("You are a friendly, concise assistant.")
    for field, value in (("temperature", "0"), ("max-tokens", "96"), ("seed", "0")):
        driver.find_element(By.ID, field).clear()
        driver.find_element(By.ID, field).send_keys(value)
    driver.find_element(By.ID, "prompt").send_keys(question)
    driver.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant[data-state=done]"))


def traffic(base_url: str, api_key: str | None, until: threading.Event) -> None:
    """Chat requests one after another (a repeated system prompt, so the prefix cache hits) until `until`."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=base_url, headers=headers, timeout=600) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        for i in range(10_000):
            if until.is_set():
                return
            client.post("/v1/chat/completions", json={
                "model": model, "max_tokens": 8 + 4 * (i % 4), "messages": [
                    {"role": "system", "content": "You are a friendly, concise assistant."},
                    {"role": "user", "content": f"Tell me fact number {i} about the sea."}]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--out", default="docs/img")
    parser.add_argument("--traffic-s", type=float, default=150.0, help="seconds of traffic under the dashboard")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    driver = create_browser()
    try:
        chat(driver, args.base_url, args.api_key, "Give me three tips for learning to cook.")
        driver.save_screenshot(str(out / "playground.png"))
        driver.get(args.base_url + "/dashboard?interval_ms=1000")
        is_done = threading.Event()
        workers = [threading.Thread(target=traffic, args=(args.base_url, args.api_key, is_done)) for _ in range(2)]
        for worker in workers:
            worker.start()
        time.sleep(args.traffic_s)
        driver.save_screenshot(str(out / "dashboard.png"))
        is_done.set()
        for worker in workers:
            worker.join()
    finally:
        driver.quit()
    print(f"wrote {out / 'playground.png'} and {out / 'dashboard.png'}")


if __name__ == "__main__":
    main()
