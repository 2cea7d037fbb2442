"""Shared plumbing for the autobahn-python test peers (backend, publisher, subscriber).

The peers are third-party WAMP clients that the Rust integration tests drive as child
processes. Every peer follows the same contract:

* one JSON object per line on stdout, flushed at once; diagnostics go to stderr;
* bytes are printed with WAMP's JSON convention: "\\u0000" + base64 (standard, padded);
* a hard watchdog (--max-seconds) ends the process even if the event loop hangs, and
  a parent watcher ends it when the test process that spawned it disappears;
* a failed connect or join exits non-zero with a clear message on stderr.
"""

import argparse
import asyncio
import base64
import faulthandler
import json
import os
import signal
import ssl
import sys
import threading
import time

import txaio

txaio.use_asyncio()

from autobahn.asyncio.wamp import ApplicationSession  # noqa: E402
from autobahn.asyncio.websocket import WampWebSocketClientFactory  # noqa: E402
from autobahn.wamp import auth  # noqa: E402
from autobahn.wamp.serializer import (  # noqa: E402
    CBORSerializer,
    JsonSerializer,
    MsgPackSerializer,
)
from autobahn.wamp.types import ComponentConfig  # noqa: E402
from autobahn.websocket.util import parse_url  # noqa: E402

EXIT_JOIN_FAILED = 2
EXIT_WATCHDOG = 4
EXIT_CONNECTION_LOST = 5

SERIALIZERS = {
    "json": JsonSerializer,
    "msgpack": MsgPackSerializer,
    "cbor": CBORSerializer,
}


def log(message):
    """Writes one diagnostic line to stderr (never stdout: stdout is the protocol)."""
    sys.stderr.write(f"[{os.path.basename(sys.argv[0])} {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def to_wamp_json(value):
    """Returns `value` with every bytes object replaced by "\\0" + base64, recursively."""
    if isinstance(value, (bytes, bytearray)):
        return "\x00" + base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(k): to_wamp_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_wamp_json(v) for v in value]
    return value


def from_wamp_json(value):
    """Inverse of `to_wamp_json`: strings starting with "\\0" become bytes, recursively."""
    if isinstance(value, str) and value.startswith("\x00"):
        return base64.b64decode(value[1:])
    if isinstance(value, dict):
        return {k: from_wamp_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_wamp_json(v) for v in value]
    return value


def describe(exc):
    """A short text for an exception; WAMP errors as "<uri>: <first arg>"."""
    uri = getattr(exc, "error", None)
    if isinstance(uri, str):
        detail = exc.args[0] if getattr(exc, "args", None) else ""
        return f"{uri}: {detail}" if detail else uri
    return repr(exc)


def emit(obj):
    """Prints one JSON line on stdout and flushes it."""
    sys.stdout.write(json.dumps(to_wamp_json(obj), default=repr) + "\n")
    sys.stdout.flush()


def add_common_args(parser):
    parser.add_argument("--url", required=True, help="ws://host:port/ws or wss://...")
    parser.add_argument("--realm", default="realm1")
    parser.add_argument("--serializer", choices=sorted(SERIALIZERS), default="json")
    parser.add_argument("--authid", help="WAMP-CRA authid (anonymous when absent)")
    parser.add_argument("--secret", help="WAMP-CRA secret (the plain password)")
    parser.add_argument("--ca-file", help="PEM file to trust for wss:// URLs")
    parser.add_argument("--join-timeout", type=float, default=20.0)
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=120.0,
        help="watchdog: the process exits with code 4 after this many seconds, whatever it does",
    )


def parse_args(parser):
    args = parser.parse_args()
    if (args.authid is None) != (args.secret is None):
        parser.error("--authid and --secret go together")
    return args


def _start_watchdogs(max_seconds):
    deadline = time.monotonic() + max_seconds
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(0.25)
            if os.getppid() != parent:
                log(f"parent process {parent} is gone; exiting")
                os._exit(EXIT_WATCHDOG)
            if time.monotonic() > deadline:
                log(f"watchdog: still running after --max-seconds {max_seconds}; stacks follow")
                faulthandler.dump_traceback(all_threads=True)
                os._exit(EXIT_WATCHDOG)

    threading.Thread(target=watch, name="watchdog", daemon=True).start()
    # Backstop in C, in case the thread above cannot get the GIL (exits with code 1).
    faulthandler.dump_traceback_later(max_seconds + 5.0, exit=True)


