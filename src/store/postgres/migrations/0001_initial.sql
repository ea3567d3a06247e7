-- mailhook store, schema version 1: the records of the embedded (redb) store, one table
-- each, keyed the same way. Bodies are the store's own JSON encoding, kept as bytes.
-- (Several replicas will claim deliveries by columns of their own: a later version.)

-- Events by id.
CREATE TABLE events (
    id   text PRIMARY KEY,
    body bytea NOT NULL
);

-- Producer event id -> the event it first produced: de-duplication is this primary key.
CREATE TABLE producers (
    producer_id text PRIMARY KEY,
    event_id    text NOT NULL,
    seen_at     bigint NOT NULL -- unix seconds
);
CREATE INDEX producers_by_age ON producers (seen_at);

-- Deliveries waiting, by seq.
CREATE TABLE pending (
    seq  bigint PRIMARY KEY,
    body bytea NOT NULL
);

-- Dead letters, by seq (the body says why and when).
CREATE TABLE dead_letters (
    seq  bigint PRIMARY KEY,
    body bytea NOT NULL
);

-- The attempt log: one subscription's attempts are one key range, in time order.
CREATE TABLE attempts (
    subscription text NOT NULL,
    at_nanos     bigint NOT NULL,
    body         bytea NOT NULL,
    PRIMARY KEY (subscription, at_nanos)
);

-- Raw messages by SHA-256, with the time archived (retention reads the index only).
CREATE TABLE raw_messages (
    sha256      text PRIMARY KEY,
    archived_at bigint NOT NULL, -- unix seconds
    message     bytea NOT NULL
);
CREATE INDEX raw_messages_by_age ON raw_messages (archived_at, sha256);

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
