#!/usr/bin/env python3
"""A webhook receiver for tests and the demo.

It verifies every delivery with the off-the-shelf `standardwebhooks` library (not
mailhook's code) and records what it saw. Its behaviour can be switched while it runs:

  POST /_mode   {"status": 500}           answer 500 to deliveries from now on
  POST /_mode   {"status": 410}           answer 410 Gone
  POST /_mode   {"status": 200}           accept again
  POST /_mode   {"redirect": "http://..."} answer 307 to that location
  POST /_mode   {"echo": false}           do not echo endpoint verification challenges
  POST /_mode   {"delay": 1.5}            wait this many seconds before answering a delivery
  GET  /_deliveries                        every delivery received, as JSON lines

Each delivery record says its path and `inFlight`: how many requests to that path were
being handled when it arrived, itself included (a subscription's concurrency, as the
endpoint sees it). A request read after its sender had already closed the connection (it
sat in the socket buffer while the sender was killed) is marked `orphaned` and not
counted: nobody is delivering it any more.

Signatures: with --secret whsec_..., `v1` (HMAC) signatures are verified by the
off-the-shelf `standardwebhooks` library. With --public-key whpk_..., `v1a` (ed25519)
signatures are verified instead, with nothing but the public key: no released Standard
Webhooks library verifies v1a yet (standardwebhooks 1.1.0 skips every version but v1), so
this follows the specification directly on top of the `cryptography` library's Ed25519.

TLS: --tls-cert/--tls-key serve HTTPS; --client-ca also requires a client certificate
signed by that CA (mutual TLS). The control endpoints above are then on a separate plain
HTTP port on 127.0.0.1 (--control-port).

Usage: receiver.py (--secret whsec_... | --public-key whpk_...) [--host 127.0.0.1] [--port 0]
                   [--tls-cert F --tls-key F [--client-ca F]] [--quiet]
Prints "listening on PORT" (and " control CPORT" with TLS) once ready.
"""

import argparse
import base64
import json
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


class Ed25519Webhook:
    """Standard Webhooks `v1a`: ed25519 over `{webhook-id}.{webhook-timestamp}.{body}`."""

    def __init__(self, public_key, tolerance=300):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        raw = base64.b64decode(public_key.removeprefix("whpk_"))
        self.key = Ed25519PublicKey.from_public_bytes(raw)
        self.tolerance = tolerance

    def verify(self, body, headers):
        from cryptography.exceptions import InvalidSignature

        msg_id, ts = headers.get("webhook-id"), headers.get("webhook-timestamp")
        signature = headers.get("webhook-signature", "")
        if not msg_id or not ts:
            raise WebhookVerificationError("missing webhook-id or webhook-timestamp")
        if abs(time.time() - int(ts)) > self.tolerance:
            raise WebhookVerificationError("timestamp outside the tolerance")
        signed = f"{msg_id}.{ts}.".encode() + body
        for part in signature.split(" "):
            version, _, sig = part.partition(",")
            if version != "v1a":
                continue
            try:
                self.key.verify(base64.b64decode(sig), signed)
                return json.loads(body)
            except (InvalidSignature, ValueError):
                continue
        raise WebhookVerificationError("no v1a signature verifies with the public key")


class State:
    def __init__(self, secret=None, public_key=None):
        self.webhook = Ed25519Webhook(public_key) if public_key else Webhook(secret)
        self.lock = threading.Lock()
        self.status = 200
        self.redirect = None
        self.echo = True
        self.delay = 0.0
        self.deliveries = []
        self.in_flight = {}


def peer_gone(connection):
    """Whether the sender closed the connection before this request was handled."""
    try:
        return connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, ValueError):  # nothing more to read; or TLS (no MSG_PEEK)
        return False
    except OSError:
        return True


def client_cert(connection):
    """The common name of the client certificate presented over mutual TLS, if any."""
    getpeercert = getattr(connection, "getpeercert", None)
    cert = getpeercert() if getpeercert else None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


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
                mode = json.loads(body)
                with state.lock:
                    state.status = int(mode.get("status", state.status))
                    state.redirect = mode.get("redirect", state.redirect)
                    state.echo = bool(mode.get("echo", state.echo))
                    state.delay = float(mode.get("delay", state.delay))
                return self.reply(200)
            if state.redirect:
                with state.lock:
                    state.deliveries.append({"webhookId": None, "verified": False, "answered": 307,
                                             "body": "", "headers": {}})
                self.send_response(307)
                self.send_header("Location", state.redirect)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            orphaned = peer_gone(self.connection)
            self.arrived = time.monotonic()
            with state.lock:
                delay = state.delay
                if not orphaned:
                    state.in_flight[self.path] = state.in_flight.get(self.path, 0) + 1
                in_flight = state.in_flight.get(self.path, 0)
            try:
                status, answer = self.deliver(body, delay, in_flight, orphaned)
            finally:
                # Done before the answer goes out: once the sender has it, it may start the
                # next request at once.
                if not orphaned:
                    with state.lock:
                        state.in_flight[self.path] -= 1
            self.reply(status, answer)

        def deliver(self, body, delay, in_flight, orphaned):
            if delay > 0:
                time.sleep(delay)
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
                        "signatures": headers.get("webhook-signature", ""),
                        "clientCert": client_cert(self.connection),
                        "path": self.path,
                        "inFlight": in_flight,
                        "orphaned": orphaned,
                        "arrived": self.arrived,
                        "port": self.client_address[1],
                    }
                )
            if verified and payload.get("type") == "endpoint.verification":
                challenge = payload.get("data", {}).get("challenge", "")
                if not state.echo:
                    return 200, b"{}"
                return 200, json.dumps({"challenge": challenge}).encode()
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
            return (status if verified else 401), b""

    return Handler


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--secret")
    parser.add_argument("--public-key")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--client-ca")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if not (args.secret or args.public_key):
        parser.error("give --secret or --public-key")
    state = State(args.secret, args.public_key)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(state, args.quiet))
    if not args.tls_cert:
        print(f"listening on {server.server_address[1]}", flush=True)
        server.serve_forever()
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(args.tls_cert, args.tls_key)
    if args.client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(args.client_ca)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    control = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state, args.quiet))
    threading.Thread(target=control.serve_forever, daemon=True).start()
    print(f"listening on {server.server_address[1]} control {control.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
