#!/usr/bin/env python3
"""A webhook receiver for tests and the demo.

It verifies every delivery with the off-the-shelf `standardwebhooks` library (not
mailhook's code), reads, decrypts and schema-checks it with other off-the-shelf libraries,
and records what it saw. Its behaviour can be switched while it runs:

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
Every request is verified this way, over the raw body, whatever its format.

Formats (mailhook's wire formats; each read with an off-the-shelf library), told apart by:
  content-type application/cloudevents-batch+json   a CloudEvents batch: a JSON array, each
                                                    element read by the `cloudevents` SDK's
                                                    JSON format
  content-type application/cloudevents+json         a structured CloudEvent (SDK)
  a ce-specversion header                           a binary CloudEvent (SDK; it
                                                    percent-decodes the ce- headers)
  anything else                                     Standard Webhooks: application/json (an
                                                    object, or an array when batched) or
                                                    application/jose (that JSON encrypted)
Encryption: --private-key FILE (a private JWK, or a JWK Set {"keys": [...]}, as JSON)
decrypts with `jwcrypto`: a Standard Webhooks body of content-type application/jose, and a
CloudEvent's data whose datacontenttype is application/jose (a JWE compact string, or the
body in binary mode). The key is chosen by the JWE's `kid` (a JWK's "kid", else its RFC 7638
thumbprint). The JWE must be compact, with alg ECDH-ES+A256KW, enc A256GCM and kid, epk and
cty "json" in its protected header. Without the key the delivery is recorded with a
`decryptError` (and its data is not schema-checked).

Schemas: every event's data is validated with `jsonschema` (Draft 2020-12, formats checked)
against the schema files in --schemas DIR (default: the repository's schemas/v1; `$ref`s
between them resolve through a `referencing` registry): DIR/<mode>/<event type>.json (mode
full, metadata or anonymized) and DIR/endpoint.verification.json. A CloudEvent's
`dataschema` (https://mailhook.io/schemas/v1/...) names its file; a Standard Webhooks body's
`type` names the event type, and its data must match --payload-mode's schema if given, else
at least one mode's. Dead-letter sink deliveries are validated the same way. A missing
schema file is an error; so is anything that does not parse, a JWE header other than the
above, a Standard Webhooks body without type, timestamp or data, a CloudEvent without one
of its required attributes or whose dataschema is not its type's (or not --payload-mode's),
and a mailhook-batch-size header that does not count the batch (a Standard Webhooks batch
must have one). Errors are recorded in `schemaErrors` and never change the answer.

Each delivery record also says its `contentType`, `format` (standardWebhooks |
cloudEvents.binary | cloudEvents.structured | cloudEvents.batch), `batchSize`, `encrypted`,
`schemaErrors`, `decryptError`, and `events`: one per event of the request, each {"type"
(without io.mailhook.), "id" (the CloudEvents id, or null), "data" (decoded, decrypted),
"attributes" (the CloudEvents attributes but data, as strings; `time` as sent; {} for
Standard Webhooks), "deadLetter" (a Standard Webhooks body's deadLetter object, or null),
"kid" (the JWE's kid, or null)}. `body` stays the raw body. A body shorter than its
Content-Length (its sender died while sending it) is marked `truncated` and not read.

Verification challenges (a Standard Webhooks `endpoint.verification` body, or a CloudEvent
of type io.mailhook.endpoint.verification) are answered {"challenge": <data.challenge>}.

TLS: --tls-cert/--tls-key serve HTTPS; --client-ca also requires a client certificate
signed by that CA (mutual TLS). The control endpoints above are then on a separate plain
HTTP port on 127.0.0.1 (the CPORT it prints).

Usage: receiver.py (--secret whsec_... | --public-key whpk_...) [--host 127.0.0.1] [--port 0]
                   [--tls-cert F --tls-key F [--client-ca F]] [--private-key JWK-FILE]
                   [--schemas DIR] [--payload-mode full|metadata|anonymized] [--quiet]
Only `standardwebhooks` is needed for plain Standard Webhooks (the demo); the other
libraries (tests/requirements.txt) are imported when a delivery needs them.
Prints "listening on PORT" (and " control CPORT" with TLS) once ready.
"""

