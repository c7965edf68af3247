//! The `finserve` binary: everything lives in the library; this only picks the allocator and
//! reports a fatal error.

/// Inference allocates and frees many megabyte-sized tensors per batch; glibc serves each from
/// fresh zeroed pages (mmap), which cost about 15% of an encoder pass in page faults. mimalloc
/// keeps and reuses them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    match finserve::cli::run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
