//! `mailhook audit`: the audit API's client (`key`, `checkpoint`, `prove`, asking a
//! running operator's admin port like `mailhook attempts` does), and what needs no
//! operator: `keygen`, and `verify`, which checks evidence offline with only the
//! verifier key.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};

use crate::audit::proof::{Evidence, verify};

/// Where the operator is, and the token it takes.
#[derive(Args, Debug, Clone)]
pub struct Operator {
    /// Base URL of the operator's admin port.
    #[arg(long, env = "MAILHOOK_ADMIN_URL", default_value = "http://127.0.0.1:8080")]
    pub admin_url: String,
    /// File holding a token from the operator's --admin-token-file.
    #[arg(long, env = "MAILHOOK_ADMIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Action {
    /// Print a new checkpoint signing key (a signed-note signer key, for the Secret behind
    /// --audit-key-file) on stdout, and its verifier key on stderr.
    Keygen {
        /// The log's origin: a name unique to this log, e.g. `example.com/mailhook`.
        #[arg(long)]
        origin: String,
    },
    /// Print the checkpoint verifier key (`name+keyid+base64`), which auditors keep.
    Key {
        #[command(flatten)]
        operator: Operator,
    },
    /// Print the newest signed checkpoint, or the one of --size.
    Checkpoint {
        #[command(flatten)]
        operator: Operator,
        #[arg(long)]
        size: Option<u64>,
    },
    /// Print evidence (JSON) against the newest checkpoint: an event's acceptance and its
    /// delivery attempts, one leaf, or that the log still extends an older checkpoint.
    Prove {
        #[command(flatten)]
        operator: Operator,
        /// An event id: its acceptance and every delivery attempt logged for it.
        #[arg(long, group = "what")]
        event: Option<String>,
        /// A leaf index.
        #[arg(long, group = "what")]
        index: Option<u64>,
        /// The size of an older checkpoint.
        #[arg(long, group = "what")]
        from: Option<u64>,
    },
    /// Append an act of custody to the log (a restore from a backup, say), by the admin
    /// token's name; prints the record's index.
    Record {
        #[command(flatten)]
        operator: Operator,
        /// What was done: a-z, 0-9 and '-', such as `restore`.
        #[arg(long)]
        action: String,
        /// What it was done to or from (a backup's name and time).
        #[arg(long)]
        subject: String,
        /// What a later reader needs to know (what was lost, who asked).
        #[arg(long, default_value = "")]
        detail: String,
    },
    /// Check evidence offline with the verifier key only: the checkpoint's signature, each
    /// record's inclusion, each older checkpoint's consistency. Exits non-zero on the
    /// first failure, naming it.
    Verify {
        /// The verifier key (`mailhook audit key`), or a file holding it.
        #[arg(long)]
        key: String,
        /// A checkpoint a witness kept (a file): the evidence's consistency proof is checked
        /// from it, whatever older checkpoint the evidence carries.
        #[arg(long)]
        witness: Option<PathBuf>,
        /// The evidence file (`-` for stdin).
        file: PathBuf,
    },
}

