"""The browser playground (service/api/static/) end to end in a real headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by Selenium through the system chromedriver), against a real uvicorn, the test Redis and
a real worker process on a keyed server: the page is found by its accessible names (a "Prompt" textbox, a
"Generate" button, result images whose alt is the prompt), as a screen reader would.

Skipped, saying why, where no Chromium is installed (`make install` installs it as root where apt works).
Set LDM_PLAYGROUND_SCREENSHOT=docs/playground.png to save the page's picture after the inpainting test.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.config import Settings
from service.images import decode_label_map
from tests.integration.secure import Keys
from tests.integration.test_rest import FAST, MODEL, Api, gradient_png, ready_stack

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.timeout(180)
BROWSER, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys.fresh()


@pytest.fixture(scope="module")
def keyed(redis_url: str, keys: Keys) -> Iterator[Api]:
    """A keyed API and one real worker (model random:tiny-sd), ready."""
    settings = Settings(redis_url=redis_url, key_prefix=f"test-{uuid.uuid4().hex[:12]}", default_model=MODEL,
                        **FAST, **keys.settings())
    with ready_stack(settings) as api:
        yield api


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    if BROWSER is None or DRIVER is None:
        pytest.skip("no Chromium here: the browser tests need Debian's chromium and chromium-driver packages "
                    "(`make install` installs them as root where apt-get works)")
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1800", "--disable-extensions", "--no-first-run"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # the network events (DevTools protocol)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def labelled(driver: WebDriver, name: str) -> WebElement:
    """The control whose <label> reads `name` (as assistive technology finds it)."""
    label = driver.find_element(By.XPATH, f"//label[normalize-space()='{name}']")
    return driver.find_element(By.ID, label.get_attribute("for"))


def button(driver: WebDriver, name: str) -> WebElement:
    return driver.find_element(By.XPATH, f"//button[normalize-space()='{name}']")


def wait(driver: WebDriver, what: Any, timeout_s: float = 90) -> Any:
    return WebDriverWait(driver, timeout_s, poll_frequency=0.05).until(what)


def open_page(driver: WebDriver, api: Api, key: str | None) -> None:
    """Load the playground, type the API key (or clear it) and wait for the model list."""
    driver.get(api.url)
    field = labelled(driver, "API key")
    field.clear()
    if key:
        field.send_keys(key)
    # leaving the field fires its change (if the value changed); the explicit one covers an unchanged value
    driver.execute_script("arguments[0].blur(); arguments[0].dispatchEvent(new Event('change'))", field)
    wait(driver, lambda d: d.execute_script("return document.body.dataset.models") == "ready", 30)


def fill(driver: WebDriver, **fields: str) -> None:
    for name, value in fields.items():
        element = labelled(driver, name)
        element.clear()
        element.send_keys(value)


def generate(driver: WebDriver, prompt: str) -> WebElement:
    """Press Generate and wait for the image whose alt is `prompt`; fail on an error shown instead."""
    before = len(driver.find_elements(By.CSS_SELECTOR, "#gallery img"))
    button(driver, "Generate").click()

    def result(d: WebDriver) -> WebElement | bool:
        alert = d.find_element(By.CSS_SELECTOR, "[role=alert]").text
        assert not alert, alert
        images = d.find_elements(By.CSS_SELECTOR, "#gallery img")
        return images[0] if len(images) > before else False
    image: WebElement = wait(driver, result)
    assert image.get_attribute("alt") == prompt
    return image


def image_bytes(driver: WebDriver, image: WebElement) -> bytes:
    """The bytes behind an <img> (a blob: URL), read in the page."""
    encoded = driver.execute_async_script("""
        const [src, done] = arguments;
        fetch(src).then((r) => r.arrayBuffer()).then((buffer) => {
          const bytes = new Uint8Array(buffer); let text = "";
          for (let i = 0; i < bytes.length; i++) text += String.fromCharCode(bytes[i]);
          done(btoa(text));
        });""", image.get_attribute("src"))
    return base64.b64decode(encoded)


def test_a_keyed_server_refuses_the_page_without_the_key_and_serves_it_with_it(
        browser: WebDriver, keyed: Api, keys: Keys) -> None:
    open_page(browser, keyed, None)
    alert = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "[role=alert]").text)
    assert alert.startswith("Could not list the models (401: authentication required")
    fill(browser, Prompt="a red circle")
    button(browser, "Generate").click()
    wait(browser, lambda d: "401: authentication required" in d.find_element(By.CSS_SELECTOR, "[role=alert]").text)
    assert not browser.find_elements(By.CSS_SELECTOR, "#gallery img")
    open_page(browser, keyed, keys.alice)
    assert browser.execute_script("return sessionStorage.getItem('ldm-serve.api-key')") == keys.alice
    fill(browser, Prompt="a red circle", Steps="2", Width="64", Height="64", Seed="7")
    generate(browser, "a red circle")


def test_prompt_and_generate_give_an_image_whose_png_carries_the_prompt_with_progress(
        browser: WebDriver, keyed: Api, keys: Keys) -> None:
    open_page(browser, keyed, keys.alice)
    assert [o.text for o in Select(labelled(browser, "Task")).options] == ["txt2img", "img2img", "inpaint"]
    prompt = "a blue square at the top"
    fill(browser, Prompt=prompt, **{"Negative prompt": "blurry"}, Steps="6", Width="64", Height="48", Seed="11")
    Select(labelled(browser, "Sampler")).select_by_visible_text("DDIM")
    image = generate(browser, prompt)
    png = Image.open(io.BytesIO(image_bytes(browser, image)))
    assert png.size == (64, 48)
    text = png.text  # type: ignore[attr-defined]
    assert (text["prompt"], text["negative_prompt"], text["seed"], text["steps"], text["sampler"]) == \
        (prompt, "blurry", "11", "6", "ddim")
    progress = browser.find_element(By.CSS_SELECTOR, "progress")
    assert int(progress.get_attribute("data-events")) >= 2  # progress events arrived over SSE, step by step
    assert progress.get_attribute("value") == progress.get_attribute("max") == "6"
    caption = browser.find_element(By.CSS_SELECTOR, "#gallery figure figcaption").text
    assert "11" in caption and "ddim" in caption and "Download" in caption


def test_paint_a_mask_and_inpaint_keeps_every_pixel_outside_it(browser: WebDriver, keyed: Api, keys: Keys,
                                                                 tmp_path: Path) -> None:
    original = tmp_path / "gradient.png"
    original.write_bytes(gradient_png(64, 64))
    open_page(browser, keyed, keys.alice)
    Select(labelled(browser, "Task")).select_by_visible_text("inpaint")
    labelled(browser, "Input image").send_keys(str(original))
    canvas = browser.find_element(By.ID, "canvas")
    wait(browser, lambda d: d.execute_script("return state.image !== null"), 30)
    half = canvas.size["width"] / 2
    ActionChains(browser).move_to_element_with_offset(canvas, -half * 0.6, -half * 0.6).click_and_hold() \
        .move_by_offset(0, half * 0.5).move_by_offset(half * 0.4, 0).release().perform()
    mask = np.array(browser.execute_script("return Array.from(state.paint)"), np.uint8).reshape(64, 64) > 0
    assert 50 < mask.sum() < 64 * 64 / 2, mask.sum()  # a stroke, not nothing and not everything
    fill(browser, Prompt="a green triangle", Steps="3", Seed="5")
    image = generate(browser, "a green triangle")
    out = np.asarray(Image.open(io.BytesIO(image_bytes(browser, image))).convert("RGB"), np.int16)
    before = np.asarray(Image.open(original).convert("RGB"), np.int16)
    assert (out[~mask] == before[~mask]).all()  # kept exactly
    assert np.abs(out[mask] - before[mask]).mean() > 5  # repainted
    if target := os.environ.get("LDM_PLAYGROUND_SCREENSHOT"):
        browser.save_screenshot(target)


def use_task(driver: WebDriver, task: str, labels: list[tuple[str, str]]) -> None:
    """Switch the page to `task` with these paint labels (text, value), as for a model that has them (this stack's
    model is text-to-image; what is checked is the page's drawing and what it would send)."""
    driver.execute_script("""
        const [task, labels] = arguments;
        $("task").append(new Option(task, task)); $("task").value = task; taskChanged();
        $("paint-label").replaceChildren(...labels.map(([t, v]) => new Option(t, v)));
        $("paint-label").value = labels[labels.length - 1][1];""", task, labels)


def drag(driver: WebDriver, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Press at `start`, move to `end`, release; positions as fractions of the canvas."""
    canvas = driver.find_element(By.ID, "canvas")
    w, h = canvas.size["width"], canvas.size["height"]
    ActionChains(driver).move_to_element_with_offset(canvas, (start[0] - 0.5) * w, (start[1] - 0.5) * h) \
        .click_and_hold().move_by_offset((end[0] - start[0]) * w, (end[1] - start[1]) * h).release().perform()


def test_painted_label_maps_go_as_mode_l_pngs_the_api_reads_back_exactly(browser: WebDriver, keyed: Api,
                                                                           keys: Keys) -> None:
    open_page(browser, keyed, keys.alice)
    use_task(browser, "semantic", [("Background", "0"), ("red circle", "1"), ("blue square", "2")])
    drag(browser, (0.2, 0.2), (0.2, 0.8))
    browser.execute_script('$("paint-label").value = "1"')
    drag(browser, (0.7, 0.3), (0.9, 0.3))
    painted = np.array(browser.execute_script("return Array.from(state.paint)"), np.uint8).reshape(64, 64)
    assert set(np.unique(painted)) == {0, 1, 2}
    body = browser.execute_script("return buildBody()")
    assert body["task"] == "semantic" and "prompt" not in body and "width" not in body
    decoded = decode_label_map(base64.b64decode(body["label_map"]), keyed.settings)
    assert decoded.labels == (0, 1, 2) and decoded.size == (64, 64)
    assert (np.asarray(Image.open(io.BytesIO(decoded.png))) == painted).all()


def test_drawn_layout_boxes_become_the_layout_field(browser: WebDriver, keyed: Api, keys: Keys) -> None:
    open_page(browser, keyed, keys.alice)
    use_task(browser, "layout", [("red circle", "red circle"), ("blue square", "blue square")])
    drag(browser, (0.1, 0.2), (0.5, 0.6))
    assert browser.find_element(By.CSS_SELECTOR, "[aria-label='Layout boxes'] li").text.startswith("blue square")
    body = browser.execute_script("return buildBody()")
    [box] = body["layout"]
    assert box["label"] == "blue square" and (body["width"], body["height"]) == (64, 64)
    assert np.allclose(box["box"], [0.1, 0.2, 0.5, 0.6], atol=0.04), box
    button(browser, "Remove").click()
    assert browser.execute_script("return state.boxes.length") == 0
    button(browser, "Generate").click()
    assert browser.find_element(By.CSS_SELECTOR, "[role=alert]").text == "Draw at least one box first."


def test_cancel_stops_a_running_job(browser: WebDriver, keyed: Api, keys: Keys) -> None:
    open_page(browser, keyed, keys.alice)
    fill(browser, Prompt="x", Steps="1000", Width="64", Height="64")
    button(browser, "Generate").click()
    wait(browser, lambda d: d.find_element(By.ID, "status").text.startswith("Step "))
    button(browser, "Cancel").click()
    wait(browser, lambda d: d.find_element(By.ID, "status").text == "Cancelled", 30)
    assert not browser.find_elements(By.CSS_SELECTOR, "#gallery img")


def foreign_requests(driver: WebDriver, origin: str) -> dict[str, str | None]:
    """URL -> why it was blocked (None: it went out) of every request since the last call to another origin than
    `origin` (data: and blob: URLs are the page's own)."""
    sent, blocked = {}, {}
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message["params"]
        if message["method"] == "Network.requestWillBeSent":
            sent[params["requestId"]] = params["request"]["url"]
        elif message["method"] == "Network.loadingFailed":
            blocked[params["requestId"]] = params.get("blockedReason")
    return {url: blocked.get(rid) for rid, url in sent.items()
            if not url.startswith((origin, "data:", f"blob:{origin}"))}


def test_docs_render_without_the_internet(browser: WebDriver, keyed: Api) -> None:
    """Swagger UI and ReDoc draw the API from files the API serves. ReDoc's bundle links the Redocly logo from its
    CDN: the page's Content-Security-Policy blocks it before it is sent; nothing else leaves the machine."""
    for page, selector in (("/docs", ".swagger-ui .info .title"), ("/redoc", "h1")):
        foreign_requests(browser, keyed.url)
        browser.get(keyed.url + page)
        try:
            title = wait(browser, lambda d, s=selector: d.find_elements(By.CSS_SELECTOR, s), 30)[0]  # type: ignore[misc]
        except TimeoutException as exc:
            raise AssertionError(f"{page} drew nothing") from exc
        assert "ldm-serve" in title.text
        time.sleep(0.5)  # ReDoc draws its sidebar's logo after the title
        foreign = foreign_requests(browser, keyed.url)
        assert all(reason == "csp" for reason in foreign.values()), foreign
