"""The web dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright).

A `tinkex serve` process trains a few steps through the tinkex SDK; the browser signs in with the
key form, watches the run's charts grow while more steps train, downloads and deletes checkpoints,
samples in the playground, and a second tenant sees none of it.

Screenshots of the run page and the playground go to a temporary directory, or to the directory
$TINKEX_DASHBOARD_SCREENSHOTS names: `TINKEX_DASHBOARD_SCREENSHOTS=docs pytest tests/dashboard`
(re)makes docs/dashboard.png and docs/dashboard-playground.png for the README.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

import tinkex
from tinkex import types

from ..conftest import ALICE, BOB, start_server

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the browser tests say so; the others still run
    expect = sync_playwright = None

MODEL = "tinkex/tiny-qwen3"
CHROMIUM = os.environ.get("TINKEX_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
TEXT = "The quick brown fox jumps over the lazy dog."
STEPS, MORE_STEPS = 12, 3
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def dash_server(tmp_path_factory: pytest.TempPathFactory, hf_home: Path):
    proc = start_server(tmp_path_factory.mktemp("dashboard-data"))
    yield proc
    proc.stop()


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


def _train(run: SimpleNamespace, steps: int) -> None:
    for _ in range(steps):
        fwd_bwd = run.trainer.forward_backward([run.datum], "cross_entropy")
        optim = run.trainer.optim_step(types.AdamParams(learning_rate=5e-3))
        fwd_bwd.result(60)
        optim.result(60)


@pytest.fixture(scope="module")
def run(dash_server) -> Iterator[SimpleNamespace]:
    """Alice's training run: STEPS steps, a sampler checkpoint and a training checkpoint."""
    client = tinkex.ServiceClient(base_url=dash_server.base_url, api_key=ALICE)
    trainer = client.create_lora_training_client(MODEL, rank=8, seed=0).result(60)
    tokens = trainer.get_tokenizer().encode(TEXT)
    state = SimpleNamespace(client=client, trainer=trainer, run_id=trainer.model_id, datum=_datum(tokens))
    _train(state, STEPS)
    state.sampler_path = trainer.save_weights_for_sampler("step-12").result(60).path
    state.state_path = trainer.save_state("state-12").result(60).path
    yield state
    client.close().result(30)


@pytest.fixture(scope="module")
def browser():
    assert sync_playwright is not None, "Playwright is missing: pip install playwright (never `playwright install`)"
    assert Path(CHROMIUM).exists(), "Chromium is missing: apt-get install -y chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


class Page(SimpleNamespace):
    """A browser tab that records what it requested and every error it logged."""


def _open(browser, base_url: str, key: str) -> Page:
    context = browser.new_context(viewport={"width": 1320, "height": 900}, accept_downloads=True)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    tab = Page(page=page, context=context, base_url=base_url, urls=[], errors=[])
    page.on("request", lambda request: tab.urls.append(request.url))
    page.on("console", lambda message: message.type == "error" and tab.errors.append(message.text))
    page.on("pageerror", lambda error: tab.errors.append(str(error)))
    page.goto(f"{base_url}/dashboard")
    expect(page.locator("#key-form")).to_be_visible()
    page.fill("#key-input", key)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#nav")).to_be_visible()
    return tab


@pytest.fixture(scope="module")
def alice(browser, dash_server, run) -> Iterator[Page]:
    tab = _open(browser, dash_server.base_url, ALICE)
    yield tab
    tab.context.close()


def _screenshot(page, name: str, tmp_path: Path) -> None:
    directory = Path(os.environ.get("TINKEX_DASHBOARD_SCREENSHOTS") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=directory / f"{name}.png", full_page=True)


def _api(server, path: str, key: str | None = ALICE, method: str = "GET", **kwargs) -> httpx.Response:
    headers = {"X-API-Key": key} if key else {}
    return httpx.request(method, f"{server.base_url}/api/v1{path}", headers=headers, timeout=30, **kwargs)


def test_a_wrong_key_is_refused_in_the_form(browser, dash_server):
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{dash_server.base_url}/dashboard")
    page.fill("#key-input", "tml-not-a-key")
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-error")).to_contain_text("not accepted")
    expect(page.locator("#nav")).to_be_hidden()
    assert page.evaluate("sessionStorage.length + localStorage.length") == 0
    context.close()


def test_sessions_page_shows_the_live_session_and_its_heartbeat_age(alice, run):
    page = alice.page
    page.goto(f"{alice.base_url}/dashboard#/sessions")
    row = page.locator(f'tr[data-session="{run.run_id.split(":")[0]}"]')
    expect(row.locator(".badge")).to_have_text("live")
    expect(row.locator("td.heartbeat")).to_contain_text("s ago")
    assert float(row.locator("td.heartbeat").get_attribute("data-age")) < 30
    expect(row.locator("td").nth(3)).to_have_text("1")  # one training run


def test_runs_page_lists_base_model_lora_steps_and_status(alice, run):
    page = alice.page
    page.click("[data-nav=runs]")
    row = page.locator(f'tr[data-run="{run.run_id}"]')
    expect(row.locator("td.steps")).to_have_text(str(STEPS))
    expect(row).to_contain_text(MODEL)
    expect(row).to_contain_text("rank 8 · mlp + attn + unembed")
    expect(row.locator(".badge")).to_have_text("training")


