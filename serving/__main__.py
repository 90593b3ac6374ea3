"""python -m serving --model-dir exported/ [--port 50051] [--http-port 8080] [--ready-file F] ...

Flags and their VAE_SERVE_* environment variables: `python -m serving --help`.
Exit codes: 0 clean shutdown, 1 start-up failure (bad model, checksum, providers), 2 bad flags.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from serving.config import ConfigError, ServeConfig, deprecated_settings
from serving.errors import StartupError
from serving.loop import loop_factory

logger = logging.getLogger("serving")


def main(argv: list[str] | None = None) -> int:
    try:
        config = ServeConfig.from_args(argv)
    except ConfigError as e:
        sys.stderr.write(f"python -m serving: {e}\n")
        return 2
    logging.basicConfig(level=config.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for note in deprecated_settings(sys.argv[1:] if argv is None else argv, os.environ):
        logger.warning("%s", note)
    from serving.workers import supervise, worker_count

    if worker_count(config) > 1:
        try:
            return supervise(config)
        except OSError as e:
            logger.error("cannot start: %s", e)
            return 1
    from serving.server import serve  # after logging is configured

    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            return runner.run(serve(config))
    except StartupError as e:
        logger.error("cannot start: %s", e)
        return 1
    except OSError as e:
        logger.error("cannot start: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
