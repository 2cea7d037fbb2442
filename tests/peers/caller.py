"""Test peer: an autobahn-python caller that calls one procedure --count times, concurrently.

Call i sends args [i] and kwargs {"seq": i}, or the --payload-json
{"args": [...], "kwargs": {...}} (WAMP JSON bytes convention) for every call.

stdout: per call {"call": i, "args": [...], "kwargs": {...}} on success or
{"call": i, "error": URI, "args": [...]} on a WAMP error, then
{"done": true, "count": N, "errors": E}. Exit code 0 even when calls failed (the
lines say so); 2 when connecting or joining fails, 4 on the watchdog.
"""

import asyncio
import json

import peerlib
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.types import CallResult


def parse_args():
    parser = peerlib.new_parser(__doc__.splitlines()[0])
    parser.add_argument("--procedure", required=True)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--payload-json", help='{"args": [...], "kwargs": {...}} for every call')
    parser.add_argument("--call-timeout", type=float, default=30.0, help="seconds per call")
    return peerlib.parse_args(parser)


async def main(args):
    session, ended = await peerlib.connect(args)
    errors = 0

    async def one_call(i):
        nonlocal errors
        if args.payload_json is not None:
            custom = peerlib.from_wamp_json(json.loads(args.payload_json))
            call_args, call_kwargs = list(custom.get("args") or []), dict(custom.get("kwargs") or {})
        else:
            call_args, call_kwargs = [i], {"seq": i}
        try:
            result = await asyncio.wait_for(
                session.call(args.procedure, *call_args, **call_kwargs), args.call_timeout
            )
        except ApplicationError as exc:
            errors += 1
            peerlib.emit({"call": i, "error": exc.error, "args": list(exc.args)})
            return
        except asyncio.TimeoutError:
            errors += 1
            peerlib.emit({"call": i, "error": "timeout"})
            return
        if isinstance(result, CallResult):
            peerlib.emit({"call": i, "args": list(result.results), "kwargs": result.kwresults})
        else:
            peerlib.emit({"call": i, "args": [] if result is None else [result], "kwargs": {}})

    try:
        await asyncio.gather(*(one_call(i) for i in range(args.count)))
        peerlib.emit({"done": True, "count": args.count, "errors": errors})
        await peerlib.leave(session, ended)
        return 0
    except asyncio.CancelledError:
        await peerlib.leave(session, ended)
        return 0


if __name__ == "__main__":
    arguments = parse_args()
    peerlib.run(main, arguments)
