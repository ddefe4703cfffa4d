-- Requests sent through a Batch API: one row per batch, written before its file is uploaded, so a
-- killed run finds the batch it made and attaches to it instead of paying for it again.
CREATE TABLE batches (
    id             INTEGER PRIMARY KEY,
    run_id         INTEGER REFERENCES runs(id),
    stage          TEXT NOT NULL,
    base_url       TEXT NOT NULL,
    model          TEXT NOT NULL,
    -- preparing (row written), uploaded (input_file_id known), then the API's own states
    -- (validating, in_progress, finalizing, completed, failed, expired, cancelled); abandoned for a
    -- row whose upload never got on record (nothing was created from it).
    status         TEXT NOT NULL,
    input_file_id  TEXT,
    batch_id       TEXT,
    output_file_id TEXT,
    error_file_id  TEXT,
    requests       INTEGER NOT NULL,
    completed      INTEGER NOT NULL DEFAULT 0,
    failed         INTEGER NOT NULL DEFAULT 0,
    bytes          INTEGER NOT NULL,
    error          TEXT,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    -- When every answer of the finished batch was in llm_calls.
    ingested_at    INTEGER
);
CREATE INDEX batches_stage ON batches(stage, ingested_at);

-- The requests of each batch, by the request hash that keys the cache (the batch's custom_id).
CREATE TABLE batch_requests (
    batch_row    INTEGER NOT NULL REFERENCES batches(id),
    request_hash TEXT NOT NULL,
    PRIMARY KEY (batch_row, request_hash)
);
CREATE INDEX batch_requests_hash ON batch_requests(request_hash);
