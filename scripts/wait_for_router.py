"""Waits until a WAMP router accepts WebSocket connections at URL (argv[1]),
for at most 30 s; exits 1 with a message otherwise. Used by scripts/demo.sh
and scripts/dashboard-screenshot.sh."""
import sys
import time

from websockets.sync.client import connect

deadline = time.time() + 30
while True:
    try:
        connect(sys.argv[1], subprotocols=["wamp.2.json"], open_timeout=2).close()
        break
    except Exception:
        if time.time() > deadline:
            sys.exit("Crossbar did not come up within 30 s; see its log")
        time.sleep(0.2)
