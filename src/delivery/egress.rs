//! The egress guard: where deliveries may connect. Anyone who can create a
//! WebhookSubscription chooses a URL the operator POSTs to from inside the cluster, so by
//! default addresses that reach the operator's own surroundings are refused: loopback,
//! link-local (cloud metadata endpoints live there), unspecified, multicast and broadcast,
//! private and shared ranges, and the cluster's pod and service ranges. Operators widen or
//! narrow that with allow and deny lists.
//!
//! The check runs on the addresses actually connected to: hostnames are resolved by
//! `GuardedResolver` on every new connection (a DNS answer that changes after validation
//! cannot slip through), and IP-literal URLs, which reqwest connects to without resolving,
//! are checked before each request.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// Operator-wide egress settings (flags `--egress-*`).
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    /// Allowed even where the defaults refuse (e.g. an internal SIEM's range).
    pub allow: Vec<IpNet>,
    /// Refused whatever else says; wins over `allow` and `allow_hosts`.
    pub deny: Vec<IpNet>,
    /// Host names allowed whatever they resolve to (except `deny`); exact, lower-case,
    /// or `*.suffix`.
    pub allow_hosts: Vec<String>,
    /// The cluster's pod and service ranges, refused by default.
    pub cluster: Vec<IpNet>,
}

impl EgressPolicy {
    /// The policy from its flags; host names are compared lower-case and without a
    /// trailing dot, as DNS does.
    pub fn new(allow: Vec<IpNet>, deny: Vec<IpNet>, allow_hosts: &[String], cluster: Vec<IpNet>) -> EgressPolicy {
        EgressPolicy {
            allow,
            deny,
            allow_hosts: allow_hosts
                .iter()
                .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            cluster,
        }
    }
}

/// Why an address is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{ip} is {why}")]
pub struct Refused {
    pub ip: IpAddr,
    pub why: String,
}

/// Ranges refused unless allowed, with what they are. Checked on the canonical address
/// (an IPv4-mapped IPv6 address counts as its IPv4 address).
const DEFAULT_DENY: &[(&str, &str)] = &[
    ("0.0.0.0/8", "an unspecified (\"this network\") address"),
    ("127.0.0.0/8", "a loopback address"),
    (
        "169.254.0.0/16",
        "a link-local address (cloud metadata endpoints live here)",
    ),
    ("10.0.0.0/8", "a private address (RFC 1918)"),
    ("172.16.0.0/12", "a private address (RFC 1918)"),
    ("192.168.0.0/16", "a private address (RFC 1918)"),
    ("100.64.0.0/10", "a shared address (carrier-grade NAT, RFC 6598)"),
    ("192.0.0.0/24", "an IETF protocol assignment address"),
    ("198.18.0.0/15", "a benchmarking address"),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved address"),
    ("::/128", "the unspecified address"),
    ("::1/128", "a loopback address"),
    ("fe80::/10", "a link-local address"),
    ("fc00::/7", "a private (unique local) address"),
    ("ff00::/8", "a multicast address"),
    ("64:ff9b:1::/48", "a local-use NAT64 address"),
];

/// DEFAULT_DENY parsed once (the ranges are constants; a typo fails the unit tests).
static DEFAULTS: std::sync::LazyLock<Vec<(IpNet, &'static str)>> = std::sync::LazyLock::new(|| {
    DEFAULT_DENY
        .iter()
        .filter_map(|(net, why)| net.parse().ok().map(|n| (n, *why)))
        .collect()
});

impl EgressPolicy {
    /// Whether deliveries may connect to `ip`.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Refused> {
        let ip = ip.to_canonical();
        let refused = |why: String| Err(Refused { ip, why });
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return refused("in a range the operator denies (--egress-deny)".into());
        }
        if self.allow.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        if self.cluster.iter().any(|n| n.contains(&ip)) {
            return refused("in the cluster's pod or service range (--egress-cluster-cidr)".into());
        }
        if let Some((_, why)) = DEFAULTS.iter().find(|(n, _)| n.contains(&ip)) {
            return refused((*why).to_string());
        }
        if ip == IpAddr::from([255, 255, 255, 255]) {
            return refused("the broadcast address".into());
        }
        Ok(())
    }

    /// Whether `host` is allowed by name (its addresses then go unchecked but for `deny`).
    pub fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.allow_hosts.iter().any(|a| match a.strip_prefix("*.") {
            Some(suffix) => host.ends_with(&format!(".{suffix}")),
            None => *a == host,
        })
    }

    /// Checks the addresses `host` resolved to: those deliveries may connect to, or why
    /// none.
    pub fn filter(&self, host: &str, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, EgressError> {
        let by_name = self.host_allowed(host);
        let mut allowed = Vec::with_capacity(addrs.len());
        let mut refused = Vec::new();
        for a in addrs {
            let verdict = if by_name {
                if self.deny.iter().any(|n| n.contains(&a.ip().to_canonical())) {
                    Err(Refused {
                        ip: a.ip(),
                        why: "in a range the operator denies (--egress-deny)".into(),
                    })
                } else {
                    Ok(())
                }
            } else {
                self.check_ip(a.ip())
            };
            match verdict {
                Ok(()) => allowed.push(a),
                Err(r) => refused.push(r),
            }
        }
        if allowed.is_empty() {
            return Err(EgressError {
                host: host.to_string(),
                refused,
            });
        }
        Ok(allowed)
    }

    /// Checks a URL whose host is an IP literal (reqwest connects to those without
    /// resolving). Host names pass here; `GuardedResolver` checks them.
    pub fn check_url(&self, url: &url::Url) -> Result<(), EgressError> {
        let ip = match url.host() {
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
            _ => return Ok(()),
        };
        self.check_ip(ip).map_err(|r| EgressError {
            host: ip.to_string(),
            refused: vec![r],
        })
    }
}

