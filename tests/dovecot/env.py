#!/usr/bin/env python3
"""A throw-away Dovecot (IMAP, POP3, LMTP, ManageSieve) on loopback for tests and benchmarks.

    env.py up [--mailhook URL --token TOKEN] [--tls]   prints one JSON line, then returns
    env.py down DIR                                     stops it and removes DIR

`up` writes a private configuration in a new directory: users alice@example.test and
bob@example.test (passwords alicepw, bobpw), the master users mailhook-admin (masterpw,
login as `user*mailhook-admin`) and helpdesk-admin (helpdeskpw), Maildir mailboxes with Sent and Trash, Sieve and
ManageSieve, IMAP ACL and METADATA, listeners on free loopback ports. With --mailhook it
installs mailhook's Dovecot source exactly as shipped: examples/dovecot/90-mailhook.conf
(only its file paths and URL replaced) and examples/dovecot/mailhook.lua. It prints
{"dir", "host", "imap", "pop3", "lmtp", "sieve", "spool"}. Mail processes run as `nobody`;
the master process as whoever runs this (root in CI).

With --tls, a test CA made with the openssl CLI signs the server's certificate (for
127.0.0.2 and localhost), `ssl = required` (no login without TLS: IMAP on "imap" needs
STARTTLS, POP3 on "pop3" needs STLS), an implicit-TLS IMAP listener is added, and
everything listens on 127.0.0.2; the JSON adds "imaps" and "ca" (the CA's PEM file).
"host" is where the listeners are. act.py then speaks STARTTLS (STLS for POP3); its
ManageSieve action stays plain and is refused.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def listener(host, service, *listeners):
    """A service block with (name, port, ssl) inet listeners on `host`."""
    blocks = "".join(
        f"""  inet_listener {name} {{
    address = {host}
    port = {port}
    ssl = {"yes" if ssl else "no"}
  }}
