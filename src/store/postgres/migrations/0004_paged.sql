-- mailhook store, schema version 4: the paged queues of a database one operator owns.
-- Each subscription's queue and dead letters are key ranges read a page at a time
-- (memory keeps a window), events count what refers to them, and each subscription's
-- figures are kept with the data. Several replicas sharing a database keep using
-- `pending` and `dead_letters` (rows move between the layouts when a database changes
-- mode: see the store's start-up).

CREATE TABLE queue (
    subscription text   NOT NULL,
    seq          bigint NOT NULL,
    due          bigint NOT NULL, -- unix nanoseconds
    event_id     text   NOT NULL,
    body         bytea  NOT NULL,
    PRIMARY KEY (subscription, seq)
);
-- An unordered queue is read by due time.
CREATE INDEX queue_by_due ON queue (subscription, due, seq);

CREATE TABLE dead_queue (
    subscription text   NOT NULL,
    seq          bigint NOT NULL,
    dead_at      bigint NOT NULL, -- unix nanoseconds
    event_id     text   NOT NULL,
    body         bytea  NOT NULL,
    PRIMARY KEY (subscription, seq)
);
CREATE INDEX dead_queue_by_time ON dead_queue (subscription, dead_at, seq);

-- Deliveries and dead letters that refer to the event: it goes with the last.
ALTER TABLE events ADD COLUMN refs integer NOT NULL DEFAULT 0;

-- (queued, bytes of their events, dead letters) per subscription.
CREATE TABLE queue_stats (
    uid    text PRIMARY KEY,
    queued bigint NOT NULL,
    bytes  bigint NOT NULL,
    dead   bigint NOT NULL
);

-- Counters kept with the data (the next seq the paged store hands out).
CREATE TABLE store_counters (
    name  text PRIMARY KEY,
    value bigint NOT NULL
);
