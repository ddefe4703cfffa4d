//! The server's counters and histograms, written in Prometheus' text format for `GET /metrics`.
//! By hand: a few atomics and two histograms read at scrape time; a metrics crate would add a registry for six series.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Latency buckets in seconds, and batch-size buckets in texts.
const LATENCY: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const SIZES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

pub struct Histogram {
    bounds: &'static [f64],
    state: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, state: Mutex::new((vec![0; bounds.len()], 0.0, 0)) }
    }

    pub fn observe(&self, v: f64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            s.0[i] += 1;
        }
        s.1 += v;
        s.2 += 1;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (b, n) in self.bounds.iter().zip(&s.0) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", s.2);
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", s.1);
        let _ = writeln!(out, "{name}_count{braces} {}", s.2);
    }
}

pub struct Metrics {
    /// (route, status) -> requests answered.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency: BTreeMap<&'static str, Histogram>,
    /// Texts per encoder call, by encoder (`black_box`, `augment`).
    pub batch_sizes: BTreeMap<&'static str, Histogram>,
    pub swaps: AtomicU64,
}

pub const ROUTES: &[&str] = &["embeddings", "search", "models", "healthz", "metrics", "other"];
pub const ENCODERS: &[&str] = &["black_box", "augment", "reranker"];

/// What the black box's cache did, read from the encoder at scrape time.
pub struct BlackBoxCounts {
    pub cached: u64,
    pub computed: u64,
    pub calls: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::default(),
            latency: ROUTES.iter().map(|r| (*r, Histogram::new(LATENCY))).collect(),
            batch_sizes: ENCODERS.iter().map(|e| (*e, Histogram::new(SIZES))).collect(),
            swaps: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub fn answered(&self, route: &'static str, status: u16, seconds: f64) {
        *self.requests.lock().unwrap_or_else(|p| p.into_inner()).entry((route, status)).or_default() += 1;
        if let Some(h) = self.latency.get(route) {
            h.observe(seconds);
        }
    }

    pub fn batch(&self, encoder: &'static str, texts: usize) {
        if let Some(h) = self.batch_sizes.get(encoder) {
            h.observe(texts as f64);
        }
    }

    pub fn render(&self, bb: &BlackBoxCounts, model: &str) -> String {
        let mut out = String::new();
        out.push_str("# HELP flow_http_requests_total HTTP requests answered, by route and status.\n");
        out.push_str("# TYPE flow_http_requests_total counter\n");
        for ((route, status), n) in self.requests.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "flow_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
        out.push_str("# HELP flow_http_request_duration_seconds Time to answer a request, by route.\n");
        out.push_str("# TYPE flow_http_request_duration_seconds histogram\n");
        for (route, h) in &self.latency {
            h.write(&mut out, "flow_http_request_duration_seconds", &format!("route=\"{route}\""));
        }
        out.push_str(
            "# HELP flow_encoder_batch_texts Texts per encoder call (requests batched together), by encoder.\n",
        );
        out.push_str("# TYPE flow_encoder_batch_texts histogram\n");
        for (enc, h) in &self.batch_sizes {
            h.write(&mut out, "flow_encoder_batch_texts", &format!("encoder=\"{enc}\""));
        }
        out.push_str(
            "# HELP flow_black_box_texts_total Black-box texts served from the embeddings cache or computed.\n",
        );
        out.push_str("# TYPE flow_black_box_texts_total counter\n");
        let _ = writeln!(out, "flow_black_box_texts_total{{source=\"cache\"}} {}", bb.cached);
        let _ = writeln!(out, "flow_black_box_texts_total{{source=\"computed\"}} {}", bb.computed);
        out.push_str(
            "# HELP flow_black_box_calls_total Black-box encoder calls (API requests) for texts not cached.\n",
        );
        out.push_str("# TYPE flow_black_box_calls_total counter\n");
        let _ = writeln!(out, "flow_black_box_calls_total {}", bb.calls);
        out.push_str(
            "# HELP flow_model_swaps_total Times a newly promoted model (or changed chunks) was swapped in.\n",
        );
        out.push_str("# TYPE flow_model_swaps_total counter\n");
        let _ = writeln!(out, "flow_model_swaps_total {}", self.swaps.load(Ordering::Relaxed));
        out.push_str("# HELP flow_model_info The default retriever and its model.\n");
        out.push_str("# TYPE flow_model_info gauge\n");
        let _ = writeln!(out, "flow_model_info{{model=\"{}\"}} 1", model.replace('"', "'"));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_count_every_observation() {
        let m = Metrics::default();
        for s in [0.0005, 0.003, 0.003, 20.0] {
            m.answered("embeddings", 200, s);
        }
        m.answered("embeddings", 401, 0.0001);
        let text = m.render(&BlackBoxCounts { cached: 3, computed: 2, calls: 1 }, "mafin (model 1)");
        assert!(text.contains("flow_http_requests_total{route=\"embeddings\",status=\"200\"} 4"), "{text}");
        assert!(text.contains("flow_http_requests_total{route=\"embeddings\",status=\"401\"} 1"));
        // 0.0005 and 0.0001 are under 1 ms; the two 3 ms land by 5 ms; 20 s only in +Inf.
        assert!(text.contains("flow_http_request_duration_seconds_bucket{route=\"embeddings\",le=\"0.001\"} 2"));
        assert!(text.contains("flow_http_request_duration_seconds_bucket{route=\"embeddings\",le=\"0.005\"} 4"));
        assert!(text.contains("flow_http_request_duration_seconds_bucket{route=\"embeddings\",le=\"10\"} 4"));
        assert!(text.contains("flow_http_request_duration_seconds_bucket{route=\"embeddings\",le=\"+Inf\"} 5"));
        assert!(text.contains("flow_http_request_duration_seconds_count{route=\"embeddings\"} 5"));
        assert!(text.contains("flow_black_box_texts_total{source=\"cache\"} 3"));
    }
}