class PeerSession(ApplicationSession):
    """An ApplicationSession that signs WAMP-CRA challenges and reports join/leave on futures."""

    def __init__(self, config, secret, joined, ended):
        super().__init__(config)
        self._secret = secret
        self._joined = joined
        self._ended = ended

    def onConnect(self):
        extra = self.config.extra
        if extra.get("authid"):
            self.join(self.config.realm, authmethods=["wampcra"], authid=extra["authid"])
        else:
            self.join(self.config.realm, authmethods=["anonymous"])

    def onChallenge(self, challenge):
        if challenge.method != "wampcra":
            raise Exception(f"unexpected auth method {challenge.method}")
        key = self._secret.encode("utf8")
        if "salt" in challenge.extra:
            # Salted user: the HMAC key is the base64 text of PBKDF2(password, salt).
            log(
                "salted WAMP-CRA challenge (iterations={}, keylen={})".format(
                    challenge.extra["iterations"], challenge.extra["keylen"]
                )
            )
            key = auth.derive_key(
                key,
                challenge.extra["salt"],
                challenge.extra["iterations"],
                challenge.extra["keylen"],
            )
        return auth.compute_wcs(key, challenge.extra["challenge"].encode("utf8")).decode("ascii")

    async def onJoin(self, details):
        if not self._joined.done():
            self._joined.set_result(details)

    def onLeave(self, details):
        log(f"left the session: {details.reason} {details.message or ''}".rstrip())
        if not self._joined.done():
            self._joined.set_exception(
                RuntimeError(f"join failed: {details.reason} {details.message or ''}".rstrip())
            )
        if not self._ended.done():
            self._ended.set_result(details.reason)
        self.disconnect()

    def onDisconnect(self):
        if not self._joined.done():
            self._joined.set_exception(RuntimeError("disconnected before the session was joined"))
        if not self._ended.done():
            self._ended.set_result("disconnected")


async def connect(args):
    """Connects and joins. Returns (session, ended_future); exits the process on failure."""
    loop = asyncio.get_running_loop()
    txaio.config.loop = loop
    joined = loop.create_future()
    ended = loop.create_future()
    config = ComponentConfig(args.realm, {"authid": args.authid})
    holder = {}

    def make_session():
        session = PeerSession(config, args.secret, joined, ended)
        holder["session"] = session
        return session

    try:
        is_secure, host, port, _resource, _path, _params = parse_url(args.url)
    except ValueError as exc:
        log(f"bad --url: {exc}")
        sys.exit(EXIT_JOIN_FAILED)
    factory = WampWebSocketClientFactory(
        make_session, url=args.url, serializers=[SERIALIZERS[args.serializer]()]
    )
    factory.setProtocolOptions(openHandshakeTimeout=5.0, closeHandshakeTimeout=1.0, tcpNoDelay=True)
    factory.loop = loop
    ssl_context = None
    if is_secure:
        ssl_context = ssl.create_default_context(cafile=args.ca_file)
    try:
        _transport, protocol = await asyncio.wait_for(
            loop.create_connection(factory, host, port, ssl=ssl_context), args.join_timeout
        )
    except Exception as exc:  # noqa: BLE001 - any failure to connect ends the peer
        log(f"cannot connect to {args.url}: {exc!r}")
        sys.exit(EXIT_JOIN_FAILED)

    def closed(_):
        # A failed WebSocket upgrade (e.g. HTTP 200 from a leaf resource) never creates a
        # session, so the join future must also fail when the connection closes.
        if not joined.done():
            joined.set_exception(RuntimeError("connection closed before the session was joined"))
        if not ended.done():
            ended.set_result("connection closed")

    txaio.add_callbacks(protocol.is_closed, closed, closed)
    try:
        details = await asyncio.wait_for(joined, args.join_timeout)
    except asyncio.TimeoutError:
        log(f"no WELCOME from {args.url} within {args.join_timeout} s")
        sys.exit(EXIT_JOIN_FAILED)
    except Exception as exc:  # noqa: BLE001
        log(f"cannot join realm {args.realm!r} at {args.url}: {exc}")
        sys.exit(EXIT_JOIN_FAILED)
    log(
        f"joined {args.realm} as session {details.session} "
        f"(authid={details.authid}, authrole={details.authrole}, serializer={args.serializer})"
    )
    return holder["session"], ended


async def leave(session, ended):
    """Leaves the session politely (GOODBYE), waiting at most 2 s for the router's reply."""
    if not session.is_attached():
        return
    try:
        session.leave()
        await asyncio.wait_for(asyncio.shield(ended), 2.0)
    except Exception as exc:  # noqa: BLE001 - leaving is best effort
        log(f"leave: {exc!r}")


async def stdin_lines(ended):
    """Yields each line read from stdin (stripped) until the router ends the
    session (the `ended` future of `connect`); then logs why and stops. The
    caller returns EXIT_CONNECTION_LOST after the loop."""
    lines = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def read():
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line.strip())
        log("stdin closed (ignored)")

    threading.Thread(target=read, name="stdin", daemon=True).start()
    while True:
        next_line = asyncio.ensure_future(lines.get())
        done, _ = await asyncio.wait({next_line, ended}, return_when=asyncio.FIRST_COMPLETED)
        if ended in done:
            next_line.cancel()
            log(f"session ended by the router: {ended.result()}")
            return
        yield next_line.result()


def run(main, args):
    """Runs `main(args)` (a coroutine function returning an exit code) under the watchdogs."""
    _start_watchdogs(args.max_seconds)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    task = loop.create_task(main(args))
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    loop.add_signal_handler(signal.SIGINT, task.cancel)
    try:
        code = loop.run_until_complete(task)
    except asyncio.CancelledError:
        log("terminated by signal")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: skip interpreter teardown, which can hang on leftover autobahn callbacks.
    os._exit(code or 0)


def new_parser(description):
    parser = argparse.ArgumentParser(description=description)
    add_common_args(parser)
    return parser
