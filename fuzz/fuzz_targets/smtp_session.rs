//! Any bytes as what an SMTP client sends: command lines (any verb, any argument, bytes
//! that are not UTF-8, overlong lines), DATA with any content, pipelined or cut off. The
//! session state machine runs as the listener runs it, over an in-memory connection, with
//! a real pipeline (in-memory store, a routing table with one subscription). It must
//! answer and end without panicking; a panic here is the bug class that poisons a
//! listener.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

mod common;

use libfuzzer_sys::fuzz_target;
use mailhook::api::{MailboxFilterSpec, MatchCriteria};
use mailhook::delivery::{Deliveries, Housekeeping};
use mailhook::route::{CompiledFilter, Router};
use mailhook::source::smtp::{SmtpConfig, session};
use mailhook::source::{Limits, Pipeline};
use mailhook::store::DurableStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct World {
    runtime: tokio::runtime::Runtime,
    pipeline: Arc<Pipeline>,
    config: SmtpConfig,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let metrics = mailhook::metrics::Metrics::new().expect("metrics");
        let store = Arc::new(DurableStore::in_memory().expect("store"));
        let router = Arc::new(Router::default());
        let deliveries = runtime.block_on(async {
            let lifecycle = mailhook::lifecycle::Lifecycle::new();
            Deliveries::start(
                mailhook::delivery::Capacity {
                    shards: 1,
                    max_in_flight: 512,
                },
                store,
                metrics.clone(),
                Housekeeping::default(),
                &lifecycle,
                mailhook::handles::Leadership::sole(),
                router.clone(),
            )
        });
        deliveries.warmed_up();
        // Mail to one non-ASCII domain is routed and stored; the rest is parsed and dropped.
        let spec = MailboxFilterSpec {
            criteria: MatchCriteria {
                domains: vec!["bücher.example".into()],
                ..Default::default()
            },
            exclude: None,
            flag: None,
        };
        router.swap(common::one_route(Arc::new(
            CompiledFilter::compile(&spec).expect("filter"),
        )));
        let pipeline = Arc::new(Pipeline {
            deliveries,
            router,
            metrics,
            internal_domains: vec!["contoso.com".into()],
            matches: Arc::default(),
            activity: Arc::default(),
            limits: Limits::default(),
        });
        let config = SmtpConfig {
            hostname: "fuzz.mailhook.test".into(),
            max_message_bytes: 64 * 1024,
            max_recipients: 8,
            max_connections: 1,
            max_connections_per_address: 1,
            idle_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(1),
            session_timeout: Duration::from_secs(2),
            tls: None,
            auth: None,
        };
        World {
            runtime,
            pipeline,
            config,
        }
    })
}

fuzz_target!(
    init: {
        // The session catches panics (421) and the journal parser mail-parser's (554), but
        // libFuzzer must see ours.
        common::abort_on_our_panics();
    },
    |data: &[u8]| {
    let w = world();
    w.runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let peer = std::net::IpAddr::from([127, 0, 0, 1]);
        let serve = session(Box::new(server), peer, &w.config, &w.pipeline);
        let talk = async {
            // Write and read at once: replies must not back up behind unread input.
            let (mut rx, mut tx) = tokio::io::split(&mut client);
            let write = async {
                let _ = tx.write_all(data).await;
                let _ = tx.shutdown().await;
            };
            let read = async {
                let mut replies = Vec::new();
                let _ = rx.read_to_end(&mut replies).await;
            };
            tokio::join!(write, read);
        };
        let (result, ()) = tokio::join!(serve, talk);
        let _ = result;
    });
    // Nothing delivers here: keep the stored queue (and the process's memory) bounded.
    let store = w.pipeline.deliveries.queues();
    if store.total_backlog() > 1000 {
        store.forget_subscription("sub").expect("forget the fuzz queue");
    }
    }
);
