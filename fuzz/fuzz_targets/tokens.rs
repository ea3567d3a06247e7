//! Any text as a token file: credentials or an error naming the line, never a panic; every
//! credential has a valid name and a token without whitespace.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailhook::auth::parse_token_file;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_token_file(text, "ingest") {
        Ok(list) => {
            assert!(list.len() <= text.lines().count());
            for (name, token) in list {
                assert!(!token.is_empty() && !token.chars().any(char::is_whitespace));
                assert!(name == "ingest" || (1..=63).contains(&name.len()));
                assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')));
            }
        }
        Err(e) => assert!(e.to_string().starts_with("line ")),
    }
});
