//! The `flow` command line: parse, call the library, print, exit code. Besides that, only the
//! process-wide settings that must precede any thread (allocator thresholds, candle's dequantizing).

mod cli;
mod commands;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // candle reads this once per thread when a quantized model loads: dequantized f32 weights make
    // the local LLM's prompt processing 4x faster (prompts dominate flow's calls; see BENCHMARKS.md).
    // Set before any other thread exists; a user's own setting wins.
    if std::env::var_os("CANDLE_DEQUANTIZE_ALL").is_none() && std::env::var_os("CANDLE_DEQUANTIZE_ALL_F16").is_none() {
        // SAFETY: single-threaded here: the async runtime starts below.
        unsafe { std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1") };
    }
    keep_freed_memory();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            flow::progress::stderr_line(&format!("error: cannot start the async runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(commands::dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // A reader that closed the pipe needs no message; any other failure says what it was.
            if !e.downcast_ref::<commands::OutputError>().is_some_and(commands::OutputError::is_closed_pipe) {
                flow::progress::stderr_line(&commands::render_error(&e));
            }
            ExitCode::from(commands::exit_code(&e))
        }
    }
}

/// Tensor code allocates and frees buffers of many megabytes per operation. glibc hands such blocks
/// straight back to the kernel (mmap/munmap), so every new tensor is page-faulted in again, which
/// cost training a third of its time. Keeping freed memory in the process avoids that.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator thresholds; called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        // A few arenas: with freed memory kept, every extra thread arena would hold its own copy.
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
