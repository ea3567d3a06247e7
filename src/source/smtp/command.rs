//! The SMTP command parser: one command line, as the session read it, to a [`Command`] or
//! to the [`CommandError`] whose text is the reply. Pure: no I/O, no session state, no
//! limits (the session compares SIZE with its maximum and checks the order of commands).
//! Depends only on `source::normalize_address` (what counts as a usable address), base64
//! and thiserror.
//!
//! Written here rather than on smtp-proto 0.2.5 (which builds on Rust 1.95): it refuses
//! what this receiver has always taken (EHLO/HELO without a name, unknown MAIL parameters,
//! a SIZE that is not a number), judges addresses by its own grammar instead of
//! `normalize_address`, and its errors carry no reply text, so the replies would change.

use crate::source::normalize_address;

/// Longest command line (RFC 5321 §4.5.3.1.4: 512 octets with CRLF).
pub const MAX_COMMAND_LINE: usize = 512;

/// A command line that names a known verb. Arguments that are refused are kept in the
/// variant rather than failing the parse: the session answers a command out of order
/// (`503`, `530`, ...) before it answers a refused argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// The client's name as given; not checked (any, even none, is greeted).
    Ehlo(&'a str),
    Helo(&'a str),
    Mail(Mail<'a>),
    /// The forward path (surrounding whitespace trimmed), or why it is refused.
    Rcpt {
        to: Result<&'a str, CommandError>,
    },
    Data,
    Rset,
    Noop,
    Vrfy,
    Help,
    Quit,
    StartTls,
    /// AUTH PLAIN, or the refusal of another mechanism.
    Auth(Result<AuthPlain<'a>, CommandError>),
}

/// `MAIL FROM:<reverse-path> [parameters]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail<'a> {
    /// The reverse path (surrounding whitespace trimmed; empty for a bounce), or why it is
    /// refused. The session answers an oversized SIZE before this refusal.
    pub from: Result<&'a str, CommandError>,
    /// `SIZE=n`; `None` when absent or not a number (not refused), or when the path
    /// itself is malformed (parameters are then not read).
    pub size: Option<usize>,
    /// `SMTPUTF8` (informational: command lines are UTF-8 either way).
    pub smtputf8: bool,
    /// `BODY=...` (informational: the message is read as bytes either way).
    pub body: Option<Body<'a>>,
}

/// The `BODY` parameter of MAIL (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body<'a> {
    SevenBit,
    EightBitMime,
    /// Any other value, as given (not refused).
    Other(&'a str),
}

/// `AUTH PLAIN [initial-response]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthPlain<'a> {
    /// The initial response (trimmed); `None` when there is none and the session must
    /// ask for it with `334`.
    pub initial: Option<&'a str>,
}

/// A refused command line; `Display` is the whole reply line (without CRLF).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("500 5.5.2 Line too long ({} bytes at most)", MAX_COMMAND_LINE)]
    TooLong,
    /// SMTPUTF8 (RFC 6531): other bytes are refused, not replaced (a U+FFFD in an address
    /// would pass for a character of it).
    #[error("501 5.6.7 Command line is not valid UTF-8")]
    NotUtf8,
    #[error("500 5.5.1 Command unrecognized")]
    Unrecognized,
    #[error("501 5.1.7 Bad sender address syntax")]
    BadSender,
    #[error("501 5.1.3 Bad recipient address syntax")]
    BadRecipient,
    #[error("504 5.5.4 Only AUTH PLAIN is offered")]
    UnsupportedMechanism,
}

impl CommandError {
    /// The SMTP reply code (the first three digits of the reply).
    pub fn code(self) -> u16 {
        match self {
            CommandError::TooLong | CommandError::Unrecognized => 500,
            CommandError::NotUtf8 | CommandError::BadSender | CommandError::BadRecipient => 501,
            CommandError::UnsupportedMechanism => 504,
        }
    }
}

/// Parses one command line, with or without its line ending.
pub fn parse(line: &[u8]) -> Result<Command<'_>, CommandError> {
    if line.len() > MAX_COMMAND_LINE {
        return Err(CommandError::TooLong);
    }
    let line = std::str::from_utf8(line).map_err(|_| CommandError::NotUtf8)?;
    let line = line.trim_end_matches(['\r', '\n']);
    let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
    Ok(match verb.to_ascii_uppercase().as_str() {
        "EHLO" => Command::Ehlo(arg),
        "HELO" => Command::Helo(arg),
        "MAIL" => Command::Mail(mail(arg)),
        "RCPT" => Command::Rcpt { to: rcpt(arg) },
        "DATA" => Command::Data,
        "RSET" => Command::Rset,
        "NOOP" => Command::Noop,
        "VRFY" => Command::Vrfy,
        "HELP" => Command::Help,
        "QUIT" => Command::Quit,
        "STARTTLS" => Command::StartTls,
        "AUTH" => Command::Auth(auth(arg)),
        _ => return Err(CommandError::Unrecognized),
    })
}

