//! The promotion gate: the newest trained model replaces the promoted one only if it scores at
//! least as well on the same eval set in the same run; otherwise it stays a candidate, with why.

use serde_json::{Value, json};

use super::retrieve::{self, Ctx};
use super::set::EvalSet;
use crate::error::Result;
use crate::retriever::Kind;
use crate::store::models::{self as models_table, ModelRow};
use crate::store::states::ModelStatus;

pub struct Gate<'a> {
    pub metric: &'a str,
    /// The retriever scored (hybrid scores its dense side's model, each model with its own alpha).
    pub kind: Kind,
    /// Whose models compete.
    pub trained: crate::train::Retriever,
    /// The train stages whose promoted model the candidate faces (any stage when empty).
    pub stages: &'a [String],
}

impl Gate<'_> {
    /// Promotes `candidate` (scored `value` on `set`) or leaves it a candidate; returns the decision.
    pub async fn decide(&self, cx: &Ctx<'_>, set: &EvalSet, candidate: &ModelRow, value: f64) -> Result<Value> {
        let trained = self.trained.name();
        let (m, r) = (self.metric, self.kind.name());
        let mut decision = json!({
            "retriever": r, "metric": m, "eval_set": set.key, "model": candidate.id, "value": value,
        });
        if candidate.improved == Some(false) {
            let reason = "training did not beat its starting model on validation".to_string();
            cx.progress.log(&format!("gate: model {} stays a candidate ({reason})", candidate.id));
            decision["outcome"] = "kept as candidate".into();
            models_table::keep_candidate(cx.store, candidate.id, &reason, &decision.to_string()).await?;
            return Ok(decision);
        }
        if candidate.status == ModelStatus::Promoted {
            cx.progress.log(&format!("gate: model {} is the promoted {r} model already", candidate.id));
            decision["outcome"] = "already promoted".into();
            return Ok(decision);
        }
        let promoted = models_table::promoted(cx.store, self.stages, trained)
            .await?
            .filter(|p| std::path::Path::new(&p.path).join("model.safetensors").exists());
        let Some(promoted) = promoted else {
            let reason = format!("first {r} model to pass the gate: {m} {value:.4} on {}", set.key);
            decision["outcome"] = "promoted".into();
            models_table::promote(cx.store, candidate.id, &reason, Some(&decision.to_string())).await?;
            cx.progress.log(&format!("gate: model {} promoted ({reason})", candidate.id));
            return Ok(decision);
        };
        // The promoted model is scored on this very set now, so both face the same queries.
        let quiet = Ctx { count_items: false, ..*cx };
        let theirs =
            retrieve::metrics_of(&quiet, set, self.kind, Some(&promoted)).await?.0.get(m).copied().unwrap_or(0.0);
        decision["against"] = json!({ "model": promoted.id, "value": theirs });
        if value >= theirs {
            let reason = format!("{m} {value:.4} >= {theirs:.4} of model {} on {}", promoted.id, set.key);
            decision["outcome"] = "promoted".into();
            models_table::promote(cx.store, candidate.id, &reason, Some(&decision.to_string())).await?;
            cx.progress
                .log(&format!("gate: model {} promoted, model {} retired ({reason})", candidate.id, promoted.id));
        } else {
            let reason = format!("{m} {value:.4} < {theirs:.4} of the promoted model {} on {}", promoted.id, set.key);
            decision["outcome"] = "kept as candidate".into();
            models_table::keep_candidate(cx.store, candidate.id, &reason, &decision.to_string()).await?;
            cx.progress.log(&format!("gate: model {} stays a candidate ({reason})", candidate.id));
        }
        Ok(decision)
    }
}