fn token(operator: &Operator) -> anyhow::Result<String> {
    let Some(path) = &operator.token_file else {
        bail!(
            "the audit API takes a token from the operator's --admin-token-file: pass --token-file or MAILHOOK_ADMIN_TOKEN_FILE"
        );
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the token file {}", path.display()))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .with_context(|| format!("{} holds no token", path.display()))
}

fn url(operator: &Operator, path: &str) -> anyhow::Result<reqwest::Url> {
    let mut url = reqwest::Url::parse(&operator.admin_url)
        .with_context(|| format!("--admin-url {:?} is not a URL", operator.admin_url))?;
    url.path_segments_mut()
        .map_err(|()| anyhow::anyhow!("--admin-url {:?} cannot take a path", operator.admin_url))?
        .pop_if_empty()
        .extend(["v1", "audit", path]);
    Ok(url)
}

async fn get(operator: &Operator, path: &str, query: &[(&str, String)], authenticated: bool) -> anyhow::Result<String> {
    let url = url(operator, path)?;
    let mut request = reqwest::Client::new().get(url.clone()).query(query);
    if authenticated {
        request = request.bearer_auth(token(operator)?);
    }
    send(request, &url).await
}

async fn send(request: reqwest::RequestBuilder, url: &reqwest::Url) -> anyhow::Result<String> {
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach the operator at {url}"))?;
    let status = response.status();
    let body = response.text().await.context("reading the answer")?;
    if !status.is_success() {
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
            .unwrap_or(body);
        bail!("the operator answered {status}: {message}");
    }
    Ok(body)
}

/// Runs the subcommand; returns what to print on stdout.
pub async fn run(action: Action) -> anyhow::Result<String> {
    match action {
        Action::Keygen { origin } => {
            let (skey, vkey) = crate::audit::key::Key::generate(&origin)?;
            eprintln!("verifier key (auditors keep it; `mailhook audit key` prints it too): {vkey}");
            Ok(format!("{skey}\n"))
        }
        Action::Key { operator } => get(&operator, "key", &[], false).await,
        Action::Record {
            operator,
            action,
            subject,
            detail,
        } => {
            let url = url(&operator, "custody")?;
            let request = reqwest::Client::new()
                .post(url.clone())
                .bearer_auth(token(&operator)?)
                .header("content-type", "application/json")
                .body(serde_json::to_vec(
                    &serde_json::json!({ "action": action, "subject": subject, "detail": detail }),
                )?);
            let body = send(request, &url).await?;
            let index = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["index"].as_u64());
            Ok(match index {
                Some(index) => format!("recorded at index {index}\n"),
                None => "recorded\n".into(),
            })
        }
        Action::Checkpoint { operator, size } => {
            let query: Vec<(&str, String)> = size.map(|s| ("size", s.to_string())).into_iter().collect();
            get(&operator, "checkpoint", &query, true).await
        }
        Action::Prove {
            operator,
            event,
            index,
            from,
        } => {
            let query: Vec<(&str, String)> = match (event, index, from) {
                (Some(e), None, None) => vec![("event", e)],
                (None, Some(i), None) => vec![("index", i.to_string())],
                (None, None, Some(f)) => vec![("from", f.to_string())],
                _ => bail!("name one of --event, --index or --from"),
            };
            let body = get(&operator, "prove", &query, true).await?;
            let evidence: Evidence = serde_json::from_str(&body).context("the operator's evidence does not parse")?;
            Ok(format!("{}\n", serde_json::to_string_pretty(&evidence)?))
        }
        Action::Verify { key, witness, file } => {
            let vkey = match std::fs::read_to_string(&key) {
                Ok(text) => text.trim().to_string(),
                Err(_) => key.trim().to_string(),
            };
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading stdin")?
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?
            };
            let mut evidence: Evidence =
                serde_json::from_str(&text).with_context(|| format!("{} is not audit evidence", file.display()))?;
            if let Some(path) = &witness {
                // The witness's own copy of the older checkpoint is what the proof must
                // reach: the log's copy could have been rewritten with it.
                let [check] = evidence.consistency.as_mut_slice() else {
                    bail!(
                        "--witness checks one consistency proof: give it the evidence of `mailhook audit prove --from <the witness checkpoint's size>`"
                    );
                };
                check.old = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            }
            let verified =
                verify(&evidence, &vkey).map_err(|e| anyhow::anyhow!("FAILED: {}", crate::error_chain(&e)))?;
            let mut out = format!(
                "checkpoint ok: origin={} size={}\n",
                verified.checkpoint.origin, verified.checkpoint.size
            );
            for index in verified.records {
                out.push_str(&format!("inclusion ok: index={index}\n"));
            }
            for old in verified.extends {
                out.push_str(&format!("consistency ok: {old} -> {}\n", verified.checkpoint.size));
            }
            Ok(out)
        }
    }
}
