//! What both daemons' `main.rs` share: the async runtime for `run`, and how an error ends the
//! process (the whole chain on one line, each cause once, exit code 1).

use std::future::Future;
use std::process::ExitCode;

use anyhow::Context;

/// Runs `fut` to completion on a multi-threaded tokio runtime.
pub fn block_on<T>(fut: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(fut)
}

/// `name: error: <chain>` on stderr and failure, or success.
pub fn exit_code(name: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {}", crate::logging::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
