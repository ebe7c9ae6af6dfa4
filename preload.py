"""Command-line flags the web UI accepts for DreamBooth (it calls ``preload(parser)`` before parsing its own)."""


def preload(parser):
    """Add DreamBooth's flags to the web UI's argument parser."""
    parser.add_argument("--dreambooth-dir", type=str, default=None,
                        help="DreamBooth: folder of the model folders (config.json, class images, caches); "
                             "default <models>/dreambooth")
    parser.add_argument("--dreambooth-python", type=str, default=None,
                        help="DreamBooth: Python interpreter that runs training (default: the web UI's own), "
                             "e.g. a separate environment with newer libraries")
    parser.add_argument("--dreambooth-no-api", action="store_true",
                        help="DreamBooth: do not serve the /dreambooth/v1 HTTP API")
