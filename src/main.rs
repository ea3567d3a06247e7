use clap::Parser;
use mailhook::cli::{Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crdgen => {
            print!("{}", mailhook::api::crds_yaml()?);
            Ok(())
        }
        Command::Run(config) => {
            mailhook::telemetry::init(config.log_format)?;
            // reqwest and kube share one TLS implementation: rustls with ring.
            let _ = rustls::crypto::ring::default_provider().install_default();
            mailhook::cli::run(*config).await
        }
    }
}
