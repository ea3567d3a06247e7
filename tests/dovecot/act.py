#!/usr/bin/env python3
"""What a mail user (or an admin) does to a mailbox, against tests/dovecot/env.py's Dovecot,
with Python's own imaplib, poplib and smtplib (LMTP) and a plain ManageSieve exchange.

    act.py --ports '{"imap": P, "pop3": P, "lmtp": P, "sieve": P}' ACTION ARGS...

Messages are found by Message-ID (UID SEARCH HEADER Message-ID), so tests name them the
way events do. Each action logs in, does one thing, and logs out. Actions:

    deliver RCPT MESSAGE-ID SUBJECT FROM      LMTP delivery
    select USER FOLDER                        SELECT only (clears \\Recent: no event)
    flag USER FOLDER MESSAGE-ID FLAG          UID STORE +FLAGS
    unflag USER FOLDER MESSAGE-ID FLAG        UID STORE -FLAGS
    move USER FROM TO MESSAGE-ID              UID MOVE
    copy USER FROM TO MESSAGE-ID              UID COPY
    expunge USER FOLDER MESSAGE-ID            STORE +FLAGS \\Deleted, then UID EXPUNGE
    append USER FOLDER MESSAGE-ID TO SUBJECT  APPEND (a client saving sent mail)
    create|delete|subscribe|unsubscribe USER FOLDER
    rename USER FROM TO
    setacl USER FOLDER IDENTIFIER RIGHTS
    setmetadata USER FOLDER ENTRY VALUE
    putscript USER NAME [SCRIPT]              ManageSieve PUTSCRIPT; without SCRIPT a forwarding
                                              rule (redirect :copy to archive@outside.example);
                                              with SCRIPT (Sieve text, e.g.
                                              'redirect "x@outside.example";') that script
    setactive USER NAME                       ManageSieve SETACTIVE NAME
    read USER FOLDER MESSAGE-ID               UID FETCH uid (BODY[]): sets \\Seen
    peek USER FOLDER MESSAGE-ID               UID FETCH uid (BODY.PEEK[]): leaves the flags
    fetch USER FOLDER MESSAGE-ID ITEMS        UID FETCH uid ITEMS, e.g. '(ENVELOPE)' or
                                              '(BODY.PEEK[HEADER])'
    bulkread USER FOLDER                      UID FETCH 1:* (BODY.PEEK[]), one command; prints
                                              {"fetched": N} (messages whose body came back)
    appendmany USER FOLDER N PREFIX           appends N small messages (Message-ID
                                              <PREFIX-i@example.test>, i = 1..N) over one
                                              connection: one MULTIAPPEND command (one
                                              transaction) per 100 messages, about 4 times
                                              faster than an APPEND each; prints {"appended": N}
    login USER                                LOGIN, then LOGOUT
    loginfail USER                            LOGIN with a wrong password: succeeds (exit 0)
                                              when Dovecot answers NO, fails if it lets in
    pop3read USER N                           POP3 USER/PASS (STLS with --tls), RETR N, QUIT
                                              (Dovecot sets \\Seen on the message at QUIT)
    latency USER N                            N rounds of SELECT, FETCH (FLAGS), BODY (a
                                              BODY.PEEK[] read), STORE, NOOP; prints per-command
                                              latency percentiles (ms) as JSON

USER may be `alice@example.test*mailhook-admin`: the master user's login into alice's mailbox
(IMAP, POP3 and ManageSieve actions alike).
"""

import argparse
import base64
import imaplib
import json
import poplib
import smtplib
import socket
import ssl
import statistics
import time

PASSWORDS = {
    "alice@example.test": "alicepw",
    "bob@example.test": "bobpw",
    "mailhook-admin": "masterpw",
    "helpdesk-admin": "helpdeskpw",
}

imaplib.Commands.setdefault("SETMETADATA", ("AUTH", "SELECTED"))
imaplib.Commands.setdefault("SETACL", ("AUTH", "SELECTED"))
imaplib.Commands.setdefault("UID EXPUNGE", ("SELECTED",))


