//! Command line: subcommands and the `run` configuration (flags with `MAILHOOK_*`
//! environment fallbacks; the Helm chart's values map onto them).

use std::net::SocketAddr;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::net::TcpListener;
use tracing::info;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::admin::{self, Readiness};
use crate::controller;
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

    /// Namespace whose resources the operator serves; repeat for several. All
    /// namespaces when absent.
    #[arg(
        long = "watch-namespace",
        env = "MAILHOOK_WATCH_NAMESPACE",
        value_delimiter = ','
    )]
    pub watch_namespaces: Vec<String>,

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

    // One signal fans out to every part.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    let metrics = Metrics::new()?;
    let readiness = Readiness::default();
    let listener = TcpListener::bind(config.http_addr).await?;
    info!(addr = %listener.local_addr()?, "admin server listening");
    let admin = tokio::spawn(admin::serve(
        listener,
        metrics,
        readiness.clone(),
        stopped(),
    ));

    let scopes: Vec<Option<String>> = if config.watch_namespaces.is_empty() {
        vec![None]
    } else {
        config.watch_namespaces.iter().cloned().map(Some).collect()
    };
    let pending = Arc::new(AtomicUsize::new(scopes.len()));
    let mut controllers = Vec::new();
    for scope in scopes {
        info!(
            namespace = scope.as_deref().unwrap_or("<all>"),
            "starting controllers"
        );
        let (pending, readiness) = (pending.clone(), readiness.clone());
        controllers.push(tokio::spawn(controller::run(
            client.clone(),
            scope,
            stopped(),
            move || {
                if pending.fetch_sub(1, Ordering::AcqRel) == 1 {
                    readiness.set_ready(true);
                    info!("caches synced; ready");
                }
            },
        )));
    }

    shutdown_signal().await;
    readiness.set_ready(false);
    let _ = stop_tx.send(true);
    for c in controllers {
        c.await?;
    }
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
