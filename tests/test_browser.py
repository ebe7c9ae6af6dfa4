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

from dreambooth.host.standalone import StandaloneHost
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
    # The standalone app has no txt2img dropdown: the page's checkpoint watch saw the saves and clicked nothing.
    page.wait_for_function("() => window.dreamboothCheckpointWatch.saves >= 1", timeout=10_000)
    assert page.evaluate("() => window.dreamboothCheckpointWatch.refreshes") == 0
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


# ---- every open page lists a new checkpoint (issue 18.4) ---------------------------------------------------


class PageHost(StandaloneHost):
    """The standalone host inside a page that has a txt2img checkpoint dropdown with the web UI's 🔄 id."""

    checkpoint_refresh_element = "refresh_sd_model_checkpoint"


def web_ui_page(models: Path, port: int):
    """A page shaped like the web UI's: a txt2img tab with a checkpoint dropdown and its 🔄 (which re-lists, as
    the web UI's does), the DreamBooth tab, our javascript/ loaded into the page, our routes on its app."""
    import gradio as gr

    from dreambooth.api import mount_page_routes
    from dreambooth.supervisor import Supervisor
    from dreambooth.ui.tab import SCRIPT_FILE, _event_kwargs, build_tab

    host = PageHost(models)
    supervisor = Supervisor(host, models / "dreambooth", host.checkpoints_dir)
    tab = build_tab(supervisor, host)  # built first, rendered into its tab below, as the web UI does
    with gr.Blocks(analytics_enabled=False) as page:
        with gr.Tab("txt2img", elem_id="tab_txt2img"):
            dropdown = gr.Dropdown(choices=host.checkpoint_titles(), value=host.checkpoint_titles()[0],
                                   label="Checkpoint", elem_id="txt2img_checkpoint", interactive=True)
            refresh = gr.Button("🔄", elem_id="refresh_sd_model_checkpoint")

            def relist():
                host.refresh_checkpoints()
                return gr.update(choices=host.checkpoint_titles())

            refresh.click(relist, None, dropdown)
            gr.Textbox("a photo", label="Prompt", elem_id="txt2img_prompt")
        with gr.Tab("DreamBooth", elem_id="tab_dreambooth"):
            tab.render()
        page.load(None, None, None, **_event_kwargs("js", f"() => {{\n{SCRIPT_FILE.read_text()}\n}}"))
    page.queue()
    app, _, _ = page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    mount_page_routes(app, supervisor)
    return page, supervisor


def dropdown_choices(page: Page) -> list[str]:
    """What the txt2img dropdown offers (blurred first: an opened gradio dropdown filters by its text)."""
    page.mouse.click(1, 990)
    page.locator("#txt2img_checkpoint input").click()
    choices = page.locator("#txt2img_checkpoint li").evaluate_all("(items) => items.map(i => i.ariaLabel)")
    page.keyboard.press("Escape")
    page.mouse.click(1, 990)
    return choices


def wait_until_listed(page: Page, name: str, deadline: float) -> None:
    """Wait (without a reload or a click on 🔄) until the page's txt2img dropdown offers ``name``."""
    while name not in dropdown_choices(page):
        assert time.monotonic() < deadline, (name, dropdown_choices(page), page.evaluate(
            "() => JSON.stringify(window.dreamboothCheckpointWatch)"))
        time.sleep(0.2)


