//! The audit log end to end: a real operator signs checkpoints of every event accepted and
//! every delivery attempt, and the evidence it gives checks with Go's `sumdb/note` and
//! `sumdb/tlog` (`tests/toolchain/tlogverify`, code this project did not write) as well
//! as with `mailhook audit verify`, offline, with only the verifier key.

use std::path::Path;

use serde_json::Value;

use crate::support::{
    Operator, Receiver, SIEM_SECRET, TestNamespace, apply_siem, eventually, mailhook, siem_event, wait_ready,
};

const ADMIN_TOKEN: &str = "audit-admin-token";

/// The Go verifier, built (or found built) from the module proxy.
fn tlogverify() -> String {
    let out = std::process::Command::new(crate::support::repo_path("tests/toolchain/tlogverify/build"))
        .output()
        .expect("run tests/toolchain/tlogverify/build");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("path").trim().to_string()
}

/// (passed, stdout, stderr) of the Go verifier on an evidence file.
fn go_verify(vkey: &str, file: &Path) -> (bool, String, String) {
    let out = std::process::Command::new(tlogverify())
        .args(["-vkey", vkey, &file.display().to_string()])
        .output()
        .expect("run tlogverify");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path
}

/// Both verifiers on one evidence file: (Go passed, mailhook passed, what they said).
fn both(vkey: &str, file: &Path) -> (bool, bool, String) {
    let (go, out, err) = go_verify(vkey, file);
    let (ours, out2, err2) = mailhook(&["audit", "verify", "--key", vkey, &file.display().to_string()]);
    (go, ours, format!("go: {out}{err}\nmailhook: {out2}{err2}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_are_proven_to_go_verifiers_and_the_log_stays_consistent_across_a_restart() {
    let ns = TestNamespace::new("audit").await;
    let dir = std::env::temp_dir().join(format!("mailhook-audit-{}", ns.name));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let tokens = write(&dir, "admin-token", &format!("{ADMIN_TOKEN}\n"));
    let (skey, vkey_made) = {
        let (ok, out, err) = mailhook(&["audit", "keygen", "--origin", "test.mailhook.example/audit"]);
        assert!(ok, "{err}");
        let vkey = err.rsplit(": ").next().expect("verifier key").trim().to_string();
        (out, vkey)
    };
    let key_file = write(&dir, "audit-key", &skey);
    let receiver = Receiver::start(SIEM_SECRET);
    let mut operator = Operator::start_with(
        &ns,
        &[
            "--store-dir",
            &dir.join("store").display().to_string(),
            "--admin-token-file",
            &tokens.display().to_string(),
            "--audit-key-file",
            &key_file.display().to_string(),
            "--audit-checkpoint-interval",
            "1s",
            "--audit-key-configmap",
            "mailhook-audit-key",
            "--leader-lease-namespace",
            &ns.name,
        ],
    )
    .await;
    apply_siem(&ns, &receiver.url("/hooks"), "");
    // The verifier key is where cluster users look, too.
    let published = eventually(
        "the verifier key is published on its ConfigMap",
        || async {
            ns.api::<k8s_openapi::api::core::v1::ConfigMap>()
                .get_opt("mailhook-audit-key")
                .await
                .ok()
                .flatten()
        },
        |cm| cm.is_some(),
    )
    .await
    .and_then(|cm| cm.data)
    .unwrap_or_default();
    assert_eq!(published.get("vkey"), Some(&vkey_made), "{published:?}");
    assert_eq!(
        published.get("origin").map(String::as_str),
        Some("test.mailhook.example/audit")
    );
    wait_ready(&ns, "siem").await;
    let (status, body) = operator.ingest(&[siem_event("audit-1"), siem_event("audit-2")]).await;
    assert_eq!(status, 202, "{body}");
    let event_id = body["events"][0]["id"].as_str().expect("event id").to_string();
    eventually("both delivered", || receiver.deliveries(), |got| got.len() >= 2).await;

    let admin = format!("http://{}", operator.admin);
    let base = |args: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.extend([
            "--admin-url".into(),
            admin.clone(),
            "--token-file".into(),
            tokens.display().to_string(),
        ]);
        v
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        mailhook(&refs)
    };
    // The key the operator serves is the one made for it; no token needed for it.
    let (ok, vkey, err) = mailhook(&["audit", "key", "--admin-url", &admin]);
    assert!(ok, "{err}");
    let vkey = vkey.trim().to_string();
    assert_eq!(vkey, vkey_made);

    // The event's evidence: its acceptance and its delivery attempt, once the attempt is
    // logged (it is committed with the completion).
    let evidence = eventually(
        "the event's acceptance and delivery logged",
        || {
            let args = base(&["audit", "prove", "--event", &event_id]);
            async move { run(args) }
        },
        |(ok, out, _)| {
            *ok && serde_json::from_str::<Value>(out)
                .is_ok_and(|e| e["inclusion"].as_array().is_some_and(|a| a.len() >= 2))
        },
    )
    .await
    .1;
    let parsed: Value = serde_json::from_str(&evidence).expect("evidence");
    let records: Vec<Value> = parsed["inclusion"]
        .as_array()
        .expect("inclusion")
        .iter()
        .map(|i| {
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(i["record"].as_str().expect("record"))
                .expect("base64");
            serde_json::from_slice(&bytes).expect("record json")
        })
        .collect();
    assert_eq!(records[0]["kind"], "event", "{records:?}");
    assert_eq!(records[0]["eventId"], event_id.as_str());
    assert_eq!(records[1]["kind"], "delivery", "{records:?}");
    assert_eq!(records[1]["httpStatus"], 200);
    assert!(
        records[1]["bodySha256"].as_str().is_some_and(|s| s.len() == 64),
        "{records:?}"
    );
    let file = write(&dir, "event.json", &evidence);
    let (go, ours, said) = both(&vkey, &file);
    assert!(go && ours, "{said}");
    assert!(said.contains("inclusion ok"), "{said}");
    // The delivery carried the index of the event's acceptance, where the proof starts,
    // and its leaf names that acceptance.
    let accepted = parsed["inclusion"][0]["index"].as_u64().expect("index");
    assert_eq!(records[1]["eventIndex"], accepted, "{records:?}");
    let delivered = receiver.deliveries().await;
    let delivery = delivered
        .iter()
        .find(|r| r.body.contains(&event_id))
        .expect("the event's delivery");
    assert_eq!(
        delivery.headers.get("mailhook-log-index").map(String::as_str),
        Some(accepted.to_string().as_str()),
        "{:?}",
        delivery.headers
    );

    // A record altered after the fact fails both, naming it.
    let mut forged = parsed.clone();
    {
        use base64::Engine as _;
        let mut record = records[1].clone();
        record["httpStatus"] = 500.into();
        forged["inclusion"][1]["record"] = base64::engine::general_purpose::STANDARD
            .encode(serde_json::to_vec(&record).expect("json"))
            .into();
    }
    let file = write(&dir, "forged.json", &forged.to_string());
    let (go, ours, said) = both(&vkey, &file);
    assert!(!go && !ours, "{said}");
    let index = parsed["inclusion"][1]["index"].as_u64().expect("index");
    assert!(
        said.contains(&format!("index {index}")),
        "mailhook names the record: {said}"
    );
    // So does a checkpoint checked with another key.
    let (_, other) = Key::generate();
    let file = write(&dir, "event-again.json", &evidence);
    let (go, ours, said) = both(&other, &file);
    assert!(!go && !ours, "{said}");

    // A witness keeps a checkpoint; the log grows, the operator is killed and restarted,
    // grows again: the newest checkpoint still extends the witness's.
    let (ok, witness, err) = run(base(&["audit", "checkpoint"]));
    assert!(ok, "{err}");
    let old_size: u64 = witness.lines().nth(1).and_then(|l| l.parse().ok()).expect("size line");
    operator.ingest(&[siem_event("audit-3")]).await;
    operator.kill_and_restart().await;
    operator.ingest(&[siem_event("audit-4")]).await;
    eventually("all four delivered", || receiver.deliveries(), |got| got.len() >= 4).await;
    let consistency = eventually(
        "a checkpoint past the restart",
        || {
            let args = base(&["audit", "prove", "--from", &old_size.to_string()]);
            async move { run(args) }
        },
        |(ok, out, _)| {
            *ok && serde_json::from_str::<Value>(out).is_ok_and(|e| {
                e["checkpoint"]
                    .as_str()
                    .and_then(|c| c.lines().nth(1)?.parse::<u64>().ok())
                    .is_some_and(|size| size >= old_size + 4)
            })
        },
    )
    .await
    .1;
    let file = write(&dir, "consistency.json", &consistency);
    let (go, ours, said) = both(&vkey, &file);
    assert!(go && ours, "{said}");
    assert!(said.contains(&format!("consistency ok: {old_size} ->")), "{said}");
    eprintln!("{said}");

    // An act of custody (a restore, here) is recorded by the token's name and proven
    // like any leaf; a bad one is refused naming the field.
    let (ok, out, err) = run(base(&[
        "audit",
        "record",
        "--action",
        "restore",
        "--subject",
        "backup of 2026-03-01",
        "--detail",
        "checkpoints after size 3 are lost",
    ]));
    assert!(ok, "{err}");
    let index: u64 = out
        .trim()
        .strip_prefix("recorded at index ")
        .and_then(|n| n.parse().ok())
        .expect("the record's index");
    let (ok, evidence, err) = run(base(&["audit", "prove", "--index", &index.to_string()]));
    assert!(ok, "{err}");
    let file = write(&dir, "custody.json", &evidence);
    let (go, ours, said) = both(&vkey, &file);
    assert!(go && ours, "{said}");
    let custody: Value = {
        use base64::Engine as _;
        let parsed: Value = serde_json::from_str(&evidence).expect("evidence");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(parsed["inclusion"][0]["record"].as_str().expect("record"))
            .expect("base64");
        serde_json::from_slice(&bytes).expect("record")
    };
    assert_eq!(custody["kind"], "custody");
    assert_eq!(custody["action"], "restore");
    assert_eq!(custody["by"], "admin-token:admin", "{custody}");
    let (ok, _, err) = run(base(&["audit", "record", "--action", "Restore!", "--subject", "x"]));
    assert!(!ok && err.contains("400") && err.contains("action"), "{err}");

    // The audit API takes the admin token only.
    let (ok, _, err) = mailhook(&["audit", "checkpoint", "--admin-url", &admin]);
    assert!(!ok && err.contains("--token-file"), "{err}");
    let wrong = write(&dir, "wrong-token", "nope\n");
    let (ok, _, err) = mailhook(&[
        "audit",
        "checkpoint",
        "--admin-url",
        &admin,
        "--token-file",
        &wrong.display().to_string(),
    ]);
    assert!(!ok && err.contains("401"), "{err}");
    drop(operator);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Another verifier key, for the same origin.
struct Key;

impl Key {
    fn generate() -> (String, String) {
        let (ok, out, err) = mailhook(&["audit", "keygen", "--origin", "test.mailhook.example/audit"]);
        assert!(ok, "{err}");
        (out, err.rsplit(": ").next().expect("verifier key").trim().to_string())
    }
}

/// A test's scratch folder with an admin token file and a new audit key.
struct Keyed {
    dir: std::path::PathBuf,
    tokens: String,
    vkey: String,
    key_file: String,
}

impl Keyed {
    fn new(ns: &TestNamespace) -> Keyed {
        let dir = std::env::temp_dir().join(format!("mailhook-audit-{}", ns.name));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let tokens = write(&dir, "admin-token", &format!("{ADMIN_TOKEN}\n"))
            .display()
            .to_string();
        let (skey, vkey) = Key::generate();
        let key_file = write(&dir, "audit-key", &skey).display().to_string();
        Keyed {
            dir,
            tokens,
            vkey,
            key_file,
        }
    }
}

/// An operator with an audit key, an admin token and a checkpoint every second, and what
/// the tests ask it with.
struct Audited {
    operator: Operator,
    dir: std::path::PathBuf,
    tokens: String,
    vkey: String,
}

impl Audited {
    async fn start(ns: &TestNamespace, store: &[&str]) -> Audited {
        let Keyed {
            dir,
            tokens,
            vkey,
            key_file,
        } = Keyed::new(ns);
        let mut flags = store.to_vec();
        flags.extend([
            "--admin-token-file",
            &tokens,
            "--audit-key-file",
            &key_file,
            "--audit-checkpoint-interval",
            "1s",
        ]);
        let operator = Operator::start_with(ns, &flags).await;
        Audited {
            operator,
            dir,
            tokens,
            vkey,
        }
    }

    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let admin = format!("http://{}", self.operator.admin);
        let mut all = vec!["audit"];
        all.extend(args);
        all.extend(["--admin-url", &admin, "--token-file", &self.tokens]);
        mailhook(&all)
    }

    /// Evidence for an event once both its acceptance and a delivery are logged.
    async fn event_evidence(&self, event_id: &str) -> String {
        eventually(
            "the event's acceptance and delivery logged",
            || async { self.cli(&["prove", "--event", event_id]) },
            |(ok, out, _)| {
                *ok && serde_json::from_str::<Value>(out)
                    .is_ok_and(|e| e["inclusion"].as_array().is_some_and(|a| a.len() >= 2))
            },
        )
        .await
        .1
    }

    /// The newest checkpoint once it covers at least `size` leaves.
    async fn checkpoint_of_at_least(&self, size: u64) -> String {
        eventually(
            "a checkpoint of the grown log",
            || async { self.cli(&["checkpoint"]) },
            |(ok, out, _)| {
                *ok && out
                    .lines()
                    .nth(1)
                    .and_then(|l| l.parse::<u64>().ok())
                    .is_some_and(|s| s >= size)
            },
        )
        .await
        .1
    }
}

fn size_of(checkpoint: &str) -> u64 {
    checkpoint
        .lines()
        .nth(1)
        .and_then(|l| l.parse().ok())
        .expect("a checkpoint's second line is its size")
}

/// The index of the first delivery leaf in evidence.
fn delivery_leaf(evidence: &str) -> u64 {
    let parsed: Value = serde_json::from_str(evidence).expect("evidence");
    parsed["inclusion"][1]["index"].as_u64().expect("index")
}

async fn deliver_some(audited: &Audited, receiver: &Receiver, ns: &TestNamespace, ids: &[&str]) -> Vec<String> {
    apply_siem(ns, &receiver.url("/hooks"), "");
    wait_ready(ns, "siem").await;
    let events: Vec<Value> = ids.iter().map(|id| siem_event(id)).collect();
    let (status, body) = audited.operator.ingest(&events).await;
    assert_eq!(status, 202, "{body}");
    eventually("delivered", || receiver.deliveries(), |got| got.len() >= ids.len()).await;
    body["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_string())
        .collect()
}

/// A record edited in the embedded store, after the fact: the evidence the operator then
/// gives fails verification, naming the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_edited_in_the_embedded_store_fails_verification_naming_it() {
    let ns = TestNamespace::new("audit-edit").await;
    let store = std::env::temp_dir().join(format!("mailhook-audit-store-{}", ns.name));
    let _ = std::fs::remove_dir_all(&store);
    let receiver = Receiver::start(SIEM_SECRET);
    let mut audited = Audited::start(&ns, &["--store-dir", &store.display().to_string()]).await;
    let ids = deliver_some(&audited, &receiver, &ns, &["edit-1", "edit-2"]).await;
    let evidence = audited.event_evidence(&ids[0]).await;
    audited.event_evidence(&ids[1]).await;
    let leaf = delivery_leaf(&evidence);
    // An investigation bundle of both events verifies offline, and its export is logged.
    let before = audited.dir.join("bundle-before");
    let (ok, out, err) = audited.cli(&[
        "export",
        "--event",
        &ids[0],
        "--event",
        &ids[1],
        "--output",
        &before.display().to_string(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("records at checkpoint size"), "{out}");
    let exported = out;
    let records = std::fs::read_dir(before.join("records")).expect("records").count();
    assert!(records >= 4, "two acceptances and two deliveries: {records}");
    let (ours, out, err) = mailhook(&["audit", "verify", "--key", &audited.vkey, &before.display().to_string()]);
    assert!(ours, "{out}{err}");
    assert!(out.contains(&format!("inclusion ok: index={leaf}")), "{out}");
    let custody: u64 = exported
        .split("the log's record ")
        .nth(1)
        .and_then(|t| t.split(')').next())
        .and_then(|n| n.parse().ok())
        .expect("the export names its record");
    let (ok, proof, err) = audited.cli(&["prove", "--index", &custody.to_string()]);
    assert!(ok, "{err}");
    let record = {
        use base64::Engine as _;
        let parsed: Value = serde_json::from_str(&proof).expect("evidence");
        base64::engine::general_purpose::STANDARD
            .decode(parsed["inclusion"][0]["record"].as_str().expect("record"))
            .expect("base64")
    };
    let record = String::from_utf8_lossy(&record);
    assert!(
        record.contains("\"action\":\"export\"") && record.contains("admin-token:"),
        "{record}"
    );
    // A record's copy edited in the bundle is named.
    let copy = before.join("records").join(format!("{leaf}.json"));
    let text = std::fs::read_to_string(&copy).expect("copy");
    std::fs::write(&copy, text.replace("\"httpStatus\":200", "\"httpStatus\":503")).expect("edit the copy");
    let (ours, out, err) = mailhook(&["audit", "verify", "--key", &audited.vkey, &before.display().to_string()]);
    assert!(!ours, "an edited copy passed: {out}");
    assert!(err.contains(&format!("records/{leaf}.json differs")), "{err}");
    // The operator holds the store's lock: stopped, edited, started again.
    audited.operator.kill();
    {
        let db = redb::Database::open(store.join("mailhook.redb")).expect("open the store");
        let txn = db.begin_write().expect("write");
        {
            const RECORDS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("audit_records");
            use redb::ReadableTable as _;
            let mut records = txn.open_table(RECORDS).expect("audit_records");
            let body = records.get(leaf).expect("read").expect("the leaf").value().to_vec();
            let edited = String::from_utf8(body)
                .expect("utf8")
                .replace("\"httpStatus\":200", "\"httpStatus\":503");
            records.insert(leaf, edited.as_bytes()).expect("edit");
        }
        txn.commit().expect("commit");
    }
    audited.operator.restart().await;
    let after = audited.event_evidence(&ids[0]).await;
    // The edited record is what the store now serves.
    let parsed: Value = serde_json::from_str(&after).expect("evidence");
    let record = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(parsed["inclusion"][1]["record"].as_str().expect("record"))
            .expect("base64")
    };
    assert!(String::from_utf8_lossy(&record).contains("\"httpStatus\":503"));
    let file = write(&audited.dir, "after-edit.json", &after);
    let (go, ours, said) = both(&audited.vkey, &file);
    assert!(!go && !ours, "{said}");
    assert!(said.contains(&format!("index {leaf}")), "the record is named: {said}");
    // A bundle exported after the edit fails too, naming the record.
    let after_dir = audited.dir.join("bundle-after");
    let (ok, _, err) = audited.cli(&[
        "export",
        "--event",
        &ids[0],
        "--output",
        &after_dir.display().to_string(),
    ]);
    assert!(ok, "{err}");
    let (ours, out, err) = mailhook(&[
        "audit",
        "verify",
        "--key",
        &audited.vkey,
        &after_dir.display().to_string(),
    ]);
    assert!(!ours, "the edited store's bundle passed: {out}");
    assert!(err.contains(&format!("index {leaf}")), "the record is named: {err}");
    drop(audited);
    let _ = std::fs::remove_dir_all(&store);
}

/// On PostgreSQL: a record edited in the database fails verification naming it; and the
/// threat that matters, a history rewritten and re-signed with the operator's own key, is
/// caught by a witness's older checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgresql_an_edit_is_named_and_a_rewrite_resigned_with_the_key_fails_the_witness() {
    let ns = TestNamespace::new("audit-pg").await;
    let url = crate::pg::database("audit").await;
    let receiver = Receiver::start(SIEM_SECRET);
    let mut audited = Audited::start(&ns, &["--store-url", &url]).await;
    let ids = deliver_some(&audited, &receiver, &ns, &["pg-1", "pg-2"]).await;
    let evidence = audited.event_evidence(&ids[0]).await;
    let file = write(&audited.dir, "before.json", &evidence);
    let (go, ours, said) = both(&audited.vkey, &file);
    assert!(go && ours, "{said}");

    let db = mailhook::store::postgres::config(&url, None, None).expect("url");
    let client = mailhook::store::postgres::connect(&db).await.expect("connect");
    let leaf = delivery_leaf(&evidence);
    client
        .execute(
            "UPDATE audit_records SET body = convert_to(replace(convert_from(body, 'UTF8'), '\"httpStatus\":200', '\"httpStatus\":503'), 'UTF8') WHERE idx = $1",
            &[&i64::try_from(leaf).expect("index")],
        )
        .await
        .expect("edit");
    let after = audited.event_evidence(&ids[0]).await;
    let file = write(&audited.dir, "after-edit.json", &after);
    let (go, ours, said) = both(&audited.vkey, &file);
    assert!(!go && !ours, "{said}");
    assert!(said.contains(&format!("index {leaf}")), "the record is named: {said}");

    // A witness keeps a checkpoint.
    let witness = audited.checkpoint_of_at_least(4).await;
    let witnessed = size_of(&witness);
    let witness_file = write(&audited.dir, "witness", &witness);
    // Someone with the database rewrites the history from the start, checkpoints and all,
    // and lets the operator sign the new one with its own key.
    audited.operator.kill();
    client
        .batch_execute(
            "DELETE FROM audit_records; DELETE FROM audit_hashes; DELETE FROM audit_accepted; \
             UPDATE audit_head SET size = 0, frontier = ''; \
             DELETE FROM audit_checkpoints;",
        )
        .await
        .expect("rewrite");
    audited.operator.restart().await;
    let more: Vec<Value> = (0..witnessed).map(|i| siem_event(&format!("rewritten-{i}"))).collect();
    let (status, body) = audited.operator.ingest(&more).await;
    assert_eq!(status, 202, "{body}");
    audited.checkpoint_of_at_least(witnessed + 1).await;
    let (ok, evidence, err) = audited.cli(&["prove", "--from", &witnessed.to_string()]);
    assert!(ok, "{err}");
    let file = write(&audited.dir, "rewritten.json", &evidence);
    // The witness's checkpoint, not the log's, is where the proof must lead.
    let (ours, out, err) = mailhook(&[
        "audit",
        "verify",
        "--key",
        &audited.vkey,
        "--witness",
        &witness_file.display().to_string(),
        &file.display().to_string(),
    ]);
    assert!(!ours, "the rewrite passed the witness: {out}");
    assert!(err.contains("history was rewritten"), "{err}");
    let mut parsed: Value = serde_json::from_str(&evidence).expect("evidence");
    parsed["consistency"][0]["old"] = witness.clone().into();
    let file = write(&audited.dir, "rewritten-for-go.json", &parsed.to_string());
    let (go, out, err) = go_verify(&audited.vkey, &file);
    assert!(!go, "Go's tlog accepted the rewrite: {out}");
    assert!(err.contains("consistency"), "{err}");
}

/// Three replicas on PostgreSQL grow one tree; one is SIGKILLed, and the checkpoints on
/// both sides of the kill are consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_grow_one_tree_and_it_stays_consistent_across_a_sigkill() {
    let ns = TestNamespace::new("audit-replicas").await;
    let url = crate::pg::database("audit_replicas").await;
    let receiver = Receiver::start(SIEM_SECRET);
    let Keyed {
        dir,
        tokens,
        vkey,
        key_file,
    } = Keyed::new(&ns);
    let mut replicas = Vec::new();
    for name in ["audit-a", "audit-b", "audit-c"] {
        replicas.push(
            Operator::start_with(
                &ns,
                &[
                    "--store-url",
                    &url,
                    "--shared-store",
                    "--shards",
                    "8",
                    "--replica-name",
                    name,
                    "--leader-lease-namespace",
                    &ns.name,
                    "--admin-token-file",
                    &tokens,
                    "--audit-key-file",
                    &key_file,
                    "--audit-checkpoint-interval",
                    "1s",
                ],
            )
            .await,
        );
    }
    apply_siem(&ns, &receiver.url("/hooks"), "");
    wait_ready(&ns, "siem").await;
    let cli = |operator: &Operator, args: &[&str]| {
        let admin = format!("http://{}", operator.admin);
        let mut all = vec!["audit"];
        all.extend(args);
        all.extend(["--admin-url", &admin, "--token-file", &tokens]);
        mailhook(&all)
    };
    // Events through every replica.
    for (i, r) in replicas.iter().enumerate() {
        let (status, body) = r.ingest(&[siem_event(&format!("replica-{i}"))]).await;
        assert_eq!(status, 202, "{body}");
    }
    eventually("three delivered", || receiver.deliveries(), |got| got.len() >= 3).await;
    // Every replica serves the same tree.
    let before = eventually(
        "a checkpoint of all three events",
        || async { cli(&replicas[2], &["checkpoint"]) },
        |(ok, out, _)| {
            *ok && out
                .lines()
                .nth(1)
                .and_then(|l| l.parse::<u64>().ok())
                .is_some_and(|s| s >= 3)
        },
    )
    .await
    .1;
    let old = size_of(&before);
    replicas[0].kill();
    for (i, r) in replicas.iter().enumerate().skip(1) {
        let (status, body) = r.ingest(&[siem_event(&format!("after-kill-{i}"))]).await;
        assert_eq!(status, 202, "{body}");
    }
    eventually("five delivered", || receiver.deliveries(), |got| got.len() >= 5).await;
    let (ok, evidence, err) = eventually(
        "a checkpoint past the kill, from another replica",
        || async { cli(&replicas[1], &["prove", "--from", &old.to_string()]) },
        |(ok, out, _)| {
            *ok && serde_json::from_str::<Value>(out).is_ok_and(|e| {
                e["checkpoint"]
                    .as_str()
                    .and_then(|c| c.lines().nth(1)?.parse::<u64>().ok())
                    .is_some_and(|size| size >= old + 2)
            })
        },
    )
    .await;
    assert!(ok, "{err}");
    let file = write(&dir, "consistency.json", &evidence);
    let witness = write(&dir, "witness", &before);
    let (ours, out, err) = mailhook(&[
        "audit",
        "verify",
        "--key",
        &vkey,
        "--witness",
        &witness.display().to_string(),
        &file.display().to_string(),
    ]);
    assert!(ours, "{out}{err}");
    let mut parsed: Value = serde_json::from_str(&evidence).expect("evidence");
    parsed["consistency"][0]["old"] = before.clone().into();
    let file = write(&dir, "consistency-go.json", &parsed.to_string());
    let (go, out, err) = go_verify(&vkey, &file);
    assert!(go, "{out}{err}");
    // Each event was logged once, whichever replica took it.
    let last: Value = serde_json::from_str(&evidence).expect("evidence");
    let size = last["checkpoint"]
        .as_str()
        .and_then(|c| c.lines().nth(1)?.parse::<u64>().ok())
        .expect("size");
    assert!(size >= 10, "five events and five deliveries: {size}");
    let _ = std::fs::remove_dir_all(&dir);
}
