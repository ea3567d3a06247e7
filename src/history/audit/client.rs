//! `mailhook audit`: the audit API's client (`key`, `checkpoint`, `prove`, `record`,
//! `export`, asking a running operator's admin port like `mailhook attempts` does), and
//! what needs no operator: `keygen`, and `verify`, which checks evidence or an exported
//! bundle offline with only the verifier key.

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
    /// Write an investigation bundle to a new directory: every record about the events,
    /// with their inclusion proofs against one signed checkpoint (and its consistency with
    /// an older one, given --from), for `verify` to check offline. The export is itself
    /// recorded in the log, by the admin token's name.
    Export {
        #[command(flatten)]
        operator: Operator,
        /// An event id (repeat it for more): its acceptance and every delivery attempt.
        #[arg(long = "event", required = true)]
        events: Vec<String>,
        /// The size of an older checkpoint (a witness's, the last bundle's) to prove the
        /// bundle's checkpoint extends.
        #[arg(long)]
        from: Option<u64>,
        /// The directory to create (it must not exist, or be empty).
        #[arg(long)]
        output: PathBuf,
    },
    /// Check evidence or an exported bundle offline with the verifier key only: the
    /// checkpoint's signature, each record's inclusion, each older checkpoint's
    /// consistency, and that a bundle's files are the records proven. Exits non-zero on the
    /// first failure, naming it.
    Verify {
        /// The verifier key (`mailhook audit key`), or a file holding it.
        #[arg(long)]
        key: String,
        /// A checkpoint a witness kept (a file): the evidence's consistency proof is checked
        /// from it, whatever older checkpoint the evidence carries.
        #[arg(long)]
        witness: Option<PathBuf>,
        /// The evidence file (`-` for stdin), or a bundle's directory.
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
    answered(response).await
}

/// The body of a successful answer; otherwise the operator's error.
async fn answered(response: reqwest::Response) -> anyhow::Result<String> {
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
        Action::Export {
            operator,
            events,
            from,
            output,
        } => export(&operator, &events, from, &output).await,
        Action::Verify { key, witness, file } => {
            let vkey = match std::fs::read_to_string(&key) {
                Ok(text) => text.trim().to_string(),
                Err(_) => key.trim().to_string(),
            };
            let bundle = file.is_dir();
            let evidence_file = if bundle { file.join(EVIDENCE) } else { file.clone() };
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading stdin")?
            } else {
                std::fs::read_to_string(&evidence_file)
                    .with_context(|| format!("cannot read {}", evidence_file.display()))?
            };
            let mut evidence: Evidence = serde_json::from_str(&text)
                .with_context(|| format!("{} is not audit evidence", evidence_file.display()))?;
            if bundle {
                check_bundle(&file, &evidence).map_err(|e| anyhow::anyhow!("FAILED: {e}"))?;
            }
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

/// A bundle's files: the evidence, its checkpoint as a note of its own, and each record.
const EVIDENCE: &str = "evidence.json";
const CHECKPOINT: &str = "checkpoint";
const RECORDS: &str = "records";

/// Most events in one bundle (the API's limit).
const MAX_BUNDLE_EVENTS: usize = 1000;

async fn export(
    operator: &Operator,
    events: &[String],
    from: Option<u64>,
    output: &std::path::Path,
) -> anyhow::Result<String> {
    if events.iter().any(|e| e.is_empty() || e.contains(',')) {
        bail!("--event takes one event id, without commas");
    }
    if events.len() > MAX_BUNDLE_EVENTS {
        bail!("one bundle holds at most {MAX_BUNDLE_EVENTS} events: export them in several");
    }
    if output.exists()
        && std::fs::read_dir(output)
            .with_context(|| format!("--output {} is not a directory", output.display()))?
            .next()
            .is_some()
    {
        bail!("--output {} is not empty: name a new directory", output.display());
    }
    let mut query = vec![("events", events.join(","))];
    if let Some(from) = from {
        query.push(("from", from.to_string()));
    }
    // The operator records the export as an act of custody before it answers.
    let url = url(operator, "prove")?;
    let response = reqwest::Client::new()
        .get(url.clone())
        .query(&query)
        .bearer_auth(token(operator)?)
        .send()
        .await
        .with_context(|| format!("cannot reach the operator at {url}"))?;
    let recorded = response
        .headers()
        .get(super::CUSTODY_INDEX)
        .and_then(|v| v.to_str().ok())
        .map(|i| format!(" (the export is the log's record {i})"))
        .unwrap_or_default();
    let body = answered(response).await?;
    let evidence: Evidence = serde_json::from_str(&body).context("the operator's evidence does not parse")?;
    // Written beside the output and renamed into place whole: a bundle that is there is
    // complete.
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bundle".into());
    let staging = output.with_file_name(format!(".{name}.partial-{}", uuid::Uuid::now_v7().simple()));
    let written = write_bundle(&staging, &evidence).and_then(|()| {
        std::fs::rename(&staging, output).with_context(|| format!("cannot move the bundle to {}", output.display()))
    });
    if let Err(e) = written {
        // A partial bundle that cannot be removed is named, for the user to remove.
        return Err(match std::fs::remove_dir_all(&staging) {
            Ok(()) => e,
            Err(left) => e.context(format!("the partial bundle {} is left: {left}", staging.display())),
        });
    }
    let size = evidence
        .checkpoint
        .lines()
        .nth(1)
        .and_then(|l| l.parse::<u64>().ok())
        .unwrap_or(0);
    Ok(format!(
        "wrote {}: {} records at checkpoint size {size}{recorded}; check it with `mailhook audit verify --key <verifier key> {}`\n",
        output.display(),
        evidence.inclusion.len(),
        output.display()
    ))
}

fn write_bundle(dir: &std::path::Path, evidence: &Evidence) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join(RECORDS)).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: &std::path::Path, bytes: &[u8]| -> anyhow::Result<()> {
        std::fs::write(dir.join(name), bytes).with_context(|| format!("cannot write {}", dir.join(name).display()))
    };
    write(
        EVIDENCE.as_ref(),
        format!("{}\n", serde_json::to_string_pretty(evidence)?).as_bytes(),
    )?;
    write(CHECKPOINT.as_ref(), evidence.checkpoint.as_bytes())?;
    for inclusion in &evidence.inclusion {
        use base64::Engine as _;
        let record = base64::engine::general_purpose::STANDARD
            .decode(&inclusion.record)
            .context("the operator's evidence holds a record that is not base64")?;
        write(
            &std::path::Path::new(RECORDS).join(format!("{}.json", inclusion.index)),
            &record,
        )?;
    }
    Ok(())
}

