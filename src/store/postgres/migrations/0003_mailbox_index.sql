-- mailhook store, schema version 3: the mailbox index of the Dovecot source. Keys are the
-- store's byte layout (user NUL folder NUL, then UIDVALIDITY and UID big-endian): one
-- user's or one folder's entries are one key range. Bodies are the store's JSON, as bytes.
CREATE TABLE mailbox_index (
    key       bytea PRIMARY KEY,
    user_name text NOT NULL,
    seen_at   bigint NOT NULL, -- unix seconds indexed; retention reads this index
    body      bytea NOT NULL
);
CREATE INDEX mailbox_index_by_age ON mailbox_index (seen_at);
CREATE INDEX mailbox_index_by_user ON mailbox_index (user_name);
