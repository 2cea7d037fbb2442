"""A backend reading subtocall's Redis streams (SUBTOCALL_REDIS_TARGET=stream).

subtocall XADDs each event of a SUB_ procedure to the stream
<SUBTOCALL_REDIS_PREFIX><procedure> (default prefix `queue:`), the event's JSON
envelope in the field `event`, and creates the consumer group
SUBTOCALL_REDIS_CONSUMER_GROUP (default `backends`) on it. Run as many of these
as you like with the same group and different consumer names: each entry goes
to one of them.

What it does, and what a consumer of yours should do the same way:

- reads new entries with XREADGROUP and acknowledges each (XACK) only after it
  was handled, so an entry whose consumer dies before that stays pending;
- every --claim-idle-ms / 2, takes over (XAUTOCLAIM) the entries another
  consumer has held unacknowledged for --claim-idle-ms (it died, or hangs);
- an entry delivered more than --max-deliveries times (it keeps failing, or
  keeps killing its consumer) is moved to the dead-letter stream
  (<stream>:dead by default) and acknowledged, instead of going round forever.

subtocall trims only entries every group has acknowledged, so a consumer that
never acknowledges holds the backlog up until SUBTOCALL_REDIS_MAX_BACKLOG, after
which new events are dead-lettered by subtocall (reason `backlog`).

    python examples/stream_consumer.py --stream queue:com.example.SUB_status \\
        --consumer worker-1 [--redis-url redis://127.0.0.1:6379/0]

Handling here is printing one JSON line per entry on stdout:
  {"consumer": NAME, "id": ENTRY_ID, "deliveries": N, "procedure": ..., "topic": ...,
   "publication": ..., "args": [...], "kwargs": {...}}
and {"dead_lettered": ENTRY_ID, "deliveries": N} for an entry given up. Replace
handle() with your own. --handle-ms makes each handling take that long (to see
a takeover). Needs redis-py (pip install redis). SIGTERM stops it after the
entry in hand.
"""

import argparse
import json
import signal
import sys
import time

import redis


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--stream", required=True, help="e.g. queue:com.example.SUB_status")
    p.add_argument("--group", default="backends", help="SUBTOCALL_REDIS_CONSUMER_GROUP")
    p.add_argument("--consumer", required=True, help="this consumer's name in the group")
    p.add_argument("--claim-idle-ms", type=int, default=30_000)
    p.add_argument("--max-deliveries", type=int, default=5)
    p.add_argument("--dead-letter-stream", help="default: <stream>:dead")
    p.add_argument("--count", type=int, default=10, help="entries read at once")
    p.add_argument("--handle-ms", type=int, default=0, help="how long handling one entry takes")
    return p.parse_args()


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def handle(args, entry_id, deliveries, envelope):
    """Your work goes here; raise to leave the entry pending (it is retried)."""
    if args.handle_ms:
        time.sleep(args.handle_ms / 1000.0)
    emit(
        {
            "consumer": args.consumer,
            "id": entry_id,
            "deliveries": deliveries,
            "procedure": envelope.get("procedure"),
            "topic": envelope.get("topic"),
            "publication": envelope.get("publication"),
            "args": envelope.get("args"),
            "kwargs": envelope.get("kwargs"),
        }
    )


class Consumer:
    def __init__(self, args):
        self.args = args
        self.r = redis.Redis.from_url(args.redis_url, decode_responses=True)
        self.dead = args.dead_letter_stream or f"{args.stream}:dead"
        self.stopping = False
        self.next_claim = 0.0

    def ensure_group(self):
        # subtocall creates it on its first push; creating it here too lets a
        # consumer start first. "0": every entry already there is read.
        try:
            self.r.xgroup_create(self.args.stream, self.args.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def deliveries(self, entry_ids):
        """How often each entry was delivered, from the group's pending list."""
        if not entry_ids:
            return {}
        rows = self.r.xpending_range(
            self.args.stream,
            self.args.group,
            min=min(entry_ids, key=id_key),
            max=max(entry_ids, key=id_key),
            count=len(entry_ids) * 2 + 16,
            consumername=self.args.consumer,
        )
        return {row["message_id"]: row["times_delivered"] for row in rows}

    def process(self, entries):
        counts = self.deliveries([entry_id for entry_id, _ in entries])
        for entry_id, fields in entries:
            if fields is None:  # deleted meanwhile
                self.r.xack(self.args.stream, self.args.group, entry_id)
                continue
            n = counts.get(entry_id, 1)
            if n > self.args.max_deliveries:
                # Give up on it: keep it where a person can look at it.
                pipe = self.r.pipeline(transaction=True)
                pipe.xadd(self.dead, {**fields, "deliveries": n, "id": entry_id})
                pipe.xack(self.args.stream, self.args.group, entry_id)
                pipe.execute()
                emit({"dead_lettered": entry_id, "deliveries": n})
                continue
            try:
                envelope = json.loads(fields["event"])
            except (KeyError, ValueError):
                envelope = {"unreadable": fields}
            try:
                handle(self.args, entry_id, n, envelope)
            except Exception as e:  # noqa: BLE001 - left pending, claimed again later
                print(f"stream_consumer: {entry_id} failed, left pending: {e!r}", file=sys.stderr)
                continue
            self.r.xack(self.args.stream, self.args.group, entry_id)
            if self.stopping:
                return

    def claim(self):
        """Takes over what other consumers left idle for --claim-idle-ms."""
        start = "0-0"
        while not self.stopping:
            reply = self.r.xautoclaim(
                self.args.stream,
                self.args.group,
                self.args.consumer,
                min_idle_time=self.args.claim_idle_ms,
                start_id=start,
                count=100,
            )
            start, entries = reply[0], reply[1]
            if entries:
                self.process(entries)
            if start == "0-0":
                return

    def run(self):
        self.ensure_group()
        emit({"ready": True, "consumer": self.args.consumer})
        while not self.stopping:
            try:
                self.step()
            except (redis.ConnectionError, redis.TimeoutError) as e:
                # Redis restarting or out of reach: what this consumer holds
                # stays pending in the stream; go on when Redis is back.
                print(f"stream_consumer: Redis unreachable ({e}); retrying", file=sys.stderr)
                time.sleep(0.5)
                try:
                    self.ensure_group()
                except (redis.ConnectionError, redis.TimeoutError):
                    pass

    def step(self):
        """Claims what is due, then reads and handles new entries once."""
        now = time.monotonic()
        if now >= self.next_claim:
            self.claim()
            self.next_claim = now + self.args.claim_idle_ms / 2000.0
        block = max(1, min(1000, int((self.next_claim - time.monotonic()) * 1000)))
        reply = self.r.xreadgroup(
            self.args.group,
            self.args.consumer,
            {self.args.stream: ">"},
            count=self.args.count,
            block=block,
        )
        for _stream, entries in reply or []:
            self.process(entries)


def id_key(entry_id):
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def main():
    args = parse_args()
    consumer = Consumer(args)

    def stop(_signum, _frame):
        consumer.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    consumer.run()


if __name__ == "__main__":
    main()
