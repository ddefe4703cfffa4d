-- The store: one SQLite file per workflow. Append-only: later changes come as new migrations.

CREATE TABLE runs (
    id            INTEGER PRIMARY KEY,
    workflow      TEXT    NOT NULL,          -- workflow name
    workflow_path TEXT    NOT NULL,          -- absolute path of the YAML, for `flow resume`
    status        TEXT    NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'interrupted')),
    args          TEXT    NOT NULL DEFAULT '{}', -- the run's options (--force/--only/--from) as JSON
    pid           INTEGER,
    started_at    INTEGER NOT NULL,          -- unix milliseconds
    finished_at   INTEGER
);

CREATE TABLE stage_runs (
    id            INTEGER PRIMARY KEY,
    run_id        INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    stage         TEXT    NOT NULL,
    kind          TEXT    NOT NULL,
    fingerprint   TEXT    NOT NULL,
    status        TEXT    NOT NULL CHECK (status IN
                    ('pending', 'running', 'succeeded', 'failed', 'up_to_date', 'blocked', 'interrupted')),
    items_total   INTEGER NOT NULL DEFAULT 0,
    items_done    INTEGER NOT NULL DEFAULT 0,    -- done in this stage run
    items_cached  INTEGER NOT NULL DEFAULT 0,    -- already stored before, not redone
    items_skipped INTEGER NOT NULL DEFAULT 0,    -- bad input, recorded with a reason
    items_failed  INTEGER NOT NULL DEFAULT 0,
    summary       TEXT,                          -- JSON the stage chooses to report
    error         TEXT,
    started_at    INTEGER,
    finished_at   INTEGER,
    UNIQUE (run_id, stage)
);
CREATE INDEX stage_runs_fingerprint ON stage_runs (stage, fingerprint, status);

-- A document is one source file (or one record of a .jsonl file) seen by a chunk stage.
CREATE TABLE documents (
    id            INTEGER PRIMARY KEY,
    stage         TEXT    NOT NULL,           -- the chunk stage that owns it
    path          TEXT    NOT NULL,           -- relative to the corpus root; 'file.jsonl#id' for records
    title         TEXT,
    content_hash  TEXT    NOT NULL,           -- sha256 of the bytes (or of the record's text)
    chunk_config  TEXT    NOT NULL,           -- hash of the chunking settings its chunks were made with
    status        TEXT    NOT NULL CHECK (status IN ('active', 'skipped', 'gone')),
    skip_reason   TEXT,
    bytes         INTEGER NOT NULL DEFAULT 0,
    updated_at    INTEGER NOT NULL,
    UNIQUE (stage, path)
);

CREATE TABLE chunks (
    id            INTEGER PRIMARY KEY,
    document_id   INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    ordinal       INTEGER NOT NULL,
    text          TEXT    NOT NULL,
    n_tokens      INTEGER NOT NULL,
    content_hash  TEXT    NOT NULL,           -- sha256 of the text: later stages key their work on it
    page          INTEGER,                    -- 1-based PDF page where the chunk starts
    start_byte    INTEGER NOT NULL,
    end_byte      INTEGER NOT NULL,
    retired_at    INTEGER                     -- set when a new version of the document no longer has it
);
CREATE INDEX chunks_document ON chunks (document_id, retired_at);
CREATE INDEX chunks_hash ON chunks (content_hash);

CREATE TABLE queries (
    id            INTEGER PRIMARY KEY,
    chunk_id      INTEGER NOT NULL REFERENCES chunks(id) ON DELETE CASCADE,
    stage         TEXT    NOT NULL,
    text          TEXT    NOT NULL,
    type          TEXT,
    model         TEXT    NOT NULL,
    prompt_hash   TEXT    NOT NULL,
    params        TEXT    NOT NULL DEFAULT '{}',
    status        TEXT    NOT NULL DEFAULT 'kept',  -- kept, or why it was dropped (duplicate, not_a_question, ...)
    created_at    INTEGER NOT NULL
);
CREATE INDEX queries_chunk ON queries (chunk_id);

CREATE TABLE judgments (
    id            INTEGER PRIMARY KEY,
    query_id      INTEGER NOT NULL REFERENCES queries(id) ON DELETE CASCADE,
    stage         TEXT    NOT NULL,
    score         INTEGER,
    verdict       TEXT    NOT NULL CHECK (verdict IN ('accepted', 'rejected', 'failed')),
    reason        TEXT,
    model         TEXT    NOT NULL,
    created_at    INTEGER NOT NULL,
    UNIQUE (query_id, stage)
);

-- What a person wants to read: each query with its passage, document and verdict.
CREATE VIEW pairs AS
SELECT q.id            AS query_id,
       q.text          AS query,
       c.text          AS passage,
       d.path          AS document,
       c.page          AS page,
       j.score         AS score,
       COALESCE(j.verdict, 'unjudged') AS verdict,
       j.reason        AS reason,
       q.model         AS generator,
       c.id            AS chunk_id,
       q.created_at    AS created_at
FROM queries q
JOIN chunks c    ON c.id = q.chunk_id
JOIN documents d ON d.id = c.document_id
LEFT JOIN judgments j ON j.query_id = q.id
WHERE q.status = 'kept' AND c.retired_at IS NULL;
