//! The control plane: a `kube::Client` for it, the CRDs installed once per process, one
//! namespace per test, kubectl, and our resources' status as tests read it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config};
use mailhook::api::{MailboxFilter, MailboxGrant, WebhookSubscription};
use tokio::sync::OnceCell;

use super::{eventually, repo_path};

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

/// A namespace owned by one test. Objects of our kinds in it (and its grant) are deleted
/// and the namespace finalized when it is dropped (no kube-controller-manager runs here,
/// so nothing else would finish a namespace deletion).
pub struct TestNamespace {
    pub client: Client,
    pub name: String,
}

impl TestNamespace {
    /// A fresh namespace named after `test`, granted every mailbox at full payload with
    /// raw message links (a MailboxGrant named like the namespace): what tests that are
    /// not about grants run under.
    pub async fn new(test: &str) -> TestNamespace {
        let ns = TestNamespace::ungranted(test).await;
        ns.grant(
            &ns.name,
            r#"{"mailboxes": ["*"], "maxPayloadMode": "full", "rawMessageLinks": true}"#,
        )
        .await;
        ns
    }

    /// Applies the MailboxGrant `name` with `spec` (JSON, without `namespaces`, which is
    /// set to this namespace); deleted with the namespace.
    pub async fn grant(&self, name: &str, spec: &str) {
        let mut spec: serde_json::Value = serde_json::from_str(spec).expect("grant spec is JSON");
        spec["namespaces"] = serde_json::json!([self.name]);
        let grant = serde_json::json!({
            "apiVersion": "mailhook.io/v1alpha1", "kind": "MailboxGrant",
            "metadata": {"name": name, "labels": {"mailhook.io/test-namespace": self.name}},
            "spec": spec,
        });
        Api::<MailboxGrant>::all(self.client.clone())
            .patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&grant))
            .await
            .unwrap_or_else(|e| panic!("apply MailboxGrant {name}: {e}"));
    }

    /// Deletes the MailboxGrant `name`.
    pub async fn revoke(&self, name: &str) {
        Api::<MailboxGrant>::all(self.client.clone())
            .delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("delete MailboxGrant {name}: {e}"));
    }

    /// A client with the CRDs installed and a fresh namespace named after `test`, which no
    /// grant covers: its subscriptions receive nothing until the test grants it mail.
    pub async fn ungranted(test: &str) -> TestNamespace {
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
                let by_label = ListParams::default().labels(&format!("mailhook.io/test-namespace={name}"));
                let _ = Api::<MailboxGrant>::all(client.clone())
                    .delete_collection(&dp, &by_label)
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

/// The kubectl the test environment built (`MAILHOOK_KUBECTL`), or the one on PATH.
fn kubectl() -> std::process::Command {
    let path = std::env::var("MAILHOOK_KUBECTL").unwrap_or_else(|_| "kubectl".to_string());
    std::process::Command::new(path)
}

/// Runs kubectl with `args` (and `stdin` if given); returns (success, stdout, stderr).
pub fn kubectl_run(args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    super::run(kubectl().args(args), stdin.map(str::as_bytes)).expect("run kubectl")
}

/// `kubectl apply` of `yaml` (one or more documents) in the test's namespace; panics with
/// kubectl's error and the YAML if it is refused.
pub fn apply(ns: &TestNamespace, yaml: &str) {
    let (ok, _, err) = kubectl_run(&["apply", "-n", &ns.name, "-f", "-"], Some(yaml));
    assert!(ok, "kubectl apply failed: {err}\n{yaml}");
}

/// `kubectl apply -R -f <repo>/<rel>` in the test's namespace, as a user applying a file
/// or a folder of the repository (e.g. `examples`) would.
pub fn apply_path(ns: &TestNamespace, rel: &str) {
    // `examples` holds cluster-scoped MailboxGrants that tests running side by side apply
    // too: kubectl's get-then-create can lose that race once, and then finds them.
    let mut tries = 0;
    loop {
        let (ok, _, err) = kubectl_run(&["apply", "-R", "-n", &ns.name, "-f", &repo_path(rel)], None);
        tries += 1;
        if ok || !(err.contains("AlreadyExists") && tries < 3) {
            assert!(ok, "kubectl apply -R -f {rel}: {err}");
            return;
        }
    }
}

/// The WebhookSubscription `name` as it is now.
pub async fn whs(ns: &TestNamespace, name: &str) -> WebhookSubscription {
    ns.api::<WebhookSubscription>()
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("get WebhookSubscription {}/{name}: {e}", ns.name))
}

/// Our kinds' status conditions (none before the first status write).
pub trait Conditions {
    fn conditions(&self) -> &[Condition];
}

impl Conditions for WebhookSubscription {
    fn conditions(&self) -> &[Condition] {
        self.status.as_ref().map_or(&[], |s| &s.conditions)
    }
}

impl Conditions for MailboxFilter {
    fn conditions(&self) -> &[Condition] {
        self.status.as_ref().map_or(&[], |s| &s.conditions)
    }
}

/// (status, reason) of the condition `type_` (Ready, Healthy, Stalled, Reconciling) on
/// `object`, if it has one.
pub fn condition(object: &impl Conditions, type_: &str) -> Option<(String, String)> {
    object
        .conditions()
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// Waits until the WebhookSubscription `name` is Ready=True at its current generation.
pub async fn wait_ready(ns: &TestNamespace, name: &str) {
    eventually(
        &format!("{}/{name} Ready=True at its generation", ns.name),
        || whs(ns, name),
        |w| {
            condition(w, "Ready").is_some_and(|(s, _)| s == "True")
                && w.status.as_ref().and_then(|s| s.observed_generation) == w.metadata.generation
        },
    )
    .await;
}
