"""A local Crossbar for scripts/demo.sh and scripts/dashboard-screenshot.sh.

  local_router.py config PORT FILE   writes examples/crossbar/config.json to
                                     FILE, listening on 127.0.0.1:PORT
  local_router.py wait URL           waits until the router accepts WebSocket
                                     connections at URL (30 s at most; exits
                                     1 with a message otherwise)
"""
import json
import sys
import time


def config(port, path):
    with open("examples/crossbar/config.json") as f:
        cfg = json.load(f)
    endpoint = cfg["workers"][0]["transports"][0]["endpoint"]
    endpoint["interface"], endpoint["port"] = "127.0.0.1", int(port)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def wait(url):
    from websockets.sync.client import connect

    deadline = time.time() + 30
    while True:
        try:
            connect(url, subprotocols=["wamp.2.json"], open_timeout=2).close()
            return
        except Exception:
            if time.time() > deadline:
                sys.exit("Crossbar did not come up within 30 s; see its log")
            time.sleep(0.2)


if __name__ == "__main__":
    if sys.argv[1:2] == ["config"] and len(sys.argv) == 4:
        config(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["wait"] and len(sys.argv) == 3:
        wait(sys.argv[2])
    else:
        sys.exit(__doc__)
