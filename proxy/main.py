"""`rr-proxy`: run the proxy on granian (ASGI, uvloop) with the configured number of workers."""

from __future__ import annotations

import logging
import sys

from shared.settings import SettingsError, load_settings


def main() -> None:
    try:
        settings = load_settings()  # validate once here, so a bad setting prints one line, not one per worker
    except SettingsError as exc:
        print(f"rr-proxy: {exc}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from granian import Granian
    from granian.constants import Interfaces, Loops
    from granian.http import HTTP1Settings

    Granian(
        "proxy.app:create_app",
        address=settings.proxy_host,
        port=settings.proxy_port,
        interface=Interfaces.ASGI,
        loop=Loops.uvloop,
        workers=settings.proxy_workers,
        factory=True,
        log_access=False,
        # A worker that dies (OOM, a crash) is replaced; the others keep serving meanwhile.
        respawn_failed_workers=True,
        # Partial request heads are cut here (slowloris); partial bodies by proxy.http.BodyReader.
        http1_settings=HTTP1Settings(header_read_timeout=int(settings.header_read_timeout_s * 1000)),
    ).serve()


if __name__ == "__main__":
    main()