import argparse
import base64
import json
import os
import socket
import ssl
import sys
import threading
import time
import traceback
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

SCHEMA_URL = "https://mailhook.io/schemas/v1/"
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
MODES = ("full", "metadata", "anonymized")
TYPE_PREFIX = "io.mailhook."
VERIFICATION = "endpoint.verification"
# What the JWE's protected header must say (besides a kid and an epk).
JWE_HEADER = {"alg": "ECDH-ES+A256KW", "enc": "A256GCM", "cty": "json"}


class Ed25519Webhook:
    """Standard Webhooks `v1a`: ed25519 over `{webhook-id}.{webhook-timestamp}.{body}`."""

    def __init__(self, public_key, tolerance=300):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        raw = base64.b64decode(public_key.removeprefix("whpk_"))
        self.key = Ed25519PublicKey.from_public_bytes(raw)
        self.tolerance = tolerance

    def verify(self, body, headers, json_parse=True):
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
                return json.loads(body) if json_parse else None
            except (InvalidSignature, ValueError):
                continue
        raise WebhookVerificationError("no v1a signature verifies with the public key")


def media_type(value):
    """`application/json; charset=utf-8` -> `application/json`."""
    return (value or "").split(";", 1)[0].strip().lower()


def is_json_type(value):
    kind = media_type(value)
    return kind == "application/json" or kind.endswith("+json")


def shorten(text, limit=240):
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def why(e):
    """An exception as a line (str(), not repr(): the SDK's validation error lists its
    errors only there)."""
    return shorten(f"{type(e).__name__}: {e}", 400)


class DecryptError(Exception):
    """Encrypted data this receiver cannot decrypt (no key given, none with its kid, or the
    wrong one). Recorded as `decryptError`, not as a schema error: tests may mean it."""


class Keys:
    """The private JWKs of --private-key (a JWK or a JWK Set), by kid: a JWK's "kid", else
    its RFC 7638 SHA-256 thumbprint (what mailhook puts in the JWE header)."""

    def __init__(self, path):
        from jwcrypto import jwk

        with open(path) as f:
            doc = json.load(f)
        self.keys = {}
        for params in doc["keys"] if "keys" in doc else [doc]:
            key = jwk.JWK(**params)
            if not key.has_private:
                name = params.get("kid") or key.thumbprint()
                raise ValueError(f"{path}: the key {name} is not private")
            self.keys[params.get("kid") or key.thumbprint()] = key

    def decrypt(self, token, kid):
        key = self.keys.get(kid)
        if key is None:
            raise DecryptError(f"no private key with kid {kid!r} (have {sorted(self.keys)})")
        try:
            token.decrypt(key)
        except Exception as e:
            raise DecryptError(f"decrypting with the key {kid!r} failed: {e!r}") from e
        return token.payload


def open_jwe(compact, keys, problems):
    """The JSON value a JWE compact serialization carries, and its kid. A JWE that breaks
    the contract (not compact, header other than JWE_HEADER) adds to `problems`, and raises
    if it cannot be read at all; one this receiver has no key for raises DecryptError."""
    from jwcrypto import jwe

    if isinstance(compact, (bytes, bytearray)):
        compact = bytes(compact).decode("ascii")
    if not isinstance(compact, str):
        raise ValueError(f"encrypted data is a {type(compact).__name__}, not a JWE compact string")
    if compact.count(".") != 4:
        raise ValueError("encrypted data is not a JWE compact serialization (5 parts)")
    token = jwe.JWE()
    token.deserialize(compact)
    header = json.loads(token.objects["protected"])
    for name, want in JWE_HEADER.items():
        if header.get(name) != want:
            problems.append(f"JWE protected header: {name} is {header.get(name)!r}, not {want!r}")
    for name in ("kid", "epk"):
        if name not in header:
            problems.append(f"JWE protected header has no {name}")
    kid = header.get("kid")
    if keys is None:
        raise DecryptError("encrypted, and no --private-key to decrypt it", kid)
    try:
        plaintext = keys.decrypt(token, kid)
    except DecryptError as e:
        raise DecryptError(str(e), kid) from e
    try:
        return json.loads(plaintext), kid
    except ValueError as e:
        raise ValueError(f"the decrypted data is not JSON: {e}") from e


