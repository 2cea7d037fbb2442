"""Test peer: an autobahn-python publisher that publishes numbered events with acknowledge=True.

Event i has args [i, "hello", {"nested": [1, 2.5, None, True]}] and kwargs
{"seq": i, "key": "value"}; with --with-bytes, b"\\x00\\x01\\x02\\xff" + i (4 bytes,
big endian) is appended to args and set as kwargs["blob"]. --payload-json replaces
args and kwargs with {"args": [...], "kwargs": {...}} (WAMP JSON bytes convention).

stdout: {"published": i, "publication": ID} per event (not with --quiet),
then {"done": true, "count": N, "seconds": S}. Exit codes as in backend.py; a
failed publish exits 6 after printing {"publish_error": i, "error": STR}.
"""

import asyncio
import json
import time

import peerlib
from autobahn.wamp.types import PublishOptions

EXIT_PUBLISH_FAILED = 6


def parse_args():
    parser = peerlib.new_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--topic", action="append", required=True, help="repeatable: event i goes to topic i %% N"
    )
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--first", type=int, default=0, help="the first event's seq")
    parser.add_argument("--rate", type=float, default=0.0, help="events per second, 0 = max")
    parser.add_argument("--with-bytes", action="store_true")
    parser.add_argument(
        "--keys", type=int, default=0, help='add kwargs "k": i %% N (an ordering key)'
    )
    parser.add_argument("--payload-json", help='{"args": [...], "kwargs": {...}} for every event')
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    return peerlib.parse_args(parser)


def payload(args, i):
    if args.payload_json is not None:
        custom = peerlib.from_wamp_json(json.loads(args.payload_json))
        return list(custom.get("args") or []), dict(custom.get("kwargs") or {})
    event_args = [i, "hello", {"nested": [1, 2.5, None, True]}]
    event_kwargs = {"seq": i, "key": "value"}
    if args.keys:
        event_kwargs["k"] = i % args.keys
    if args.with_bytes:
        blob = b"\x00\x01\x02\xff" + i.to_bytes(4, "big")
        event_args.append(blob)
        event_kwargs["blob"] = blob
    return event_args, event_kwargs


async def main(args):
    session, ended = await peerlib.connect(args)
    options = PublishOptions(acknowledge=True)
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    started = time.monotonic()
    try:
        for n in range(args.count):
            i = args.first + n
            if interval:
                # Pace against the start time so slow publishes do not lower the rate.
                delay = started + n * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            event_args, event_kwargs = payload(args, i)
            try:
                topic = args.topic[i % len(args.topic)]
                publication = await session.publish(
                    topic, *event_args, options=options, **event_kwargs
                )
            except Exception as exc:  # noqa: BLE001 - reported, then the peer exits
                peerlib.emit({"publish_error": i, "error": peerlib.describe(exc)})
                peerlib.log(f"publish {i} to {topic} failed: {peerlib.describe(exc)}")
                await peerlib.leave(session, ended)
                return EXIT_PUBLISH_FAILED
            if not args.quiet:
                peerlib.emit({"published": i, "publication": publication.id})
        peerlib.emit(
            {"done": True, "count": args.count, "seconds": round(time.monotonic() - started, 3)}
        )
        await peerlib.leave(session, ended)
        return 0
    except asyncio.CancelledError:
        await peerlib.leave(session, ended)
        return 0


if __name__ == "__main__":
    arguments = parse_args()
    peerlib.run(main, arguments)
