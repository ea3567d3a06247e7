//! Any text as a Sieve script: a summary or an error naming a line of it, never a panic
//! or a deep recursion; what a summary lists fits in the script.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailhook::source::dovecot::sieve::{SieveError, summarize};

fuzz_target!(|data: &[u8]| {
    let Ok(script) = std::str::from_utf8(data) else {
        return;
    };
    match summarize(script) {
        Ok(s) => {
            let listed = s.redirects.len() + s.vacation_from.len() + s.notify.len() + s.unresolved.len();
            assert!(listed <= script.len());
            for target in s.redirects.iter().chain(&s.vacation_from) {
                assert!(!target.contains("${"), "a variable is unresolved, not a target: {target}");
            }
        }
        Err(SieveError::Syntax { line, .. }) => assert!(line >= 1 && line <= script.lines().count().max(1) + 1),
        Err(SieveError::TooLarge) => assert!(script.len() > mailhook::source::dovecot::sieve::MAX_SCRIPT),
    }
});
