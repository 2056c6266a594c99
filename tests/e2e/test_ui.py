"""The playground page (GET /) in headless Chromium against a real `textgen serve` process.

What a person at the browser sees: the page loads with no console errors and fits a phone; a
generation streams in and Stop ends it; the curl command is the request the page sent; Activate
switches the model the generate panel uses; a training job draws its loss chart as events arrive
and its model can be tried at once; Cancel stops a job; 401/403/429/503 read as sentences.
Screenshots of each panel go to test-output/ui/.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.app.conftest import Server, start_server, stop_servers
from tests.e2e.ui_support import CHROMIUM, CHROMIUM_ARGS, CORPUS, SCREENSHOTS, build_models

pytestmark = pytest.mark.slow

TRAIN_TEXT = CORPUS * 48  # about 32 KB: 8 tiny epochs take several seconds, long enough to watch on a busy machine
LONG_STREAM = "1000000"  # max_tokens for a generation that runs until Stop


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return build_models(tmp_path_factory.mktemp("ui-models") / "models")


ServerFactory = Callable[..., Server]


@pytest.fixture(scope="module")
def serve(models_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """serve(**settings): a `textgen serve` process on a fresh copy of the tiny models, stopped at module end."""
    servers: list[Server] = []

    def start(models: bool = True, **env: str) -> Server:
        root = tmp_path_factory.mktemp("ui-server")
        models_dir = root / "models"
        if models:
            shutil.copytree(models_template, models_dir)
        else:
            models_dir.mkdir()
        server = start_server(models_dir, root, ready="/readyz" if models else "/healthz", **env)
        servers.append(server)
        return server

    yield start
    stop_servers(servers)


@pytest.fixture(scope="module")
def shared_server(serve: ServerFactory) -> Server:
    """For the tests that change nothing on the server: tiny-a active, no token cap to speak of."""
    return serve(max_tokens=LONG_STREAM)


@pytest.fixture(scope="module")
def registry_server(serve: ServerFactory) -> Server:
    """For the tests that change the registry (activate, delete, train); none depends on another's changes."""
    return serve(max_tokens=LONG_STREAM)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class Tab:
    """One browser tab and what its console said."""

    page: Page
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)  # uncaught exceptions: never acceptable

    def open(self, server: Server, panel: str = "generate") -> None:
        response = self.page.goto(f"{server.url}/#{panel}")
        assert response is not None and response.status == 200
        self.page.wait_for_selector("body.loaded")


