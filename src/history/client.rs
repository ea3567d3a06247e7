//! The `mailhook attempts | dead-letters | replay` subcommands: clients of the history
//! API on a running operator's admin port (`kubectl port-forward`, or `kubectl exec` into
//! the pod, where the token file is mounted).

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use serde::de::DeserializeOwned;

use super::{AttemptList, DeadLetterList, Replayed};

#[derive(Args, Debug, Clone)]
pub struct Target {
    /// The subscription, as NAMESPACE/NAME.
    #[arg(value_name = "NAMESPACE/NAME")]
    pub subscription: String,

    /// Base URL of the operator's admin port.
    #[arg(long, env = "MAILHOOK_ADMIN_URL", default_value = "http://127.0.0.1:8080")]
    pub admin_url: String,

    /// File holding a token the operator accepts: one of its --admin-token-file, or a
    /// Kubernetes token (`kubectl create token …`) whose user may get the subscription.
    #[arg(long, env = "MAILHOOK_ADMIN_TOKEN_FILE")]
    pub token_file: PathBuf,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct ListArgs {
    #[command(flatten)]
    pub target: Target,

    /// Only records at or after this RFC 3339 time, or within this duration (2h).
    #[arg(long)]
    pub since: Option<String>,

    /// Most records to show, newest first.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,

    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Args, Debug, Clone)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub target: Target,

    /// Only dead letters given up at or after this RFC 3339 time, or within this
    /// duration (2h). All of them when absent.
    #[arg(long)]
    pub since: Option<String>,
}

/// What the subcommand asks for.
pub enum Request {
    Attempts(ListArgs),
    DeadLetters(ListArgs),
    Replay(ReplayArgs),
}

fn split(subscription: &str) -> anyhow::Result<(&str, &str)> {
    match subscription.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok((ns, name)),
        _ => bail!("{subscription:?}: name the subscription as NAMESPACE/NAME"),
    }
}

async fn call<T: DeserializeOwned>(
    target: &Target,
    method: reqwest::Method,
    path: &str,
    query: &[(&str, String)],
) -> anyhow::Result<T> {
    let (namespace, name) = split(&target.subscription)?;
    let token = std::fs::read_to_string(&target.token_file)
        .with_context(|| format!("cannot read the token file {}", target.token_file.display()))?;
    let token = token
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .with_context(|| format!("{} holds no token", target.token_file.display()))?
        .to_string();
    let mut url = reqwest::Url::parse(&target.admin_url)
        .with_context(|| format!("--admin-url {:?} is not a URL", target.admin_url))?;
    url.path_segments_mut()
        .map_err(|()| anyhow::anyhow!("--admin-url {:?} cannot take a path", target.admin_url))?
        .pop_if_empty()
        .extend(["v1", "subscriptions", namespace, name, path]);
    let response = reqwest::Client::new()
        .request(method, url.clone())
        .bearer_auth(token)
        .query(query)
        .send()
        .await
        .with_context(|| format!("cannot reach the operator at {url}"))?;
    let status = response.status();
    let body = response.bytes().await.context("reading the answer")?;
    if !status.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        bail!("the operator answered {status}: {message}");
    }
    serde_json::from_slice(&body).with_context(|| format!("unexpected answer from {url}"))
}

fn list_query(args: &ListArgs) -> Vec<(&'static str, String)> {
    let mut q = vec![("limit", args.limit.to_string())];
    q.extend(args.since.clone().map(|s| ("since", s)));
    q
}

fn json(value: &impl serde::Serialize) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(value)?)
}

/// Runs the subcommand and returns what to print.
pub async fn run(request: Request) -> anyhow::Result<String> {
    match request {
        Request::Attempts(args) => {
            let list: AttemptList = call(&args.target, reqwest::Method::GET, "attempts", &list_query(&args)).await?;
            if args.output == Output::Json {
                return json(&list.items);
            }
            let mut out = String::from(
                "TIME                            EVENT                                 ATTEMPT  STATUS  LATENCY  ERROR\n",
            );
            for a in &list.items {
                out.push_str(&format!(
                    "{:<31} {:<37} {:>7}  {:>6}  {:>5}ms  {}\n",
                    a.at.to_string(),
                    a.event_id,
                    a.attempt,
                    a.http_status.map_or("-".into(), |s| s.to_string()),
                    a.latency_ms,
                    a.error.as_deref().unwrap_or("")
                ));
            }
            Ok(out)
        }
        Request::DeadLetters(args) => {
            let list: DeadLetterList =
                call(&args.target, reqwest::Method::GET, "dead-letters", &list_query(&args)).await?;
            if args.output == Output::Json {
                return json(&list.items);
            }
            let mut out = String::from(
                "DEAD SINCE                      EVENT                                 ATTEMPTS  REASON\n",
            );
            for d in &list.items {
                out.push_str(&format!(
                    "{:<31} {:<37} {:>8}  {}\n",
                    d.dead_at.to_string(),
                    d.event_id,
                    d.attempts,
                    d.reason
                ));
            }
            Ok(out)
        }
        Request::Replay(args) => {
            let query: Vec<(&str, String)> = args.since.clone().map(|s| ("since", s)).into_iter().collect();
            let replayed: Replayed = call(&args.target, reqwest::Method::POST, "replay", &query).await?;
            Ok(format!(
                "{}/{}: {} dead letter(s) queued for delivery again\n",
                replayed.subscription.namespace, replayed.subscription.name, replayed.replayed
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn subscriptions_are_named_namespace_slash_name() {
        assert_eq!(split("mail/siem").expect("ok"), ("mail", "siem"));
        for bad in ["siem", "/siem", "mail/", "a/b/c"] {
            assert!(split(bad).is_err(), "{bad}");
        }
    }
}
