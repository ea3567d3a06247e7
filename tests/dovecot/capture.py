#!/usr/bin/env python3
"""Regenerates tests/fixtures/dovecot-exported/: what Dovecot's event exporter posts for
reads, logins and configuration changes, captured from a real Dovecot.

    capture.py [--out DIR] [--keep]

It starts a Dovecot with tests/dovecot/env.py (without mailhook's source), adds to its
dovecot.conf an event exporter `capture` (format = json, format_args = time-rfc3339,
transport = http-post, exactly as examples/dovecot/90-mailhook.conf sets mailhook's) that
posts to an http.server of this process on loopback, and a metric whose filter selects

    mail_opened, auth_request_finished, auth_passdb_request_finished,
    auth_client_request_finished, imap_command_finished, managesieve_command_finished,
    pop3_command_finished, sieve_action_finished

(plus `sendmail_path` pointing at a script that discards the message, so a Sieve redirect
goes nowhere), reloads Dovecot (doveadm reload) and waits until events arrive. Then it runs
each scenario with tests/dovecot/act.py's actions, one after another: a scenario's setup
(not captured), then its actions, then it waits for the events the scenario must produce
and for a quiet spell (no POST for QUIET seconds), with a deadline. Each scenario's POST
bodies go to DIR/<scenario>.jsonl, one per line, in the order they arrived (Dovecot posts
concurrently: arrival order is not event order), byte for byte as sent; nothing is
replaced (host name, ports and session IDs are those of the throw-away instance). Files
are written only when every scenario got its events; DIR/README.md is not touched.
A summary (per scenario: each event, when it arrived after the action started) goes to
stderr. --keep leaves Dovecot running and prints its env.py JSON.

Failed logins come last: after a failure from an address Dovecot delays that address's
next authentication by seconds (auth penalty, cleared by a successful login), which would
slow every later scenario; the unknown user's scenario logs in successfully first (setup).
The whole run takes about 20 s.
"""

import argparse
import contextlib
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no __pycache__ beside act.py
import act  # noqa: E402

EVENTS = [
    "mail_opened",
    "auth_request_finished",
    "auth_passdb_request_finished",
    "auth_client_request_finished",
    "imap_command_finished",
    "managesieve_command_finished",
    "pop3_command_finished",
    "sieve_action_finished",
]
ALICE = "alice@example.test"
MASTER = "alice@example.test*mailhook-admin"
QUIET = 0.5
DEADLINE = 20


class Capture:
    """POST bodies received, with their arrival times."""

    def __init__(self):
        self.cond = threading.Condition()
        self.posts = []  # (arrival, body bytes, parsed or None)
        self.last = 0.0
        capture = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                if self.headers.get("Transfer-Encoding"):
                    self.send_error(411, "capture.py reads Content-Length bodies only")
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    parsed = json.loads(body)
                except ValueError:
                    parsed = None
                with capture.cond:
                    capture.last = time.monotonic()
                    capture.posts.append((capture.last, body, parsed))
                    capture.cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def take(self):
        with self.cond:
            posts, self.posts = self.posts, []
            return posts

    def wait(self, required, what, quiet=QUIET, deadline=DEADLINE):
        """Waits until every (event, cmd_name or None) of `required` arrived since the last
        take() and no POST came for `quiet` seconds; then returns the POSTs and clears them."""
        end = time.monotonic() + deadline
        with self.cond:
            while True:
                now = time.monotonic()
                missing = [r for r in required if not any(matches(p[2], *r) for p in self.posts)]
                if not missing and now - self.last >= quiet:
                    posts, self.posts = self.posts, []
                    return posts
                if now > end:
                    got = [describe(p[2]) for p in self.posts]
                    raise SystemExit(f"{what}: no {missing} within {deadline} s; got {got}")
                self.cond.wait(min(0.05, max(0.001, end - now)))


def matches(event, name, cmd=None):
    return bool(event) and event.get("event") == name and (
        cmd is None or event.get("fields", {}).get("cmd_name") == cmd)


def describe(event):
    if not event:
        return "(not JSON)"
    cmd = event.get("fields", {}).get("cmd_name")
    return event.get("event", "?") + (f" {cmd}" if cmd else "")


