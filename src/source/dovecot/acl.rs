//! What an IMAP ACL command changed (RFC 4314 `SETACL` / `DELETEACL`), read from the
//! arguments Dovecot exports with the command (`imap_command_finished`'s `cmd_args`, e.g.
//! `INBOX bob@example.test +lr`): who was granted or lost which rights on which folder.
//! Dovecot's own ACL plugin emits no event of its own, so this is the record of a delegate
//! being let into a mailbox. Pure.

/// One right of RFC 4314, by its letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Right {
    /// `l`: the folder is listed.
    Lookup,
    /// `r`: its messages can be read.
    Read,
    /// `s`: `\Seen` is kept.
    KeepSeen,
    /// `w`: other flags can be changed.
    Write,
    /// `i`: messages can be added.
    Insert,
    /// `p`: mail can be posted to it.
    Post,
    /// `k`: subfolders can be created.
    CreateMailbox,
    /// `x`: the folder can be deleted.
    DeleteMailbox,
    /// `t`: messages can be marked deleted.
    DeleteMessages,
    /// `e`: deleted messages can be expunged.
    Expunge,
    /// `a`: the ACL itself can be changed.
    Administer,
}

impl Right {
    fn from_letter(c: char) -> Option<&'static [Right]> {
        Some(match c {
            'l' => &[Right::Lookup],
            'r' => &[Right::Read],
            's' => &[Right::KeepSeen],
            'w' => &[Right::Write],
            'i' => &[Right::Insert],
            'p' => &[Right::Post],
            'k' => &[Right::CreateMailbox],
            'x' => &[Right::DeleteMailbox],
            't' => &[Right::DeleteMessages],
            'e' => &[Right::Expunge],
            'a' => &[Right::Administer],
            // RFC 2086's letters, which RFC 4314 maps to its own.
            'c' => &[Right::CreateMailbox, Right::DeleteMailbox],
            'd' => &[Right::DeleteMessages, Right::Expunge],
            _ => return None,
        })
    }

    /// The right's name as events carry it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Right::Lookup => "lookup",
            Right::Read => "read",
            Right::KeepSeen => "keep-seen",
            Right::Write => "write",
            Right::Insert => "insert",
            Right::Post => "post",
            Right::CreateMailbox => "create-mailbox",
            Right::DeleteMailbox => "delete-mailbox",
            Right::DeleteMessages => "delete-messages",
            Right::Expunge => "expunge",
            Right::Administer => "administer",
        }
    }
}

/// How a `SETACL` changes the identifier's rights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `+`: these rights are added.
    Add,
    /// `-`: these rights are taken away.
    Remove,
    /// No sign: the rights become exactly these.
    Replace,
    /// `DELETEACL`: the identifier's entry is gone.
    Delete,
}

/// One ACL change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclChange {
    pub folder: String,
    /// Who the entry is for: a user, `anyone`, `authenticated`, `owner`, `$group`.
    pub identifier: String,
    /// A negative entry (identifier written with a leading `-`): rights denied.
    pub negative: bool,
    pub mode: Mode,
    /// Sorted, each once.
    pub rights: Vec<Right>,
}

impl AclChange {
    /// Whether someone may now do something they could not: rights added or set, on an
    /// entry that grants (not one that denies).
    pub fn grants(&self) -> bool {
        !self.negative && matches!(self.mode, Mode::Add | Mode::Replace) && !self.rights.is_empty()
    }

    /// Whether the change lets the identifier read the folder's mail.
    pub fn grants_reading(&self) -> bool {
        self.grants() && self.rights.contains(&Right::Read)
    }
}

/// Why the arguments could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclError {
    #[error("{0} is not an ACL command")]
    NotAcl(String),
    #[error("the {0} argument is missing")]
    Missing(&'static str),
    #[error("an argument is not an IMAP atom or quoted string")]
    Unreadable,
    #[error("{0:?} is not a right of RFC 4314")]
    UnknownRight(char),
    #[error("more arguments than the command takes")]
    TooMany,
}

/// The IMAP astrings of `args`: atoms and quoted strings (literals are not exported).
fn astrings(args: &str) -> Result<Vec<String>, AclError> {
    let mut out = Vec::new();
    let mut chars = args.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ' ') {
            chars.next();
        }
        let Some(&first) = chars.peek() else {
            return Ok(out);
        };
        let mut s = String::new();
        if first == '"' {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(AclError::Unreadable),
                    Some('"') => break,
                    Some('\\') => s.push(chars.next().ok_or(AclError::Unreadable)?),
                    Some(c) => s.push(c),
                }
            }
            if chars.peek().is_some_and(|c| *c != ' ') {
                return Err(AclError::Unreadable);
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ' ' {
                    break;
                }
                if c.is_control() || matches!(c, '(' | ')' | '{' | '"' | '\\') {
                    return Err(AclError::Unreadable);
                }
                s.push(c);
                chars.next();
            }
        }
        out.push(s);
    }
}

