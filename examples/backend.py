#!/usr/bin/env python3
"""An example subtocall backend (autobahn-python, asyncio).

It registers a shared procedure `<prefix>.SUB_<name>` with `invoke: roundrobin`.
subtocall sees the registration, subscribes to the topic `<prefix>.<name>`, and
forwards every event published there as one call to this procedure; the router
hands each call to exactly one of the registered backends. Start several of
these and each event is processed once, by one of them.

    python examples/backend.py --name A
    python examples/backend.py --name B --url ws://127.0.0.1:8080/ws

Handlers should be idempotent: subtocall delivers at least once, and the
`_details` kwarg (when subtocall runs with SUBTOCALL_DETAILS_KWARG=_details)
carries the publication id to de-duplicate on.
"""
import argparse
import asyncio
import signal
import sys

import txaio
from autobahn.asyncio.component import Component
from autobahn.wamp.types import RegisterOptions


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="ws://127.0.0.1:8080/ws")
    p.add_argument("--realm", default="realm1")
    p.add_argument("--name", default="backend")
    p.add_argument("--procedure", default="com.example.SUB_status",
                   help="the SUB_ procedure to register (default: %(default)s)")
    p.add_argument("--authid", default="backend")
    p.add_argument("--secret", default="secret123")
    p.add_argument("--work", type=float, default=0.0,
                   help="seconds each event takes to handle, after it is printed "
                        "(simulated work; default: %(default)s)")
    args = p.parse_args()
    txaio.start_logging(level="error")
    txaio.set_global_log_level("error")

    component = Component(
        transports=[{"url": args.url, "serializers": ["msgpack", "json"],
                     "max_retries": 0}],
        realm=args.realm,
        authentication={"wampcra": {"authid": args.authid, "secret": args.secret}},
    )
    handled = 0

    @component.on_join
    async def joined(session, details):
        async def on_event(*event_args, **event_kwargs):
            nonlocal handled
            handled += 1
            details = event_kwargs.pop("_details", None)
            print(f"[{args.name}] handled {list(event_args)} {event_kwargs}"
                  + (f" publication={details['publication']}" if details else ""),
                  flush=True)
            if args.work > 0:
                await asyncio.sleep(args.work)
            return args.name

        await session.register(on_event, args.procedure,
                               options=RegisterOptions(invoke="roundrobin"))
        print(f"[{args.name}] registered {args.procedure} (roundrobin); waiting for events",
              flush=True)

    @component.on_leave
    async def left(session, details):
        print(f"[{args.name}] left after handling {handled} events", flush=True)

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    done = component.start(loop=loop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(component.stop()))
    try:
        loop.run_until_complete(done)
    except Exception as e:  # connection refused, auth failure ...
        print(f"[{args.name}] stopped: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
