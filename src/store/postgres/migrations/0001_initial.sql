-- mailhook store, schema version 1: the same records as the redb backend's tables.

-- Events by id, as JSON.
CREATE TABLE events (
    id          text PRIMARY KEY,
    body        jsonb NOT NULL,
    accepted_at timestamptz NOT NULL DEFAULT now()
);

-- Producer event id -> the event it first produced: de-duplication is this primary key.
CREATE TABLE producers (
    producer_id text PRIMARY KEY,
    event_id    text NOT NULL,
    seen_at     timestamptz NOT NULL
);
CREATE INDEX producers_by_age ON producers (seen_at);

-- Deliveries waiting (per subscription, due time, ordering key, seq).
CREATE TABLE pending (
    seq          bigint PRIMARY KEY,
    subscription text NOT NULL,
    event_id     text NOT NULL,
    attempts     integer NOT NULL,
    not_before   timestamptz NOT NULL,
    accepted_at  timestamptz NOT NULL,
    ordering_key text,
    body         jsonb NOT NULL
);
CREATE INDEX pending_due ON pending (subscription, not_before);

-- Dead letters, with why and when they were given up.
CREATE TABLE dead_letters (
    seq          bigint PRIMARY KEY,
    subscription text NOT NULL,
    event_id     text NOT NULL,
    dead_at      timestamptz NOT NULL,
    reason       text NOT NULL,
    body         jsonb NOT NULL
);
CREATE INDEX dead_letters_by_subscription ON dead_letters (subscription, dead_at);

-- The attempt log: one subscription's attempts are one key range, in time order.
CREATE TABLE attempts (
    subscription text NOT NULL,
    at_nanos     bigint NOT NULL,
    body         jsonb NOT NULL,
    PRIMARY KEY (subscription, at_nanos)
);

-- Raw messages by SHA-256, with the time archived (retention reads the index only).
CREATE TABLE raw_messages (
    sha256      text PRIMARY KEY,
    archived_at timestamptz NOT NULL,
    message     bytea NOT NULL
);
CREATE INDEX raw_messages_by_age ON raw_messages (archived_at);

-- Subscription UID -> namespace, for every subscription that had deliveries.
CREATE TABLE subscriptions (
    uid       text PRIMARY KEY,
    namespace text NOT NULL
);

-- Secrets kept with the data (name -> 32 bytes).
CREATE TABLE meta (
    name  text PRIMARY KEY,
    value bytea NOT NULL
);
