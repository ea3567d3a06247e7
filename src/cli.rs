//! Command line: subcommands and the `run` configuration (flags with `MAILHOOK_*`
//! environment fallbacks; the Helm chart's values map onto them).

use std::net::SocketAddr;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::net::TcpListener;
use tracing::info;

use crate::admin::{self, Readiness};
use crate::metrics::Metrics;

#[derive(Parser, Debug)]
#[command(
    name = "mailhook",
    version,
    about = "Turns mailbox activity into signed, reliable webhook deliveries"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the operator.
    Run(RunConfig),
    /// Print the CustomResourceDefinitions as YAML (what crds/ holds).
    Crdgen,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunConfig {
    /// Address of the admin server: /metrics, /healthz, /readyz.
    #[arg(long, env = "MAILHOOK_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// Log line format.
    #[arg(long, env = "MAILHOOK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Starts every part of the operator and waits for SIGTERM or Ctrl-C.
pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await?;
    let version = client.apiserver_version().await?;
    info!(apiserver = %version.git_version, "connected to Kubernetes");

    let metrics = Metrics::new()?;
    let readiness = Readiness::default();
    let listener = TcpListener::bind(config.http_addr).await?;
    info!(addr = %listener.local_addr()?, "admin server listening");
    let admin = tokio::spawn(admin::serve(
        listener,
        metrics,
        readiness.clone(),
        shutdown_signal(),
    ));
    readiness.set_ready(true);

    admin.await??;
    info!("shut down");
    Ok(())
}

/// Resolves on SIGTERM (what the kubelet sends) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::warn!(%err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(err) => {
                tracing::warn!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    info!("shutdown requested");
}