def run(ports, steps, what):
    """Runs act.py actions; one whose name ends in "!" must fail (Dovecot refuses it)."""
    for action, *args in steps:
        refused = action.endswith("!")
        action = action.rstrip("!")
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                act.act(ports, action, list(args))
        except SystemExit as e:
            if refused:
                continue
            raise SystemExit(f"{what}: act.py {action} {args}: {e}") from None
        except Exception as e:  # imaplib, poplib, sockets
            raise SystemExit(f"{what}: act.py {action} {args}: {type(e).__name__}: {e}") from None
        if refused:
            raise SystemExit(f"{what}: act.py {action} {args} succeeded; it should have been refused")


LOGOUT = ("imap_command_finished", "LOGOUT")
LOGIN = ("auth_request_finished", None)

# (file name, setup steps, their required events, steps, required events)
SCENARIOS = [
    ("deliver", [], [],
     [("deliver", ALICE, "<read-1@outside.example>", "Zum Lesen", "emile@outside.example")],
     [("mail_opened", None)]),
    ("read", [], [],
     [("read", ALICE, "INBOX", "<read-1@outside.example>")],
     [LOGIN, ("mail_opened", None), ("imap_command_finished", "UID FETCH"), LOGOUT]),
    ("peek", [], [],
     [("peek", ALICE, "INBOX", "<read-1@outside.example>")],
     [LOGIN, ("mail_opened", None), ("imap_command_finished", "UID FETCH"), LOGOUT]),
    ("master-read", [], [],
     [("read", MASTER, "INBOX", "<read-1@outside.example>")],
     [LOGIN, ("mail_opened", None), ("imap_command_finished", "UID FETCH"), LOGOUT]),
    # What opens a message without its body: a fresh message each, Dovecot's cache empty.
    ("fetch-envelope",
     [("deliver", ALICE, "<headers-1@outside.example>", "Nur Kopf", "emile@outside.example")], [],
     [("fetch", ALICE, "INBOX", "<headers-1@outside.example>", "(ENVELOPE)")],
     [LOGIN, ("imap_command_finished", "UID FETCH"), LOGOUT]),
    ("fetch-envelope-again", [], [],
     [("fetch", ALICE, "INBOX", "<headers-1@outside.example>", "(ENVELOPE)")],
     [LOGIN, ("imap_command_finished", "UID FETCH"), LOGOUT]),
    ("fetch-header",
     [("deliver", ALICE, "<headers-2@outside.example>", "Nur Kopf", "emile@outside.example")], [],
     [("fetch", ALICE, "INBOX", "<headers-2@outside.example>", "(BODY.PEEK[HEADER])")],
     [LOGIN, ("imap_command_finished", "UID FETCH"), LOGOUT]),
    ("pop3-retr", [], [],
     [("pop3read", ALICE, "1")],
     [LOGIN, ("mail_opened", None)]),
    ("login-ok", [], [],
     [("login", ALICE)],
     [LOGIN, ("auth_client_request_finished", None), LOGOUT]),
    ("master-login", [], [],
     [("login", MASTER)],
     [LOGIN, ("auth_client_request_finished", None), LOGOUT]),
    ("setacl", [], [],
     [("setacl", ALICE, "INBOX", "bob@example.test", "lr")],
     [("imap_command_finished", "SETACL"), LOGOUT]),
    ("bulkread",
     [("create", ALICE, "Bulk"), ("appendmany", ALICE, "Bulk", "20", "bulk")], [LOGOUT],
     [("bulkread", ALICE, "Bulk")],
     [("imap_command_finished", "UID FETCH"), LOGOUT]),
    ("putscript", [], [],
     [("putscript", ALICE, "outside", 'redirect "x@outside.example";')],
     [("managesieve_command_finished", "PUTSCRIPT"), ("managesieve_command_finished", "SETACTIVE")]),
    # A script that does not compile: PUTSCRIPT answers NO.
    ("putscript-invalid", [], [],
     [("putscript!", ALICE, "broken", "redirect")],
     [("managesieve_command_finished", "PUTSCRIPT")]),
    # The script activated above redirects every delivery (sendmail_path discards it).
    ("sieve-redirect", [], [],
     [("deliver", ALICE, "<redirected-1@outside.example>", "Weiter", "emile@outside.example")],
     [("sieve_action_finished", None)]),
    ("login-fail-password", [], [],
     [("loginfail", ALICE)],
     [LOGIN, ("auth_client_request_finished", None)]),
    # A successful login first: it clears the penalty the failure above earned.
    ("login-fail-unknown", [("login", ALICE)], [LOGIN, LOGOUT],
     [("loginfail", "nobody@example.test")],
     [LOGIN, ("auth_client_request_finished", None)]),
]