class Schemas:
    """The JSON Schemas (2020-12) of --schemas, loaded once: every *.json under the
    directory, registered under https://mailhook.io/schemas/v1/<path> (and its $id) so that
    they can `$ref` each other."""

    def __init__(self, root):
        self.root = root
        self.load_error = None
        self.lock = threading.Lock()
        self.files = None  # path under root -> parsed contents, or why it cannot be used
        self.registry = None
        self.validators = {}  # path under root -> validator, or a list of errors

    def _load(self):
        self.files = {}
        try:
            import jsonschema  # noqa: F401 (here, so that a missing library is said once)
            from referencing import Registry, Resource
            from referencing.jsonschema import DRAFT202012
        except ImportError as e:
            self.load_error = f"cannot validate: {e} (pip install -r tests/requirements.txt)"
            # Said once here, not per delivery.
            print(f"SCHEMA: {self.load_error}", file=sys.stderr, flush=True)
            return
        resources = []
        for folder, _, names in os.walk(self.root):
            for name in sorted(names):
                if not name.endswith(".json"):
                    continue
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, self.root).replace(os.sep, "/")
                try:
                    with open(path) as f:
                        contents = json.load(f)
                    resource = Resource.from_contents(contents, default_specification=DRAFT202012)
                except Exception as e:
                    self.files[rel] = f"schema {path} cannot be read: {e!r}"
                    continue
                self.files[rel] = contents
                resources.append((SCHEMA_URL + rel, resource))
                own_id = contents.get("$id") if isinstance(contents, dict) else None
                if isinstance(own_id, str) and own_id != SCHEMA_URL + rel:
                    resources.append((own_id, resource))
        self.registry = Registry().with_resources(resources)

    def _validator(self, rel):
        if self.load_error:
            return [self.load_error]
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError

        contents = self.files.get(rel)
        if contents is None:
            return [f"no schema for {rel} ({os.path.join(self.root, rel)} does not exist)"]
        if isinstance(contents, str):
            return [contents]
        declared = DRAFT_2020_12
        if isinstance(contents, dict):
            declared = contents.get("$schema", DRAFT_2020_12)
        if str(declared).rstrip("#") != DRAFT_2020_12:
            return [f"schema {rel} is {declared}, not JSON Schema 2020-12"]
        try:
            Draft202012Validator.check_schema(contents)
        except SchemaError as e:
            return [f"schema {rel} is not a valid 2020-12 schema: {shorten(e.message)}"]
        # By reference, so that the schema's own relative `$ref`s resolve against its URL.
        return Draft202012Validator(
            {"$ref": SCHEMA_URL + rel},
            registry=self.registry,
            format_checker=Draft202012Validator.FORMAT_CHECKER,
        )

    def unavailable(self):
        """Why nothing can be validated (a library is missing), or None."""
        with self.lock:
            if self.files is None:
                self._load()
            return self.load_error

    def validate(self, rel, data):
        """Why `data` does not match the schema at `rel` (empty if it does)."""
        with self.lock:  # validators resolve lazily: one thread at a time
            if self.files is None:
                self._load()
            if rel not in self.validators:
                self.validators[rel] = self._validator(rel)
            validator = self.validators[rel]
            if isinstance(validator, list):
                return validator
            errors = validator.iter_errors(data)
            errors = sorted(errors, key=lambda e: [str(p) for p in e.absolute_path])
        found = [f"{rel}: {e.json_path}: {shorten(e.message)}" for e in errors[:5]]
        if len(errors) > 5:
            found.append(f"{rel}: ... and {len(errors) - 5} more")
        return found


