"""The web page in a real headless Chromium (Debian ``chromium`` + ``chromium-driver``, via Selenium).

The test starts uvicorn on a free loopback port over a tiny real index, then drives the page as a
person would: type a query, see ranked thumbnails, click one to search by it, fold near-duplicates,
upload an image through the file input, download the results; screenshots go to the test's tmp dir.
Skipped only when the browser is not installed (``bash scripts/setup_browser.sh`` installs it).
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from test_index import image_path, make_encoder, write_collection

from vitrina.index.embed import index_folder
from vitrina.serve.app import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason="no /usr/bin/chromium + /usr/bin/chromedriver; install them with `bash scripts/setup_browser.sh`",
)

WAIT_S = 20


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser") / "photos"
    write_collection(root, variants=3, captions=True)  # 36 images
    shutil.copyfile(image_path(root, "green", "square-0"), root / "green" / "square-0-copy.png")
    return root


@pytest.fixture(scope="module")
def base_url(collection: Path):
    """A real uvicorn server in a thread, on a loopback port the OS picked."""
    import uvicorn

    encoder = make_encoder()
    index_dir = collection.parent / "index"
    index_folder(collection, encoder, index_dir, model_ref="clip-tiny", progress=False, workers=0)
    app = create_app(index_dir, encoder=encoder)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=WAIT_S)
    sock.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def api(base_url: str, path: str, **params) -> dict:
    """GET a JSON answer of the server, as the page's numbers are checked against it."""
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{base_url}{path}{query}", timeout=WAIT_S) as response:
        return json.load(response)


def cards(driver) -> list[dict]:
    """The result grid as the page shows it: id, score, rank badge, and whether the thumbnail loaded."""
    return driver.execute_script(
        """return [...document.querySelectorAll('#results li.card')].map(li => ({
             id: Number(li.dataset.id), score: Number(li.dataset.score),
             rank: li.querySelector('.rank').textContent, dups: li.querySelector('.dups')?.textContent || '',
             loaded: li.querySelector('img').complete && li.querySelector('img').naturalWidth > 0}))"""
    )


def wait_for(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda d: condition(d), message)


