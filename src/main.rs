use clap::Parser;

// The data path allocates per delivery on many threads; glibc malloc cost ~18% of the
// benchmark's CPU (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use mailhook::cli::{Cli, Command};
use mailhook::history::client::Request;

async fn history(request: Request) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    print!("{}", mailhook::history::client::run(request).await?);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
