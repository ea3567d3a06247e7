#!/usr/bin/env python3
"""A webhook receiver for tests and the demo.

It verifies every delivery with the off-the-shelf `standardwebhooks` library (not
mailhook's code) and records what it saw. Its behaviour can be switched while it runs:

  POST /_mode   {"status": 500}           answer 500 to deliveries from now on
  POST /_mode   {"status": 410}           answer 410 Gone
  POST /_mode   {"status": 200}           accept again
  GET  /_deliveries                        every delivery received, as JSON lines

Usage: receiver.py --secret whsec_... [--port 0] [--quiet]
Prints "listening on PORT" once ready.
"""

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


class State:
    def __init__(self, secret):
        self.webhook = Webhook(secret)
        self.lock = threading.Lock()
        self.status = 200
        self.deliveries = []


def make_handler(state, quiet):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def reply(self, status, body=b""):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path != "/_deliveries":
                return self.reply(404)
            with self.lock_copy() as items:
                body = "".join(json.dumps(d) + "\n" for d in items).encode()
            self.reply(200, body)

        def lock_copy(self):
            class Ctx:
                def __enter__(_):
                    state.lock.acquire()
                    return list(state.deliveries)

                def __exit__(_, *exc):
                    state.lock.release()

            return Ctx()

        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            if self.path == "/_mode":
                with state.lock:
                    state.status = int(json.loads(body)["status"])
                return self.reply(200)
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                payload = state.webhook.verify(body, headers)
                verified = True
            except WebhookVerificationError as e:
                payload, verified = None, False
                print(f"VERIFICATION FAILED: {e}", file=sys.stderr, flush=True)
            with state.lock:
                status = state.status
                state.deliveries.append(
                    {
                        "webhookId": headers.get("webhook-id"),
                        "verified": verified,
                        "answered": status,
                        "body": body.decode("utf-8", "replace"),
                        "headers": {k: v for k, v in headers.items() if k.startswith("x-")},
                    }
                )
            if verified and status < 300 and not quiet:
                data = payload.get("data", {})
                who = data.get("mailbox") or data.get("mailboxDomain") or "-"
                flags = [f["name"] for f in data.get("flags", [])]
                tags = f"flags={flags}" if flags else f"filters={data.get('matchedFilters', [])}"
                line = (
                    f"verified {self.path:<11} {payload.get('type'):<19} {who:<28} "
                    f"{(data.get('subject') or '')[:34]!r:<36} {tags}\n"
                )
                with state.lock:  # one write per line: threads must not interleave
                    sys.stdout.write(line)
                    sys.stdout.flush()
            self.reply(status if verified else 401)

    return Handler


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--secret", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    state = State(args.secret)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(state, args.quiet))
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