@pytest.fixture
def tabs(browser: Browser) -> Iterator[Callable[[], Tab]]:
    """tabs(): a new tab of one fresh browser context (its own session storage)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    opened: list[Tab] = []

    def new_tab() -> Tab:
        tab = Tab(context.new_page())
        tab.page.on("console", lambda m: tab.console_errors.append(m.text) if m.type == "error" else None)
        tab.page.on("pageerror", lambda e: tab.page_errors.append(str(e)))
        opened.append(tab)
        return tab

    yield new_tab
    context.close()
    for tab in opened:
        assert tab.page_errors == [], "uncaught errors in the page"


@pytest.fixture
def tab(tabs: Callable[[], Tab]) -> Tab:
    return tabs()


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


def output_length(page: Page) -> int:
    return page.evaluate("document.querySelector('#gen-out-text').textContent.length")


def wait_for_growth(page: Page, than: int) -> int:
    # a function, not an expression: Playwright would eval() an expression, which the page's CSP forbids
    page.wait_for_function(f"() => document.querySelector('#gen-out-text').textContent.length > {than}", timeout=5000)
    return output_length(page)


def server_gauge(server: Server, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", httpx.get(f"{server.url}/metrics").text, re.MULTILINE)
    assert match, name
    return float(match.group(1))


def generate_short(page: Page, max_tokens: int = 30, seed: int = 7) -> None:
    page.fill("#gen-max-tokens", str(max_tokens))
    page.fill("#gen-seed", str(seed))
    page.click("#gen-start")
    expect(page.locator("#gen-stat-finish")).to_have_text("length")


def confirm(page: Page, answer: str) -> None:
    dialog = page.locator("#confirm")
    expect(dialog).to_be_visible()
    dialog.get_by_role("button", name=answer).click()
    expect(dialog).to_be_hidden()


# ---------------------------------------------------------------------------- the page


def test_page_loads_without_console_errors(shared_server: Server, tab: Tab) -> None:
    response = httpx.get(f"{shared_server.url}/")
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert '<script type="module" src="/static/js/main.js">' in response.text
    assert not re.search(r'(src|href)="(https?:)?//', response.text)  # nothing from another site

    page = tab.page
    tab.open(shared_server)
    expect(page.locator("#serving")).to_have_text("serving tiny-a")
    options = page.locator("#gen-model option").all_inner_texts()
    assert options == ["Active model (tiny-a)", "tiny-c", "tiny-b", "tiny-a · active"]
    expect(page.locator("#key-form")).to_be_hidden()  # no keys configured: nothing to ask for
    screenshot(page, "generate-empty")

    # keyboard: the tabs follow the arrow keys, Home and End
    page.focus("#tab-generate")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tab-train")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#panel-train")).to_be_visible()
    expect(page.locator("#panel-generate")).to_be_hidden()
    page.keyboard.press("End")
    expect(page.locator("#panel-models")).to_be_visible()
    expect(page.locator("#models-body tr")).to_have_count(3)
    page.keyboard.press("Home")
    expect(page.locator("#panel-generate")).to_be_visible()

    # a phone-width screen: every panel fits without scrolling sideways
    page.set_viewport_size({"width": 375, "height": 800})
    for panel in ("generate", "train", "models"):
        page.click(f"#tab-{panel}")
        expect(page.locator(f"#panel-{panel}")).to_be_visible()
        width, visible = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert width <= visible, f"the {panel} panel is wider than a phone"
        screenshot(page, f"phone-{panel}")
    assert tab.console_errors == []


def test_static_files_are_served_from_the_package_only(shared_server: Server) -> None:
    script = httpx.get(f"{shared_server.url}/static/js/main.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    for path in ("/static/../routes/ui.py", "/static/%2e%2e/routes/ui.py", "/static/js/missing.js", "/static/"):
        response = httpx.get(f"{shared_server.url}{path}")
        assert response.status_code == 404, path
        assert response.json()["error"]["type"] == "not_found_error"
    config = httpx.get(f"{shared_server.url}/ui/config").json()
    assert config["auth"] is False
    assert config["limits"]["max_tokens"] == int(LONG_STREAM)
    assert config["training"]["defaults"]["hidden_dim"] is None  # fitted to the corpus (lm/train/sizing.py)
    assert config["training"]["defaults"]["tie_weights"] is False and config["training"]["bounds"]["layers"] == [1, 8]


def test_generation_streams_and_stop_ends_it(shared_server: Server, tab: Tab) -> None:
    page = tab.page
    tab.open(shared_server)
    page.fill("#gen-max-tokens", LONG_STREAM)
    page.focus("#gen-prompt")
    page.keyboard.press("Control+Enter")
    expect(page.locator("#gen-stop")).to_be_enabled()
    lengths = [output_length(page)]
    for _ in range(4):  # the output grows read after read while the stream runs
        lengths.append(wait_for_growth(page, lengths[-1]))
    assert lengths == sorted(set(lengths))
    expect(page.locator("#gen-stat-model")).to_have_text("tiny-a")
    expect(page.locator("#gen-stat-ttft")).to_have_text(re.compile(r"^\d[\d.]* m?s$"))
    expect(page.locator("#gen-stat-finish")).to_have_text("…")

    page.click("#gen-stop")
    expect(page.locator("#gen-stat-finish")).to_have_text("stopped (by you)")
    expect(page.locator("#gen-start")).to_be_enabled()
    expect(page.locator("#gen-stop")).to_be_disabled()
    stopped_at = output_length(page)
    deadline = time.monotonic() + 5
    while server_gauge(shared_server, "textgen_running_sequences") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server_gauge(shared_server, "textgen_running_sequences") == 0  # the server freed the sequence
    assert output_length(page) == stopped_at
    assert tab.console_errors == []


def test_the_curl_command_is_the_request_the_page_sent(shared_server: Server, tab: Tab) -> None:
    page = tab.page
    tab.open(shared_server)
    page.fill("#gen-prompt", "Shall I")
    page.fill("#gen-temperature", "0.7")
    page.fill("#gen-top-k", "20")
    page.fill("#gen-stop-strings", "zz\\nq")
    generate_short(page, max_tokens=40, seed=11)
    expect(page.locator("#gen-stat-tokens")).to_have_text(re.compile(r"^\d+$"))
    assert page.inner_text("#gen-stat-rate") != "—"
    shown = page.inner_text("#gen-out-text")
    assert page.inner_text("#gen-out-prompt") == "Shall I"
    screenshot(page, "generate")

    words = shlex.split(page.inner_text("#gen-curl"))
    assert words[:3] == ["curl", "-N", f"{shared_server.url}/generate"]
    body = json.loads(words[words.index("-d") + 1])
    assert body == {
        "prompt": "Shall I",
        "max_tokens": 40,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 1,
        "min_p": 0,
        "repetition_penalty": 1,
        "stop": ["zz\nq"],
        "seed": 11,
        "stream": True,
    }
    answer = httpx.post(f"{shared_server.url}/generate", json={**body, "stream": False}).json()
    assert answer["text"] == shown  # same seed, same parameters, same model: the same text
    assert page.inner_text("#gen-stat-tokens") == str(answer["usage"]["completion_tokens"])
    assert tab.console_errors == []


def test_the_constraint_field_constrains_and_shows_in_curl(shared_server: Server, tab: Tab) -> None:
    page = tab.page
    tab.open(shared_server)
    page.fill("#gen-prompt", "Shall I")
    page.select_option("#gen-constraint-kind", "regex")
    page.fill("#gen-constraint", "[a-z]{3} [a-z]{2}")
    page.fill("#gen-max-tokens", "40")
    page.fill("#gen-seed", "5")
    page.click("#gen-start")
    expect(page.locator("#gen-stat-finish")).to_have_text("stop")  # the regex is complete
    shown = page.inner_text("#gen-out-text")
    assert re.fullmatch("[a-z]{3} [a-z]{2}", shown), shown

    words = shlex.split(page.inner_text("#gen-curl"))
    body = json.loads(words[words.index("-d") + 1])
    assert body["structured_outputs"] == {"regex": "[a-z]{3} [a-z]{2}"}
    answer = httpx.post(f"{shared_server.url}/generate", json={**body, "stream": False}).json()
    assert answer["text"] == shown

    page.select_option("#gen-constraint-kind", "json")
    page.fill("#gen-constraint", "{not json")
    expect(page.locator("#gen-curl")).to_contain_text("the JSON schema is not JSON")
    page.select_option("#gen-constraint-kind", "choice")
    page.fill("#gen-constraint", "yes\nno")
    words = shlex.split(page.inner_text("#gen-curl"))
    assert json.loads(words[words.index("-d") + 1])["structured_outputs"] == {"choice": ["yes", "no"]}
    assert tab.console_errors == []


# ---------------------------------------------------------------------------- models


def test_activate_switches_the_model_of_the_generate_panel(registry_server: Server, tab: Tab) -> None:
    server = registry_server
    page = tab.page
    tab.open(server, "models")
    row = page.locator('tr[data-model="tiny-b"]')
    row.get_by_role("button", name="Activate tiny-b").click()
    confirm(page, "Cancel")  # a second thought changes nothing
    assert httpx.get(f"{server.url}/models").json()["active"] == "tiny-a"
    row.get_by_role("button", name="Activate tiny-b").click()
    confirm(page, "Activate")
    expect(row).to_have_attribute("data-active", "true")
    expect(page.locator("#models-notice")).to_have_text("tiny-b is active now.")
    expect(page.locator('tr[data-model="tiny-a"]')).to_have_attribute("data-active", "false")
    expect(row.get_by_role("button", name="Delete tiny-b")).to_be_disabled()  # the active model stays
    assert httpx.get(f"{server.url}/models").json()["active"] == "tiny-b"

    tiny_c = page.locator('tr[data-model="tiny-c"]')
    tiny_c.get_by_role("button", name="Delete tiny-c").click()
    confirm(page, "Delete")
    expect(tiny_c).to_have_count(0)
    assert httpx.get(f"{server.url}/models/tiny-c").status_code == 404
    screenshot(page, "models")

    page.click("#tab-generate")
    expect(page.locator("#gen-model option").first).to_have_text("Active model (tiny-b)")
    generate_short(page)
    expect(page.locator("#gen-stat-model")).to_have_text("tiny-b")
    expect(page.locator("#serving")).to_have_text("serving tiny-b")
    assert tab.console_errors == []


def test_the_aliases_show_a_canary_and_promote_and_abort_it(serve: ServerFactory, tab: Tab) -> None:
    server = serve()  # its own server: production's model changes here
    canary = {"model": "tiny-b", "weight": 0.25}
    put = httpx.put(f"{server.url}/models/aliases/production", json={"model": "tiny-a", "canary": canary})
    assert put.status_code == 200, put.text
    page = tab.page
    tab.open(server, "models")
    production = page.locator('tr[data-alias="production"]')
    expect(production).to_have_attribute("data-canary", "tiny-b")
    expect(production.locator('td[data-label="Model"]')).to_have_text("tiny-a")
    expect(production.locator('td[data-label="Canary"]')).to_have_text("tiny-b serves 25% of the routing keys")
    expect(page.locator('tr[data-model="tiny-b"] .badge[data-state="canary"]')).to_have_text("production's canary")
    screenshot(page, "aliases")

    production.get_by_role("button", name="Promote production's canary").click()
    confirm(page, "Promote")
    expect(page.locator("#models-notice")).to_have_text("tiny-b is production's model now.")
    expect(production).to_have_attribute("data-canary", "")
    expect(production.locator('td[data-label="Model"]')).to_have_text("tiny-b")
    expect(production.locator('td[data-label="Canary"]')).to_have_text("none")
    expect(production.get_by_role("button", name="Promote production's canary")).to_be_disabled()
    expect(page.locator('tr[data-model="tiny-b"]')).to_have_attribute("data-active", "true")
    alias = httpx.get(f"{server.url}/models/aliases").json()["data"][0]
    assert (alias["alias"], alias["model"], alias["canary"]) == ("production", "tiny-b", None)

    canary = {"model": "tiny-c", "weight": 0.5}
    assert httpx.put(f"{server.url}/models/aliases/production", json={"model": "tiny-b", "canary": canary}).is_success
    page.click("#models-refresh")
    expect(production.locator('td[data-label="Canary"]')).to_have_text("tiny-c serves 50% of the routing keys")
    production.get_by_role("button", name="Abort production's canary").click()
    confirm(page, "Abort canary")
    expect(page.locator("#models-notice")).to_have_text(
        "production's canary tiny-c was aborted; tiny-b serves all of it."
    )
    expect(production.locator('td[data-label="Canary"]')).to_have_text("none")
    alias = httpx.get(f"{server.url}/models/aliases").json()["data"][0]
    assert (alias["model"], alias["canary"]) == ("tiny-b", None)
    assert tab.console_errors == []


# ---------------------------------------------------------------------------- training


def test_a_training_job_draws_its_loss_curve_and_its_model_can_be_tried(registry_server: Server, tab: Tab) -> None:
    page = tab.page
    tab.open(registry_server, "train")
    page.fill("#train-text", TRAIN_TEXT)
    page.click('[data-preset="tiny"]')
    page.fill("#train-epochs", "8")
    page.fill("#train-name", "fresh-model")
    page.click("#train-submit")
    expect(page.locator("#job")).to_be_visible()

    chart = page.locator("#loss-chart")
    seen: list[tuple[int, int]] = []  # (train points, validation points) as the page showed them
    deadline = time.monotonic() + 60
    while (state := page.get_attribute("#job", "data-state")) != "succeeded" and time.monotonic() < deadline:
        assert state in ("queued", "running")  # read once: the job may succeed between two reads
        points = (int(chart.get_attribute("data-train-points")), int(chart.get_attribute("data-val-points")))
        if points != (0, 0) and points not in seen:
            seen.append(points)
        time.sleep(0.1)
    expect(page.locator("#job-state")).to_have_text("succeeded")
    final = (int(chart.get_attribute("data-train-points")), int(chart.get_attribute("data-val-points")))
    assert final[1] == 8 and final[0] >= 8  # a validation point per epoch, train points besides
    assert len(seen) >= 2, f"the chart never gained points while the job ran: {seen}"
    assert page.locator("#loss-chart .val circle").count() == 8
    expect(page.locator("#job-samples li")).to_have_count(8)
    expect(page.locator("#job-result")).to_contain_text("Published fresh-model and activated")
    expect(page.locator("#job-result")).to_contain_text(
        "Quality gate passed: validation loss"
    )  # tiny-a: random weights
    expect(page.locator("#job-step")).to_have_text(re.compile(r"^(\d+) of \1$"))
    expect(page.locator("#job-list li").first).to_contain_text("fresh-model")
    screenshot(page, "train")

    page.click("#job-try")
    expect(page.locator("#panel-generate")).to_be_visible()
    expect(page.locator("#gen-model")).to_have_value("fresh-model")
    generate_short(page)
    expect(page.locator("#gen-stat-model")).to_have_text("fresh-model")
    assert tab.console_errors == []


def test_a_model_held_back_by_the_quality_gate_shows_the_verdict_and_why(serve: ServerFactory, tab: Tab) -> None:
    server = serve()
    # a fine-tune of the active model on one letter: far worse than it on the corpus (tests/app/test_quality_gate.py);
    # no weight decay, which would pull tiny-a's random weights toward a uniform guess, better than theirs
    body = {"text": "e" * 6000, "base_model": "tiny-a", "epochs": 3, "lr": 0.05, "weight_decay": 0.0}
    body["validation_text"] = CORPUS * 3
    submitted = httpx.post(f"{server.url}/train", json={**body, "seq_len": 16, "batch_size": 4, "name": "unlearned"})
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    deadline = time.monotonic() + 120
    while (job := httpx.get(f"{server.url}/train/{job_id}").json())["state"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert job["gate"]["result"] == "held_back", job
    reason = job["gate"]["reason"]
    assert "worse than the active model 'tiny-a'" in reason

    page = tab.page
    tab.open(server, "train")
    entry = page.locator("#job-list li", has_text="unlearned")
    expect(entry.locator('.badge[data-state="held_back"]')).to_have_text("held back by the gate")
    entry.get_by_role("button", name="Follow").click()
    result = page.locator("#job-result")
    expect(result).to_contain_text("Published unlearned (not activated).")
    expect(result).to_contain_text(f"Quality gate held the model back: {reason}.")
    expect(result).to_have_attribute("data-tone", "warn")
    expect(page.locator("#serving")).to_have_text("serving tiny-a")
    screenshot(page, "gate-held-back")
    assert tab.console_errors == []


def test_cancel_stops_a_running_job(registry_server: Server, tab: Tab) -> None:
    page = tab.page
    tab.open(registry_server, "train")
    page.check('input[name="source"][value="file"]')  # the multipart upload this time
    upload = {"name": "sonnets.txt", "mimeType": "text/plain", "buffer": TRAIN_TEXT.encode()}
    page.set_input_files("#train-file", files=[upload])
    size_kb = len(TRAIN_TEXT.encode()) / 1000  # the page counts kilobytes of 1,000 bytes
    expect(page.locator("#train-file-size")).to_contain_text(f"sonnets.txt: {size_kb:.1f} KB")
    page.click('[data-preset="tiny"]')
    page.fill("#train-epochs", "10000")
    page.fill("#train-name", "never-published")
    page.click("#train-submit")
    expect(page.locator("#job")).to_have_attribute("data-state", "running", timeout=30_000)
    page.wait_for_function("() => Number(document.querySelector('#loss-chart').dataset.valPoints) >= 1", timeout=30_000)
    page.click("#job-cancel")
    expect(page.locator("#job-state")).to_have_text("cancelled")
    expect(page.locator("#job-result")).to_have_text("Cancelled: nothing was published.")
    expect(page.locator("#job-cancel")).to_be_disabled()
    job = httpx.get(f"{registry_server.url}/train?limit=1").json()["jobs"][0]
    assert job["state"] == "cancelled" and job["params"]["corpus_name"] == "sonnets"
    assert job["params"]["epochs"] == 10000 and job["params"]["hidden_dim"] == 64
    assert "never-published" not in [m["id"] for m in httpx.get(f"{registry_server.url}/models").json()["models"]]
    assert tab.console_errors == []


def test_pause_saves_a_running_job_and_resume_goes_on(registry_server: Server, tab: Tab) -> None:
    page = tab.page
    tab.open(registry_server, "train")
    page.fill("#train-text", TRAIN_TEXT)
    page.click('[data-preset="tiny"]')
    page.fill("#train-epochs", "10000")
    page.fill("#train-name", "paused-then-cancelled")
    page.click("#train-submit")
    expect(page.locator("#job")).to_have_attribute("data-state", "running", timeout=30_000)
    expect(page.locator("#job-pause")).to_have_text("Pause")
    page.wait_for_function("() => Number(document.querySelector('#loss-chart').dataset.valPoints) >= 1", timeout=30_000)
    page.click("#job-pause")
    expect(page.locator("#job")).to_have_attribute("data-state", "paused", timeout=30_000)
    expect(page.locator("#job-state")).to_have_text(re.compile(r"^paused · saved at step [1-9][0-9,]*$"))
    expect(page.locator("#job-result")).to_contain_text("Paused: the training state is saved and the worker is free.")
    expect(page.locator("#job-pause")).to_have_text("Resume")
    job = httpx.get(f"{registry_server.url}/train?limit=1").json()["jobs"][0]
    assert (job["state"], job["worker"]) == ("paused", None)
    screenshot(page, "job-paused")

    page.click("#job-pause")  # Resume
    expect(page.locator("#job")).to_have_attribute("data-state", "running", timeout=30_000)
    expect(page.locator("#job-pause")).to_have_text("Pause")
    page.click("#job-cancel")
    expect(page.locator("#job-state")).to_have_text("cancelled")
    events = httpx.get(f"{registry_server.url}/v1/fine_tuning/jobs/{job['id']}/events?limit=100").json()["data"]
    kinds = [e["data"]["kind"] for e in events]
    assert "paused" in kinds and "resumed" in kinds
    assert tab.console_errors == []


def test_a_job_released_as_a_canary_from_the_form_shows_in_the_aliases(serve: ServerFactory, tab: Tab) -> None:
    server = serve()  # its own server: production gets a canary here
    page = tab.page
    tab.open(server, "train")
    page.fill("#train-text", TRAIN_TEXT)
    page.click('[data-preset="tiny"]')
    page.fill("#train-name", "canary-from-form")
    page.uncheck("#train-gate")  # no effect on a canary: the gate applies to it, and passes or skips here
    page.check("#train-canary")
    page.fill("#train-canary-percent", "25")
    page.click("#train-submit")
    result = page.locator("#job-result")
    expect(page.locator("#job")).to_have_attribute("data-state", "succeeded", timeout=120_000)
    expect(result).to_contain_text("Published canary-from-form as production's canary")
    expect(result).to_have_attribute("data-tone", "good")
    job = httpx.get(f"{server.url}/train?limit=1").json()["jobs"][0]
    assert job["params"]["activate"] == "canary:0.25" and job["activated"] is False

    page.click("#tab-models")
    page.click("#models-refresh")
    production = page.locator('tr[data-alias="production"]')
    expect(production).to_have_attribute("data-canary", "canary-from-form")
    expect(production.locator('td[data-label="Canary"]')).to_have_text(
        "canary-from-form serves 25% of the routing keys"
    )
    assert httpx.get(f"{server.url}/readyz").json()["model"] == "tiny-a"
    assert tab.console_errors == []


# ---------------------------------------------------------------------------- keys and errors


def test_api_key_field_and_error_messages(serve: ServerFactory, tabs: Callable[[], Tab]) -> None:
    server = serve(
        api_keys="user-key", admin_keys="admin-key", max_running="1", max_waiting="0", max_tokens=LONG_STREAM
    )
    first = tabs()
    page = first.page
    first.open(server, "models")
    expect(page.locator("#key-form")).to_be_visible()
    expect(page.locator("#models-error")).to_contain_text("API key needed (401)")
    page.fill("#api-key", "user-key")
    page.click("#key-form button[type=submit]")
    expect(page.locator("#models-body tr")).to_have_count(3)
    assert page.evaluate("sessionStorage.getItem('textgen.apiKey')") == "user-key"
    expect(page.locator("#jobs-error")).to_contain_text("not allowed to do that (403)")  # jobs need the admin key
    page.locator('tr[data-model="tiny-b"]').get_by_role("button", name="Activate tiny-b").click()
    confirm(page, "Activate")
    expect(page.locator("#models-error")).to_contain_text("not allowed to do that (403)")

    page.reload()  # the key survives a reload of the tab
    page.wait_for_selector("body.loaded")
    expect(page.locator("#api-key")).to_have_value("user-key")
    page.click("#tab-generate")
    curl = page.inner_text("#gen-curl")
    assert "Authorization: Bearer $TEXTGEN_API_KEY" in curl and "user-key" not in curl

    # one running slot, no waiting room: a second generation is refused with 429
    page.fill("#gen-max-tokens", LONG_STREAM)
    page.click("#gen-start")
    wait_for_growth(page, 0)
    second = tabs()
    second.open(server)
    second.page.fill("#api-key", "user-key")
    second.page.click("#key-form button[type=submit]")
    second.page.click("#gen-start")
    expect(second.page.locator("#gen-error")).to_contain_text("The server is busy (429)")
    expect(second.page.locator("#gen-error")).to_contain_text("retry after 1 s")  # the Retry-After
    expect(second.page.locator("#gen-stat-finish")).to_have_text("—")
    screenshot(second.page, "error-429")
    page.bring_to_front()
    page.keyboard.press("Escape")  # the keyboard's Stop
    expect(page.locator("#gen-stat-finish")).to_have_text("stopped (by you)")

    page.click("#key-clear")
    assert page.evaluate("sessionStorage.getItem('textgen.apiKey')") is None


def test_a_server_without_a_model_says_it_is_not_ready(serve: ServerFactory, tab: Tab) -> None:
    server = serve(models=False)
    page = tab.page
    tab.open(server)
    expect(page.locator("#serving")).to_contain_text("not ready")
    expect(page.locator("#gen-model option")).to_have_text(["Active model (none)"])
    page.click("#gen-start")
    expect(page.locator("#gen-error")).to_contain_text("The service is unavailable (503): no model is loaded")
    page.click("#tab-models")
    expect(page.locator("#models-body")).to_contain_text("No models in the registry yet.")
