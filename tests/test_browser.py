"""The standalone app in a real browser: Playwright drives Debian's headless chromium against the tab.

Create a model from a tiny checkpoint, fill a concept, train a few steps while the progress moves, see the saved
checkpoint listed; then cancel a long run mid-way and find nothing half-written. The training runs for real
(``python -m dreambooth train``, in a child process) on the tiny model.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import draw_subject
from playwright.sync_api import Page, expect, sync_playwright
from safetensors import safe_open

from dreambooth.ui.app import launch

pytestmark = pytest.mark.slow  # Chromium and the standalone app; test_tab.py checks the form fast

CHROMIUM = os.environ.get("DREAMBOOTH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
TIMEOUT_MS = 60_000
expect.set_options(timeout=TIMEOUT_MS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app(tmp_path: Path, tiny, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # gradio checks that it can reach itself
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(tiny.path, models / "Stable-diffusion" / "tiny-sd1.safetensors")
    photos = tmp_path / "photos"
    for i in range(3):
        draw_subject(photos / f"zwx_{i}.png", seed=i)
    port = free_port()
    blocks = launch(models, "127.0.0.1", port)
    supervisor = blocks.dreambooth_supervisor
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", models=models, photos=photos, supervisor=supervisor)
    finally:
        supervisor.cancel()
        supervisor.wait(60)
        blocks.close()


@pytest.fixture
def page():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def field(page: Page, elem_id: str):
    """The text or number input of a gradio component."""
    return page.locator(f"#{elem_id}").locator("textarea, input").first


def choose(page: Page, elem_id: str, option: str) -> None:
    """Pick ``option`` in a gradio dropdown (same markup on gradio 3.41 and 4.x)."""
    page.locator(f"#{elem_id} input").click()
    page.locator(f'#{elem_id} li[aria-label="{option}"]').click()


def open_panel(page: Page, group: str) -> None:
    page.locator(f"#dreambooth_group_{group.replace(' ', '_')} .label-wrap").first.click()


def message(page: Page):
    """The tab's message line (gradio 3.41 repeats a Markdown's id on its inner element)."""
    return page.locator("#dreambooth_message").first


def progress(page: Page) -> dict[str, str]:
    bar = page.locator("#dreambooth_progress .dreambooth-progress").first
    return {name: bar.get_attribute(f"data-{name}") or "" for name in ("state", "step", "total")}


def progress_text(page: Page) -> str:
    return page.locator("#dreambooth_progress .dreambooth-progress").first.inner_text()


def wait_for_state(page: Page, states: set[str], timeout: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = progress(page)
        if now["state"] in states:
            return now
        page.wait_for_timeout(200)
    raise AssertionError(
        f"progress never reached {states}: {progress(page)}; {page.locator('#dreambooth_progress').inner_text()}"
    )


def test_create_train_watch_and_cancel_in_the_browser(app, page: Page, tiny, tokenizer_dir) -> None:
    page.goto(app.url, wait_until="domcontentloaded")

    # Create a model from a checkpoint the (standalone) host lists.
    field(page, "dreambooth_new_name").fill("zwx")
    choose(page, "dreambooth_source", "tiny-sd1.safetensors")
    page.locator("#dreambooth_create").click()
    expect(message(page)).to_contain_text("Created zwx")
    expect(field(page, "dreambooth_model_name")).to_have_value("zwx")
    assert (app.models / "dreambooth" / "zwx" / "config.json").is_file()

    # One concept, a tiny resolution, few steps, on the CPU; the tiny model's own config and tokenizer folders.
    field(page, "dreambooth_concepts_0_instance_dir").fill(str(app.photos))
    field(page, "dreambooth_concepts_0_instance_prompt").fill("photo of zwx disc")
    field(page, "dreambooth_concepts_0_class_prompt").fill("photo of a disc")
    field(page, "dreambooth_max_steps").fill("4")
    field(page, "dreambooth_learning_rate").fill("0.001")
    field(page, "dreambooth_concepts_0_sample_prompts").fill("photo of zwx disc")
    for group in ("Model", "Images", "Memory and speed", "Loss", "Saving", "Samples"):
        open_panel(page, group)
    field(page, "dreambooth_model_config_dir").fill(str(tiny.config_dir))
    field(page, "dreambooth_tokenizer_dir").fill(str(tokenizer_dir))
    field(page, "dreambooth_resolution").fill("64")
    choose(page, "dreambooth_device", "cpu")
    page.locator("#dreambooth_prior_preservation input[type=checkbox]").set_checked(False)
    field(page, "dreambooth_save_every").fill("2")
    field(page, "dreambooth_sample_every").fill("2")
    field(page, "dreambooth_sample_steps").fill("2")

    # The web UI's checkpoint refresh button (quicksettings 🔄), as A1111 has it: counts its clicks.
    page.evaluate(
        """() => { const b = document.createElement('button'); b.id = 'refresh_sd_model_checkpoint';
                   window.refreshClicks = 0; b.onclick = () => { window.refreshClicks += 1; };
                   document.body.appendChild(b); }"""
    )

    # Train: the run finishes with its checkpoints listed.
    page.locator("#dreambooth_train").click()
    expect(message(page)).to_contain_text("Training zwx")
    final = wait_for_state(page, {"finished", "failed", "cancelled"})
    assert final == {"state": "finished", "step": "4", "total": "4"}, progress_text(page)
    assert int(page.locator("#dreambooth_plot_svg").get_attribute("data-points")) >= 2
    expect(page.locator("#dreambooth_samples img").first).to_be_visible()  # the newest previews
    checkpoints = page.locator("#dreambooth_checkpoints")
    expect(checkpoints).to_contain_text("zwx_4.safetensors")
    expect(checkpoints).to_contain_text("zwx_2.safetensors")
    # Each new checkpoint made the page click the web UI's refresh, so txt2img's dropdown lists it at once.
    page.wait_for_function("() => window.refreshClicks >= 1", timeout=10_000)
    config = app.supervisor.load_config("zwx")
    assert (config.max_steps, config.resolution, config.device, config.prior_preservation) == (4, 64, "cpu", False)
    assert config.concepts[0].sample_prompts == ["photo of zwx disc"] and config.sample_every == 2

    # "Use in txt2img" hands the checkpoint to the host.
    page.locator("#dreambooth_use").click()
    expect(message(page)).to_contain_text("now uses zwx/zwx_4.safetensors")

    # Reloading the page restores the form from config.json.
    page.reload(wait_until="domcontentloaded")
    expect(field(page, "dreambooth_model_name")).to_have_value("zwx")
    expect(field(page, "dreambooth_concepts_0_instance_prompt")).to_have_value("photo of zwx disc")
    expect(field(page, "dreambooth_max_steps")).to_have_value("4")

    # A long run, cancelled mid-way: it stops after the current step and nothing half-written remains.
    field(page, "dreambooth_max_steps").fill("100000")
    open_panel(page, "Saving")
    open_panel(page, "Samples")
    field(page, "dreambooth_save_every").fill("3")
    field(page, "dreambooth_sample_every").fill("0")
    page.locator("#dreambooth_train").click()
    running_steps = set()  # the progress moves: several steps of the run are shown while it runs
    deadline = time.monotonic() + 60
    while len(running_steps) < 3 and time.monotonic() < deadline:
        now = progress(page)
        assert now["state"] in ("idle", "running", "finished"), progress_text(page)
        if now["state"] == "running" and now["total"] == "100000" and int(now["step"]) >= 1:
            running_steps.add(int(now["step"]))
        page.wait_for_timeout(100)
    assert len(running_steps) >= 3, running_steps
    assert "it/s" in progress_text(page)
    # On another tab (txt2img) the page keeps watching the run, more slowly.
    page.evaluate("() => { document.querySelector('#dreambooth_progress').style.display = 'none'; }")
    page.wait_for_timeout(2_500)
    assert page.evaluate("() => window.dreamboothTab.active()")
    page.evaluate("() => { document.querySelector('#dreambooth_progress').style.display = ''; }")
    page.locator("#dreambooth_cancel").click()
    expect(message(page)).to_contain_text("Stopping zwx")
    stopped = wait_for_state(page, {"cancelled"})
    assert 4 <= int(stopped["step"]) < 100_000
    assert app.supervisor.wait(10) and not app.supervisor.status().running

    leftovers = [p for p in app.models.rglob("*") if p.name.endswith(".partial") or ".tmp" in p.name]
    assert leftovers == []
    saved = sorted(p.name for p in (app.models / "Stable-diffusion" / "zwx").glob("*.safetensors"))
    assert "zwx_3.safetensors" in saved
    for name in saved:  # every file there is whole: its header and every tensor read back
        with safe_open(str(app.models / "Stable-diffusion" / "zwx" / name), "pt") as f:
            assert all(f.get_tensor(key).numel() > 0 for key in f.keys())  # noqa: SIM118 (safe_open is no dict)
    expect(page.locator("#dreambooth_checkpoints")).to_contain_text("zwx_3.safetensors")
    # The page's polling ends with the run.
    page.wait_for_function("() => window.dreamboothTab && !window.dreamboothTab.active()", timeout=10_000)


def test_polling_lives_only_while_the_tab_is_shown_and_a_run_is_active(app, page: Page) -> None:
    page.goto(app.url, wait_until="domcontentloaded")
    page.wait_for_function("() => window.dreamboothTab !== undefined")
    active = "() => window.dreamboothTab.active()"
    page.wait_for_function(f"() => !({active})()", timeout=10_000)  # nothing runs: the loop after page load ends
    page.evaluate("() => window.dreamboothTab.start()")
    assert page.evaluate(active)
    page.evaluate("() => { document.querySelector('#dreambooth_progress').style.display = 'none'; }")  # tab hidden
    page.wait_for_function(f"() => !({active})()", timeout=5_000)
    page.evaluate("() => { document.querySelector('#dreambooth_progress').style.display = ''; }")
    page.mouse.click(5, 5)  # a click (e.g. on the tab's button) resumes it
    page.wait_for_function(active, timeout=5_000)
    page.wait_for_function(f"() => !({active})()", timeout=10_000)  # and it ends again: no run is active
