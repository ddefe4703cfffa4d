//! SIGINT and SIGTERM as one shutdown request, seen by every run and by the scheduler: a run sends
//! nothing new, stores the answers in flight, is marked interrupted, and the process exits cleanly.
//! A second signal exits at once (what was committed stays; answers still in flight may be lost).

use std::sync::OnceLock;

use tokio::sync::watch;

static REQUESTED: OnceLock<watch::Receiver<bool>> = OnceLock::new();

fn receiver() -> watch::Receiver<bool> {
    REQUESTED
        .get_or_init(|| {
            let (tx, rx) = watch::channel(false);
            tokio::spawn(async move {
                next_signal().await;
                let _ = tx.send(true);
                next_signal().await;
                crate::progress::stderr_line("a second signal: exiting now (`flow resume` continues)");
                std::process::exit(130);
            });
            rx
        })
        .clone()
}

/// Waits for SIGINT or SIGTERM.
async fn next_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Starts listening (call early, so a signal is never the default kill).
pub fn listen() {
    receiver();
}

/// Completes once a shutdown has been asked for (at once if it already has).
pub async fn requested() {
    let mut rx = receiver();
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

pub fn is_requested() -> bool {
    *receiver().borrow()
}
