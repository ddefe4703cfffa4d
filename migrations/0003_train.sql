-- Training: cached black-box embeddings, trained models with their lineage, and training curves.

-- A black-box embedding per (model identity, text hash): computed or paid for once, read on every rerun.
CREATE TABLE embeddings (
    model      TEXT    NOT NULL,   -- provider|base_url|model, or local|<folder>|<weights sha256>
    text_hash  TEXT    NOT NULL,   -- sha256 of the exact text embedded
    dim        INTEGER NOT NULL,
    vector     BLOB    NOT NULL,   -- dim little-endian f32
    created_at INTEGER NOT NULL,
    PRIMARY KEY (model, text_hash)
) WITHOUT ROWID;

-- A trained augment model: a sentence-transformers folder on disk and what made it.
CREATE TABLE models (
    id               INTEGER PRIMARY KEY,
    stage            TEXT    NOT NULL,
    run_id           INTEGER REFERENCES runs(id),
    stage_run_id     INTEGER REFERENCES stage_runs(id),
    path             TEXT    NOT NULL,   -- the best checkpoint's folder
    parent           TEXT    NOT NULL,   -- the folder or model it was initialised from
    retriever        TEXT    NOT NULL,   -- mafin | augment_only: what it was trained for
    black_box        TEXT,               -- the black box's identity (mafin)
    weight           REAL    NOT NULL,   -- w, the augment's weight in the mafin concatenation
    data_fingerprint TEXT    NOT NULL,   -- sha256 over the training pairs and settings
    metrics          TEXT    NOT NULL,   -- JSON: best validation metrics and where they were reached
    status           TEXT    NOT NULL DEFAULT 'candidate' CHECK (status IN ('candidate', 'promoted', 'retired')),
    status_reason    TEXT,
    created_at       INTEGER NOT NULL
);
CREATE INDEX models_stage ON models (stage, created_at);

-- Loss per optimiser step and validation metrics per epoch, for progress reports and the HTML report.
CREATE TABLE train_curves (
    stage_run_id INTEGER NOT NULL REFERENCES stage_runs(id) ON DELETE CASCADE,
    kind         TEXT    NOT NULL CHECK (kind IN ('loss', 'validation')),
    step         INTEGER NOT NULL,
    epoch        INTEGER NOT NULL,
    value        REAL    NOT NULL,   -- the loss, or validation Recall@10
    extra        TEXT,               -- JSON: learning rate; or every validation metric
    PRIMARY KEY (stage_run_id, kind, step)
);
