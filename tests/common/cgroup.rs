//! A cgroup v1 memory cgroup for the real operator binary, as a kubelet applies a pod's
//! memory limit (`memory.limit_in_bytes`), and what it recorded: the peak
//! (`memory.max_usage_in_bytes`, the page cache of files the process wrote included, as the
//! kernel charges it) and OOM kills (`oom_kill` in `memory.oom_control`). Shared by the test
//! targets that run the operator under a limit (tests/adversarial, tests/backlog).

use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup/memory";

/// A memory cgroup with a limit, removed when dropped (once nothing runs in it).
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    /// Why memory cgroups cannot be made here, if they cannot: not root, or no cgroup v1
    /// memory controller mounted at /sys/fs/cgroup/memory (a cgroup v2-only machine).
    pub fn unavailable() -> Option<String> {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().nth(1))
            .unwrap_or("?");
        if uid != "0" {
            return Some(format!(
                "not root (effective uid {uid}): making a memory cgroup needs root"
            ));
        }
        if !Path::new(ROOT).join("memory.limit_in_bytes").exists() {
            return Some(format!(
                "no cgroup v1 memory controller at {ROOT} (memory.limit_in_bytes is missing; a cgroup v2-only machine?)"
            ));
        }
        None
    }

    /// Makes `/sys/fs/cgroup/memory/<name>` limited to `limit` bytes; panics if it cannot.
    pub fn create(name: &str, limit: u64) -> Cgroup {
        let path = Path::new(ROOT).join(name);
        if let Err(e) = std::fs::create_dir(&path) {
            panic!(
                "cannot create the memory cgroup {}: {e} (needs root and the cgroup v1 memory controller)",
                path.display()
            );
        }
        let cgroup = Cgroup { path };
        cgroup.write("memory.limit_in_bytes", &limit.to_string());
        let applied = cgroup.read_u64("memory.limit_in_bytes");
        assert_eq!(applied, limit, "the cgroup's limit was not applied");
        cgroup
    }

    pub fn write(&self, file: &str, value: &str) {
        std::fs::write(self.path.join(file), value)
            .unwrap_or_else(|e| panic!("write {value} to {}/{file}: {e}", self.path.display()));
    }

    pub fn read_u64(&self, file: &str) -> u64 {
        let text = std::fs::read_to_string(self.path.join(file))
            .unwrap_or_else(|e| panic!("read {}/{file}: {e}", self.path.display()));
        text.trim().parse().expect("a number")
    }

    /// `memory.max_usage_in_bytes`: the most the cgroup was charged, page cache included.
    pub fn peak(&self) -> u64 {
        self.read_u64("memory.max_usage_in_bytes")
    }

    /// Starts a new peak measurement (cgroup v1 resets the maximum on a write).
    pub fn reset_peak(&self) {
        self.write("memory.max_usage_in_bytes", "0");
    }

    /// `memory.failcnt`: how often the usage hit the limit. Not an OOM by itself: hitting
    /// the limit first reclaims page cache, and only what cannot be reclaimed kills.
    pub fn failcnt(&self) -> u64 {
        self.read_u64("memory.failcnt")
    }

    /// One counter of `memory.stat` (e.g. `total_rss`, `total_cache`), 0 when absent.
    pub fn stat(&self, key: &str) -> u64 {
        let text = std::fs::read_to_string(self.path.join("memory.stat")).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// `memory.oom_control` as it is: `oom_kill_disable`, `under_oom` and, on kernels that
    /// have it (4.13+), `oom_kill`.
    pub fn oom_control(&self) -> String {
        std::fs::read_to_string(self.path.join("memory.oom_control")).expect("read memory.oom_control")
    }

    /// The `oom_kill` counter of `memory.oom_control`: processes the kernel killed for this
    /// cgroup's limit. None on kernels older than 4.13, which lack it (then `under_oom` and
    /// whether the process died of a SIGKILL nobody sent tell).
    pub fn oom_kills(&self) -> Option<u64> {
        self.oom_control()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .map(|v| v.trim().parse().expect("oom_kill is a number"))
    }

    /// Pids in the cgroup.
    pub fn procs(&self) -> Vec<u32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// A `sh -c` script that moves the shell into the cgroup, then execs `"$0" "$@"`: the
    /// program runs inside from its first allocation.
    pub fn script(&self) -> String {
        format!("echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"", self.path.display())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}
