"""The web console (/console/) in a real headless browser: Debian's chromium driven by Selenium
through Debian's chromedriver (nothing is downloaded at test time). It signs in with a key, finds a
run the stillroom SDK just trained, reads its loss curve (the values the SDK got), sets a TTL,
publishes, downloads and deletes checkpoints, and gets a reply in the playground; it screenshots
each page (into STILLROOM_CONSOLE_SCREENSHOTS when set, e.g. docs/console for the README).

Also, without a browser: the console's JSON routes are keyed, owner-scoped and strict about their
query strings, and the page is served with a content security policy that allows only itself.
The browser test skips when chromium, chromedriver or selenium is missing, unless
STILLROOM_REQUIRE_BROWSER=1 (scripts/test.sh sets it: CI installs chromium, scripts/chromium.sh).
"""

from __future__ import annotations

import base64
import os
import shutil
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from stillroom_server.store import keys

from conftest import TINY
from helpers import encode_line, sft_datum, train_steps

CHROMIUM = os.environ.get("STILLROOM_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("STILLROOM_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,900", "--force-device-scale-factor=1"]
STEPS = 4
WAIT = 60.0
LEARNING_RATE = 1e-2


def tinker(path: str) -> str:
    return "tinker://" + path.removeprefix("stillroom://")


@pytest.fixture(scope="module")
def trained(service, tokenizer):
    """A LoRA trained STEPS steps with the stillroom SDK; its losses and two sampler checkpoints."""
    trainer = service.create_lora_training_client(TINY, rank=4, seed=3)
    data = [sft_datum(encode_line(tokenizer, "the cat sat on the mat.\n"))]
    losses = train_steps(trainer, data, STEPS, LEARNING_RATE)
    keep = trainer.save_weights_for_sampler("console-keep").result().path
    drop = trainer.save_weights_for_sampler("console-drop").result().path
    return trainer.training_run_id, losses, tinker(keep), tinker(drop)


def http(server, method: str, path: str, key: str | None = None, **kwargs) -> httpx.Response:
    headers = {"X-API-Key": key if key is not None else server.local_api_key}
    return httpx.request(method, server.http_url + path, headers=headers, timeout=30, **kwargs)


def checkpoint(server, run_id: str, path: str) -> dict | None:
    listed = http(server, "GET", f"/api/v1/training_runs/{run_id}/checkpoints").json()["checkpoints"]
    return next((c for c in listed if c["tinker_path"] == path), None)


# ---------------------------------------------------------------- steps, without a server

def _result(kind: str, **metrics: float) -> bytes:
    from stillroom._proto import stillroom_pb2 as pb

    if kind == "optim_step":
        return pb.FutureResult(optim_step=pb.OptimStepResult(metrics=metrics)).SerializeToString()
    return pb.FutureResult(forward_backward=pb.ForwardBackwardResult(metrics=metrics)).SerializeToString()


def test_a_steps_metrics_fold_its_requests_by_suffix():
    from stillroom_server.core.console import _steps
    from stillroom_server.store.history import RunResult

    rows = [RunResult(5, "forward_backward", _result("fwd", **{"loss:sum": 2.0, "teacher_kl:mean": 1.0})),
            RunResult(6, "forward_backward", _result("fwd", **{"loss:sum": 3.0, "teacher_kl:mean": 3.0})),
            RunResult(7, "forward", _result("fwd", **{"loss:sum": 9.0})),
            RunResult(8, "optim_step", _result("optim_step", **{"grad_norm:value": 0.5})),
            RunResult(9, "forward_backward", _result("fwd", **{"loss:sum": 4.0, "clip_fraction:max": 0.25})),
            RunResult(10, "forward_backward", _result("fwd", **{"loss:sum": float("nan")}))]
    first, pending = _steps(rows, earlier_steps=2)   # two optim_steps held before these
    assert first == {"step": 3, "first_seq": 5, "last_seq": 8, "done": True, "metrics": {
        "loss:sum": 5.0, "teacher_kl:mean": 2.0, "forward/loss:sum": 9.0, "grad_norm:value": 0.5}}
    assert pending["step"] == 4 and not pending["done"] and pending["first_seq"] == 9
    assert pending["metrics"] == {"clip_fraction:max": 0.25}   # a NaN sum is left out (JSON has none)


def test_a_run_is_in_memory_on_disk_or_unloaded():
    from stillroom_server.core.console import run_state

    class Engine:
        def spilled_runs(self) -> set[str]:
            return {"spilled"}

    class Service:
        engine = Engine()

        def is_live(self, run_id: str) -> bool:
            return run_id in ("resident", "spilled")

    states = [run_state(Service(), r) for r in ("resident", "spilled", "gone")]  # pyright: ignore[reportArgumentType]
    assert states == ["in_memory", "on_disk", "unloaded"]


# ---------------------------------------------------------------- the routes, without a browser

def test_the_metrics_route_gives_the_losses_the_sdk_got_by_step(server, trained):
    run_id, losses, _, _ = trained
    answer = http(server, "GET", f"/api/v1/console/runs/{run_id}/metrics")
    assert answer.status_code == 200, answer.text
    metrics = answer.json()
    assert metrics["series"][0] == "loss:sum" and "grad_norm:value" in metrics["series"]
    steps = [s for s in metrics["steps"] if s["done"]]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    assert [s["metrics"]["loss:sum"] for s in steps] == pytest.approx(losses, rel=1e-6)
    assert all(s["metrics"]["learning_rate:value"] == pytest.approx(LEARNING_RATE) for s in steps)
    assert not metrics["truncated"] and metrics["results_kept_seconds"] == 7 * 86400
    one = http(server, "GET", f"/api/v1/console/runs/{run_id}/metrics?requests=2").json()
    assert one["truncated"] and one["requests_read"] == 2


def test_runs_and_the_server_state_say_where_each_run_is(server, service, trained):
    run_id = trained[0]
    unloaded = service.create_lora_training_client(TINY, rank=2, seed=4)
    unloaded.unload()
    listed = http(server, "GET", "/api/v1/console/runs?limit=1000").json()["runs"]
    runs = {r["training_run_id"]: r for r in listed}
    mine = runs[run_id]
    assert mine["state"] == "in_memory" and mine["lora_rank"] == 4 and mine["base_model"] == TINY
    assert runs[unloaded.training_run_id]["state"] == "unloaded"
    state = http(server, "GET", "/api/v1/console/server").json()
    assert state["runs_in_memory"] >= 1 and state["owner"]["live_runs"] >= 1
    assert state["owner"]["owner"] == "local" and isinstance(state["queued_by_kind"], dict)
    assert TINY in {m["model_name"] for m in state["models"]}
    assert [(e["engine"], e["state"], e["models"]) for e in state["engines"]] == [("0", "up", ["*"])]


def test_console_routes_are_keyed_owner_scoped_and_strict(server, trained):
    run_id, _, keep, _ = trained
    _, other = keys.create_key(server.store, "console-other", "console test")
    name = keep.rsplit("/", 1)[-1]
    for method, path in [("GET", f"/api/v1/console/runs/{run_id}"),
                         ("GET", f"/api/v1/console/runs/{run_id}/metrics"),
                         ("POST", f"/api/v1/console/training_runs/{run_id}/checkpoints/sampler_weights/"
                                  f"{name}/archive_url")]:
        assert http(server, method, path, key=other).status_code == 404, path
        assert http(server, method, path, key="").status_code == 401, path
    theirs = http(server, "GET", "/api/v1/console/runs", key=other).json()
    assert theirs["runs"] == [] and theirs["cursor"]["total_count"] == 0
    assert http(server, "GET", "/api/v1/console/sessions", key=other).json()["sessions"] == []
    assert http(server, "GET", "/api/v1/console/server", key=other).json()["owner"]["live_runs"] == 0
    for query in ["?requests=0", "?requests=20001", "?requests=-1", "?requests=1e3", "?requests=1&requests=2",
                  "?unknown=1", "?requests=" + "9" * 11]:
        answer = http(server, "GET", f"/api/v1/console/runs/{run_id}/metrics{query}")
        assert answer.status_code == 400 and answer.json()["code"] == "INVALID_ARGUMENT", query
    assert http(server, "GET", "/api/v1/console/runs?limit=1001").status_code == 400
    assert http(server, "GET", "/api/v1/console/runs/" + "r" * 300).status_code == 400


def test_the_page_is_served_whole_and_allows_only_itself(server):
    assert httpx.get(server.http_url + "/console", timeout=30).headers["location"] == "/console/"
    page = httpx.get(server.http_url + "/console/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert "http" not in page.text.replace(server.http_url, "")   # nothing from elsewhere
    for name, kind in [("console.js", "text/javascript"), ("console.css", "text/css")]:
        answer = httpx.get(f"{server.http_url}/console/{name}", timeout=30)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(kind)
    assert httpx.get(server.http_url + "/console/app.py", timeout=30).status_code == 404


# ---------------------------------------------------------------- the browser

def _browser_or_skip():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (the dev extra)")
    if missing:
        reason = (f"no headless browser: {', '.join(missing)} missing (apt-get install chromium "
                  "chromium-driver, or bash scripts/chromium.sh)")
        if os.environ.get("STILLROOM_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + "; STILLROOM_REQUIRE_BROWSER=1 asks for it")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="stillroom-chromium-")
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow",
                                                            "downloadPath": str(downloads)})
    driver.downloads = downloads  # pyright: ignore[reportAttributeAccessIssue]
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


class Console:
    """The page in the browser: waits for its renders, finds things, takes screenshots."""

    def __init__(self, driver, base_url: str, shots: Path) -> None:
        self.driver, self.base_url, self.shots = driver, base_url, shots

    def wait(self, condition, timeout: float = WAIT):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(condition)

    def ready(self) -> str:
        return self.driver.execute_script("return document.body.dataset.ready || ''")

    def wait_page(self, page: str, after: str = "") -> None:
        """Until the page `page` has drawn (a render newer than `after`)."""
        self.wait(lambda d: d.execute_script("return document.body.dataset.page") == page
                  and self.ready() not in ("", after))

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.wait(lambda d: d.find_element(By.CSS_SELECTOR, css))

    def all(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def go(self, page: str) -> None:
        from selenium.webdriver.common.keys import Keys

        before = self.ready()
        self.find(f'#nav a[data-page="{page}"]').send_keys(Keys.ENTER)
        self.wait_page(page, before)

    def status(self, text: str) -> None:
        self.wait(lambda d: text in self.find("#status").text)

    def shoot(self, name: str) -> None:
        """A PNG of the whole page, below the window's edge too (Chrome's DevTools protocol)."""
        size = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 4000), "scale": 1}
        shot = self.driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True, "clip": clip})
        self.shots.mkdir(parents=True, exist_ok=True)
        (self.shots / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))