/// `FROM:<path> [SIZE=n] [SMTPUTF8] [BODY=...]`; unknown parameters are ignored.
fn mail(arg: &str) -> Mail<'_> {
    let Some(from) = path(arg, "FROM:") else {
        return Mail {
            from: Err(CommandError::BadSender),
            size: None,
            smtputf8: false,
            body: None,
        };
    };
    let value = |key: &str| parameters(arg).find(|(k, v)| k.eq_ignore_ascii_case(key) && v.is_some());
    let body = value("BODY").and_then(|(_, v)| v).map(|v| {
        if v.eq_ignore_ascii_case("7BIT") {
            Body::SevenBit
        } else if v.eq_ignore_ascii_case("8BITMIME") {
            Body::EightBitMime
        } else {
            Body::Other(v)
        }
    });
    let usable = from.is_empty() || normalize_address(from).is_some();
    Mail {
        from: if usable {
            Ok(from.trim())
        } else {
            Err(CommandError::BadSender)
        },
        size: value("SIZE").and_then(|(_, v)| v?.parse::<usize>().ok()),
        smtputf8: parameters(arg).any(|(k, v)| k.eq_ignore_ascii_case("SMTPUTF8") && v.is_none()),
        body,
    }
}

fn rcpt(arg: &str) -> Result<&str, CommandError> {
    match path(arg, "TO:") {
        Some(to) if normalize_address(to).is_some() => Ok(to.trim()),
        _ => Err(CommandError::BadRecipient),
    }
}

fn auth(arg: &str) -> Result<AuthPlain<'_>, CommandError> {
    let (mechanism, initial) = arg.split_once(' ').unwrap_or((arg, ""));
    if !mechanism.eq_ignore_ascii_case("PLAIN") {
        return Err(CommandError::UnsupportedMechanism);
    }
    // Only an absent response asks with 334: a blank one is checked (and refused) as is.
    let initial = (!initial.is_empty()).then(|| initial.trim());
    Ok(AuthPlain { initial })
}

/// The parameters after the path: `KEY=value` or a bare `KEY`. The first word is taken
/// for the path (`FROM:<...>`), as the receiver always did.
fn parameters(arg: &str) -> impl Iterator<Item = (&str, Option<&str>)> {
    arg.split_whitespace().skip(1).map(|p| match p.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (p, None),
    })
}

/// The address inside `<...>` after `prefix` (case-insensitive), e.g. `TO:<a@b.c>`.
/// Character-boundary safe: `get` refuses an offset inside a multi-byte character.
fn path<'a>(arg: &'a str, prefix: &str) -> Option<&'a str> {
    let arg = arg.trim_start();
    if !arg.get(..prefix.len())?.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = arg.get(prefix.len()..)?.trim_start().strip_prefix('<')?;
    let (address, _) = rest.split_once('>')?;
    Some(address)
}

