use clap::Parser;

// The data path allocates per delivery on many threads; glibc malloc cost ~18% of the
// benchmark's CPU (BENCHMARKS.md).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use mailhook::cli::{Cli, Command};
use mailhook::history::client::Request;

async fn history(request: Request) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    print!("{}", mailhook::history::client::run(request).await?);
    Ok(())
}

/// mimalloc's options for a process under a memory limit, read from the environment when
/// the process starts: arenas committed as they are used rather than whole, and freed
/// memory given back at once. Without them ingest bursts doubled the operator's peak (a
/// pod's memory limit counts every committed page; BENCHMARKS.md, the backlog test).
const ALLOCATOR_ENV: [(&str, &str); 2] = [("MIMALLOC_ARENA_EAGER_COMMIT", "0"), ("MIMALLOC_PURGE_DELAY", "0")];

/// Starts the binary again with `ALLOCATOR_ENV` when its environment lacks them (a value
/// already set is kept). Returns only when that is not needed or not possible.
fn with_allocator_env() {
    use std::os::unix::process::CommandExt;
    if ALLOCATOR_ENV.iter().all(|(name, _)| std::env::var_os(name).is_some()) {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let mut again = std::process::Command::new(exe);
    again.args(std::env::args_os().skip(1));
    for (name, value) in ALLOCATOR_ENV {
        if std::env::var_os(name).is_none() {
            again.env(name, value);
        }
    }
    // Replaces this process (same pid); on failure the process goes on as it is.
    let err = again.exec();
    eprintln!("note: could not restart with the allocator's settings ({err}); going on without them");
}

/// Threads for blocking work (store reads and commits waiting for their fsync). Tokio's
/// default, 512, let an ingest burst start ~50, each with its own allocator heap: 124 MiB
/// of anonymous memory for a heap of ~35 MiB (BENCHMARKS.md, the backlog test). Store
/// calls wait for the committer thread, never for each other, so a small pool queues work
/// instead of deadlocking.
const BLOCKING_THREADS: usize = 8;

fn main() -> anyhow::Result<()> {
    with_allocator_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .build()?;
    let result = runtime.block_on(run());
    // Every task has drained by now; a blocking store call stuck on a dead peer does not
    // hold the exit up (dropping the runtime would wait for it without end).
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    result
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Keygen { kind } => {
            match kind {
                mailhook::cli::KeyKind::Ed25519 => {
                    let (secret, public) = mailhook::delivery::signing::generate_ed25519();
                    println!("{secret}");
                    eprintln!("public key (receivers verify v1a signatures with it): {public}");
                }
                mailhook::cli::KeyKind::Hmac => {
                    use base64::Engine;
                    let bytes = mailhook::crypto::random_bytes();
                    println!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(bytes));
                }
            }
            Ok(())
        }
        Command::Store { action, database } => {
            print!("{}", mailhook::app::store(action, &database).await?);
            Ok(())
        }
        Command::Crdgen => {
            print!("{}", mailhook::api::crds_yaml()?);
            Ok(())
        }
        Command::Schemagen { out } => {
            for (path, text) in mailhook::delivery::schema::files()? {
                let file = out.join(&path);
                if let Some(parent) = file.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(&file, text)?;
            }
            Ok(())
        }
        Command::Audit { action } => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            print!("{}", mailhook::history::audit::client::run(action).await?);
            Ok(())
        }
        Command::Attempts(args) => history(Request::Attempts(args)).await,
        Command::DeadLetters(args) => history(Request::DeadLetters(args)).await,
        Command::Replay(args) => history(Request::Replay(args)).await,
        Command::Run(config) => {
            mailhook::telemetry::init(config.telemetry.log_format)?;
            mailhook::panics::install_hook();
            // reqwest and kube share one TLS implementation: rustls with ring.
            let _ = rustls::crypto::ring::default_provider().install_default();
            mailhook::app::run(*config).await
        }
    }
}
