"""Test peer: a session that makes the calls it reads on stdin, to ask the router's meta API.

Tests use it to wait on what the router sees (e.g. who subscribes to a topic) instead of
on what the sidecar logs. The session needs a role that may call wamp.* (the fixture's
`backend` role may).

stdin: one JSON object per line, {"id": N, "procedure": URI, "args": [...]}; the calls are
made one at a time, in order.
stdout: {"ready": true, "session": ID} once joined, then per call {"id": N, "result": [...]}
(the positional results) or {"id": N, "error": URI, "args": [...]} on a WAMP error.
SIGTERM leaves cleanly and exits 0; the process exits 5 when the router ends the session.
"""

import asyncio
import json

import peerlib
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.types import CallResult


def parse_args():
    parser = peerlib.new_parser(__doc__.splitlines()[0])
    return peerlib.parse_args(parser)


async def call(session, request):
    try:
        result = await session.call(request["procedure"], *request.get("args", []))
    except ApplicationError as exc:
        return {"id": request["id"], "error": exc.error, "args": list(exc.args)}
    if isinstance(result, CallResult):
        results = list(result.results)
    else:
        results = [result]
    return {"id": request["id"], "result": results}


async def main(args):
    session, ended = await peerlib.connect(args)
    try:
        peerlib.emit({"ready": True, "session": session._session_id})
        async for line in peerlib.stdin_lines(ended):
            if line:
                peerlib.emit(await call(session, json.loads(line)))
        return peerlib.EXIT_CONNECTION_LOST
    except asyncio.CancelledError:
        await peerlib.leave(session, ended)
        return 0


if __name__ == "__main__":
    arguments = parse_args()
    peerlib.run(main, arguments)
