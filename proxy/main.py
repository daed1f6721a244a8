"""`rr-proxy`: run the proxy on granian (ASGI, uvloop) with the configured number of workers."""

from __future__ import annotations

import os
import shutil
import sys

from shared.logs import configure_logging, logging_config
from shared.metrics.snapshots import prepare_server
from shared.settings import ENV_NAMES, SettingsError, load_settings


def main() -> None:
    try:
        settings = load_settings()  # validate once here, so a bad setting prints one line, not one per worker
    except SettingsError as exc:
        print(f"rr-proxy: {exc}", file=sys.stderr)
        sys.exit(2)
    configure_logging(settings.log_format)
    made_dir = None
    if settings.metrics_token:  # the workers' snapshots go here; /metrics on any worker serves them all
        os.environ[ENV_NAMES["metrics_dir"]] = base = prepare_server(settings.metrics_dir, "proxy")
        made_dir = None if settings.metrics_dir else base
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
        log_dictconfig=logging_config(settings.log_format),
        # A worker that dies (OOM, a crash) is replaced; the others keep serving meanwhile.
        respawn_failed_workers=True,
        # Partial request heads are cut here (slowloris); partial bodies by proxy.http.BodyReader.
        http1_settings=HTTP1Settings(header_read_timeout=int(settings.header_read_timeout_s * 1000)),
    ).serve()
    if made_dir is not None:  # a temporary directory of this run only
        shutil.rmtree(made_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