def test_every_open_page_lists_a_new_checkpoint_within_seconds(tmp_path: Path, tiny, tokenizer_dir,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Two pages opened before the run; page B never opens the DreamBooth tab. Each checkpoint the run saves is
    in both pages' txt2img dropdowns within a few seconds, without a reload or a click on 🔄."""
    from dreambooth.config import TrainConfig

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(tiny.path, models / "Stable-diffusion" / "tiny-sd1.safetensors")
    photos = tmp_path / "photos"
    for i in range(3):
        draw_subject(photos / f"zwx_{i}.png", seed=i)
    port = free_port()
    server, supervisor = web_ui_page(models, port)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            pages = [browser.new_page(viewport={"width": 1400, "height": 1000}) for _ in range(2)]
            for page in pages:
                page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
                page.wait_for_function("() => window.dreamboothCheckpointWatch && window.dreamboothCheckpointWatch"
                                       ".active()")
                expect(page.locator("#txt2img_checkpoint")).to_be_visible()
            assert all(dropdown_choices(p) == ["tiny-sd1.safetensors"] for p in pages)
            pages[0].locator("button", has_text="DreamBooth").first.click()  # page A opens the tab
            expect(pages[0].locator("#dreambooth_train")).to_be_visible()
            assert not pages[1].locator("#dreambooth_train").is_visible()  # page B never does

            config = supervisor.create_model("zwx", "tiny-sd1")
            config = TrainConfig.from_dict({
                **config.to_dict(), "model_config_dir": str(tiny.config_dir), "tokenizer_dir": str(tokenizer_dir),
                "resolution": 64, "max_steps": 4, "save_every": 2, "sample_every": 0, "device": "cpu",
                "prior_preservation": False, "learning_rate": 1e-3,
                "concepts": [{"instance_dir": str(photos), "instance_prompt": "photo of zwx disc"}]})
            supervisor.start(config)
            first = models / "Stable-diffusion" / "zwx" / "zwx_2.safetensors"
            deadline = time.monotonic() + 240
            while not first.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert first.exists(), supervisor.status()
            saved_at = time.monotonic()
            for page in pages:  # listed within a few seconds on both pages (page A's dropdown is hidden for now)
                page.wait_for_function("() => window.dreamboothCheckpointWatch.refreshes >= 1", timeout=10_000)
            wait_until_listed(pages[1], "zwx/zwx_2.safetensors", saved_at + 10)
            listed_after = time.monotonic() - saved_at
            assert listed_after < 5, listed_after
            assert supervisor.wait(240) and supervisor.status().finished, supervisor.status()
            assert not pages[1].locator("#dreambooth_train").is_visible()
            pages[0].locator("button", has_text="txt2img").first.click()  # page A goes back to txt2img
            finished_at = time.monotonic()
            for page in pages:  # the last save too (a tiny run may save twice between two answers: one refresh)
                wait_until_listed(page, "zwx/zwx_4.safetensors", finished_at + 10)
                assert dropdown_choices(page) == ["tiny-sd1.safetensors", "zwx/zwx_2.safetensors",
                                                  "zwx/zwx_4.safetensors"]
            assert time.monotonic() - finished_at < 5
            browser.close()
    finally:
        supervisor.cancel()
        supervisor.wait(60)
        server.close()


def test_use_in_txt2img_puts_a_loras_tag_into_the_txt2img_prompt(tmp_path: Path, tiny, tokenizer_dir,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A LoRA is no checkpoint to switch to: "Use in txt2img" adds ``<lora:name:1>`` to the txt2img prompt, once."""
    from dreambooth.config import TrainConfig

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(tiny.path, models / "Stable-diffusion" / "tiny-sd1.safetensors")
    photos = tmp_path / "photos"
    for i in range(2):
        draw_subject(photos / f"zwx_{i}.png", seed=i)
    port = free_port()
    server, supervisor = web_ui_page(models, port)
    try:
        config = supervisor.create_model("zwx", "tiny-sd1")
        supervisor.start(TrainConfig.from_dict({
            **config.to_dict(), "model_config_dir": str(tiny.config_dir), "tokenizer_dir": str(tokenizer_dir),
            "resolution": 64, "max_steps": 2, "sample_every": 0, "device": "cpu", "prior_preservation": False,
            "method": "lora", "lora_rank": 4,
            "concepts": [{"instance_dir": str(photos), "instance_prompt": "photo of zwx disc"}]}))
        assert supervisor.wait(240) and supervisor.status().finished, supervisor.status()
        assert (models / "Lora" / "zwx" / "zwx_2.safetensors").is_file()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.locator("button", has_text="DreamBooth").first.click()
            choose(page, "dreambooth_model", "zwx")
            page.locator("#dreambooth_open").click()
            expect(message(page)).to_contain_text("Opened zwx")
            page.locator("#dreambooth_checkpoints label", has_text="zwx_2.safetensors").click()
            for _ in range(2):  # twice: the tag is added once
                page.locator("#dreambooth_use").click()
                expect(message(page)).to_contain_text("<lora:zwx_2:1>")
            page.locator("button", has_text="txt2img").first.click()
            expect(field(page, "txt2img_prompt")).to_have_value("a photo <lora:zwx_2:1>")
            browser.close()
    finally:
        server.close()
