-- Results belong to the settings that made them. A generate or judge result carries the key of its
-- stage's settings (model, prompt, sampling, ...); a stage whose settings changed makes new results and
-- marks the others superseded: kept and readable, but not in `pairs`, not trained on, not counted.

-- A cached answer is only replayed when it parsed into a result; one that did not is tried again.
ALTER TABLE llm_calls ADD COLUMN usable INTEGER NOT NULL DEFAULT 1;

CREATE TABLE generations_v2 (
    id            INTEGER PRIMARY KEY,
    stage         TEXT    NOT NULL,
    chunk_id      INTEGER NOT NULL REFERENCES chunks(id) ON DELETE CASCADE,
    settings      TEXT    NOT NULL DEFAULT '',   -- key of the stage settings this result was made with
    status        TEXT    NOT NULL CHECK (status IN ('done', 'failed')),
    error         TEXT,
    call_id       INTEGER REFERENCES llm_calls(id),
    kept          INTEGER NOT NULL DEFAULT 0,
    dropped       INTEGER NOT NULL DEFAULT 0,
    updated_at    INTEGER NOT NULL,
    UNIQUE (stage, chunk_id, settings)
);
INSERT INTO generations_v2 (id, stage, chunk_id, status, error, call_id, kept, dropped, updated_at)
    SELECT id, stage, chunk_id, status, error, call_id, kept, dropped, updated_at FROM generations;
DROP TABLE generations;
ALTER TABLE generations_v2 RENAME TO generations;

ALTER TABLE queries ADD COLUMN settings TEXT NOT NULL DEFAULT '';
ALTER TABLE queries ADD COLUMN superseded_at INTEGER;   -- set while its stage runs with other settings

CREATE TABLE judgments_v2 (
    id            INTEGER PRIMARY KEY,
    query_id      INTEGER NOT NULL REFERENCES queries(id) ON DELETE CASCADE,
    stage         TEXT    NOT NULL,
    settings      TEXT    NOT NULL DEFAULT '',   -- key of the judge's settings, its threshold left out
    score         INTEGER,
    verdict       TEXT    NOT NULL CHECK (verdict IN ('accepted', 'rejected', 'failed')),
    reason        TEXT,
    model         TEXT    NOT NULL,
    call_id       INTEGER REFERENCES llm_calls(id),
    superseded_at INTEGER,
    created_at    INTEGER NOT NULL,
    UNIQUE (query_id, stage, settings)
);
INSERT INTO judgments_v2 (id, query_id, stage, score, verdict, reason, model, call_id, created_at)
    SELECT id, query_id, stage, score, verdict, reason, model, call_id, created_at FROM judgments;
DROP VIEW pairs;
DROP TABLE judgments;
ALTER TABLE judgments_v2 RENAME TO judgments;
CREATE INDEX judgments_query ON judgments (query_id, superseded_at);

-- What a person wants to read: each current query with its passage, document and current verdict.
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
LEFT JOIN judgments j ON j.query_id = q.id AND j.superseded_at IS NULL
WHERE q.status = 'kept' AND q.superseded_at IS NULL AND c.retired_at IS NULL;

-- A resumed stage keeps what its earlier attempts in the same run spent: totals add up across resumes.
ALTER TABLE stage_runs ADD COLUMN attempts          INTEGER NOT NULL DEFAULT 1;
ALTER TABLE stage_runs ADD COLUMN earlier_calls     INTEGER NOT NULL DEFAULT 0;
ALTER TABLE stage_runs ADD COLUMN earlier_cached    INTEGER NOT NULL DEFAULT 0;
ALTER TABLE stage_runs ADD COLUMN earlier_failures  INTEGER NOT NULL DEFAULT 0;
ALTER TABLE stage_runs ADD COLUMN earlier_prompt_tokens     INTEGER NOT NULL DEFAULT 0;
ALTER TABLE stage_runs ADD COLUMN earlier_completion_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE stage_runs ADD COLUMN earlier_cost      REAL;