/// The password of an AUTH PLAIN response (`base64(authzid \0 authcid \0 password)`).
pub fn plain_password(response: &str) -> Option<String> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(response).ok()?;
    let mut parts = bytes.split(|b| *b == 0);
    let (_authz, _authc, password) = (parts.next()?, parts.next()?, parts.next()?);
    String::from_utf8(password.to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mail_of(line: &str) -> Mail<'_> {
        match parse(line.as_bytes()) {
            Ok(Command::Mail(m)) => m,
            other => panic!("{line:?} gave {other:?}"),
        }
    }

    fn rcpt_of(line: &str) -> Result<&str, CommandError> {
        match parse(line.as_bytes()) {
            Ok(Command::Rcpt { to }) => to,
            other => panic!("{line:?} gave {other:?}"),
        }
    }

    #[test]
    fn every_verb_in_any_case_with_or_without_line_ending() {
        let mail = Mail {
            from: Ok("A@b.com"),
            size: None,
            smtputf8: false,
            body: None,
        };
        let cases = [
            ("EHLO", " client.example", Command::Ehlo("client.example")),
            ("HELO", " client.example", Command::Helo("client.example")),
            ("MAIL", " from:<A@b.com>", Command::Mail(mail)),
            ("RCPT", " To:<C@d.com>", Command::Rcpt { to: Ok("C@d.com") }),
            ("DATA", "", Command::Data),
            ("RSET", "", Command::Rset),
            ("NOOP", "", Command::Noop),
            ("VRFY", " someone", Command::Vrfy),
            ("HELP", "", Command::Help),
            ("QUIT", "", Command::Quit),
            ("STARTTLS", "", Command::StartTls),
            ("AUTH", " plain", Command::Auth(Ok(AuthPlain { initial: None }))),
        ];
        for (verb, rest, expected) in cases {
            let mixed: String = verb
                .chars()
                .enumerate()
                .map(|(i, c)| if i % 2 == 0 { c.to_ascii_lowercase() } else { c })
                .collect();
            for verb in [verb.to_string(), verb.to_ascii_lowercase(), mixed] {
                for ending in ["", "\r\n", "\n"] {
                    let line = format!("{verb}{rest}{ending}");
                    assert_eq!(parse(line.as_bytes()), Ok(expected.clone()), "{line:?}");
                }
            }
        }
    }

    #[test]
    fn arguments_of_argumentless_verbs_and_names_are_not_checked() {
        assert_eq!(parse(b"EHLO"), Ok(Command::Ehlo("")));
        assert_eq!(parse(b"HELO \xc3\xa9"), Ok(Command::Helo("é")));
        assert_eq!(parse(b"QUIT now"), Ok(Command::Quit));
        assert_eq!(parse(b"DATA extra"), Ok(Command::Data));
        assert_eq!(parse(b"NOOP\r\r\n\n"), Ok(Command::Noop));
    }

    #[test]
    fn unknown_verbs_empty_lines_and_other_separators() {
        for line in [
            &b""[..],
            b"\r\n",
            b" NOOP",
            b"NOOP\tx",
            b"XYZZY",
            b"MAI",
            b"MAILFROM:<a@b.com>",
            b"EXPN x",
        ] {
            assert_eq!(parse(line), Err(CommandError::Unrecognized), "{line:?}");
        }
    }

    #[test]
    fn overlong_and_non_utf8_lines() {
        let mut line = b"NOOP ".to_vec();
        line.resize(MAX_COMMAND_LINE - 2, b'y');
        line.extend_from_slice(b"\r\n");
        assert_eq!(parse(&line), Ok(Command::Noop), "512 bytes with CRLF is the limit");
        line.insert(5, b'y');
        assert_eq!(parse(&line), Err(CommandError::TooLong));
        assert_eq!(parse(b"MAIL FROM:\xff\xfe<x@fabrikam.com>"), Err(CommandError::NotUtf8));
        assert_eq!(parse(b"RCPT TO:<erin@contoso.\xc3(com>"), Err(CommandError::NotUtf8));
        // A multi-byte character cut by the end of the line.
        assert_eq!(parse(b"XYZ \xc3"), Err(CommandError::NotUtf8));
    }

    #[test]
    fn mail_parameters() {
        let m = mail_of("MAIL FROM:<a@b.com> SIZE=100 SMTPUTF8 BODY=8BITMIME");
        assert_eq!(
            m,
            Mail {
                from: Ok("a@b.com"),
                size: Some(100),
                smtputf8: true,
                body: Some(Body::EightBitMime),
            }
        );
        let m = mail_of("MAIL FROM:<a@b.com> body=7bit size=5 smtputf8");
        assert_eq!((m.size, m.smtputf8, m.body), (Some(5), true, Some(Body::SevenBit)));
        assert_eq!(
            mail_of("MAIL FROM:<a@b.com> BODY=BINARYMIME").body,
            Some(Body::Other("BINARYMIME"))
        );
        // Unknown or malformed parameters are ignored, as before (no 555).
        let m = mail_of("MAIL FROM:<a@b.com> SIZE=abc FOO=bar SMTPUTF8=yes SIZE");
        assert_eq!((m.from, m.size, m.smtputf8, m.body), (Ok("a@b.com"), None, false, None));
        assert_eq!(mail_of("MAIL FROM:<a@b.com> SIZE=99999999999999999999999").size, None);
        // The first SIZE counts; parameters glued to the path are not read.
        assert_eq!(mail_of("MAIL FROM:<a@b.com> SIZE=7 SIZE=9").size, Some(7));
        assert_eq!(mail_of("MAIL FROM:<a@b.com>SIZE=7").size, None);
        // A malformed path: the parameters are not read.
        assert_eq!(mail_of("MAIL FROM:a@b.com SIZE=7").size, None);
        // A well-formed path with an unusable address still reports SIZE (answered first).
        let m = mail_of("MAIL FROM:<not an address> SIZE=5000");
        assert_eq!((m.from, m.size), (Err(CommandError::BadSender), Some(5000)));
    }

    #[test]
    fn reverse_paths() {
        assert_eq!(mail_of("MAIL FROM:<>").from, Ok(""), "a bounce");
        assert_eq!(mail_of("MAIL from: <a@b.com>").from, Ok("a@b.com"));
        assert_eq!(mail_of("MAIL  FROM:<a@b.com>").from, Ok("a@b.com"));
        assert_eq!(mail_of("MAIL FROM:< a@b.com >").from, Ok("a@b.com"));
        assert_eq!(mail_of("MAIL FROM:<\ra@b.com>").from, Ok("a@b.com"));
        for bad in [
            "MAIL",
            "MAIL FROM:",
            "MAIL FROM:a@b.com",
            "MAIL FROM:<a@b.com",
            "MAIL TO:<a@b.com>",
            "MAIL FROM:< >",
            "MAIL FROM:<not an address>",
            "MAIL FROM:<a@b>",
            "MAIL FROM:<a\rb@c.com>",
            "MAIL FRO\u{e9}:<x@fabrikam.com>",
            "MAIL \u{1F600}",
            "MAIL FROM:<\u{fc}",
        ] {
            assert_eq!(mail_of(bad).from, Err(CommandError::BadSender), "{bad:?}");
        }
        assert_eq!(
            mail_of("MAIL FROM:<j\u{fc}rgen@b\u{fc}cher.example>").from,
            Ok("jürgen@bücher.example")
        );
        let long = format!("MAIL FROM:<{}@b.com>", "a".repeat(320));
        assert_eq!(mail_of(&long).from, Err(CommandError::BadSender), "over 320 bytes");
    }

    #[test]
    fn forward_paths() {
        assert_eq!(
            rcpt_of("RCPT TO:<erin@contoso.com> NOTIFY=NEVER"),
            Ok("erin@contoso.com")
        );
        assert_eq!(rcpt_of("RCPT TO:<jürgen@bücher.example>"), Ok("jürgen@bücher.example"));
        assert_eq!(rcpt_of("RCPT TO:<postmaster@localhost>"), Ok("postmaster@localhost"));
        for bad in [
            "RCPT",
            "RCPT TO:<>",
            "RCPT TO:a@b.com",
            "RCPT FROM:<a@b.com>",
            "RCPT TO:<a@b.com",
            "RCPT TO\u{1F600}<erin@contoso.com>",
            "RCPT T\u{d6}:<erin@contoso.com>",
            "RCPT TO:<<a@b.com>>",
        ] {
            assert_eq!(rcpt_of(bad), Err(CommandError::BadRecipient), "{bad:?}");
        }
    }

    #[test]
    fn auth_mechanisms_and_initial_responses() {
        let plain = |initial| Ok(Command::Auth(Ok(AuthPlain { initial })));
        assert_eq!(parse(b"AUTH PLAIN AGEAYg=="), plain(Some("AGEAYg==")));
        assert_eq!(parse(b"auth plain  AGEAYg== \r\n"), plain(Some("AGEAYg==")));
        assert_eq!(parse(b"AUTH PLAIN "), plain(None));
        assert_eq!(parse(b"AUTH PLAIN \t"), plain(Some("")));
        for line in [&b"AUTH"[..], b"AUTH LOGIN", b"AUTH CRAM-MD5 x", b"AUTH PLAINX"] {
            assert_eq!(
                parse(line),
                Ok(Command::Auth(Err(CommandError::UnsupportedMechanism))),
                "{line:?}"
            );
        }
    }

    #[test]
    fn replies_carry_their_code() {
        let all = [
            CommandError::TooLong,
            CommandError::NotUtf8,
            CommandError::Unrecognized,
            CommandError::BadSender,
            CommandError::BadRecipient,
            CommandError::UnsupportedMechanism,
        ];
        for e in all {
            assert!(e.to_string().starts_with(&format!("{} ", e.code())), "{e}");
        }
        assert_eq!(
            CommandError::TooLong.to_string(),
            "500 5.5.2 Line too long (512 bytes at most)"
        );
    }

    #[test]
    fn auth_plain_responses() {
        use base64::Engine;
        let encode = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(plain_password(&encode(b"\0relay\0secret")).as_deref(), Some("secret"));
        assert_eq!(plain_password(&encode(b"no separators")), None);
        assert_eq!(plain_password("not base64!"), None);
    }

    #[test]
    fn paths_and_size_parameters() {
        assert_eq!(path("FROM:<a@b.com> SIZE=10", "FROM:"), Some("a@b.com"));
        assert_eq!(path("from: <>", "FROM:"), Some(""));
        assert_eq!(path("TO:a@b.com", "TO:"), None);
        // Multi-byte characters where the prefix or the brackets would be: refused, no panic.
        assert_eq!(path("é", "FROM:"), None);
        assert_eq!(path("FRO\u{e9}:<a@b.com>", "FROM:"), None);
        assert_eq!(path("TO\u{1F600}<a@b.com>", "TO:"), None);
        assert_eq!(path("TO:<jürgen@bücher.example>", "TO:"), Some("jürgen@bücher.example"));
        assert_eq!(path("TO:<ü", "TO:"), None);
    }
}
