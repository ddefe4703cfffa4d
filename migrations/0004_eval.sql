-- Evaluation: retrieval metrics per retriever and eval set, and every RAG answer with its grade.

-- One row per (eval stage run, retriever): the metrics of that retriever on that eval set.
CREATE TABLE eval_results (
    id           INTEGER PRIMARY KEY,
    run_id       INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    stage_run_id INTEGER NOT NULL REFERENCES stage_runs(id) ON DELETE CASCADE,
    stage        TEXT    NOT NULL,
    eval_set     TEXT    NOT NULL,   -- what was evaluated on: beir|<folder>|<split>|<hash>, or synthetic|...
    retriever    TEXT    NOT NULL,   -- bm25 | black_box | augment_only | mafin
    model_id     INTEGER REFERENCES models(id),
    queries      INTEGER NOT NULL,
    corpus       INTEGER NOT NULL,
    metrics      TEXT    NOT NULL,   -- JSON: recall@k, ndcg@10, mrr@10, map@100, ...
    created_at   INTEGER NOT NULL,
    UNIQUE (stage_run_id, retriever)
);
CREATE INDEX eval_results_set ON eval_results (stage, eval_set, retriever, run_id);

-- One RAG answer per (eval stage run, retriever, question), with the judge's grade.
CREATE TABLE rag_answers (
    id            INTEGER PRIMARY KEY,
    run_id        INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    stage_run_id  INTEGER NOT NULL REFERENCES stage_runs(id) ON DELETE CASCADE,
    stage         TEXT    NOT NULL,
    eval_set      TEXT    NOT NULL,
    retriever     TEXT    NOT NULL,
    model_id      INTEGER REFERENCES models(id),
    question_id   TEXT    NOT NULL,   -- the eval set's id of the question
    question      TEXT    NOT NULL,
    passages      TEXT    NOT NULL,   -- JSON: ids of the passages retrieved, best first
    hit           INTEGER NOT NULL,   -- 1 if a relevant passage was among them
    answer        TEXT,
    answer_call   INTEGER REFERENCES llm_calls(id),
    grade         TEXT    NOT NULL CHECK (grade IN ('correct', 'incorrect', 'failed')),
    reason        TEXT,
    grade_call    INTEGER REFERENCES llm_calls(id),
    created_at    INTEGER NOT NULL,
    UNIQUE (stage_run_id, retriever, question_id)
);
