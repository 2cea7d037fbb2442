#!/usr/bin/env python3
"""An example publisher: publishes ordinary events to a topic. It knows nothing
about subtocall or the backends; that is the point.

    python examples/publisher.py --count 10 --topic com.example.status
"""
import argparse
import asyncio
import sys

import txaio
from autobahn.asyncio.component import Component
from autobahn.wamp.types import PublishOptions


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="ws://127.0.0.1:8080/ws")
    p.add_argument("--realm", default="realm1")
    p.add_argument("--topic", default="com.example.status")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--interval", type=float, default=0.2, help="seconds between events")
    args = p.parse_args()
    txaio.start_logging(level="error")
    txaio.set_global_log_level("error")

    component = Component(
        transports=[{"url": args.url, "serializers": ["json"], "max_retries": 0}],
        realm=args.realm,  # anonymous
    )

    @component.on_join
    async def joined(session, details):
        for i in range(args.count):
            await session.publish(args.topic, i, status="ok", seq=i,
                                  options=PublishOptions(acknowledge=True))
            print(f"[publisher] published event {i} to {args.topic}", flush=True)
            await asyncio.sleep(args.interval)
        await session.leave()

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(component.start(loop=loop))
    except Exception as e:
        print(f"[publisher] failed: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