@pytest.mark.slow
def test_the_console_in_a_headless_browser(server, trained, browser, tmp_path):
    from selenium.webdriver.common.keys import Keys

    run_id, losses, keep, drop = trained
    shots = Path(os.environ.get("STILLROOM_CONSOLE_SCREENSHOTS") or tmp_path / "console")
    ui = Console(browser, server.http_url, shots)
    session = http(server, "POST", "/api/v1/create_session", json={"tags": ["console-test"]})
    assert session.status_code == 200, session.text  # a client session for the sessions page

    # Sign in: the key goes into this tab's sessionStorage only.
    browser.get(server.http_url + "/console")
    ui.find("#key")
    ui.shoot("sign-in")
    ui.find("#key").send_keys("not-a-key", Keys.ENTER)
    ui.wait(lambda d: "HTTP 401" in ui.find("#alert").text)
    ui.find("#key").clear()
    ui.find("#key").send_keys(server.local_api_key, Keys.ENTER)
    ui.wait_page("runs")
    assert browser.execute_script("return document.activeElement.tagName") == "H1"  # focus follows
    assert browser.execute_script("return sessionStorage.length") == 1
    assert browser.execute_script("return localStorage.length") == 0 and not browser.get_cookies()

    # The run the SDK just trained, and its loss curve: the values the SDK got, step by step.
    link = ui.find(f'a[href="#/runs/{run_id.replace(":", "%3A")}"]')
    row = link.find_element("xpath", "./ancestor::tr")
    assert TINY in row.text and "in memory" in row.text
    ui.shoot("runs")
    before = ui.ready()
    link.click()
    ui.wait_page("runs", before)
    curve = ui.find('table.values[data-metric="loss:sum"]')
    values = [float(cell.get_attribute("data-value"))
              for cell in curve.find_elements("css selector", "td[data-value]")]
    assert values == pytest.approx(losses, rel=1e-6)
    assert ui.all('figure[id="chart-loss-sum"] svg polyline')
    ui.shoot("run")

    # Checkpoints: set a TTL, publish, download one; delete the other.
    ui.go("checkpoints")
    row_css = f'tr[data-path="{keep}"]'
    ui.find(f"{row_css} input[name=ttl]").send_keys("2h", Keys.ENTER)
    ui.status("TTL of sampler_weights/console-keep set.")
    expires = (checkpoint(server, run_id, keep) or {})["expires_at"]
    left = (datetime.fromisoformat(expires) - datetime.now(timezone.utc)).total_seconds()
    assert 7000 < left <= 7200
    assert "in 2.0 h" in ui.find(f"{row_css} td.expires").text
    ui.find(f'{row_css} button[data-action="publish"]').send_keys(Keys.ENTER)   # the keyboard alone
    ui.status("sampler_weights/console-keep published.")
    assert (checkpoint(server, run_id, keep) or {})["public"] is True
    assert ui.find(f"{row_css} td.published").text == "yes"
    assert browser.switch_to.active_element.text == "Unpublish"   # focus stays on the button pressed
    ui.find(f'{row_css} button[data-action="download"]').click()
    archive = browser.downloads / "console-keep.tar"
    ui.wait(lambda d: archive.exists() and not list(browser.downloads.glob("*.crdownload")))
    with tarfile.open(archive) as tar:
        assert any(n.endswith("adapter_model.safetensors") for n in tar.getnames())
    ui.find(f'tr[data-path="{drop}"] button[data-action="delete"]').click()
    ui.wait(lambda d: d.switch_to.alert).accept()
    ui.status("sampler_weights/console-drop deleted.")
    assert not ui.all(f'tr[data-path="{drop}"]') and checkpoint(server, run_id, drop) is None
    ui.shoot("checkpoints")

    ui.go("sessions")
    assert session.json()["session_id"] in ui.find("main table").text
    ui.shoot("sessions")
    ui.go("server")
    assert "Runs in memory" in ui.find("main").text
    ui.shoot("server")

    # The playground, on the kept checkpoint (its Chat link), through the OpenAI endpoint.
    ui.go("checkpoints")
    before = ui.ready()
    ui.find(f'{row_css} a.button[href^="#/playground"]').click()
    ui.wait_page("playground", before)
    assert ui.find("#pg-model").get_attribute("value") == keep
    ui.find("#pg-temperature").clear()
    ui.find("#pg-temperature").send_keys("1")
    began = time.monotonic()
    ui.find("#pg-message").send_keys("the cat", Keys.ENTER)
    reply = ui.find("#chat-log li.msg.assistant")
    assert ui.all("#chat-log li.msg.user")[0].text.endswith("the cat")
    assert reply.find_element("css selector", ".role").text == "Model"
    assert time.monotonic() - began < WAIT
    ui.shoot("playground")
    assert not ui.find("#alert").text