def password(user):
    return PASSWORDS[user.split("*", 1)[1] if "*" in user else user]


def imap_connect(ports):
    i = imaplib.IMAP4(ports.get("host", "127.0.0.1"), ports["imap"])
    if ports.get("ca"):
        # env.py --tls: no login without TLS.
        i.starttls(ssl.create_default_context(cafile=ports["ca"]))
    return i


def imap(ports, user):
    i = imap_connect(ports)
    i.login(user, password(user))
    return i


def ok(result, what):
    status, data = result
    if status != "OK":
        raise SystemExit(f"{what}: {status} {data}")
    return data


def uid_of(i, folder, message_id):
    ok(i.select(quote(folder)), f"SELECT {folder}")
    data = ok(i.uid("SEARCH", None, "HEADER", "Message-ID", quote(message_id)), "UID SEARCH")
    uids = data[0].split()
    if len(uids) != 1:
        raise SystemExit(f"{message_id} in {folder}: {len(uids)} messages")
    return uids[0].decode()


def quote(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def utf7(folder):
    """IMAP's modified UTF-7 for folder names (RFC 3501 5.1.3)."""
    out, run = [], []

    def flush():
        if run:
            b = base64.b64encode("".join(run).encode("utf-16-be")).decode().rstrip("=").replace("/", ",")
            out.append("&" + b + "-")
            run.clear()

    for ch in folder:
        if " " <= ch <= "~":
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            run.append(ch)
    flush()
    return "".join(out)


def act(ports, action, args):
    if action == "deliver":
        rcpt, message_id, subject, sender = args
        msg = (
            f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\nMessage-ID: {message_id}\r\n"
            "Date: Sat, 05 Dec 2026 04:00:00 +0000\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "MIME-Version: 1.0\r\n\r\nGrüße\r\n"
        )
        # Subject and body in UTF-8 (SMTPUTF8-style): Dovecot stores them as sent.
        lmtp = smtplib.LMTP(ports.get("host", "127.0.0.1"), ports["lmtp"])
        lmtp.sendmail(sender, [rcpt], msg.encode("utf-8"))
        lmtp.quit()
        return
    if action == "putscript":
        if len(args) == 2:
            user, name = args
            sieve(ports, user, name, 'require ["copy"];\r\nredirect :copy "archive@outside.example";\r\n')
        elif len(args) == 3:
            user, name, script = args
            sieve(ports, user, name, script)
        else:
            raise SystemExit("putscript USER NAME [SCRIPT]")
        return
    if action == "setactive":
        user, name = args
        sieve(ports, user, name, None, activate=True)
        return
    if action == "loginfail":
        loginfail(ports, args[0])
        return
    if action == "pop3read":
        pop3read(ports, args[0], int(args[1]))
        return
    user = args[0]
    i = imap(ports, user)
    try:
        if action == "select":
            ok(i.select(quote(utf7(args[1]))), "SELECT")
        elif action in ("flag", "unflag"):
            folder, message_id, flag = args[1:]
            uid = uid_of(i, utf7(folder), message_id)
            ok(i.uid("STORE", uid, "+FLAGS" if action == "flag" else "-FLAGS", f"({flag})"), "STORE")
        elif action in ("move", "copy"):
            source, dest, message_id = args[1:]
            uid = uid_of(i, utf7(source), message_id)
            ok(i.uid(action.upper(), uid, quote(utf7(dest))), action.upper())
        elif action == "expunge":
            folder, message_id = args[1:]
            uid = uid_of(i, utf7(folder), message_id)
            ok(i.uid("STORE", uid, "+FLAGS", "(\\Deleted)"), "STORE")
            ok(i.uid("EXPUNGE", uid), "UID EXPUNGE")
        elif action == "append":
            folder, message_id, to, subject = args[1:]
            msg = f"From: {user.split('*')[0]}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: {message_id}\r\n\r\nhi\r\n"
            ok(i.append(quote(utf7(folder)), "(\\Seen)", None, msg.encode("utf-8")), "APPEND")
        elif action == "create":
            ok(i.create(quote(utf7(args[1]))), "CREATE")
        elif action == "delete":
            ok(i.delete(quote(utf7(args[1]))), "DELETE")
        elif action == "subscribe":
            ok(i.subscribe(quote(utf7(args[1]))), "SUBSCRIBE")
        elif action == "unsubscribe":
            ok(i.unsubscribe(quote(utf7(args[1]))), "UNSUBSCRIBE")
        elif action == "rename":
            ok(i.rename(quote(utf7(args[1])), quote(utf7(args[2]))), "RENAME")
        elif action == "setacl":
            folder, identifier, rights = args[1:]
            ok(i._simple_command("SETACL", quote(utf7(folder)), identifier, rights), "SETACL")
        elif action == "setmetadata":
            folder, entry, value = args[1:]
            ok(i._simple_command("SETMETADATA", quote(utf7(folder)), f"({entry} {quote(value)})"), "SETMETADATA")
        elif action == "latency":
            print(json.dumps(latency(i, int(args[1]))))
        elif action in ("read", "peek", "fetch"):
            folder, message_id = args[1:3]
            items = {"read": "(BODY[])", "peek": "(BODY.PEEK[])"}.get(action) or args[3]
            uid = uid_of(i, utf7(folder), message_id)
            data = ok(i.uid("FETCH", uid, items), f"UID FETCH {uid} {items}")
            if not data or data[0] is None:
                raise SystemExit(f"UID FETCH {uid} {items}: nothing came back")
        elif action == "bulkread":
            ok(i.select(quote(utf7(args[1]))), f"SELECT {args[1]}")
            data = ok(i.uid("FETCH", "1:*", "(BODY.PEEK[])"), "UID FETCH 1:* (BODY.PEEK[])")
            # One (envelope, literal) pair per message, a closing b")" after each.
            print(json.dumps({"fetched": sum(1 for part in data if isinstance(part, tuple))}))
        elif action == "appendmany":
            folder, n, prefix = args[1], int(args[2]), args[3]
            appendmany(i, utf7(folder), n, prefix, user.split("*")[0])
            print(json.dumps({"appended": n}))
        elif action == "login":
            pass
        else:
            raise SystemExit(f"unknown action {action}")
    finally:
        try:
            i.logout()
        except (imaplib.IMAP4.error, OSError):
            pass


def loginfail(ports, user):
    """LOGIN with a wrong password; Dovecot answers NO (after its auth failure delay)."""
    i = imap_connect(ports)
    try:
        i.login(user, "wrong-" + PASSWORDS.get(user.split("*")[-1], "password"))
    except imaplib.IMAP4.error as refused:
        print(json.dumps({"refused": str(refused)}))
        try:
            i.logout()
        except (imaplib.IMAP4.error, OSError):
            pass
        return
    i.logout()
    raise SystemExit(f"LOGIN {user} with a wrong password was let in")


def appendmany(i, folder, n, prefix, sender, per_command=100):
    """N messages in MULTIAPPEND commands (RFC 3502) of `per_command` each, literals sent
    whole with LITERAL+ (RFC 7888); both are Dovecot capabilities. Each command is one
    transaction: a separate APPEND per message costs a mailbox sync each (~15 ms here)."""
    # imaplib keeps the greeting's capabilities; after login Dovecot names more.
    offered = ok(i.capability(), "CAPABILITY")[0].decode().upper().split()
    missing = {"MULTIAPPEND", "LITERAL+"} - set(offered)
    if missing:
        raise SystemExit(f"appendmany needs {sorted(missing)}; the server offers {offered}")
    for start in range(0, n, per_command):
        tag = f"M{start + 1}"
        out = bytearray(f"{tag} APPEND {quote(folder)}".encode())
        for k in range(start + 1, min(n, start + per_command) + 1):
            msg = (f"From: {sender}\r\nTo: {sender}\r\nSubject: bulk {k}\r\n"
                   f"Message-ID: <{prefix}-{k}@example.test>\r\n\r\nmessage {k}\r\n").encode()
            out += f" {{{len(msg)}+}}\r\n".encode() + msg
        i.send(bytes(out) + b"\r\n")
        while True:
            line = i.readline()
            if not line:
                raise SystemExit("APPEND: connection closed")
            if line.startswith(tag.encode() + b" "):
                if not line.startswith(tag.encode() + b" OK"):
                    raise SystemExit(f"APPEND of messages {start + 1}..: {line.decode(errors='replace').strip()}")
                break


def pop3read(ports, user, n):
    """POP3: log in, RETR message N (1-based, as LIST numbers them), QUIT."""
    p = poplib.POP3(ports.get("host", "127.0.0.1"), ports["pop3"], timeout=10)
    try:
        if ports.get("ca"):
            p.stls(ssl.create_default_context(cafile=ports["ca"]))
        p.user(user)
        p.pass_(password(user))
        resp, lines, _ = p.retr(n)
        if not resp.startswith(b"+OK"):
            raise SystemExit(f"RETR {n}: {resp!r}")
        p.quit()
    except poplib.error_proto as e:
        raise SystemExit(f"POP3 {user}: {e}")


def latency(i, rounds):
    """Per-command round trips of an IMAP session: what a mail client waits for."""
    times = {}

    def timed(name, fn):
        start = time.perf_counter()
        ok(fn(), name)
        times.setdefault(name, []).append((time.perf_counter() - start) * 1000)

    ok(i.select("INBOX"), "SELECT")
    for n in range(rounds):
        timed("SELECT", lambda: i.select("INBOX"))
        timed("FETCH", lambda: i.fetch("1:*", "(FLAGS)"))
        timed("BODY", lambda: i.fetch("1", "(BODY.PEEK[])"))
        flag = "+FLAGS" if n % 2 == 0 else "-FLAGS"
        timed("STORE", lambda: i.store("1", flag, "(\\Flagged)"))
        timed("NOOP", lambda: i.noop())

    def pct(xs, p):
        xs = sorted(xs)
        return round(xs[min(len(xs) - 1, int(p / 100 * len(xs)))], 2)

    return {
        name: {"n": len(xs), "p50": pct(xs, 50), "p99": pct(xs, 99), "max": round(max(xs), 2), "mean": round(statistics.mean(xs), 2)}
        for name, xs in times.items()
    }


def sieve(ports, user, name, script, activate=False):
    """ManageSieve (RFC 5804) PUTSCRIPT of `script` (unless None), then SETACTIVE if
    `activate`, spoken directly: Python has no client for it."""
    s = socket.create_connection((ports.get("host", "127.0.0.1"), ports["sieve"]), timeout=10)
    f = s.makefile("rwb")

    def answer():
        while True:
            line = f.readline()
            if not line:
                raise SystemExit("ManageSieve connection closed")
            if line.startswith((b"OK", b"NO", b"BYE")):
                if not line.startswith(b"OK"):
                    raise SystemExit(f"ManageSieve: {line!r}")
                return

    answer()
    login = user.split("*")
    authz, authn = (login[0], login[1]) if len(login) == 2 else ("", user)
    creds = base64.b64encode(f"{authz}\0{authn}\0{password(user)}".encode()).decode()
    f.write(f'AUTHENTICATE "PLAIN" "{creds}"\r\n'.encode())
    f.flush()
    answer()
    if script is not None:
        body = script.encode()
        f.write(f'PUTSCRIPT "{name}" {{{len(body)}+}}\r\n'.encode() + body + b"\r\n")
        f.flush()
        answer()
    if activate:
        f.write(f'SETACTIVE "{name}"\r\n'.encode())
        f.flush()
        answer()
    f.write(b"LOGOUT\r\n")
    f.flush()
    s.close()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ports", required=True, help="the JSON env.py up printed")
    p.add_argument("action")
    p.add_argument("args", nargs="*")
    a = p.parse_args()
    act(json.loads(a.ports), a.action, a.args)


if __name__ == "__main__":
    main()
