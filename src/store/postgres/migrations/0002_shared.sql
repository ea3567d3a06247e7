-- mailhook store, schema version 2: what several replicas sharing the store need.
-- Deliveries carry their subscription, event and shard as columns (a replica claims a
-- shard's rows by them), the claim that fences writes made under a lost ownership, and
-- seqs come from one sequence (their order is the order of acknowledgement, whichever
-- replica took the event).

ALTER TABLE pending
    ADD COLUMN subscription text,
    ADD COLUMN event_id     text,
    ADD COLUMN shard        integer,
    -- The ownership epoch of the replica that loaded the row; NULL until one has.
    ADD COLUMN claim        bigint;
ALTER TABLE dead_letters
    ADD COLUMN subscription text,
    ADD COLUMN event_id     text,
    ADD COLUMN shard        integer;

UPDATE pending SET
    subscription = convert_from(body, 'UTF8')::jsonb ->> 'subscription',
    event_id     = convert_from(body, 'UTF8')::jsonb ->> 'eventId';
UPDATE dead_letters SET
    subscription = convert_from(body, 'UTF8')::jsonb ->> 'subscription',
    event_id     = convert_from(body, 'UTF8')::jsonb ->> 'eventId';

-- Partial on `shard IS NOT NULL`: a single-owner operator leaves the shard unset and pays
-- for none of these (shared mode sets it on every row, and on older rows at its start).
CREATE INDEX pending_by_shard ON pending (shard, seq) WHERE shard IS NOT NULL;
-- New rows no replica has loaded yet: what each shard's owner polls for.
CREATE INDEX pending_unclaimed ON pending (shard) WHERE claim IS NULL AND shard IS NOT NULL;
CREATE INDEX pending_by_event ON pending (event_id) WHERE shard IS NOT NULL;
CREATE INDEX dead_letters_by_shard ON dead_letters (shard) WHERE shard IS NOT NULL;
CREATE INDEX dead_letters_by_event ON dead_letters (event_id) WHERE shard IS NOT NULL;

CREATE SEQUENCE delivery_seq;
SELECT setval('delivery_seq', GREATEST(
    (SELECT COALESCE(max(seq), 0) FROM pending),
    (SELECT COALESCE(max(seq), 0) FROM dead_letters)) + 1, false);

-- A new number for every shard a replica takes: the fencing token of its claims.
CREATE SEQUENCE claim_epochs;

-- Who owns each shard (the advisory lock decides; this row names the pod for people and
-- the status, and holds the epoch).
CREATE TABLE shard_owners (
    shard integer PRIMARY KEY,
    owner text NOT NULL,
    epoch bigint NOT NULL,
    since timestamptz NOT NULL DEFAULT now()
);

-- Delivery health of each subscription as its shard's owner last published it; the
-- leader writes status from these rows.
CREATE TABLE subscription_health (
    uid        text PRIMARY KEY,
    owner      text NOT NULL,
    body       jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Deliveries made, per subscription, counted in the commit that completes them: the
-- count survives any replica, and a delivery made again after a crash counts once.
CREATE TABLE subscription_counters (
    uid       text PRIMARY KEY,
    delivered bigint NOT NULL DEFAULT 0
);
