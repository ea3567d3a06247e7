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
                api.patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&crd),
                )
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
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
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
    log: std::path::PathBuf,
}

impl Operator {
    pub fn start(ns: &TestNamespace) -> Operator {
        let log = std::env::temp_dir().join(format!("mailhook-operator-{}.log", ns.name));
        let out = std::fs::File::create(&log).expect("create operator log");
        let err = out.try_clone().expect("clone log handle");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_mailhook"))
            .args([
                "run",
                "--http-addr",
                "127.0.0.1:0",
                "--watch-namespace",
                &ns.name,
            ])
            .env("RUST_LOG", "info,mailhook=debug")
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start mailhook run");
        Operator { child, log }
    }

    /// The operator's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Polls `get` until `check` holds, for up to 30 s; panics with the last value seen.
pub async fn eventually<T: std::fmt::Debug, F, Fut>(
    what: &str,
    mut get: F,
    check: impl Fn(&T) -> bool,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
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