/// That a bundle's files are what its evidence proves: its checkpoint file is the
/// evidence's, and its records directory holds exactly the records proven, byte for byte
/// (the evidence is checked by `verify`; these are the copies a reader opens).
fn check_bundle(dir: &std::path::Path, evidence: &Evidence) -> Result<(), String> {
    // Only the bundle's own entries, each a plain file (or the records directory): a link
    // or a device in a bundle from elsewhere is not followed.
    let top = std::fs::read_dir(dir).map_err(|e| format!("the bundle cannot be read: {e}"))?;
    for entry in top {
        let entry = entry.map_err(|e| format!("the bundle cannot be read: {e}"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = entry.file_type().map_err(|e| format!("{name} cannot be read: {e}"))?;
        let expected = match name.as_str() {
            EVIDENCE | CHECKPOINT => kind.is_file(),
            RECORDS => kind.is_dir(),
            _ => {
                return Err(format!(
                    "{name} is not part of a bundle (evidence.json, checkpoint, records/)"
                ));
            }
        };
        if !expected {
            return Err(format!("{name} is not a plain file or directory"));
        }
    }
    let checkpoint = read_at_most(&dir.join(CHECKPOINT), evidence.checkpoint.len())
        .map_err(|e| format!("the bundle's {CHECKPOINT} file cannot be read: {e}"))?;
    if checkpoint != evidence.checkpoint.as_bytes() {
        return Err(format!(
            "the bundle's {CHECKPOINT} file is not the checkpoint its evidence is proven against"
        ));
    }
    let mut proven = std::collections::BTreeMap::new();
    for inclusion in &evidence.inclusion {
        use base64::Engine as _;
        let record = base64::engine::general_purpose::STANDARD
            .decode(&inclusion.record)
            .map_err(|_| format!("the record of index {} is not base64", inclusion.index))?;
        proven.insert(format!("{}.json", inclusion.index), (inclusion.index, record));
    }
    let listing = std::fs::read_dir(dir.join(RECORDS))
        .map_err(|e| format!("the bundle's {RECORDS} directory cannot be read: {e}"))?;
    let mut seen = std::collections::BTreeSet::new();
    for entry in listing {
        let entry = entry.map_err(|e| format!("the bundle's {RECORDS} directory cannot be read: {e}"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((index, record)) = proven.get(&name) else {
            return Err(format!("{RECORDS}/{name} is not a record the evidence proves"));
        };
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            return Err(format!("{RECORDS}/{name} is not a plain file"));
        }
        let bytes =
            read_at_most(&entry.path(), record.len()).map_err(|e| format!("{RECORDS}/{name} cannot be read: {e}"))?;
        if &bytes != record {
            return Err(format!(
                "{RECORDS}/{name} differs from the record of index {index} that the evidence proves"
            ));
        }
        seen.insert(name);
    }
    if let Some((name, (index, _))) = proven.iter().find(|(name, _)| !seen.contains(*name)) {
        return Err(format!("{RECORDS}/{name} (the record of index {index}) is missing"));
    }
    Ok(())
}

/// A file's bytes, at most one more than `len`: enough to tell it differs from `len` bytes.
fn read_at_most(path: &std::path::Path, len: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut bytes = Vec::with_capacity(len + 1);
    std::fs::File::open(path)?
        .take(u64::try_from(len).unwrap_or(u64::MAX).saturating_add(1))
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn path(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn bundle(records: &[(u64, &[u8])]) -> (Scratch, Evidence) {
        use base64::Engine as _;
        let dir = Scratch(std::env::temp_dir().join(format!("mailhook-bundle-test-{}", uuid::Uuid::now_v7().simple())));
        std::fs::create_dir_all(dir.path().join(RECORDS)).expect("records");
        std::fs::write(dir.path().join(CHECKPOINT), "note\n").expect("checkpoint");
        let mut inclusion = Vec::new();
        for (index, bytes) in records {
            std::fs::write(dir.path().join(RECORDS).join(format!("{index}.json")), bytes).expect("record");
            inclusion.push(crate::audit::proof::Inclusion {
                index: *index,
                record: base64::engine::general_purpose::STANDARD.encode(bytes),
                proof: vec![],
            });
        }
        let evidence = Evidence {
            checkpoint: "note\n".into(),
            inclusion,
            consistency: vec![],
        };
        (dir, evidence)
    }

    #[test]
    fn a_bundle_whose_files_are_its_records_passes_and_any_change_is_named() {
        let (dir, evidence) = bundle(&[(3, b"{\"a\":1}"), (7, b"{\"b\":2}")]);
        assert_eq!(check_bundle(dir.path(), &evidence), Ok(()));

        std::fs::write(dir.path().join(RECORDS).join("7.json"), b"{\"b\":3}").expect("edit");
        let err = check_bundle(dir.path(), &evidence).expect_err("edited");
        assert!(err.contains("records/7.json differs"), "{err}");

        std::fs::remove_file(dir.path().join(RECORDS).join("7.json")).expect("remove");
        let err = check_bundle(dir.path(), &evidence).expect_err("missing");
        assert!(
            err.contains("records/7.json (the record of index 7) is missing"),
            "{err}"
        );

        std::fs::write(dir.path().join(RECORDS).join("9.json"), b"{}").expect("add");
        let err = check_bundle(dir.path(), &evidence).expect_err("added");
        assert!(err.contains("records/9.json is not a record"), "{err}");

        let (dir, evidence) = bundle(&[(1, b"{}")]);
        std::fs::write(dir.path().join("notes.txt"), "x").expect("extra");
        let err = check_bundle(dir.path(), &evidence).expect_err("extra file");
        assert!(err.contains("notes.txt is not part of a bundle"), "{err}");
        std::fs::remove_file(dir.path().join("notes.txt")).expect("remove");
        std::fs::remove_file(dir.path().join(RECORDS).join("1.json")).expect("remove");
        std::os::unix::fs::symlink("/dev/zero", dir.path().join(RECORDS).join("1.json")).expect("link");
        let err = check_bundle(dir.path(), &evidence).expect_err("a link");
        assert!(err.contains("records/1.json is not a plain file"), "{err}");

        let (dir, evidence) = bundle(&[(1, b"{}")]);
        std::fs::write(dir.path().join(CHECKPOINT), "other\n").expect("swap");
        let err = check_bundle(dir.path(), &evidence).expect_err("checkpoint");
        assert!(err.contains("checkpoint file is not"), "{err}");
    }
}