/// The change a `command` (`SETACL` or `DELETEACL`, any case) with these exported
/// arguments made.
pub fn parse(command: &str, args: &str) -> Result<AclChange, AclError> {
    let set = command.eq_ignore_ascii_case("SETACL");
    if !set && !command.eq_ignore_ascii_case("DELETEACL") {
        return Err(AclError::NotAcl(command.to_string()));
    }
    let args = astrings(args)?;
    let mut args = args.into_iter();
    let folder = args.next().ok_or(AclError::Missing("folder"))?;
    let written = args.next().ok_or(AclError::Missing("identifier"))?;
    let (negative, identifier) = match written.strip_prefix('-') {
        Some(rest) if !rest.is_empty() => (true, rest.to_string()),
        _ => (false, written),
    };
    let (mode, rights) = if set {
        let written = args.next().ok_or(AclError::Missing("rights"))?;
        let (mode, letters) = match written.chars().next() {
            Some('+') => (Mode::Add, written.get(1..).unwrap_or_default()),
            Some('-') => (Mode::Remove, written.get(1..).unwrap_or_default()),
            _ => (Mode::Replace, written.as_str()),
        };
        let mut rights = Vec::new();
        for c in letters.chars() {
            rights.extend_from_slice(Right::from_letter(c).ok_or(AclError::UnknownRight(c))?);
        }
        rights.sort_unstable();
        rights.dedup();
        (mode, rights)
    } else {
        (Mode::Delete, Vec::new())
    };
    if args.next().is_some() {
        return Err(AclError::TooMany);
    }
    Ok(AclChange {
        folder,
        identifier,
        negative,
        mode,
        rights,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delegate_granted_reading_is_a_grant_with_its_rights() {
        let change = parse("SETACL", "INBOX bob@example.test +lr").expect("parses");
        assert_eq!(
            change,
            AclChange {
                folder: "INBOX".into(),
                identifier: "bob@example.test".into(),
                negative: false,
                mode: Mode::Add,
                rights: vec![Right::Lookup, Right::Read],
            }
        );
        assert!(change.grants_reading());
    }

    #[test]
    fn quoted_names_obsolete_letters_and_replacement_are_read() {
        let change = parse("setacl", r#""Projekte/Größe \"A\"" "anyone" lrcd"#).expect("parses");
        assert_eq!(change.folder, r#"Projekte/Größe "A""#);
        assert_eq!(change.identifier, "anyone");
        assert_eq!(change.mode, Mode::Replace);
        assert_eq!(
            change.rights.iter().map(Right::as_str).collect::<Vec<_>>(),
            [
                "lookup",
                "read",
                "create-mailbox",
                "delete-mailbox",
                "delete-messages",
                "expunge"
            ]
        );
    }

    #[test]
    fn removals_denials_and_deletions_grant_nothing() {
        for (command, args) in [
            ("SETACL", "INBOX bob -r"),
            ("SETACL", "INBOX -bob +r"),
            ("SETACL", "INBOX bob \"\""),
            ("DELETEACL", "INBOX bob"),
        ] {
            let change = parse(command, args).expect("parses");
            assert!(!change.grants(), "{command} {args}: {change:?}");
        }
        assert!(parse("SETACL", "INBOX -bob +r").expect("parses").negative);
    }

    #[test]
    fn what_is_not_an_acl_change_is_an_error_that_says_why() {
        assert_eq!(parse("GETACL", "INBOX"), Err(AclError::NotAcl("GETACL".into())));
        assert_eq!(parse("SETACL", "INBOX bob"), Err(AclError::Missing("rights")));
        assert_eq!(parse("SETACL", ""), Err(AclError::Missing("folder")));
        assert_eq!(parse("SETACL", "INBOX bob +lz"), Err(AclError::UnknownRight('z')));
        assert_eq!(parse("SETACL", "INBOX bob +l extra"), Err(AclError::TooMany));
        assert_eq!(parse("SETACL", "{5}\r\nINBOX bob +l"), Err(AclError::Unreadable));
        assert_eq!(parse("SETACL", "\"INBOX bob +l"), Err(AclError::Unreadable));
        assert_eq!(parse("DELETEACL", "INBOX bob +l"), Err(AclError::TooMany));
    }
}