class Event:
    """One event of a delivery, as recorded (see `record`)."""

    def __init__(self, kind, data, *, id=None, attributes=None, dead_letter=None, kid=None,
                 dataschema=None, cloud=False, readable=True):
        self.kind, self.data, self.id = kind, data, id
        self.attributes = attributes or {}
        self.dead_letter, self.kid = dead_letter, kid
        self.dataschema, self.cloud = dataschema, cloud
        self.readable = readable  # False: encrypted and not decrypted, nothing to check

    def record(self):
        return {"type": self.kind, "id": self.id, "data": self.data, "attributes": self.attributes,
                "deadLetter": self.dead_letter, "kid": self.kid}


class Inspector:
    """Reads a delivery in whichever format it came, decrypts it and checks every event's
    data against its schema."""

    def __init__(self, keys, schemas, payload_mode):
        self.keys, self.schemas, self.payload_mode = keys, schemas, payload_mode

    def warm_up(self):
        """Imports the libraries and loads the schemas before the first delivery, which could
        otherwise keep a burst of new connections waiting long enough to overflow the listen
        backlog. A library that is missing is said when (if ever) a delivery needs it."""
        for module in ("cloudevents.core.bindings.http", "cloudevents.core.formats.json",
                       "jwcrypto.jwe"):
            try:
                __import__(module)
            except ImportError:
                pass
        self.schemas.unavailable()  # loads them (each validator is built when first used)

    def inspect(self, body, headers):
        """The record fields describing the delivery; never raises."""
        problems, decrypt_errors = [], []
        content_type = headers.get("content-type")
        kind = media_type(content_type)
        if kind == "application/cloudevents-batch+json":
            fmt, read = "cloudEvents.batch", self.cloud_events_batch
        elif kind == "application/cloudevents+json":
            fmt, read = "cloudEvents.structured", self.cloud_event_structured
        elif "ce-specversion" in headers:
            fmt, read = "cloudEvents.binary", self.cloud_event_binary
        else:
            fmt, read = "standardWebhooks", self.standard_webhooks
        events, batch_size = [], None
        try:
            events, batch_size = read(body, headers, problems, decrypt_errors)
        except DecryptError as e:
            decrypt_errors.append(str(e.args[0]))
        except Exception as e:
            problems.append(f"cannot read the delivery as {fmt}: {why(e)}")
            traceback.print_exc(file=sys.stderr)
        for event in events:
            try:
                self.check(event, problems)
            except Exception as e:
                problems.append(f"{event.kind}: cannot validate: {why(e)}")
                traceback.print_exc(file=sys.stderr)
        encrypted = kind == "application/jose" or any(
            media_type(e.attributes.get("datacontenttype")) == "application/jose" for e in events
        )
        return {
            "contentType": content_type,
            "format": fmt,
            "batchSize": batch_size if batch_size is not None else len(events),
            "events": [e.record() for e in events],
            "encrypted": encrypted,
            "schemaErrors": problems,
            "decryptError": "; ".join(decrypt_errors) or None,
        }

    # -- Standard Webhooks -------------------------------------------------------------

    def standard_webhooks(self, body, headers, problems, decrypt_errors):
        kind = media_type(headers.get("content-type"))
        declared = headers.get("mailhook-batch-size")
        kid = None
        if kind == "application/jose":
            try:
                doc, kid = open_jwe(body, self.keys, problems)
            except DecryptError as e:
                decrypt_errors.append(str(e.args[0]))
                # The events are inside: how many, only the batch header says.
                return [], int(declared) if declared and declared.isdigit() else 1
        else:
            if kind != "application/json":
                problems.append(f"content-type {headers.get('content-type')!r} is neither "
                                "application/json nor application/jose")
            doc = json.loads(body)
        if isinstance(doc, list):
            bodies = doc
            if declared is None:
                problems.append("a batch (JSON array) without a mailhook-batch-size header")
            elif declared != str(len(doc)):
                problems.append(f"mailhook-batch-size says {declared}, the batch holds {len(doc)}")
        else:
            bodies = [doc]
            if declared is not None:
                problems.append(f"mailhook-batch-size {declared} on a body that is not a batch "
                                "(JSON array)")
        events = []
        for i, one in enumerate(bodies):
            where = f"body[{i}]" if isinstance(doc, list) else "body"
            if not isinstance(one, dict):
                problems.append(f"{where} is not a JSON object")
                continue
            for name in ("type", "timestamp", "data"):
                if name not in one:
                    problems.append(f"{where} has no {name!r}")
            kind_ = one.get("type")
            kind_ = kind_ if isinstance(kind_, str) else str(kind_ or "")
            events.append(Event(kind_, one.get("data"), dead_letter=one.get("deadLetter"), kid=kid))
        return events, len(bodies)

    # -- CloudEvents ---------------------------------------------------------------------

    def cloud_event_binary(self, body, headers, problems, decrypt_errors):
        from cloudevents.core.bindings.http import HTTPMessage, from_binary
        from cloudevents.core.formats.json import JSONFormat

        event = from_binary(HTTPMessage(headers=dict(headers), body=body), JSONFormat())
        if body and is_json_type(headers.get("content-type")):
            try:  # the SDK falls back to text when a JSON body does not parse
                json.loads(body)
            except ValueError as e:
                problems.append(f"the body is not the JSON its content-type says: {e}")
        wire = {n[3:]: unquote(value) for n, value in headers.items() if n.startswith("ce-")}
        if "content-type" in headers:
            wire["datacontenttype"] = headers["content-type"]
        return [self.cloud_event(event, wire, problems, decrypt_errors)], 1

    def cloud_event_structured(self, body, headers, problems, decrypt_errors):
        from cloudevents.core.bindings.http import HTTPMessage, from_structured
        from cloudevents.core.formats.json import JSONFormat

        event = from_structured(HTTPMessage(headers=dict(headers), body=body), JSONFormat())
        return [self.cloud_event(event, json.loads(body), problems, decrypt_errors)], 1

    def cloud_events_batch(self, body, headers, problems, decrypt_errors):
        from cloudevents.core.formats.json import JSONFormat

        batch = json.loads(body)
        if not isinstance(batch, list):
            raise ValueError("a CloudEvents batch must be a JSON array")
        declared = headers.get("mailhook-batch-size")
        if declared is not None and declared != str(len(batch)):
            problems.append(f"mailhook-batch-size says {declared}, the batch holds {len(batch)}")
        events = []
        for i, element in enumerate(batch):
            try:
                event = JSONFormat().read(None, json.dumps(element).encode())
                events.append(self.cloud_event(event, element, problems, decrypt_errors))
            except Exception as e:
                problems.append(f"batch[{i}] is not a CloudEvent: {why(e)}")
        return events, len(batch)

    def cloud_event(self, event, wire, problems, decrypt_errors):
        """An Event from the SDK's CloudEvent, its data decrypted if it is encrypted. `wire`:
        the attributes as sent (the SDK makes up an id and a time when they are missing)."""
        label = f"{wire.get('type')} {wire.get('id')}"
        for name in ("specversion", "id", "source", "type"):
            if name not in wire:
                problems.append(f"{label}: the required attribute {name} was not sent")
        attributes = {}
        for name, value in event.get_attributes().items():
            if value is None or name not in wire:
                continue
            if name == "time" and isinstance(wire["time"], str):
                value = wire["time"]  # as sent: the SDK's datetime keeps microseconds only
            elif isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, bool):
                value = "true" if value else "false"
            attributes[name] = value if isinstance(value, str) else str(value)
        full_type = event.get_type()
        kind = full_type.removeprefix(TYPE_PREFIX)
        if kind == full_type:
            problems.append(f"CloudEvent type {full_type!r} does not start with {TYPE_PREFIX!r}")
        data, kid, readable = event.get_data(), None, True
        if media_type(event.get_datacontenttype()) == "application/jose":
            try:
                data, kid = open_jwe(data, self.keys, problems)
            except DecryptError as e:
                decrypt_errors.append(f"{kind} {attributes.get('id')}: {e.args[0]}")
                data, kid, readable = None, (e.args[1] if len(e.args) > 1 else None), False
            except Exception as e:  # not a JWE, or not JSON inside
                problems.append(f"{kind} {attributes.get('id')}: encrypted data: {why(e)}")
                data, readable = None, False
        elif isinstance(data, (bytes, bytearray)):  # data_base64
            try:
                data = json.loads(data) if is_json_type(event.get_datacontenttype()) else None
            except ValueError:
                data = None
            if data is None:
                data = base64.b64encode(event.get_data()).decode()
        return Event(kind, data, id=attributes.get("id"), attributes=attributes, kid=kid,
                     dataschema=event.get_dataschema(), cloud=True, readable=readable)

    # -- schemas -------------------------------------------------------------------------

    def check(self, event, problems):
        if not event.readable:
            return
        label = event.kind or "(no type)"
        unavailable = self.schemas.unavailable()
        if unavailable:
            problems.append(f"{label}: {unavailable}")
            return
        if event.cloud:
            url = event.dataschema
            if url is None:
                problems.append(f"{label} {event.id}: no dataschema attribute")
                return
            if not url.startswith(SCHEMA_URL):
                problems.append(f"{label} {event.id}: dataschema {url} is not under {SCHEMA_URL}")
                return
            rel = url[len(SCHEMA_URL):]
            parts = rel.split("/")
            if parts[-1] != f"{event.kind}.json":
                problems.append(f"{label} {event.id}: dataschema {url} is not its type's")
            if self.payload_mode and len(parts) == 2 and parts[0] != self.payload_mode:
                problems.append(f"{label} {event.id}: dataschema {url} is not of --payload-mode "
                                f"{self.payload_mode}")
            errors = self.schemas.validate(rel, event.data)
            problems.extend(f"{label} {event.id}: {e}" for e in errors)
            return
        if not event.kind:
            problems.append("a Standard Webhooks body without an event type: no schema to check")
            return
        if event.kind == VERIFICATION:
            candidates = [f"{VERIFICATION}.json"]
        else:
            modes = [self.payload_mode] if self.payload_mode else MODES
            candidates = [f"{mode}/{event.kind}.json" for mode in modes]
        results = [(rel, self.schemas.validate(rel, event.data)) for rel in candidates]
        if any(not errors for _, errors in results):
            return
        if len(results) == 1:
            problems.extend(f"{label}: {e}" for e in results[0][1])
        elif all(errors[0].startswith("no schema for ") for _, errors in results):
            problems.append(f"{label}: no schema for {event.kind} in {self.schemas.root} "
                            f"(looked for {', '.join(candidates)})")
        else:
            firsts = [
                errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
                for _, errors in results
            ]
            problems.append(f"{label}: the data matches no payload mode's schema: "
                            + "; ".join(firsts))


