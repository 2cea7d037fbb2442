#!/usr/bin/env python3
"""The WAMP peers of scripts/dashboard-screenshot.sh's run (autobahn-python,
asyncio; run with the Crossbar venv's python). Both reconnect when the router
restarts.

    dashboard_peers.py backend --procedure com.example.SUB_orders --kind healthy --name A
    dashboard_peers.py publisher --duration 150 --topic com.example.orders=200 ...

Backend kinds:
  healthy  answers within a few milliseconds
  flaky    about 8% of calls raise wamp.error.unavailable (subtocall retries
           them) and 2% com.example.error.invalid (final: dead-lettered as
           `rejected`)
  slow     takes 50-150 ms per call; with SUBTOCALL_ORDER_BY=kwarg:key and the
           publisher's 8 keys that is about 80 events/s, so a burst waits

The publisher publishes to each `--topic URI=RATE` at RATE events/s (a
`--burst URI=RATE@FROM-TO` raises it between FROM and TO seconds), every event
with the kwarg `key` (0-7) and `seq`, fire-and-forget, for `--duration`
seconds; events are lost while the router is down, as with any publisher.
"""
import argparse
import asyncio
import random
import signal
import sys
import time

import txaio
from autobahn.asyncio.component import Component
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.types import RegisterOptions


def transports(url, serializers):
    # Reconnect for ever, quickly: the run restarts the router part-way.
    return [{"url": url, "serializers": serializers, "max_retries": -1,
             "initial_retry_delay": 0.5, "max_retry_delay": 1.0,
             "retry_delay_growth": 1.0}]


def run(component, on_stop=None):
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    done = component.start(loop=loop)

    def stop():
        if on_stop:
            on_stop()
        asyncio.ensure_future(component.stop())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    try:
        loop.run_until_complete(done)
    except Exception as e:
        print(f"stopped: {e}", file=sys.stderr)


def backend(args):
    component = Component(
        transports=transports(args.url, ["msgpack", "json"]),
        realm=args.realm,
        authentication={"wampcra": {"authid": "backend", "secret": "secret123"}},
    )
    handled = {"ok": 0, "retryable": 0, "final": 0}

    async def on_event(*event_args, **event_kwargs):
        if args.kind == "slow":
            await asyncio.sleep(random.uniform(0.05, 0.15))
        else:
            await asyncio.sleep(random.uniform(0.001, 0.02))
        if args.kind == "flaky":
            draw = random.random()
            if draw < 0.02:
                handled["final"] += 1
                raise ApplicationError("com.example.error.invalid", "cannot process this one")
            if draw < 0.10:
                handled["retryable"] += 1
                raise ApplicationError("wamp.error.unavailable", "busy, try again")
        handled["ok"] += 1
        return args.name

    @component.on_join
    async def joined(session, details):
        await session.register(on_event, args.procedure,
                               options=RegisterOptions(invoke="roundrobin"))
        print(f"[{args.name}] registered {args.procedure} ({args.kind})", flush=True)

    @component.on_leave
    async def left(session, details):
        print(f"[{args.name}] left: {handled}", flush=True)

    run(component)


def parse_rate(text):
    uri, rate = text.rsplit("=", 1)
    return uri, float(rate)


def publisher(args):
    rates = dict(parse_rate(t) for t in args.topic)
    bursts = []
    for text in args.burst:
        uri, spec = text.rsplit("=", 1)
        rate, window = spec.split("@")
        start, end = window.split("-")
        bursts.append((uri, float(rate), float(start), float(end)))
    component = Component(transports=transports(args.url, ["json"]), realm=args.realm)
    started = time.monotonic()
    sent = {uri: 0 for uri in rates}
    due = {uri: 0.0 for uri in rates}
    stopping = {"flag": False}

    def rate_of(uri, t):
        for b_uri, b_rate, b_start, b_end in bursts:
            if b_uri == uri and b_start <= t < b_end:
                return b_rate
        return rates[uri]

    @component.on_join
    async def joined(session, details):
        print(f"[publisher] joined at {time.monotonic() - started:.1f}s", flush=True)
        last = time.monotonic()
        while not stopping["flag"] and session.is_attached():
            now = time.monotonic()
            t = now - started
            if t >= args.duration:
                stopping["flag"] = True
                print(f"[publisher] done: {sent}", flush=True)
                await component.stop()
                return
            for uri in rates:
                due[uri] += rate_of(uri, t) * (now - last)
                while due[uri] >= 1:
                    due[uri] -= 1
                    n = sent[uri]
                    try:
                        session.publish(uri, n, seq=n, key=n % 8)
                    except Exception as e:  # the router went away: wait for the rejoin
                        print(f"[publisher] {type(e).__name__} at {t:.1f}s", flush=True)
                        return
                    sent[uri] = n + 1
            last = now
            await asyncio.sleep(0.01)

    run(component, on_stop=lambda: stopping.update(flag=True))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--realm", default="realm1")
    sub = p.add_subparsers(dest="role", required=True)
    b = sub.add_parser("backend")
    b.add_argument("--procedure", required=True)
    b.add_argument("--name", required=True)
    b.add_argument("--kind", choices=["healthy", "flaky", "slow"], default="healthy")
    pub = sub.add_parser("publisher")
    pub.add_argument("--duration", type=float, required=True)
    pub.add_argument("--topic", action="append", default=[], help="URI=RATE")
    pub.add_argument("--burst", action="append", default=[], help="URI=RATE@FROM-TO")
    args = p.parse_args()
    txaio.start_logging(level="error")
    txaio.set_global_log_level("error")
    backend(args) if args.role == "backend" else publisher(args)


if __name__ == "__main__":
    main()
