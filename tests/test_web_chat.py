"""The web chat at `/` in a real browser: headless Chromium (Debian's chromium and
chromium-driver) driven by selenium. Loads the page, sends messages, watches the answer
stream in, switches the attention policy, and writes a screenshot."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("fastapi")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from pylazy import LazyPrefill, Llama, Recycle  # noqa: E402
from tests.server_process import request, start_server, stop_server  # noqa: E402

N_CTX = 1024
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt)")
SCREENSHOT_DIR = Path(os.environ.get("PYLAZY_SCREENSHOT_DIR", Path(__file__).resolve().parent.parent / "build"))


@pytest.fixture(scope="module")
def server():
    proc, base = start_server("--ctx", str(N_CTX))
    yield base
    assert proc.poll() is None
    stop_server(proc)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def llm():
    m = Llama(n_ctx=N_CTX, verbose=False)
    yield m
    m.close()


def answers(browser):
    """Texts of the assistant bubbles, without their stats lines."""
    return browser.execute_script(
        "return [...document.querySelectorAll('.msg.assistant')].map(b => b.firstChild ? b.firstChild.textContent : '')")


def send(browser, text, max_tokens):
    box = browser.find_element(By.ID, "max-tokens")
    box.clear()
    box.send_keys(str(max_tokens))
    browser.find_element(By.ID, "prompt").send_keys(text)
    browser.find_element(By.ID, "send").click()


def wait_done(browser, n_answers, timeout=120):
    """Wait until answer n_answers has its stats line (the stream ended); its text then."""
    WebDriverWait(browser, timeout).until(
        lambda b: len(b.find_elements(By.CSS_SELECTOR, ".msg.assistant .stats")) >= n_answers)
    return answers(browser)[n_answers - 1]


def test_page_streams_keeps_the_conversation_and_switches_policy(server, browser, llm):
    browser.get(server + "/")
    WebDriverWait(browser, 30).until(lambda b: "n_ctx" in b.find_element(By.ID, "model").text)
    question = "Name three primary colors."
    # 1. full attention: the answer appears while it streams, then equals pylazy.Llama's
    send(browser, question, max_tokens=48)
    seen = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .stats"):
        texts = answers(browser)
        if texts and texts[0]:
            seen.add(texts[0])
        time.sleep(0.02)
    first = wait_done(browser, 1)
    history = [{"role": "user", "content": question}]
    want = llm.create_chat_completion(history, max_tokens=48, temperature=0)["choices"][0]["message"]["content"]
    assert first == want and len(first) > 10
    assert len(seen) >= 2, f"the answer did not stream in (saw {seen})"   # partial texts shown
    stats = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .stats")[0].text
    assert "TTFT" in stats and "tok/s" in stats and "KV" in stats and "full" in stats

    # 2. the conversation is kept: the follow-up is answered with the first turn in view
    follow_up = "And three secondary colors?"
    send(browser, follow_up, max_tokens=24)
    second = wait_done(browser, 2)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": follow_up}]
    want = llm.create_chat_completion(history, max_tokens=24, temperature=0)["choices"][0]["message"]["content"]
    assert second == want and second
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOT_DIR / "web_chat.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

    # 3. a new chat with lazy prefill + recycled decode: the page sends the policy
    browser.find_element(By.ID, "new-chat").click()
    assert answers(browser) == []
    Select(browser.find_element(By.ID, "policy")).select_by_value("lazy+recycled")
    k = browser.find_element(By.ID, "recycle-k")
    k.clear()
    k.send_keys("16")
    send(browser, question, max_tokens=48)
    third = wait_done(browser, 1)
    want = llm.create_chat_completion([{"role": "user", "content": question}], max_tokens=48, temperature=0,
                                      lazy=LazyPrefill(), recycle=Recycle(k=16, stride=16))
    assert third == want["choices"][0]["message"]["content"] and third
    assert llm.stats["computed_fraction"] < 1 and llm.stats["recycled_steps"] > 0
    stats = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .stats").text
    assert "lazy + recycled" in stats and "recycled steps" in stats and "prefill computed" in stats
    shot = SCREENSHOT_DIR / "web_chat_lazy_recycled.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

    # 4. Stop mid-answer: the stream is cut, the server's slot is free again, the page goes on
    Select(browser.find_element(By.ID, "policy")).select_by_value("full")
    send(browser, "Write a long story about a dragon.", max_tokens=600)
    WebDriverWait(browser, 60).until(lambda b: len(answers(b)) == 2 and answers(b)[1])
    browser.find_element(By.ID, "stop").click()
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "send").is_enabled())
    deadline = time.monotonic() + 60
    while request("GET", server, "/health")[1]["slots_idle"] != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    health = request("GET", server, "/health")[1]
    assert health["slots_idle"] == 1 and health["requests"]["cancelled"] == 1
    assert len(answers(browser)[1]) > 0 and browser.find_element(By.ID, "send").is_enabled()
