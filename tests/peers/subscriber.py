"""Test peer: an autobahn-python subscriber that prints every event it receives.

stdout: {"ready": true, "subscription": ID} once subscribed, then per event
{"topic": URI, "args": [...], "kwargs": {...}, "publication": ID, "publisher": ID|null,
 "publisher_authid": STR|null, "at": UNIX_TIME}. SIGTERM leaves cleanly and exits 0;
the process exits 5 when the router ends the session.
"""

import asyncio
import time

import peerlib
from autobahn.wamp.types import SubscribeOptions


def parse_args():
    parser = peerlib.new_parser(__doc__.splitlines()[0])
    parser.add_argument("--topic", required=True)
    parser.add_argument("--match", choices=["exact", "prefix", "wildcard"], default="exact")
    return peerlib.parse_args(parser)


async def main(args):
    session, ended = await peerlib.connect(args)

    def on_event(*event_args, details, **event_kwargs):
        peerlib.emit(
            {
                "topic": details.topic or args.topic,
                "args": list(event_args),
                "kwargs": event_kwargs,
                "publication": details.publication,
                "publisher": details.publisher,
                "publisher_authid": details.publisher_authid,
                "at": time.time(),
            }
        )

    try:
        try:
            subscription = await session.subscribe(
                on_event, args.topic, options=SubscribeOptions(match=args.match, details=True)
            )
        except Exception as exc:  # noqa: BLE001 - reported, then the peer exits
            peerlib.emit({"subscribe_error": args.topic, "error": peerlib.describe(exc)})
            peerlib.log(f"cannot subscribe to {args.topic}: {peerlib.describe(exc)}")
            await peerlib.leave(session, ended)
            return peerlib.EXIT_JOIN_FAILED
        peerlib.emit({"ready": True, "subscription": subscription.id})
        reason = await asyncio.shield(ended)
        peerlib.log(f"session ended by the router: {reason}")
        return peerlib.EXIT_CONNECTION_LOST
    except asyncio.CancelledError:
        await peerlib.leave(session, ended)
        return 0


if __name__ == "__main__":
    arguments = parse_args()
    peerlib.run(main, arguments)
