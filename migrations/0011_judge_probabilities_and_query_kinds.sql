-- A judge's score read as the model's probabilities over the digits 1-5 (its logits locally, the
-- logprobs of a server that returns them): the expected score decides the verdict, the distribution
-- is kept beside the reason, and `scored_by` says how the score was read.
ALTER TABLE judgments ADD COLUMN expected REAL;      -- sum of d * p(d); NULL: the sampled digit decided
ALTER TABLE judgments ADD COLUMN probs TEXT;         -- JSON [p1, p2, p3, p4, p5]
ALTER TABLE judgments ADD COLUMN scored_by TEXT;     -- 'probabilities' or 'sampled'
-- How each chat answer was held to its shape: 'grammar' (decoded under its JSON schema's grammar),
-- 'probabilities' (a score read from the logits), 'json_schema' (a server's structured output), 'none'.
ALTER TABLE llm_calls ADD COLUMN constrained TEXT;

-- What kind of query generate asked for (question, keywords, claim); every query before kinds is a question.
ALTER TABLE queries ADD COLUMN kind TEXT NOT NULL DEFAULT 'question';

DROP VIEW pairs;
CREATE VIEW pairs AS
SELECT q.id            AS query_id,
       q.text          AS query,
       q.kind          AS kind,
       c.text          AS passage,
       d.path          AS document,
       c.page          AS page,
       j.score         AS score,
       j.expected      AS expected,
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