class Server(ThreadingHTTPServer):
    request_queue_size = 128  # a burst of new connections (concurrency) must not be refused

    def handle_error(self, request, client_address):
        # A sender killed mid-request (the durability tests do it on purpose) resets its
        # connection: expected, not worth a traceback. Anything else is still printed.
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)


class State:
    def __init__(self, secret=None, public_key=None, inspector=None):
        self.webhook = Ed25519Webhook(public_key) if public_key else Webhook(secret)
        self.inspector = inspector
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
                try:
                    mode = json.loads(body)
                    with state.lock:
                        state.status = int(mode.get("status", state.status))
                        state.redirect = mode.get("redirect", state.redirect)
                        state.echo = bool(mode.get("echo", state.echo))
                        state.delay = float(mode.get("delay", state.delay))
                except (ValueError, TypeError, AttributeError) as e:
                    return self.reply(400, f"bad mode: {e}\n".encode())
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
            except Exception:  # a bug here must not leave the request unanswered
                traceback.print_exc(file=sys.stderr)
                status, answer = state.status, b""
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
            try:  # over the raw body, whatever the format
                state.webhook.verify(body, headers, json_parse=False)
                verified = True
            except Exception as e:  # WebhookVerificationError, or headers it cannot even read
                verified = False
                print(f"VERIFICATION FAILED: {e!r}", file=sys.stderr, flush=True)
            if len(body) < int(headers.get("content-length", "0")):
                # The sender died while sending it: nothing to read, and no one to answer.
                seen = {"contentType": headers.get("content-type"), "truncated": True,
                        "schemaErrors": []}
            else:
                seen = state.inspector.inspect(body, headers)
            for problem in seen["schemaErrors"]:
                said = state.inspector.schemas.load_error
                if said and said in problem:
                    continue  # said once already
                where = f"{self.path} {headers.get('webhook-id')}"
                print(f"SCHEMA: {where}: {problem}", file=sys.stderr, flush=True)
            with state.lock:
                status = state.status
                state.deliveries.append(
                    {
                        "webhookId": headers.get("webhook-id"),
                        "verified": verified,
                        "answered": status,
                        "body": body.decode("utf-8", "replace"),
                        "headers": {k: v for k, v in headers.items() if k.startswith(("x-", "mailhook-"))},
                        "signatures": headers.get("webhook-signature", ""),
                        "clientCert": client_cert(self.connection),
                        "path": self.path,
                        "inFlight": in_flight,
                        "orphaned": orphaned,
                        "arrived": self.arrived,
                        "port": self.client_address[1],
                        **seen,
                    }
                )
            events = seen.get("events", [])
            challenge = next((e for e in events if e["type"] == VERIFICATION), None)
            if verified and challenge is not None:
                data = challenge["data"] if isinstance(challenge["data"], dict) else {}
                if not state.echo:
                    return 200, b"{}"
                return 200, json.dumps({"challenge": data.get("challenge", "")}).encode()
            if verified and status < 300 and not quiet:
                try:
                    lines = "".join(self.line(e) for e in events)
                except Exception as e:  # an unexpected data shape: say so, and answer anyway
                    lines = f"verified {self.path:<11} (cannot summarize: {e!r})\n"
                with state.lock:  # one write per delivery: threads must not interleave
                    sys.stdout.write(lines)
                    sys.stdout.flush()
            return (status if verified else 401), b""

        def line(self, event):
            data = event["data"] if isinstance(event["data"], dict) else {}
            who = str(data.get("mailbox") or data.get("mailboxDomain") or "-")
            flags = [f["name"] for f in data.get("flags") or []]
            tags = f"flags={flags}" if flags else f"filters={data.get('matchedFilters', [])}"
            return (
                f"verified {self.path:<11} {event['type']:<19} {who:<28} "
                f"{str(data.get('subject') or '')[:34]!r:<36} {tags}\n"
            )

    return Handler


def default_schemas():
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "schemas", "v1"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--secret")
    parser.add_argument("--public-key")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--client-ca")
    parser.add_argument("--private-key", help="a private JWK (or JWK Set) file, to decrypt with")
    parser.add_argument("--schemas", default=default_schemas(), help="default: schemas/v1")
    parser.add_argument("--payload-mode", choices=MODES, help="for Standard Webhooks data")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if not (args.secret or args.public_key):
        parser.error("give --secret or --public-key")
    keys = Keys(args.private_key) if args.private_key else None
    inspector = Inspector(keys, Schemas(args.schemas), args.payload_mode)
    inspector.warm_up()
    state = State(args.secret, args.public_key, inspector)
    server = Server((args.host, args.port), make_handler(state, args.quiet))
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
    control = Server(("127.0.0.1", 0), make_handler(state, args.quiet))
    threading.Thread(target=control.serve_forever, daemon=True).start()
    print(f"listening on {server.server_address[1]} control {control.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
