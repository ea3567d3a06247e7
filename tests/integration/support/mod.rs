//! Test harness: a `kube::Client` for the control plane that `tests/testenv/up` started
//! (found through `KUBECONFIG`), the CRDs installed once per process, and one namespace
//! per test so tests run in parallel without seeing each other's objects.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config};
use mailhook::api::{MailboxFilter, WebhookSubscription};
use tokio::sync::OnceCell;

const FIELD_MANAGER: &str = "mailhook-tests";

static CRDS_INSTALLED: OnceCell<()> = OnceCell::const_new();
static NAMESPACE_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A client for the test control plane. Fails with a hint when none is running.
pub async fn client() -> Client {
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "integration tests need a real control plane: run tests/run, or eval \"$(tests/testenv/up)\" first"
    );
    let config = Config::infer().await.expect("KUBECONFIG is readable");
    Client::try_from(config).expect("client for the test control plane")
}

/// Installs (server-side applies) the CRDs `mailhook crdgen` prints, once per test
/// process, and waits until the apiserver serves them.
pub async fn install_crds(client: &Client) {
    CRDS_INSTALLED
        .get_or_init(|| async {
            let api: Api<CustomResourceDefinition> = Api::all(client.clone());
            for crd in mailhook::api::crds() {
                let name = crd.metadata.name.clone().expect("CRDs are named");
                api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&crd))
                    .await
                    .unwrap_or_else(|e| panic!("apply CRD {name}: {e}"));
                tokio::time::timeout(
                    Duration::from_secs(30),
                    await_condition(api.clone(), &name, conditions::is_crd_established()),
                )
                .await
                .unwrap_or_else(|_| panic!("CRD {name} not established within 30s"))
                .unwrap_or_else(|e| panic!("watch CRD {name}: {e}"));
            }
        })
        .await;
}

/// A namespace owned by one test. Objects of our kinds in it are deleted and the
/// namespace finalized when it is dropped (no kube-controller-manager runs here, so
/// nothing else would finish a namespace deletion).
pub struct TestNamespace {
    pub client: Client,
    pub name: String,
}

impl TestNamespace {
    /// A client with the CRDs installed and a fresh namespace named after `test`.
    pub async fn new(test: &str) -> TestNamespace {
        let client = client().await;
        install_crds(&client).await;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "{}-{:x}{:x}",
            test.replace('_', "-").chars().take(40).collect::<String>(),
            std::process::id() ^ nanos,
            NAMESPACE_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([("mailhook.io/test".to_string(), "true".to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        TestNamespace { client, name }
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let name = self.name.clone();
        // The test's runtime may be gone or single-threaded: clean up on a thread of our
        // own with a fresh client. Best effort; the control plane is removed at the end.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async move {
                let client = client().await;
                let lp = ListParams::default();
                let dp = DeleteParams::default();
                let _ = Api::<WebhookSubscription>::namespaced(client.clone(), &name)
                    .delete_collection(&dp, &lp)
                    .await;
                let _ = Api::<MailboxFilter>::namespaced(client.clone(), &name)
                    .delete_collection(&dp, &lp)
                    .await;
                let namespaces: Api<Namespace> = Api::all(client.clone());
                let _ = namespaces.delete(&name, &dp).await;
                // Finish what the namespace controller would: drop the finalizer.
                let finalize = serde_json::json!({
                    "apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": name}, "spec": {"finalizers": []}
                });
                let _ = namespaces
                    .replace_subresource("finalize", &name, &PostParams::default(), &finalize)
                    .await;
            });
        })
        .join();
    }
}

/// Path of the kubectl the test environment built.
pub fn kubectl() -> std::process::Command {
    let path = std::env::var("MAILHOOK_KUBECTL").unwrap_or_else(|_| "kubectl".to_string());
    std::process::Command::new(path)
}

/// The real `mailhook run` binary, serving one namespace, stopped when dropped.
pub struct Operator {
    child: std::process::Child,
    args: Vec<String>,
    log: std::path::PathBuf,
    token_file: std::path::PathBuf,
    pub admin: std::net::SocketAddr,
    pub ingest: std::net::SocketAddr,
}

/// The bearer token every test operator accepts.
pub const INGEST_TOKEN: &str = "test-ingest-token";

/// A free loopback port (another process may take it before we bind; tests accept that).
pub fn free_port() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

impl Operator {
    pub fn start(ns: &TestNamespace) -> Operator {
        Operator::start_with(ns, &[])
    }

    /// Starts `mailhook run`; when another process took one of the free ports meanwhile
    /// (parallel tests), starts again on new ones.
    pub fn start_with(ns: &TestNamespace, extra: &[&str]) -> Operator {
        for _ in 0..5 {
            let mut operator = Self::try_start(ns, extra);
            if operator.wait_listening() {
                return operator;
            }
        }
        panic!("the operator could not bind its ports five times in a row");
    }