def up():
    started = subprocess.run([sys.executable, os.path.join(HERE, "env.py"), "up"],
                             capture_output=True, text=True)
    if started.returncode != 0:
        raise SystemExit(f"env.py up: {started.stderr}{started.stdout}")
    return json.loads(started.stdout)


def down(env):
    subprocess.run([sys.executable, os.path.join(HERE, "env.py"), "down", env["dir"]],
                   capture_output=True)


def add_exporter(env, url):
    d = env["dir"]
    sendmail = os.path.join(d, "sendmail")
    with open(sendmail, "w") as f:
        f.write("#!/bin/sh\n# capture.py: a Sieve redirect goes nowhere.\ncat >/dev/null\n")
    os.chmod(sendmail, 0o755)
    conf = os.path.join(d, "dovecot.conf")
    with open(conf, "a") as f:
        f.write(f"""
# added by tests/dovecot/capture.py
sendmail_path = {sendmail}
event_exporter capture {{
  format = json
  format_args = time-rfc3339
  transport = http-post
  transport_args = {url}
  transport_timeout = 2sec
}}
metric capture {{
  exporter = capture
  filter = {" OR ".join(f"event={e}" for e in EVENTS)}
}}
""")
    reloaded = subprocess.run(["doveadm", "-c", conf, "reload"], capture_output=True, text=True)
    if reloaded.returncode != 0:
        raise SystemExit(f"doveadm reload: {reloaded.stderr}")


def ready(cap, ports):
    """Logs in until the reloaded Dovecot's exporter posts (its stats process restarts)."""
    end = time.monotonic() + 30
    while True:
        run(ports, [("login", ALICE)], "waiting for the exporter")
        try:
            cap.wait([LOGIN, LOGOUT], "the exporter after reload", deadline=3)
            return
        except SystemExit:
            if time.monotonic() > end:
                raise SystemExit("the capture exporter posted nothing within 30 s of doveadm reload")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/dovecot-exported"))
    p.add_argument("--keep", action="store_true", help="leave Dovecot running; print its env.py JSON")
    a = p.parse_args()

    cap = Capture()
    env = up()
    captured = {}
    try:
        add_exporter(env, cap.url)
        ready(cap, env)
        for name, setup, setup_required, steps, required in SCENARIOS:
            if setup:
                run(env, setup, f"{name} (setup)")
                cap.wait(setup_required, f"{name} (setup)")
            start = time.monotonic()
            run(env, steps, name)
            acted = time.monotonic() - start
            posts = cap.wait(required, name)
            bad = [body for _, body, parsed in posts if not isinstance(parsed, dict)]
            if bad:
                raise SystemExit(f"{name}: POST bodies that are not one JSON object: {bad[:3]}")
            captured[name] = posts
            print(f"{name}: {len(posts)} events; the action took {acted:.3f} s", file=sys.stderr)
            for arrival, _, parsed in posts:
                print(f"  +{arrival - start:7.3f} s  {describe(parsed)}", file=sys.stderr)
    finally:
        if a.keep:
            print(json.dumps(env), flush=True)
        else:
            down(env)
        cap.server.shutdown()

    os.makedirs(a.out, exist_ok=True)
    for name, posts in captured.items():
        with open(os.path.join(a.out, f"{name}.jsonl"), "wb") as f:
            for _, body, _ in posts:
                f.write(body if body.endswith(b"\n") else body + b"\n")
    print(f"wrote {len(captured)} files to {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
