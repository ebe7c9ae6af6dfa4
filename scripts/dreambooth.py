"""The web UI's entry point: registers the DreamBooth tab, its HTTP API and its settings section.

Everything else lives in ``dreambooth/``; ``dreambooth/host/a1111.py`` is the only module that talks to the web UI.
"""

from dreambooth.host import a1111

a1111.register()
