#!/usr/bin/env python3
"""Prints a realistic burst of mailbox events as NDJSON for the quick start."""
import json
import random
import sys

random.seed(int(sys.argv[2]) if len(sys.argv) > 2 else 7)
count = int(sys.argv[1]) if len(sys.argv) > 1 else 40
people = ["alice", "bob", "carol", "dave", "erin"]
partners = ["supplier.org", "bank.example.net", "lawfirm.example", "newsletter.example.com"]
subjects = ["Invoice {n}", "Re: contract draft v{n}", "Wire transfer request #{n}", "Weekly report {n}", "Lunch?"]
for i in range(count):
    kind = random.choice(["in", "in", "in", "out", "internal"])
    person = random.choice(people)
    mailbox = f"{person}@finance.example.com" if i % 3 else f"{person}@sales.example.com"
    external = f"{random.choice(['billing', 'noreply', 'jane', 'ops'])}@{random.choice(partners)}"
    attachments = []
    if random.random() < 0.3:
        attachments.append({"name": f"doc-{i}.pdf", "contentType": "application/pdf", "size": random.randint(10_000, 900_000)})
    event = {
        "eventId": f"quickstart-{i}",
        "mailbox": mailbox,
        "messageId": f"<{i}.{random.randint(1000, 9999)}@mail.example.com>",
        "subject": random.choice(subjects).format(n=i),
        "size": random.randint(2_000, 2_000_000),
        "attachments": attachments,
        "folder": "Inbox",
    }
    if kind == "in":
        event.update(type="message.received", **{"from": external, "to": [mailbox]})
    elif kind == "out":
        event.update(type="message.sent", **{"from": mailbox, "to": [external]})
    else:
        event.update(type="message.internal", **{"from": mailbox, "to": [f"{random.choice(people)}@finance.example.com"]})
    print(json.dumps(event))
