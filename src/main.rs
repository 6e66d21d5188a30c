use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = assetflow::cli::Cli::parse();
    // A short-lived command ends quietly when the reader of its output goes away
    // (`assetflow batch list | head`), like any Unix tool; Rust would otherwise panic on the next
    // write. The long-running ones keep SIGPIPE ignored: a restarted log collector must not kill
    // a service.
    if !matches!(cli.command, assetflow::cli::Command::Run { .. } | assetflow::cli::Command::Simulate { .. }) {
        // SAFETY: setting a signal's disposition to its default before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    assetflow::cli::init_logging(cli.log_format, cli.verbose);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    match runtime.block_on(assetflow::cli::execute(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