def _series(page) -> dict[str, tuple[int, int]]:
    """Each chart's series name -> (its data-points attribute, the points in its Chart.js dataset)."""
    return {name: tuple(counts) for name, *counts in page.evaluate("""() =>
        [...document.querySelectorAll('.chart-card')].map(card => [card.dataset.series, Number(card.dataset.points),
            Chart.getChart(card.querySelector('canvas')).data.datasets[0].data.length])""")}


def _expected_series(server, run_id: str) -> set[str]:
    rows = _api(server, f"/training_runs/{run_id}/metrics").json()["metrics"]
    kinds = {"ForwardBackward": "forward_backward", "OptimStep": "optim_step"}
    names = {f"{kinds[row['request_type']]} · {key}" for row in rows for key in row["metrics"]}
    return names | {"forward_backward · loss / token"}


def test_run_page_charts_every_metric_and_updates_live(alice, run, dash_server):
    page = alice.page
    page.click(f'tr[data-run="{run.run_id}"] a')
    loss = page.locator('.chart-card[data-series="forward_backward · loss / token"]')
    expect(loss).to_have_attribute("data-points", str(STEPS))
    expected = _expected_series(dash_server, run.run_id)
    assert {"forward_backward · loss:sum", "optim_step · grad_norm:mean"} <= expected
    assert _series(page) == {name: (STEPS, STEPS) for name in expected}
    expect(page.locator("#run-steps")).to_have_text(str(STEPS))

    _train(run, MORE_STEPS)  # while the page is open: the charts follow by polling
    expect(loss).to_have_attribute("data-points", str(STEPS + MORE_STEPS))
    expect(page.locator('.chart-card[data-series="optim_step · grad_norm:mean"]')).to_have_attribute(
        "data-points", str(STEPS + MORE_STEPS))
    assert _series(page) == {name: (STEPS + MORE_STEPS,) * 2 for name in expected}
    first, last = page.evaluate("""() => {
        const data = Chart.getChart(document.querySelector('[data-series="forward_backward · loss / token"] canvas'))
            .data.datasets[0].data;
        return [data[0].y, data[data.length - 1].y]; }""")
    assert last < first  # it learned the sentence

    rows = page.locator("#checkpoints tbody tr")
    expect(rows).to_have_count(2)
    for path in (run.sampler_path, run.state_path):
        expect(page.locator(f'tr[data-checkpoint="{path}"] td').nth(2)).to_contain_text("KiB")


def test_download_gives_the_checkpoint_archive(alice, run, tmp_path):
    page = alice.page
    with page.expect_download() as info:
        page.locator(f'tr[data-checkpoint="{run.sampler_path}"] button', has_text="Download").click()
    target = tmp_path / "checkpoint.tar.gz"
    info.value.save_as(target)
    with tarfile.open(target) as archive:
        assert any(name.endswith(".safetensors") for name in archive.getnames())


def test_playground_samples_from_a_checkpoint(alice, run, tmp_path):
    page = alice.page
    page.locator(f'tr[data-checkpoint="{run.sampler_path}"] a', has_text="Sample").click()
    expect(page.locator("#pg-model")).to_have_value(f"path:{run.sampler_path}")
    page.fill("#pg-prompt", "The quick brown")
    page.fill("#pg-max_tokens", "8")
    page.fill("#pg-temperature", "0.5")
    page.fill("#pg-seed", "7")
    page.fill("#pg-num_samples", "2")
    page.click("#pg-sample")
    samples = page.locator("article.sample")
    expect(samples).to_have_count(2)
    first = samples.first
    expect(first.locator(".sample-text .prompt")).to_have_text("The quick brown")
    completion = first.locator(".sample-text .completion").inner_text()
    assert completion.strip()
    token_rows = first.locator("table.tokens tbody tr")
    assert 1 <= token_rows.count() <= 8
    logprobs = [float(token_rows.nth(i).locator("td").nth(3).inner_text()) for i in range(token_rows.count())]
    assert all(lp <= 0 for lp in logprobs)
    _screenshot(page, "dashboard-playground", tmp_path)

    # The playground's own session was finished once the sample was in.
    page.click("[data-nav=sessions]")
    expect(page.locator("tr", has_text="dashboard playground").locator(".badge")).to_have_text("success")


def test_delete_removes_a_checkpoint(alice, run, dash_server, tmp_path):
    page = alice.page
    page.goto(f"{alice.base_url}/dashboard#/runs/{run.run_id}")
    expect(page.locator("#checkpoints tbody tr")).to_have_count(2)
    expect(page.locator('.chart-card[data-series="forward_backward · loss / token"]')).to_have_attribute(
        "data-points", str(STEPS + MORE_STEPS))
    _screenshot(page, "dashboard", tmp_path)

    page.once("dialog", lambda dialog: dialog.accept())
    page.locator(f'tr[data-checkpoint="{run.state_path}"] button', has_text="Delete").click()
    expect(page.locator("#checkpoints tbody tr")).to_have_count(1)
    remaining = _api(dash_server, f"/training_runs/{run.run_id}/checkpoints").json()["checkpoints"]
    assert [c["tinker_path"] for c in remaining] == [run.sampler_path]


