//! The `finserve` binary: everything lives in the library; this only reports a fatal error.

fn main() -> std::process::ExitCode {
    match finserve::cli::run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
