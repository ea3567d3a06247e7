//! The memory limit the process runs under: a container's (cgroup v2 `memory.max`, cgroup
//! v1 `memory.limit_in_bytes`), as a kubelet applies a pod's `resources.limits.memory`.
//! Caches are sized from it, so the same defaults fit a 64 MiB pod and a 1 GiB one. Read
//! once; depends on nothing else of the crate.

use std::path::Path;
use std::sync::OnceLock;

/// Limits at or above this mean "none" (cgroup v1 writes ~2^63 for unlimited).
const UNLIMITED: u64 = 1 << 60;

/// The process's memory limit in bytes, if it has one: `MAILHOOK_MEMORY_LIMIT` (bytes;
/// for runtimes that hide the cgroup, e.g. set from the Downward API's `limits.memory`),
/// else the cgroup's.
pub fn limit() -> Option<u64> {
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        if let Ok(set) = std::env::var("MAILHOOK_MEMORY_LIMIT") {
            match set.trim().parse::<u64>() {
                Ok(bytes) => return (bytes < UNLIMITED).then_some(bytes),
                Err(_) => tracing::warn!(
                    value = set,
                    "MAILHOOK_MEMORY_LIMIT is not a number of bytes (e.g. 268435456); using the cgroup's limit"
                ),
            }
        }
        let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        from_cgroup(&cgroups, |path| std::fs::read_to_string(path).ok())
    })
}

/// The limit named by `/proc/self/cgroup`'s text, reading control files through `read`:
/// the process's own cgroup first, then the root of the mount (inside a container the
/// cgroup is mounted at the root, while `/proc/self/cgroup` may still name the host's
/// path). Pure but for `read`.
fn from_cgroup(cgroups: &str, read: impl Fn(&Path) -> Option<String>) -> Option<u64> {
    let parse = |text: Option<String>| -> Option<u64> {
        let value = text?.trim().parse::<u64>().ok()?;
        (value < UNLIMITED).then_some(value)
    };
    let mut candidates = Vec::new();
    for line in cgroups.lines() {
        // hierarchy-ID:controllers:path; v2 is `0::path`.
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let relative = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            let base = Path::new("/sys/fs/cgroup/memory");
            candidates.push(base.join(relative).join("memory.limit_in_bytes"));
            candidates.push(base.join("memory.limit_in_bytes"));
        } else if controllers.is_empty() {
            let base = Path::new("/sys/fs/cgroup");
            candidates.push(base.join(relative).join("memory.max"));
            candidates.push(base.join("memory.max"));
        }
    }
    candidates.into_iter().find_map(|path| parse(read(&path)))
}

/// `share` of the limit, within `[min, max]`; `max` without a limit.
pub fn share(limit: Option<u64>, divisor: u64, min: u64, max: u64) -> u64 {
    limit.map_or(max, |l| (l / divisor.max(1)).clamp(min, max))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn reader(files: &[(&str, &str)]) -> impl Fn(&Path) -> Option<String> {
        let files: HashMap<String, String> = files.iter().map(|(p, t)| (p.to_string(), t.to_string())).collect();
        move |p: &Path| files.get(p.to_str()?).cloned()
    }

    #[test]
    fn a_limit_is_read_from_either_cgroup_version() {
        let v1 = "12:pids:/kubepods/pod1\n5:memory:/kubepods/pod1/c1\n0::/\n";
        let files = [(
            "/sys/fs/cgroup/memory/kubepods/pod1/c1/memory.limit_in_bytes",
            "67108864\n",
        )];
        assert_eq!(from_cgroup(v1, reader(&files)), Some(64 << 20));
        // Inside the container the cgroup is the mount's root.
        let files = [("/sys/fs/cgroup/memory/memory.limit_in_bytes", "268435456\n")];
        assert_eq!(from_cgroup(v1, reader(&files)), Some(256 << 20));
        let v2 = "0::/kubepods.slice/pod1\n";
        let files = [("/sys/fs/cgroup/kubepods.slice/pod1/memory.max", "1073741824\n")];
        assert_eq!(from_cgroup(v2, reader(&files)), Some(1 << 30));
        let files = [("/sys/fs/cgroup/memory.max", "536870912\n")];
        assert_eq!(from_cgroup("0::/\n", reader(&files)), Some(512 << 20));
    }

    #[test]
    fn no_limit_is_none() {
        let files = [
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n"),
            ("/sys/fs/cgroup/memory.max", "max\n"),
        ];
        assert_eq!(from_cgroup("4:memory:/\n0::/\n", reader(&files)), None);
        assert_eq!(from_cgroup("", reader(&files)), None);
        assert_eq!(from_cgroup("garbage", reader(&[])), None);
    }

    #[test]
    fn a_share_is_clamped() {
        assert_eq!(share(None, 8, 4, 32), 32);
        assert_eq!(share(Some(64), 8, 4, 32), 8);
        assert_eq!(share(Some(8), 8, 4, 32), 4);
        assert_eq!(share(Some(1024), 8, 4, 32), 32);
    }
}
