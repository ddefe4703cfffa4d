-- The LLM layer: the request cache, per-item ledgers of the generate and judge stages, and accounting.

-- Every successful LLM call, keyed by a hash of everything that decides its answer. A rerun, resume or
-- refresh that sends the same request reads the answer from here instead of paying for it again.
CREATE TABLE llm_calls (
    id                INTEGER PRIMARY KEY,
    request_hash      TEXT    NOT NULL UNIQUE,
    kind              TEXT    NOT NULL CHECK (kind IN ('chat', 'embeddings')),
    provider          TEXT    NOT NULL,
    base_url          TEXT    NOT NULL,
    model             TEXT    NOT NULL,
    request           TEXT    NOT NULL,   -- the request body as sent (never any key)
    response          TEXT    NOT NULL,   -- the response body as received
    text              TEXT,               -- the chat answer's text
    finish_reason     TEXT,
    response_id       TEXT,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    latency_ms        INTEGER NOT NULL,
    attempts          INTEGER NOT NULL,
    run_id            INTEGER,
    stage             TEXT,
    created_at        INTEGER NOT NULL
);

-- One row per chunk a generate stage has dealt with: done, or failed with the reason.
CREATE TABLE generations (
    id            INTEGER PRIMARY KEY,
    stage         TEXT    NOT NULL,
    chunk_id      INTEGER NOT NULL REFERENCES chunks(id) ON DELETE CASCADE,
    status        TEXT    NOT NULL CHECK (status IN ('done', 'failed')),
    error         TEXT,
    call_id       INTEGER REFERENCES llm_calls(id),
    kept          INTEGER NOT NULL DEFAULT 0,
    dropped       INTEGER NOT NULL DEFAULT 0,
    updated_at    INTEGER NOT NULL,
    UNIQUE (stage, chunk_id)
);

ALTER TABLE queries ADD COLUMN call_id INTEGER REFERENCES llm_calls(id);
ALTER TABLE judgments ADD COLUMN call_id INTEGER REFERENCES llm_calls(id);
CREATE INDEX queries_stage ON queries (stage, status);

-- LLM accounting per stage run.
ALTER TABLE stage_runs ADD COLUMN llm_calls         INTEGER NOT NULL DEFAULT 0;
ALTER TABLE stage_runs ADD COLUMN llm_cached        INTEGER NOT NULL DEFAULT 0;
ALTER TABLE stage_runs ADD COLUMN llm_failures      INTEGER NOT NULL DEFAULT 0;
ALTER TABLE stage_runs ADD COLUMN prompt_tokens     INTEGER NOT NULL DEFAULT 0;
ALTER TABLE stage_runs ADD COLUMN completion_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE stage_runs ADD COLUMN cost              REAL;
