"""The standalone app: the DreamBooth tab and the HTTP API on their own page, without the web UI.

``python -m dreambooth ui --models-dir D --port P [--auth user:password]`` calls :func:`serve`. Model folders
live in ``D/dreambooth``, checkpoints are read from and written to ``D/Stable-diffusion``. When that folder has
no checkpoint, the shipped demo model is put there (``dreambooth-demo/shapes-sd1.safetensors``), and the "new
model" form offers it as the source checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..api import mount, mount_page_routes, parse_credentials
from ..host.standalone import DEMO_TITLE, StandaloneHost, install_demo_model
from ..supervisor import Supervisor
from .tab import build_tab


def launch(models_dir: Path, host: str = "127.0.0.1", port: int = 7861, auth: str | None = None) -> gr.Blocks:
    """Start serving in the background and return the running ``gr.Blocks`` (``.close()`` stops it)."""
    models_dir = Path(models_dir).resolve()
    install_demo_model(models_dir / "Stable-diffusion")
    web_host = StandaloneHost(models_dir)
    supervisor = Supervisor(web_host, models_dir / "dreambooth", web_host.checkpoints_dir,
                            loras_dir=web_host.loras_dir)
    blocks = build_tab(supervisor, web_host, standalone=True, default_source=DEMO_TITLE)
    credentials = parse_credentials(auth)
    blocks.queue()
    app, _, _ = blocks.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=True,
        show_error=True,
        quiet=True,
        auth=list(credentials.items()) if credentials else None,
        allowed_paths=[str(models_dir)],
    )
    mount_page_routes(app, supervisor)
    mount(app, supervisor, credentials)
    blocks.dreambooth_supervisor = supervisor  # type: ignore[attr-defined]
    return blocks


def serve(models_dir: Path, host: str = "127.0.0.1", port: int = 7861, auth: str | None = None) -> None:
    """Serve the tab at ``http://host:port/`` and the API under ``/dreambooth/v1`` until interrupted.

    ``auth`` is ``user:password`` (several separated by commas) for both the page and the API.
    """
    blocks = launch(models_dir, host, port, auth)
    print(f"DreamBooth: http://{host}:{port}/  (models in {Path(models_dir).resolve()}; Ctrl+C stops)", flush=True)
    try:
        blocks.block_thread()
    finally:
        supervisor = blocks.dreambooth_supervisor  # type: ignore[attr-defined]
        supervisor.cancel()
        supervisor.wait(60)
        blocks.close()
