"""What the entry points (python -m caraserve.serve, python -m caraserve.ray_serve,
scripts/generate.py) share: a configuration mistake is one line on stderr and exit status 2,
whether Hydra finds it (an override it cannot parse, a key the YAML lacks) or the typed
dataclasses do (a value of the wrong type, a bad value, an added unknown key); and the HTTP
servers run uvicorn with the same limits and the same clean SIGTERM, on an address taken before
the model loads."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Callable
from typing import NoReturn

import uvicorn
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from caraserve.config import ConfigError, ServerConfig, unknown_key
from caraserve.serve.http import PROBE_CONNECTIONS

USAGE = 2  # exit status of a configuration error (as argparse's)
GRAMMAR_URL = "https://hydra.cc/docs/advanced/override_grammar/basic/"


def one_line(e: BaseException) -> str:
    """The error as one line, for a user who typed an override."""
    if isinstance(e, ConfigError):
        return " ".join(str(e).split())  # (a message quoting a library's may span lines)
    if isinstance(e, OverrideParseException):
        hint = ""
        if re.search(r"[{,]\s*['\"]", e.override):  # the grammar takes no quoted mapping keys
            hint = "; write a mapping's keys unquoted, e.g. 'model.max_memory_bytes={0: 40e9, 1: 40e9}'"
        return f"cannot parse {e.override!r}: {e.message.splitlines()[0]}{hint} (syntax: {GRAMMAR_URL})"
    if isinstance(e, MissingConfigException) and e.options:
        return f"{str(e).splitlines()[0]}; available: {', '.join(e.options)}"
    cause = e.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and "not in struct" in str(cause) and cause.full_key:
        # An override of a key the YAML does not have; Hydra would suggest adding it with "+",
        # which the typed config would refuse anyway.
        where, _, key = str(cause.full_key).rpartition(".")
        parent = cause.parent_node
        known = [k for k in parent.keys() if k != "hydra"] if parent is not None else []
        return unknown_key(key, known, where)
    lines = [ln.strip() for ln in str(e).splitlines()
             if ln.strip() and not ln.strip().startswith(("full_key:", "object_type=", "reference_type="))]
    if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
        lines.insert(0, f"{e.full_key}:")
    if isinstance(cause, OmegaConfBaseException) and str(cause).splitlines()[0] not in str(e):
        lines.append(str(cause).splitlines()[0])
    return " ".join(lines) or type(e).__name__


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(USAGE)


def config_task(fn):
    """Wraps a Hydra task function: a configuration error it raises (from the typed dataclasses,
    or OmegaConf resolving an interpolation) ends the process with one line and status 2. It
    leaves through SystemExit, which Hydra lets pass without its own report."""

    @functools.wraps(fn)
    def task(cfg):
        try:
            return fn(cfg)
        except (ConfigError, OmegaConfBaseException) as e:
            fail(one_line(e))

    return task


def run(hydra_main) -> int:
    """Runs a @hydra.main function and returns the exit status. Hydra reports its own errors
    (composition, override parsing) as a trimmed traceback plus hints, over several lines, and
    exits 1; with HYDRA_FULL_ERROR=1 it raises them instead, which is how they come here to be
    said in one line. A user who set HYDRA_FULL_ERROR=1 gets Hydra's full report as asked."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        hydra_main()
        return 0
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_main()
    except (HydraException, OmegaConfBaseException, ConfigError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return USAGE
    return 0


def listen(server: ServerConfig) -> socket.socket:
    """The server's socket, bound to server.host:server.port now: an address another process
    holds is one line and status 2 before the model loads, not a traceback once it has."""
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((server.host, server.port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"server.host/server.port: cannot listen on {server.host}:{server.port} "
                          f"({e.strerror or e})") from None
    return sock


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, which calls `before_cancel` shortly before its graceful shutdown would
    cancel the requests still running: they can then be ended with an answer of their own."""

    def __init__(self, config: uvicorn.Config, before_cancel: Callable[[], None] | None):
        super().__init__(config)
        self.before_cancel = before_cancel

    async def shutdown(self, sockets=None) -> None:
        timeout = self.config.timeout_graceful_shutdown
        handle = None
        if self.before_cancel is not None and timeout:
            margin = min(1.0, timeout / 4)  # for the answers to be written
            handle = asyncio.get_running_loop().call_later(timeout - margin, self.before_cancel)
        try:
            await super().shutdown(sockets)
        finally:
            if handle is not None:
                handle.cancel()


def serve_http(app, server: ServerConfig, log: logging.Logger, sock: socket.socket | None = None,
               before_cancel: Callable[[], None] | None = None) -> None:
    """Serves `app` until SIGTERM or SIGINT, then stops accepting and lets running requests
    finish for at most server.drain_timeout_s (`before_cancel` is called a moment before the
    rest are cancelled). uvicorn re-raises the signal afterwards to the
    handler it found: the one set here logs, so the process goes on to end normally (status 0)
    rather than by the default action (143 / 130).

    Limits: an idle keep-alive connection is closed after server.timeout_keep_alive_s; past
    server.limit_concurrency requests at once the app answers a JSON 503 (http.Guard), probes
    excepted, and uvicorn refuses connections past PROBE_CONNECTIONS more than that with its own
    plain 503. uvicorn (h11) has no timeout for a connection that never completes its request
    headers: such a client holds a connection (bounded in bytes by h11's 16 KiB header limit,
    and in count by uvicorn's limit) until it goes away. A proxy in front (nginx
    client_header_timeout) bounds that time."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: log.info("drained; exiting"))
    # log_config=None: uvicorn's loggers keep no handlers of their own and reach the root
    # logger's, so its lines (start, access, shutdown) come on the same stream, in the same
    # format, as the server's; uvicorn's default config would print them to stderr and stdout.
    config = uvicorn.Config(app, host=server.host, port=server.port, log_level=server.log_level, log_config=None,
                            timeout_graceful_shutdown=server.drain_timeout_s,
                            timeout_keep_alive=server.timeout_keep_alive_s,
                            limit_concurrency=server.limit_concurrency + PROBE_CONNECTIONS)
    _DrainingServer(config, before_cancel).run(sockets=[sock] if sock is not None else None)


def exit_now(status: int) -> NoReturn:
    """Ends the process once an entry point has shut down what it started, without the
    interpreter's finalization (see the callers for the threads that make it abort)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