/// No address of a host may be connected to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressError {
    pub host: String,
    pub refused: Vec<Refused>,
}

impl std::fmt::Display for EgressError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let reasons: Vec<String> = self.refused.iter().map(ToString::to_string).collect();
        if reasons.is_empty() {
            return write!(f, "the egress policy refuses {}: it resolves to no address", self.host);
        }
        write!(
            f,
            "the egress policy refuses {}: {}; an operator can allow it with --egress-allow (CIDR) or --egress-allow-host",
            self.host,
            reasons.join(", ")
        )
    }
}

impl std::error::Error for EgressError {}

/// Resolves host names for deliveries and drops the addresses the policy refuses; runs
/// for every new connection.
#[derive(Debug, Clone)]
pub struct GuardedResolver(pub Arc<EgressPolicy>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed = policy.filter(&host, addrs)?;
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Resolves `host` and checks it, for status: Ok when some address may be connected to
/// or the name does not resolve right now (a delivery will say why); the refusal otherwise.
pub async fn check_host(policy: &EgressPolicy, url: &url::Url) -> Result<(), EgressError> {
    policy.check_url(url)?;
    let Some(url::Host::Domain(host)) = url.host() else {
        return Ok(());
    };
    match tokio::net::lookup_host((host, url.port_or_known_default().unwrap_or(443))).await {
        Ok(addrs) => policy.filter(host, addrs.collect()).map(|_| ()),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn defaults_refuse_what_reaches_the_operators_surroundings() {
        let p = EgressPolicy::default();
        for bad in [
            "127.0.0.1",
            "127.1.2.3",
            "169.254.169.254",
            "0.0.0.0",
            "10.1.2.3",
            "172.20.0.1",
            "192.168.1.1",
            "100.100.100.200",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(p.check_ip(ip(bad)).is_err(), "{bad} must be refused");
        }
        for good in ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c", "192.0.2.2"] {
            assert_eq!(p.check_ip(ip(good)), Ok(()), "{good}");
        }
        let r = p.check_ip(ip("169.254.169.254")).expect_err("metadata");
        assert!(r.to_string().contains("metadata"), "{r}");
    }

    #[test]
    fn every_default_range_parses() {
        assert_eq!(DEFAULTS.len(), DEFAULT_DENY.len());
    }

    #[test]
    fn allow_opens_deny_wins_and_cluster_ranges_are_refused() {
        let p = EgressPolicy {
            allow: vec!["10.20.0.0/16".parse().expect("net")],
            deny: vec![
                "10.20.30.0/24".parse().expect("net"),
                "93.184.0.0/16".parse().expect("net"),
            ],
            allow_hosts: vec![],
            cluster: vec!["10.96.0.0/12".parse().expect("net")],
        };
        assert_eq!(p.check_ip(ip("10.20.1.1")), Ok(()));
        assert!(p.check_ip(ip("10.20.30.1")).is_err(), "deny wins over allow");
        assert!(
            p.check_ip(ip("93.184.215.14")).is_err(),
            "deny works on public ranges too"
        );
        let r = p.check_ip(ip("10.96.0.1")).expect_err("service range");
        assert!(r.why.contains("cluster"), "{r}");
    }

    #[test]
    fn hosts_allowed_by_name_still_obey_deny() {
        let p = EgressPolicy {
            allow_hosts: vec!["siem.corp.example".into(), "*.internal.example".into()],
            deny: vec!["169.254.0.0/16".parse().expect("net")],
            ..Default::default()
        };
        let addr = |s: &str| SocketAddr::new(ip(s), 443);
        assert!(p.host_allowed("SIEM.corp.example."));
        assert!(p.host_allowed("a.internal.example"));
        assert!(!p.host_allowed("internal.example"));
        assert_eq!(
            p.filter("siem.corp.example", vec![addr("10.0.0.5")]),
            Ok(vec![addr("10.0.0.5")])
        );
        assert!(p.filter("a.internal.example", vec![addr("169.254.169.254")]).is_err());
        // Not allowed by name: only the public address of a mixed answer is kept.
        assert_eq!(
            p.filter("mixed.example", vec![addr("10.0.0.5"), addr("93.184.215.14")]),
            Ok(vec![addr("93.184.215.14")])
        );
        let e = p
            .filter("rebound.example", vec![addr("127.0.0.1")])
            .expect_err("loopback");
        assert!(
            e.to_string()
                .contains("rebound.example: 127.0.0.1 is a loopback address"),
            "{e}"
        );
    }

    #[test]
    fn ip_literal_urls_are_checked_before_any_connection() {
        let p = EgressPolicy::default();
        let url = |s: &str| url::Url::parse(s).expect("url");
        assert!(p.check_url(&url("http://127.0.0.1:8080/hooks")).is_err());
        assert!(p.check_url(&url("http://[::ffff:a9fe:a9fe]/latest")).is_err());
        assert!(
            p.check_url(&url("http://2130706433/")).is_err(),
            "decimal IPv4 is parsed as an IP"
        );
        assert_eq!(p.check_url(&url("https://siem.example.com/hooks")), Ok(()));
    }
}
