"""`rr-control-plane`: serve the control plane on granian (ASGI) with the configured number of workers."""

from __future__ import annotations

import logging
import sys

from shared.settings import SettingsError, load_settings


def main() -> None:
    try:
        settings = load_settings()  # validated once here: a bad setting prints one line, not one per worker
    except SettingsError as exc:
        print(f"rr-control-plane: {exc}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from granian import Granian
    from granian.constants import Interfaces, Loops
    from granian.http import HTTP1Settings

    Granian(
        "control_plane.app:create_app",
        address=settings.control_plane_host,
        port=settings.control_plane_port,
        interface=Interfaces.ASGI,
        loop=Loops.uvloop,
        workers=settings.control_plane_workers,
        factory=True,
        log_access=False,
        http1_settings=HTTP1Settings(header_read_timeout=int(settings.header_read_timeout_s * 1000)),
    ).serve()


if __name__ == "__main__":
    main()
