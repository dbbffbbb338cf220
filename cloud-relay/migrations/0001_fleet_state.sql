-- The relay's fleet store, version 1. Portable SQL: the same file runs on SQLite and PostgreSQL.
--
-- `state` holds one JSON body per (kind, key): kind 'device' (a device's spool streams, status
-- and latest telemetry), 'evidence' (its calibration evidence and certificates, per model),
-- 'control' (its config documents, versions, acks and tuned thresholds) and 'kv' (fleet-wide:
-- operator overrides, config epochs, rollouts). `rev` is the revision of the batch that last
-- wrote the row: replicas that do not write follow the store with `rev > last seen`.
CREATE TABLE state (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    body TEXT NOT NULL,
    rev BIGINT NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE INDEX state_rev ON state (rev);

-- The writer's lease: one row. `epoch` grows at every takeover and every batch checks it
-- (fencing: a replica that lost the lease cannot write); `rev` counts the batches written.
CREATE TABLE lease (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    epoch BIGINT NOT NULL,
    holder TEXT NOT NULL,
    api_url TEXT NOT NULL,
    since_ms BIGINT NOT NULL,
    rev BIGINT NOT NULL
);
INSERT INTO lease (id, epoch, holder, api_url, since_ms, rev) VALUES (1, 0, '', '', 0, 0);
