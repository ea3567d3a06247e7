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
        ],
    )
    .await;
    apply_siem(&ns, &receiver.url("/hooks"), "");
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
