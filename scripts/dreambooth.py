"""The web UI's entry point: registers the DreamBooth tab, its HTTP API and its settings section.

Everything else lives in ``dreambooth/``: ``dreambooth/extension.py`` registers, and the adapters in
``dreambooth/host/`` (the AUTOMATIC1111 web UI's or Forge's, chosen by what is importable) talk to the web UI.
Inside the web UI's process that folder is imported under the name ``PACKAGE``, not ``dreambooth``: d8ahazard's
DreamBooth extension is a package named ``dreambooth`` too, Python keeps one module per name, and whichever of
the two loaded second would run the other's code. The training process (``python -m dreambooth``) is our own.
"""

import importlib
import importlib.util
import sys
from pathlib import Path

PACKAGE = "dreambooth_tab"


def load_package(name: str = PACKAGE):
    """Our ``dreambooth/`` folder imported as ``name`` (once per process), leaving ``sys.modules["dreambooth"]``
    to whoever else owns it; returns the package."""
    if name in sys.modules:
        return sys.modules[name]
    folder = Path(__file__).resolve().parent.parent / "dreambooth"
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    try:
        spec.loader.exec_module(package)
    except BaseException:
        del sys.modules[name]
        raise
    return package


load_package()
importlib.import_module(f"{PACKAGE}.extension").register()
