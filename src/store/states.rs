//! The states rows move through (runs, stage runs, judgments, generations, batches), as enums stored
//! in the same TEXT the columns have always held and shown in `--json` as the same strings.

use serde::{Deserialize, Serialize};

/// What became of a generated query (decided by the rules in `text`).
pub use crate::text::QueryStatus;

/// Declares a state enum stored as snake_case TEXT and serialised the same way, with `as_str`.
macro_rules! state {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
        #[serde(rename_all = "snake_case")]
        #[sqlx(rename_all = "snake_case")]
        pub enum $name { $($(#[$vmeta])* $variant,)* }

        impl $name {
            pub const ALL: &[$name] = &[$($name::$variant,)*];

            /// The text stored in the column and shown to users.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text,)* }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

state! {
    /// A run of a workflow.
    RunStatus {
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        /// Stopped by a signal, a kill or a budget (`stop_reason` says which when it was a budget).
        Interrupted = "interrupted",
    }
}

state! {
    /// One stage's turn in a run.
    StageStatus {
        Pending = "pending",
        Running = "running",
        Succeeded = "succeeded",
        /// Its fingerprint matched an earlier good result: skipped.
        UpToDate = "up_to_date",
        Failed = "failed",
        /// Not started because a stage it needs did not succeed.
        Blocked = "blocked",
        Interrupted = "interrupted",
    }
}

impl StageStatus {
    /// Finished well: ran, or was up to date.
    pub fn is_good(self) -> bool {
        matches!(self, StageStatus::Succeeded | StageStatus::UpToDate)
    }
}

state! {
    /// A judge's decision on one question.
    Verdict {
        Accepted = "accepted",
        Rejected = "rejected",
        /// No usable score came back (the call failed or the answer had none).
        Failed = "failed",
    }
}

state! {
    /// A trained model's standing in the promotion gate.
    ModelStatus {
        /// Trained, not (yet) promoted.
        Candidate = "candidate",
        /// The one served and continued from.
        Promoted = "promoted",
        /// Replaced by a newer promoted model.
        Retired = "retired",
    }
}

state! {
    /// How a generate stage's ask about one chunk ended.
    GenerationStatus {
        Done = "done",
        Failed = "failed",
    }
}

state! {
    /// A Batch API batch: flow's own states before it exists at the API, then the API's.
    BatchState {
        /// On record, its file not uploaded yet.
        Preparing = "preparing",
        /// Its file uploaded, the batch not created yet.
        Uploaded = "uploaded",
        /// Killed before its upload was on record: nothing was created from it.
        Abandoned = "abandoned",
        Validating = "validating",
        InProgress = "in_progress",
        Finalizing = "finalizing",
        Completed = "completed",
        Failed = "failed",
        Expired = "expired",
        Cancelling = "cancelling",
        Cancelled = "cancelled",
    }
}

impl BatchState {
    /// The state the API names `s`; a state it adds later counts as still in progress.
    pub fn from_api(s: &str) -> BatchState {
        BatchState::ALL.iter().copied().find(|b| b.as_str() == s).unwrap_or(BatchState::InProgress)
    }

    /// Whether the API will do no more with it (its answers may still wait to be read).
    pub fn finished(self) -> bool {
        matches!(self, BatchState::Completed | BatchState::Failed | BatchState::Expired | BatchState::Cancelled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_serialise_as_the_text_they_are_stored_as() {
        for s in StageStatus::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for s in BatchState::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
            assert_eq!(BatchState::from_api(s.as_str()), *s);
        }
        assert_eq!(BatchState::from_api("some_new_state"), BatchState::InProgress);
        assert_eq!(serde_json::to_value(Verdict::Accepted).unwrap(), "accepted");
        assert_eq!(serde_json::to_value(RunStatus::Interrupted).unwrap(), "interrupted");
        assert_eq!(StageStatus::UpToDate.as_str(), "up_to_date");
    }
}
