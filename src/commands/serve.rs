//! `flow serve`, `flow search` and `flow embed`: the workflow's retriever over HTTP, at a terminal,
//! and over a file.

use std::time::Duration;

use flow::progress::Progress;
use flow::serve::batch::Window;
use flow::serve::http::Limits;
use flow::serve::output::{self, Format};
use flow::serve::{Options, Service};
use flow::store::Store;

use crate::cli::{EmbedArgs, SearchArgs, ServeArgs, Target};

/// Texts per encoder call in `flow embed` (each stored as it is made, so a killed run resumes).
const EMBED_BATCH: usize = 256;

async fn open(target: &Target, window: Window, poll: Duration) -> anyhow::Result<std::sync::Arc<Service>> {
    let wf = flow::stages::load_workflow(&target.workflow)?;
    let store = Store::open_existing(&wf.store).await?;
    Ok(Service::start(wf, store, Options { window, poll }).await?)
}

pub async fn serve(a: ServeArgs) -> anyhow::Result<u8> {
    flow::engine::shutdown::listen();
    let api_key = match &a.api_key_env {
        Some(name) => match std::env::var(name) {
            Ok(v) if !v.is_empty() => Some(v),
            _ => {
                return Err(flow::Error::bad_input(
                    format!("--api-key-env {name}: the variable is not set (or empty)"),
                    format!("export {name}=<a long random key> before starting the server"),
                )
                .into());
            }
        },
        None => None,
    };
    let bad = |what: String| flow::Error::bad_input(what, "give a positive number");
    if a.max_inputs == 0 || a.max_chars == 0 || a.batch_max == 0 {
        return Err(bad("--max-inputs, --max-chars and --batch-max must be at least 1".into()).into());
    }
    if !(a.poll_secs > 0.0 && a.poll_secs.is_finite()) {
        return Err(bad(format!("--poll-secs {}", a.poll_secs)).into());
    }
    let window = Window { wait: Duration::from_millis(a.batch_wait_ms), cap: a.batch_max };
    let svc = open(&a.target, window, Duration::from_secs_f64(a.poll_secs)).await?;
    let listener = tokio::net::TcpListener::bind(&a.addr).await.map_err(|e| {
        flow::Error::bad_input(format!("cannot listen on {}: {e}", a.addr), "pick a free address with --addr HOST:PORT")
    })?;
    let addr = listener.local_addr()?;
    let live = svc.live();
    flow::serve::log(&format!(
        "listening on http://{addr} (retrievers {}; default {}{})",
        live.names().join(", "),
        live.default_served().label(),
        if api_key.is_some() { "; API key required" } else { "" }
    ));
    if !addr.ip().is_loopback() && api_key.is_none() {
        flow::serve::log("warning: listening beyond loopback with no API key (--api-key-env) asked");
    }
    let limits = Limits { api_key, max_inputs: a.max_inputs, max_chars: a.max_chars, max_k: 1000 };
    flow::serve::http::serve(listener, svc.clone(), limits).await?;
    svc.store.close().await;
    flow::serve::log("stopped: in-flight requests answered");
    Ok(0)
}

pub async fn search(a: SearchArgs) -> anyhow::Result<u8> {
    let window = Window { wait: Duration::ZERO, cap: EMBED_BATCH };
    let svc = open(&a.target, window, Duration::from_secs(3600)).await?;
    let found = svc.search(a.retriever.as_deref().unwrap_or_default(), &a.query, a.k).await?;
    svc.store.close().await;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&found)?)?;
        return Ok(0);
    }
    let how = found.fusion.as_ref().map(|f| format!(", {f}")).unwrap_or_default();
    outln!("{} ({}{how}): {} hits", found.retriever, found.model, found.hits.len())?;
    for h in &found.hits {
        let page = h.page.map(|p| format!(" p.{p}")).unwrap_or_default();
        outln!("{:>2}. {:.4}  {}{page}", h.rank, h.score, h.document)?;
        let text: String = h.text.split_whitespace().collect::<Vec<_>>().join(" ");
        let short: String = text.chars().take(200).collect();
        outln!("    {short}{}", if short.len() < text.len() { "..." } else { "" })?;
    }
    Ok(0)
}

pub async fn embed(a: EmbedArgs, quiet: bool) -> anyhow::Result<u8> {
    flow::engine::shutdown::listen();
    let format = Format::of(&a.output)?;
    let texts = output::read_texts(&a.input, &a.field)?;
    let window = Window { wait: Duration::ZERO, cap: EMBED_BATCH };
    let svc = open(&a.target, window, Duration::from_secs(3600)).await?;
    let name = a.retriever.clone().unwrap_or_default();
    let progress = Progress::new(quiet);
    let bar = progress.stage("embed");
    bar.set_total(texts.len() as u64);
    let mut rows = Vec::new();
    let mut label = String::new();
    for part in texts.chunks(EMBED_BATCH) {
        if flow::engine::shutdown::is_requested() {
            bar.finish("interrupted");
            svc.store.close().await;
            errln!("interrupted: the vectors made so far are cached; the same command resumes from them");
            return Ok(130);
        }
        let done = svc.embed(&name, part.to_vec(), false).await?;
        label = done.served.label();
        rows.extend(done.vectors.into_iter().flatten());
        bar.done(part.len() as u64);
    }
    bar.finish("succeeded");
    let dim = rows.len() / texts.len();
    output::write(&a.output, format, &rows, texts.len(), dim)?;
    let counts = svc.black_box_counts();
    svc.store.close().await;
    errln!(
        "{} texts embedded with {label} ({dim} dims) into {}; black box: {} from the cache, {} computed",
        texts.len(),
        a.output.display(),
        counts.cached,
        counts.computed
    );
    Ok(0)
}
