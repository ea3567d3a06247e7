//! Any bytes as one SMTP command line for the pure parser (`source::smtp::command`), and
//! as an AUTH PLAIN response. Never a panic; a refusal is a reply line that starts with
//! its own code; an address that is taken has no line break or bracket in it and parses
//! back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailhook::source::smtp::command::{self, Command, CommandError, MAX_COMMAND_LINE, Mail};

/// The address that MAIL or RCPT took, if any.
fn taken<'a>(parsed: &Result<Command<'a>, CommandError>) -> Option<&'a str> {
    match parsed {
        Ok(Command::Mail(Mail { from: Ok(a), .. })) | Ok(Command::Rcpt { to: Ok(a) }) => Some(a),
        _ => None,
    }
}

fn check_reply(err: CommandError) {
    let reply = err.to_string();
    assert!(reply.starts_with(&format!("{} ", err.code())), "{reply}");
    assert!(!reply.contains(['\r', '\n']), "{reply}");
}

fuzz_target!(|data: &[u8]| {
    let parsed = command::parse(data);
    if data.len() > MAX_COMMAND_LINE {
        assert_eq!(parsed, Err(CommandError::TooLong));
    }
    match &parsed {
        Err(err) => check_reply(*err),
        Ok(Command::Mail(Mail { from: Err(err), .. }) | Command::Rcpt { to: Err(err) } | Command::Auth(Err(err))) => {
            check_reply(*err)
        }
        Ok(_) => {}
    }
    if let Some(address) = taken(&parsed) {
        assert!(!address.contains(['\r', '\n', '<', '>']), "{address:?}");
        let verb = if matches!(parsed, Ok(Command::Mail(_))) {
            "MAIL FROM"
        } else {
            "RCPT TO"
        };
        let again = format!("{verb}:<{address}>\r\n");
        assert_eq!(taken(&command::parse(again.as_bytes())), Some(address), "{again:?}");
    }
    if let Ok(response) = std::str::from_utf8(data) {
        let _ = command::plain_password(response);
    }
});
