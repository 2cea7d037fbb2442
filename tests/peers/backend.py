"""Test peer: an autobahn-python callee that registers procedures and reports each invocation.

stdout (one JSON object per line):
  {"ready": true, "name": NAME, "session": ID, "registrations": {URI: ID}}   all registered
  {"name": NAME, "call": K, "procedure": URI, "args": [...], "kwargs": {...},
   "caller": ID|null, "caller_authid": STR|null, "caller_authrole": STR|null,
   "registration": ID, "at": UNIX_TIME}                                      per invocation
  {"unregistered": true, "name": NAME}                                       after `unregister`
  {"synced": true, "name": NAME}                                             after `sync`
  {"rejecting": true|false, "name": NAME}                                    after `reject`, `accept`
  {"register_error": URI, "error": STR}                                      then exit 2
Every invocation returns the positional results [NAME, args[0]] (or [NAME] without args);
a rejected one (see `reject`, --error-on-call) answers com.example.error.rejected and its
line has "errored": true. With --concurrency N at most N invocations are handled at once;
the others wait, and an invocation's line is printed when its handling starts.

stdin commands, one per line: `unregister`, `register`, `quit`, `drain` (unregister,
finish the calls in flight, leave), `sync` (print the synced line: every line printed
before it has been read by the test once it sees that line), `reject` (answer every
invocation from now on with com.example.error.rejected) and `accept` (answer normally
again). stdin EOF is ignored, so a test may spawn the backend without a stdin pipe.
SIGTERM leaves cleanly and exits 0.

Exit codes: 0 clean quit/SIGTERM, 2 connect/join/register failure, 3 --die-on-call,
4 watchdog, 5 the router closed the session.
"""

import asyncio
import os
import random
import time

import peerlib
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.types import CallResult, RegisterOptions

EXIT_DIED_ON_CALL = 3


def parse_args():
    parser = peerlib.new_parser(__doc__.splitlines()[0])
    parser.add_argument("--name", default="backend")
    parser.add_argument("--procedure", action="append", required=True, help="repeatable")
    parser.add_argument(
        "--invoke", choices=["single", "roundrobin", "random", "first", "last"], default="single"
    )
    parser.add_argument("--match", choices=["exact", "prefix", "wildcard"], default="exact")
    parser.add_argument("--delay-ms", type=int, default=0, help="sleep before answering")
    parser.add_argument(
        "--jitter-ms", type=int, default=0, help="and a further random 0..N ms on each call"
    )
    parser.add_argument(
        "--report-answers",
        action="store_true",
        help='print {"answered": K, "name", "at"} just before answering call K',
    )
    parser.add_argument(
        "--die-on-call", type=int, help="on the K-th invocation: print it, then os._exit(3)"
    )
    parser.add_argument(
        "--error-on-call",
        type=int,
        help="answer the K-th invocation with com.example.error.rejected",
    )
    parser.add_argument(
        "--concurrency", type=int, default=0, help="handle at most N invocations at once (0: any)"
    )
    parser.add_argument(
        "--hang-on-kwarg",
        help="never answer an invocation whose kwargs hold this name with a true value",
    )
    return peerlib.parse_args(parser)


async def main(args):
    session, ended = await peerlib.connect(args)
    calls = 0
    registrations = []
    rejecting = False
    slots = asyncio.Semaphore(args.concurrency) if args.concurrency > 0 else None

    def unanswered():
        # Invocations received and not yet answered. Autobahn sends the YIELD
        # in a callback that runs after the handler has returned, so counting
        # running handlers is not enough: leaving between the two makes the
        # router cancel the call, and the caller call again (a duplicate).
        return len(session._invocations)

    def make_handler(uri):
        async def handler(*call_args, details, **call_kwargs):
            if slots is None:
                return await handle(call_args, details, call_kwargs)
            async with slots:
                return await handle(call_args, details, call_kwargs)

        async def handle(call_args, details, call_kwargs):
            nonlocal calls
            calls += 1
            k = calls
            line = {
                "name": args.name,
                "call": k,
                "procedure": details.procedure or uri,
                "args": list(call_args),
                "kwargs": call_kwargs,
                "caller": details.caller,
                "caller_authid": details.caller_authid,
                "caller_authrole": details.caller_authrole,
                "registration": details.registration.id if details.registration else None,
                "at": time.time(),
            }
            if k == args.die_on_call:
                peerlib.emit(line)
                peerlib.log(f"dying on call {k} without answering (--die-on-call)")
                os._exit(EXIT_DIED_ON_CALL)
            if rejecting or k == args.error_on_call:
                line["errored"] = True
                peerlib.emit(line)
                raise ApplicationError(
                    "com.example.error.rejected", f"{args.name} rejects call {k}"
                )
            peerlib.emit(line)
            if args.hang_on_kwarg and call_kwargs.get(args.hang_on_kwarg):
                # Until the router cancels it (the caller went away).
                await asyncio.Event().wait()
            delay_ms = args.delay_ms + (random.uniform(0, args.jitter_ms) if args.jitter_ms else 0)
            if delay_ms:
                await asyncio.sleep(delay_ms / 1000.0)
            if args.report_answers:
                peerlib.emit({"answered": k, "name": args.name, "at": time.time()})
            if call_args:
                return CallResult(args.name, call_args[0])
            return CallResult(args.name)

        return handler

    async def register_all():
        options = RegisterOptions(match=args.match, invoke=args.invoke, details=True)
        ids = {}
        for uri in args.procedure:
            try:
                registration = await session.register(make_handler(uri), uri, options=options)
            except Exception as exc:  # noqa: BLE001 - reported, then the peer exits
                peerlib.emit({"register_error": uri, "error": peerlib.describe(exc)})
                peerlib.log(f"cannot register {uri}: {peerlib.describe(exc)}")
                return False
            registrations.append(registration)
            ids[uri] = registration.id
        peerlib.emit(
            {"ready": True, "name": args.name, "session": session._session_id, "registrations": ids}
        )
        return True

    try:
        if not await register_all():
            await peerlib.leave(session, ended)
            return peerlib.EXIT_JOIN_FAILED
        async for command in peerlib.stdin_lines(ended):
            if command == "unregister":
                while registrations:
                    await registrations.pop().unregister()
                peerlib.emit({"unregistered": True, "name": args.name})
            elif command == "register":
                if not await register_all():
                    await peerlib.leave(session, ended)
                    return peerlib.EXIT_JOIN_FAILED
            elif command in ("reject", "accept"):
                rejecting = command == "reject"
                peerlib.emit({"rejecting": rejecting, "name": args.name})
            elif command == "sync":
                peerlib.emit({"synced": True, "name": args.name})
            elif command == "quit":
                await peerlib.leave(session, ended)
                return 0
            elif command == "drain":
                # A graceful rolling restart: stop taking calls, answer the
                # ones in flight, then leave.
                while registrations:
                    await registrations.pop().unregister()
                for _ in range(1000):
                    if unanswered() == 0:
                        break
                    await asyncio.sleep(0.01)
                peerlib.emit({"drained": True, "name": args.name, "in_flight": unanswered()})
                await peerlib.leave(session, ended)
                return 0
            elif command:
                peerlib.log(f"unknown stdin command {command!r} (ignored)")
        return peerlib.EXIT_CONNECTION_LOST
    except asyncio.CancelledError:
        await peerlib.leave(session, ended)
        return 0


if __name__ == "__main__":
    arguments = parse_args()
    peerlib.run(main, arguments)