"""
        for name, port, ssl in listeners
    )
    return f"service {service} {{\n{blocks}}}\n"


def openssl(*args):
    made = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if made.returncode != 0:
        sys.exit(f"openssl {' '.join(args)}: {made.stderr}")


def test_pki(d):
    """A CA and a server certificate it signs for 127.0.0.2 and localhost; returns the
    paths of the CA, the certificate and its key."""
    ca, ca_key = os.path.join(d, "ca.pem"), os.path.join(d, "ca.key")
    cert, key, csr = (os.path.join(d, n) for n in ("server.pem", "server.key", "server.csr"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=mailhook test Dovecot CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
            "-keyout", ca_key, "-out", ca)
    openssl("req", *ec, "-subj", "/CN=127.0.0.2", "-keyout", key, "-out", csr)
    ext = os.path.join(d, "server.ext")
    with open(ext, "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n"
                "subjectAltName=IP:127.0.0.2,DNS:localhost\n")
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
            "-extfile", ext, "-out", cert)
    return ca, cert, key


def up(args):
    d = tempfile.mkdtemp(prefix="mailhook-dovecot.")
    os.chmod(d, 0o755)
    for sub in ("run", "state", "mail", "spool"):
        os.makedirs(os.path.join(d, sub))
    # Mail users write their mailboxes and the script's spool.
    os.chmod(os.path.join(d, "mail"), 0o777)
    os.chmod(os.path.join(d, "spool"), 0o1777)
    with open(os.path.join(d, "passwd"), "w") as f:
        f.write("alice@example.test:{PLAIN}alicepw::::::\nbob@example.test:{PLAIN}bobpw::::::\n")
    with open(os.path.join(d, "masters"), "w") as f:
        # A second master user: an administrator's, not mailhook's.
        f.write("mailhook-admin:{PLAIN}masterpw::::::\nhelpdesk-admin:{PLAIN}helpdeskpw::::::\n")
    # With the ACL plugin a master user gets the rights its own name has: give them
    # (mailhook's reconciler needs l and r; the tests' admin also writes).
    with open(os.path.join(d, "global-acl"), "w") as f:
        f.write("* owner lrwstipekxa\n* user=mailhook-admin lrwstipekxa\n* user=helpdesk-admin lrwstipekxa\n")
    ports = {"imap": free_port(), "pop3": free_port(), "lmtp": free_port(), "sieve": free_port()}
    # Dovecot takes a connection whose two ends share an address as secure, TLS or not:
    # with --tls it listens on 127.0.0.2, which clients reach from 127.0.0.1.
    listen = "127.0.0.2" if args.tls else "127.0.0.1"
    if args.tls:
        ports["imaps"] = free_port()
        ca, cert, key = test_pki(d)
        ssl = f"ssl = required\nssl_cert = <{cert}\nssl_key = <{key}\n"
    else:
        ssl = "ssl = no\n"
    imap_listeners = [("imap", ports["imap"], False)] + ([("imaps", ports["imaps"], True)] if args.tls else [])
    conf = f"""# generated by tests/dovecot/env.py
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = imap pop3 lmtp sieve
listen = {listen}
{ssl}disable_plaintext_auth = no
auth_mechanisms = plain
auth_master_user_separator = *
mail_location = maildir:{d}/mail/%u:LAYOUT=fs
mailbox_list_index = yes
mail_attribute_dict = file:%h/dovecot-attributes
default_internal_user = dovecot
default_login_user = dovenull
passdb {{
  driver = passwd-file
  args = {d}/masters
  master = yes
  result_success = continue
}}
passdb {{
  driver = passwd-file
  args = {d}/passwd
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={d}/mail/%u
}}
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Sent {{
    special_use = \\Sent
  }}
  mailbox Trash {{
    special_use = \\Trash
  }}
}}
{listener(listen, "imap-login", *imap_listeners)}{listener(listen, "pop3-login", ("pop3", ports["pop3"], False))}{listener(listen, "lmtp", ("lmtp", ports["lmtp"], False))}{listener(listen, "managesieve-login", ("sieve", ports["sieve"], False))}
service imap {{
  process_limit = 64
}}
mail_plugins = $mail_plugins acl
protocol imap {{
  mail_plugins = $mail_plugins imap_acl
  imap_metadata = yes
  mail_max_userip_connections = 100
}}
protocol lmtp {{
  mail_plugins = $mail_plugins sieve
}}
plugin {{
  acl = vfile:{d}/global-acl
  sieve = file:~/sieve;active=~/.dovecot.sieve
}}
"""
    if args.mailhook:
        token_file = os.path.join(d, "mailhook-token")
        with open(token_file, "w") as f:
            f.write(args.token + "\n")
        os.chmod(token_file, 0o644)
        host = args.mailhook.split("://", 1)[-1].rstrip("/")
        events_url = os.path.join(d, "mailhook-events-url")
        with open(events_url, "w") as f:
            # No line end: Dovecot 2.3.19 keeps it in the URL, and its stats process panics.
            f.write(f"http://dovecot:{args.token}@{host}/v1/sources/dovecot/events")
        os.chmod(events_url, 0o600)
        with open(os.path.join(ROOT, "examples/dovecot/90-mailhook.conf")) as f:
            snippet = f.read()
        snippet = (
            snippet.replace("/etc/dovecot/mailhook.lua", os.path.join(ROOT, "examples/dovecot/mailhook.lua"))
            .replace("/etc/dovecot/mailhook-token", token_file)
            .replace("/etc/dovecot/mailhook-events-url", events_url)
            .replace("/var/spool/mailhook", os.path.join(d, "spool"))
            .replace("http://mailhook-ingest.mailhook-system.svc:8080", args.mailhook.rstrip("/"))
        )
        if args.changes_only:
            for metric in ("mailhook_reads", "mailhook_logins"):
                start = snippet.index(f"metric {metric} {{")
                snippet = snippet[:start] + snippet[snippet.index("}", start) + 1:]
        conf += "\n" + snippet
    path = os.path.join(d, "dovecot.conf")
    with open(path, "w") as f:
        f.write(conf)
    # The daemon must not hold our output open (callers read it to its end): its own
    # output goes to a file.
    with open(os.path.join(d, "start.log"), "w") as out:
        started = subprocess.run(["dovecot", "-c", path], stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    if started.returncode != 0:
        sys.exit(f"dovecot did not start: {open(os.path.join(d, 'start.log')).read()}")
    deadline = time.time() + 30
    for port in ports.values():
        while True:
            try:
                socket.create_connection((listen, port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    log = open(os.path.join(d, "dovecot.log")).read() if os.path.exists(os.path.join(d, "dovecot.log")) else ""
                    subprocess.run(["doveadm", "-c", path, "stop"], capture_output=True)
                    sys.exit(f"dovecot did not listen on {port}: {log}")
                time.sleep(0.05)
    extra = {"ca": ca} if args.tls else {}
    print(json.dumps({"dir": d, "spool": os.path.join(d, "spool"), "host": listen, **ports, **extra}), flush=True)


def down(args):
    conf = os.path.join(args.dir, "dovecot.conf")
    if os.path.exists(conf):
        subprocess.run(["doveadm", "-c", conf, "stop"], capture_output=True)
        # The master exits after its children; wait for its pid file to go.
        pid = os.path.join(args.dir, "run", "master.pid")
        deadline = time.time() + 10
        while os.path.exists(pid) and time.time() < deadline:
            time.sleep(0.05)
    shutil.rmtree(args.dir, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("up")
    u.add_argument("--mailhook", help="mailhook's ingest base URL, e.g. http://127.0.0.1:8080")
    u.add_argument("--token", default="", help="a token of that mailhook's Dovecot token file (--dovecot-token-file)")
    u.add_argument("--tls", action="store_true", help="TLS required, a test CA, an implicit-TLS listener")
    u.add_argument("--changes-only", action="store_true",
                   help="install the shipped configuration without its reads and logins metrics (the exporter as "
                        "it was before mailhook took them: configuration changes only), for comparisons")
    u.set_defaults(func=up)
    dn = sub.add_parser("down")
    dn.add_argument("dir")
    dn.set_defaults(func=down)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
