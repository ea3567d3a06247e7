-- mailhook store, schema version 5: the audit log, an append-only Merkle tree (RFC 6962
-- hashing). Leaves are appended in commit order: a commit that appends takes the head
-- row's lock, so replicas sharing the database grow one tree.

CREATE TABLE audit_head (
    id       smallint PRIMARY KEY CHECK (id = 1),
    size     bigint   NOT NULL, -- leaves appended
    -- The hashes of the complete subtrees making up the tree, 32 bytes each, largest
    -- first: all an append reads, in the row it locks, so the lock is held briefly.
    frontier bytea    NOT NULL
);
INSERT INTO audit_head (id, size, frontier) VALUES (1, 0, ''::bytea);

-- The tree's stored hashes (tlog's layout: a leaf's hash and the subtrees it completes).
CREATE TABLE audit_hashes (
    idx  bigint PRIMARY KEY,
    hash bytea  NOT NULL
);

-- The leaves: each record's exact bytes, and the event whose acceptance it records.
CREATE TABLE audit_records (
    idx      bigint PRIMARY KEY,
    body     bytea  NOT NULL,
    event_id text
);
CREATE INDEX audit_records_by_event ON audit_records (event_id) WHERE event_id IS NOT NULL;

-- Each event's acceptance leaf, looked up for every event read back for delivery: a narrow
-- table of its own, so the lookup is one probe of a small index.
CREATE TABLE audit_accepted (
    event_id text   PRIMARY KEY,
    idx      bigint NOT NULL
);

-- Signed checkpoints (C2SP signed notes), one per tree size; the newest is the largest.
CREATE TABLE audit_checkpoints (
    size bigint PRIMARY KEY,
    note bytea  NOT NULL
);