    /// Waits until both ports are bound; false if the process exited because a port was taken.
    fn wait_listening(&mut self) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        // The last listener the operator opens.
        let last = if self.args.iter().any(|a| a == "--smtp-addr") {
            "SMTP journal receiver listening"
        } else {
            "ingest API listening"
        };
        while std::time::Instant::now() < deadline {
            if self.log().contains(last) {
                return true;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                if self.log().contains("Address already in use") {
                    return false;
                }
                panic!("the operator exited at start; its log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    fn try_start(ns: &TestNamespace, extra: &[&str]) -> Operator {
        let log = std::env::temp_dir().join(format!("mailhook-operator-{}.log", ns.name));
        let token_file = std::env::temp_dir().join(format!("mailhook-tokens-{}", ns.name));
        std::fs::write(&token_file, format!("# test tokens\n{INGEST_TOKEN}\n")).expect("write token file");
        let (admin, ingest) = (free_port(), free_port());
        let mut args: Vec<String> = ["run", "--watch-namespace", &ns.name, "--shards", "2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend([
            "--http-addr".into(),
            admin.to_string(),
            "--ingest-addr".into(),
            ingest.to_string(),
        ]);
        args.extend(["--ingest-token-file".into(), token_file.display().to_string()]);
        // Test receivers listen on loopback, which the egress guard refuses by default; a
        // test that sets its own egress flags gets only those.
        if !extra.iter().any(|a| a.starts_with("--egress")) {
            args.extend(["--egress-allow".into(), "127.0.0.1/32".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Self::spawn(&args, &log, false);
        Operator {
            child,
            args,
            log,
            token_file,
            admin,
            ingest,
        }
    }

    fn spawn(args: &[String], log: &std::path::Path, append: bool) -> std::process::Child {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(log)
            .expect("open operator log");
        let err = out.try_clone().expect("clone log handle");
        std::process::Command::new(env!("CARGO_BIN_EXE_mailhook"))
            .args(args)
            .env("RUST_LOG", "info,mailhook=debug")
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start mailhook run")
    }

    /// Sends SIGTERM (what the kubelet sends) and waits up to `within` for the exit.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGKILL, then start again with the same flags (same ports, same store).
    pub fn kill_and_restart(&mut self) {
        self.kill();
        self.restart();
    }

    /// SIGKILL: no shutdown code runs. `restart` starts it again.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the stopped operator again with the same flags (same ports, same store).
    pub fn restart(&mut self) {
        self.child = Self::spawn(&self.args, &self.log, true);
    }

    /// Starts the stopped operator again without the consecutive flags `remove` (e.g.
    /// `["--watch-namespace", "b"]`).
    pub fn restart_without(&mut self, remove: &[&str]) {
        if let Some(at) = self.args.windows(remove.len()).position(|w| w.iter().eq(remove.iter())) {
            self.args.drain(at..at + remove.len());
        }
        self.restart();
    }

    /// The value of one Prometheus series (`name{labels}` exactly as exposed), 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// The operator's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until /readyz answers 200; shows the operator's log if it never does.
    pub async fn ready(&self) {
        let url = format!("http://{}/readyz", self.admin);
        for _ in 0..150 {
            if reqwest::get(&url).await.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("operator not ready after 30s; its log:\n{}", self.log());
    }

    /// The Prometheus exposition from the admin port.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("body")
    }

    /// POSTs an NDJSON batch to the ingest API; returns (status, body).
    pub async fn ingest(&self, events: &[serde_json::Value]) -> (u16, serde_json::Value) {
        let body: String = events.iter().map(|e| format!("{e}\n")).collect();
        let r = reqwest::Client::new()
            .post(format!("http://{}/v1/events", self.ingest))
            .bearer_auth(INGEST_TOKEN)
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await
            .expect("ingest request");
        let status = r.status().as_u16();
        (
            status,
            serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or_default(),
        )
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- log of the operator under test:\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_file(&self.token_file);
    }
}

/// tests/receiver/receiver.py: verifies every delivery with the `standardwebhooks` PyPI
/// library and records it.
pub struct Receiver {
    child: std::process::Child,
    pub port: u16,
    /// Where /_mode and /_deliveries answer (plain HTTP).
    control: String,
    /// Where deliveries go, without the path.
    base: String,
}

/// One delivery as the receiver saw it.
#[derive(serde::Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct Received {
    pub webhook_id: Option<String>,
    pub verified: bool,
    pub answered: u16,
    pub body: String,
    /// The `x-` headers it carried (extra endpoint headers).
    pub headers: std::collections::BTreeMap<String, String>,
    /// The `webhook-signature` header.
    #[serde(default)]
    pub signatures: String,
    /// Common name of the client certificate (mutual TLS).
    #[serde(default)]
    pub client_cert: Option<String>,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_default()
    }
}

impl Receiver {
    /// A receiver on 127.0.0.1 verifying `v1` signatures with `secret`.
    pub fn start(secret: &str) -> Receiver {
        Self::start_args(&["--secret", secret])
    }

    /// A receiver with receiver.py's own flags (--host, --public-key, --tls-cert, ...).
    pub fn start_args(args: &[&str]) -> Receiver {
        use std::io::BufRead;
        let mut child = std::process::Command::new("python3")
            .arg(repo_path("tests/receiver/receiver.py"))
            .args(args)
            .arg("--quiet")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start receiver.py");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("receiver prints its port");
        let mut words = line.trim().strip_prefix("listening on ").unwrap_or_default().split(' ');
        let port: u16 = words
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("receiver said {line:?}"));
        let control_port: Option<u16> = match (words.next(), words.next()) {
            (Some("control"), Some(p)) => p.parse().ok(),
            _ => None,
        };
        let flag = |name: &str| {
            args.iter()
                .position(|a| *a == name)
                .and_then(|i| args.get(i + 1))
                .copied()
        };
        let host = flag("--host").unwrap_or("127.0.0.1").to_string();
        let scheme = if flag("--tls-cert").is_some() { "https" } else { "http" };
        let control = match control_port {
            Some(c) => format!("http://127.0.0.1:{c}"),
            None => format!("http://{host}:{port}"),
        };
        Receiver {
            child,
            port,
            control,
            base: format!("{scheme}://{host}:{port}"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// From now on, answer deliveries with `status`.
    pub async fn answer(&self, status: u16) {
        self.mode(&format!(r#"{{"status": {status}}}"#)).await;
    }

    /// Switches the receiver's behaviour (see receiver.py: status, redirect, echo).
    pub async fn mode(&self, json: &str) {
        reqwest::Client::new()
            .post(format!("{}/_mode", self.control))
            .body(json.to_string())
            .send()
            .await
            .expect("set receiver mode");
    }

    pub async fn deliveries(&self) -> Vec<Received> {
        let text = reqwest::get(format!("{}/_deliveries", self.control))
            .await
            .expect("receiver")
            .text()
            .await
            .expect("body");
        text.lines()
            .map(|l| serde_json::from_str(l).expect("delivery record"))
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `get` until `check` holds, for up to 60 s (a ceiling for a loaded machine, not a speed
/// assertion); panics with the last value seen.
pub async fn eventually<T: std::fmt::Debug, F, Fut>(what: &str, mut get: F, check: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let value = get().await;
        if check(&value) {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}; last seen: {value:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs kubectl with `args` (and `stdin` if given); returns (success, stdout, stderr).
pub fn kubectl_run(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let mut child = kubectl()
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kubectl");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("kubectl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The repository's root, for examples/ and charts/.
pub fn repo_path(rel: &str) -> String {
    format!("{}/{rel}", env!("CARGO_MANIFEST_DIR"))
}

/// The signing secret of the `siem` fixture subscription.
pub const SIEM_SECRET: &str = "whsec_dGVzdC1zaWduaW5nLWtleS1mb3ItbWFpbGhvb2stMzI=";

/// Applies Secret `signing` and WebhookSubscription `siem` (message.received to `url`);
/// `spec_extra` holds further spec lines, indented two spaces.
pub fn apply_siem(ns: &TestNamespace, url: &str, spec_extra: &str) {
    let yaml = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: signing}}\nstringData: {{key: {SIEM_SECRET}}}\n---\n\
         apiVersion: mailhook.io/v1alpha1\nkind: WebhookSubscription\nmetadata: {{name: siem}}\nspec:\n  \
         endpoint: {{url: '{url}', allowInsecureHttp: true}}\n  signing: {{secretRef: {{name: signing}}}}\n  \
         eventTypes: [message.received]\n{spec_extra}"
    );
    let (ok, _, err) = kubectl_run(&["apply", "-n", &ns.name, "-f", "-"], Some(&yaml));
    assert!(ok, "{err}");
}

/// An ingest event for the `siem` subscription, with producer id `id`.
pub fn siem_event(id: &str) -> serde_json::Value {
    serde_json::json!({"type": "message.received", "eventId": id, "mailbox": "alice@finance.example.com",
           "from": "x@partner.org", "to": ["alice@finance.example.com"], "subject": "s"})
}

/// The `siem` subscription as it is now.
pub async fn siem(ns: &TestNamespace) -> mailhook::api::WebhookSubscription {
    ns.api::<mailhook::api::WebhookSubscription>()
        .get("siem")
        .await
        .expect("get")
}

/// Writes a self-signed P-256 certificate (valid one day) for `cn`, with `san` as its
/// subjectAltName (e.g. `IP:127.0.0.1`), and its key.
pub fn self_signed(cert: &std::path::Path, key: &std::path::Path, cn: &str, san: Option<&str>) {
    let mut command = std::process::Command::new("openssl");
    command
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ])
        .args(["-days", "1", "-subj", &format!("/CN={cn}")]);
    if let Some(san) = san {
        command.args(["-addext", &format!("subjectAltName={san}")]);
    }
    let made = command
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert)
        .output()
        .expect("openssl");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
}