def test_another_tenant_sees_none_of_it(browser, dash_server, run):
    bob = _open(browser, dash_server.base_url, BOB)
    page = bob.page
    expect(page.locator("#sessions .empty")).to_be_visible()
    page.click("[data-nav=runs]")
    expect(page.locator("#runs .empty")).to_be_visible()
    assert run.run_id not in page.content()
    page.goto(f"{dash_server.base_url}/dashboard#/runs/{run.run_id}")
    expect(page.locator("#not-found")).to_be_visible()
    page.goto(f"{dash_server.base_url}/dashboard#/playground")
    expect(page.locator("#pg-model option")).to_have_count(1)  # the base model only, no checkpoints
    bob.context.close()

    assert _api(dash_server, f"/dashboard/runs/{run.run_id}", BOB).status_code == 404
    assert _api(dash_server, "/dashboard/runs", BOB).json()["training_runs"] == []
    assert _api(dash_server, "/dashboard/sessions", BOB).json()["sessions"] == []
    assert _api(dash_server, "/dashboard/tokenize", BOB, "POST",
                json={"model_path": run.sampler_path, "text": "hi"}).status_code == 404
    for path in ("/dashboard/runs", "/dashboard/sessions", "/dashboard/whoami"):
        assert _api(dash_server, path, None).status_code == 401


def test_the_key_stays_out_of_urls_and_nothing_logged_an_error(alice):
    assert alice.urls and not [url for url in alice.urls if ALICE in url]
    assert alice.errors == []


def test_tokenize_round_trip_and_bad_tokens(dash_server):
    tokens = _api(dash_server, "/dashboard/tokenize", method="POST", json={"base_model": MODEL, "text": TEXT})
    assert tokens.status_code == 200
    back = _api(dash_server, "/dashboard/detokenize", method="POST",
                json={"base_model": MODEL, "tokens": tokens.json()["tokens"]}).json()
    assert back["text"] == TEXT and "".join(back["pieces"]) == TEXT
    bad = _api(dash_server, "/dashboard/detokenize", method="POST", json={"base_model": MODEL, "tokens": [-1]})
    assert bad.status_code == 400 and bad.json()["detail"]
    assert _api(dash_server, "/dashboard/tokenize", method="POST",
                json={"base_model": "nope", "text": "x"}).status_code == 400


def test_pages_and_assets_are_served_without_a_key(dash_server):
    page = httpx.get(f"{dash_server.base_url}/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "content-security-policy" in page.headers
    for asset in ("app.js", "dashboard.css", "vendor/chart.umd.min.js"):
        assert httpx.get(f"{dash_server.base_url}/dashboard/static/{asset}").status_code == 200
    for bad in ("../routers/dashboard.py", "%2e%2e/%2e%2e/app.py", "nope.js"):
        assert httpx.get(f"{dash_server.base_url}/dashboard/static/{bad}").status_code == 404


def test_json_views_on_postgresql(postgres_url, tmp_path_factory, hf_home):
    """The dashboard's own queries (counts, maxima and times per run) on the second store backend."""
    from ..conftest import fresh_database

    database = fresh_database(postgres_url, "tinkex_dashboard")
    server = start_server(tmp_path_factory.mktemp("dashboard-pg"), "--database-url", database)
    try:
        client = tinkex.ServiceClient(base_url=server.base_url, api_key=ALICE)
        trainer = client.create_lora_training_client(MODEL, rank=4, seed=0).result(60)
        state = SimpleNamespace(trainer=trainer, datum=_datum(list(range(5, 20))))
        _train(state, 2)
        [summary] = _api(server, "/dashboard/runs").json()["training_runs"]
        assert summary["training_run_id"] == trainer.model_id
        assert (summary["steps"], summary["forward_backward"], summary["status"]) == (2, 2, "training")
        assert summary["last_loss"] > 0 and summary["lora"]["rank"] == 4
        [session] = _api(server, "/dashboard/sessions").json()["sessions"]
        assert session["state"] == "live" and session["training_runs"] == 1 and session["heartbeat_age_s"] < 30
        client.close().result(30)
        [session] = _api(server, "/dashboard/sessions").json()["sessions"]
        assert session["state"] == "success"
        assert _api(server, f"/dashboard/runs/{trainer.model_id}").json()["status"] == "finished"
    finally:
        server.stop()


def test_the_embedded_server_serves_it_too(tmp_path, hf_home):
    from tinkex.server import EmbeddedServer

    with EmbeddedServer(data_dir=tmp_path, api_keys={ALICE: "alice"}) as embedded:
        assert httpx.get(f"{embedded.base_url}/dashboard").status_code == 200
        me = httpx.get(f"{embedded.base_url}/api/v1/dashboard/whoami", headers={"X-API-Key": ALICE})
        assert me.json() == {"tenant": "alice"}