def test_search_click_collapse_upload_and_download(base_url: str, browser, collection: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.get(base_url + "/")
    wait_for(driver, lambda d: "37 images" in d.find_element(By.ID, "info").text, "the index summary")
    assert "untrained preset" in driver.find_element(By.ID, "info").text

    # 1. Type a query: ranked results appear without pressing Enter, in the API's order.
    driver.find_element(By.ID, "q").send_keys("a red circle")
    wait_for(driver, lambda d: len(cards(d)) == 24 and all(c["loaded"] for c in cards(d)), "24 loaded thumbnails")
    shown = cards(driver)
    expected = api(base_url, "/api/search", q="a red circle", k=24)["hits"]
    assert [c["id"] for c in shown] == [h["id"] for h in expected]
    assert [c["score"] for c in shown] == sorted((c["score"] for c in shown), reverse=True)
    assert [c["rank"] for c in shown[:3]] == ["#1", "#2", "#3"]
    assert "of 37 images, best first" in driver.find_element(By.ID, "status").text
    driver.save_screenshot(str(tmp_path / "1-text-query.png"))
    # every card links to its attention-rollout overlay (clip-tiny's image tower is a ViT)
    links = driver.find_elements(By.CSS_SELECTOR, "#results li.card a.why")
    assert len(links) == 24 and links[0].get_attribute("href").endswith(f"/api/explain/{shown[0]['id']}")
    # beside it, the query's patch-similarity map for the text typed
    query_links = driver.find_elements(By.CSS_SELECTOR, "#results li.card a.why-query")
    href = query_links[0].get_attribute("href")
    assert len(query_links) == 24 and href.endswith(f"/api/explain/{shown[0]['id']}?q=a+red+circle")

    # 2. Hide scores, then show them again.
    driver.find_element(By.ID, "scores").click()
    assert not driver.find_element(By.CSS_SELECTOR, "#results .score").is_displayed()
    driver.find_element(By.ID, "scores").click()
    assert driver.find_element(By.CSS_SELECTOR, "#results .score").is_displayed()

    # 3. Click a result: the page searches by that image, which comes first with score 1.
    clicked = shown[4]["id"]
    driver.find_elements(By.CSS_SELECTOR, "#results li.card button")[4].click()
    wait_for(driver, lambda d: cards(d) and cards(d)[0]["id"] == clicked, "the clicked image ranked first")
    assert cards(driver)[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert driver.find_element(By.ID, "example").is_displayed()
    assert driver.find_element(By.ID, "q").get_attribute("value") == ""
    assert driver.find_elements(By.CSS_SELECTOR, "#results li.card a.why-query") == []  # no text, no query map

    # 4. Search by the image that has an exact copy, with near-duplicates folded: one card, "+1" or more.
    ids = {h["name"]: h["id"] for h in api(base_url, "/api/search", q="anything", k=37)["hits"]}
    copy_id = ids["green/square-0-copy.png"]
    driver.find_element(By.ID, "example-clear").click()
    driver.find_element(By.ID, "k").clear()
    driver.find_element(By.ID, "k").send_keys("37")
    driver.find_element(By.ID, "q").send_keys("green square")
    wait_for(driver, lambda d: len(cards(d)) == 37, "all 37 results")
    driver.find_element(By.CSS_SELECTOR, f"#results li.card[data-id='{copy_id}'] button").click()
    wait_for(driver, lambda d: cards(d)[0]["score"] > 0.9999 and cards(d)[1]["score"] > 0.9999, "copy + original")
    driver.find_element(By.ID, "collapse").click()
    wait_for(driver, lambda d: cards(d)[0]["dups"].startswith("+"), "the copy folded into the first card")
    assert "near-duplicates folded in" in driver.find_element(By.ID, "status").text
    driver.find_element(By.ID, "collapse").click()

    # 5. Upload an image through the file input: the same picture comes first.
    upload = image_path(collection, "blue", "triangle-1")
    upload_id = ids[upload.relative_to(collection).as_posix()]
    driver.find_element(By.ID, "file").send_keys(str(upload))
    wait_for(driver, lambda d: d.find_element(By.ID, "example-name").text == upload.name, "the upload chip")
    wait_for(driver, lambda d: cards(d) and cards(d)[0]["id"] == upload_id, "the uploaded image ranked first")
    wait_for(driver, lambda d: all(c["loaded"] for c in cards(d)), "thumbnails loaded")
    driver.save_screenshot(str(tmp_path / "2-upload.png"))

    # 6. Download the results as JSON: the file holds what the page shows.
    driver.find_element(By.ID, "download").click()
    target = downloads / "vitrina-results.json"
    wait_for(driver, lambda d: target.is_file() and target.stat().st_size > 0, "the downloaded JSON")
    saved = json.loads(target.read_text())
    assert [h["id"] for h in saved["hits"]] == [c["id"] for c in cards(driver)]
    assert saved["query"] == {"image": upload.name}


def test_bad_query_shows_the_servers_message(base_url: str, browser) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    driver.get(base_url + "/")
    driver.find_element(By.ID, "q").send_keys("-people")
    wait_for(driver, lambda d: "positive term" in d.find_element(By.ID, "status").text, "the error line")
    assert "error" in driver.find_element(By.ID, "status").get_attribute("class")
    assert cards(driver) == []


@pytest.mark.parametrize(
    "raw_path",
    [
        "/api/images/../../../../etc/passwd",
        "/api/images/%2e%2e/%2e%2e/etc/passwd",
        "/static/../app.py",
        "/api/thumbs//etc/passwd",
    ],
)
def test_the_live_server_refuses_traversal(base_url: str, raw_path: str) -> None:
    """The same attempts as the API test, sent byte for byte to uvicorn (no client-side normalising)."""
    import http.client

    host, port = urllib.parse.urlsplit(base_url).netloc.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=WAIT_S)
    connection.request("GET", raw_path)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    assert response.status == 404 and b"root:" not in body and json.loads(body)["error"]


def test_the_search_lives_in_the_url(base_url: str, browser) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    driver.get(base_url + "/?q=a+green+square&k=5&collapse=1")
    wait_for(driver, lambda d: len(cards(d)) >= 1, "results of the query in the URL")
    assert driver.find_element(By.ID, "q").get_attribute("value") == "a green square"
    assert driver.find_element(By.ID, "collapse").is_selected()
    expected = api(base_url, "/api/search", q="a green square", k=5, collapse="true")["hits"]
    assert [c["id"] for c in cards(driver)] == [h["id"] for h in expected]
    # Typing another query rewrites the address (no new history entry), so a reload shows the same.
    box = driver.find_element(By.ID, "q")
    box.clear()
    box.send_keys("a blue bar")
    wait_for(driver, lambda d: "q=a+blue+bar" in d.current_url, "the URL follows the query")
    driver.refresh()
    wait_for(driver, lambda d: d.find_element(By.ID, "q").get_attribute("value") == "a blue bar", "restored query")
    wait_for(driver, lambda d: len(cards(d)) == 5, "5 results after the reload")
    # Searching by a result puts its id in the address.
    driver.find_element(By.CSS_SELECTOR, "#results li.card button").click()
    wait_for(driver, lambda d: "image=" in d.current_url and "q=" not in d.current_url, "the example id in the URL")
