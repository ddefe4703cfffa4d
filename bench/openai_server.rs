//! The fault-injecting OpenAI-compatible server of the tests, as a process of its own for benchmarks:
//! `cargo run --release --example openai_server -- --port 8099 --latency-ms 200`.

#[path = "../tests/support/openai_server.rs"]
mod openai_server;

use std::time::Duration;

fn main() {
    let mut cfg = openai_server::Config::default();
    let mut port = 0u16;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--port" => port = value().parse().expect("--port N"),
            "--latency-ms" => cfg.latency = Duration::from_millis(value().parse().expect("--latency-ms N")),
            "--faults" => {
                cfg.transient_faults = true;
                cfg.persistent_faults = true;
            }
            other => panic!("unknown argument {other} (use --port N --latency-ms N [--faults])"),
        }
    }
    let server = openai_server::start_on(&format!("127.0.0.1:{port}"), cfg);
    println!("listening on {}", server.base_url());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
