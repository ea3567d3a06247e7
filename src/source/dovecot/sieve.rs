//! What a Sieve script does with mail that leaves the mailbox: the addresses it redirects
//! to (RFC 5228 `redirect`), the senders its vacation replies claim (RFC 5230 `:from`),
//! the `mailto:` targets it notifies (RFC 5435), and the actions whose target cannot be
//! read off the script (a variable, an included script, a pipe to a program). A forwarding
//! rule to an outside address is how a compromised mailbox leaks quietly; this is what a
//! compliance filter matches on.
//!
//! A parser of RFC 5228's grammar (section 8): comments, quoted and multi-line strings,
//! string lists, tags, numbers, tests and blocks. It reads structure only and runs
//! nothing; a script it cannot parse is an error naming the line. Pure and bounded: at
//! most `MAX_SCRIPT` bytes and `MAX_DEPTH` nested blocks or tests, so a hostile script
//! costs linear time and no deep recursion.

/// Largest script read (Dovecot's own default `sieve_max_script_size` is 1 MiB).
pub const MAX_SCRIPT: usize = 1 << 20;
/// Deepest nesting of blocks and tests read.
pub const MAX_DEPTH: usize = 64;

/// What a script sends outside the mailbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// `redirect` targets, as written (a `:list` redirect is in `unresolved`).
    pub redirects: Vec<String>,
    /// `vacation :from` addresses.
    pub vacation_from: Vec<String>,
    /// `notify` methods' `mailto:` addresses.
    pub notify: Vec<String>,
    /// Actions whose target the script does not say: e.g. `redirect ${target}`,
    /// `include "other"`, `vnd.dovecot.pipe`.
    pub unresolved: Vec<String>,
}

/// Why a script could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SieveError {
    #[error("the script is larger than {MAX_SCRIPT} bytes")]
    TooLarge,
    #[error("line {line}: {problem}")]
    Syntax { line: usize, problem: &'static str },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Identifier(String),
    Tag(String),
    Number,
    Str(String),
    Punct(char),
}

fn syntax(line: usize, problem: &'static str) -> SieveError {
    SieveError::Syntax { line, problem }
}

/// The script's tokens, each with its line.
fn lex(script: &str) -> Result<Vec<(usize, Token)>, SieveError> {
    let mut out = Vec::new();
    let mut chars = script.chars().peekable();
    let mut line = 1;
    while let Some(c) = chars.next() {
        match c {
            '\n' => line += 1,
            c if c.is_whitespace() => {}
            '#' => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        line += 1;
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let start = line;
                let mut star = false;
                loop {
                    match chars.next() {
                        None => return Err(syntax(start, "a comment is not closed")),
                        Some('/') if star => break,
                        Some(c) => {
                            if c == '\n' {
                                line += 1;
                            }
                            star = c == '*';
                        }
                    }
                }
            }
            '"' => {
                let start = line;
                let mut s = String::new();
                loop {
                    match chars.next() {
                        None => return Err(syntax(start, "a string is not closed")),
                        Some('"') => break,
                        // Any character after a backslash stands for itself.
                        Some('\\') => match chars.next() {
                            None => return Err(syntax(start, "a string is not closed")),
                            Some(c) => {
                                line += usize::from(c == '\n');
                                s.push(c);
                            }
                        },
                        Some(c) => {
                            line += usize::from(c == '\n');
                            s.push(c);
                        }
                    }
                }
                out.push((start, Token::Str(s)));
            }
            ':' => {
                let name = identifier(&mut chars, None);
                if name.is_empty() {
                    return Err(syntax(line, "a ':' is not followed by a tag name"));
                }
                out.push((line, Token::Tag(name.to_ascii_lowercase())));
            }
            c if c.is_ascii_digit() => {
                while chars.peek().is_some_and(char::is_ascii_digit) {
                    chars.next();
                }
                if chars
                    .peek()
                    .is_some_and(|c| matches!(c, 'K' | 'M' | 'G' | 'k' | 'm' | 'g'))
                {
                    chars.next();
                }
                out.push((line, Token::Number));
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let name = identifier(&mut chars, Some(c));
                if name.eq_ignore_ascii_case("text") && chars.peek() == Some(&':') {
                    chars.next();
                    let (text, lines) = multiline(&mut chars)
                        .ok_or_else(|| syntax(line, "a text: string is not ended by a line with a single '.'"))?;
                    out.push((line, Token::Str(text)));
                    line += lines;
                } else {
                    out.push((line, Token::Identifier(name.to_ascii_lowercase())));
                }
            }
            ';' | '{' | '}' | '(' | ')' | ',' | '[' | ']' => out.push((line, Token::Punct(c))),
            _ => return Err(syntax(line, "a character that has no place in Sieve")),
        }
    }
    Ok(out)
}

fn identifier(chars: &mut std::iter::Peekable<std::str::Chars<'_>>, first: Option<char>) -> String {
    let mut name: String = first.into_iter().collect();
    while let Some(&c) = chars.peek() {
        if c.is_ascii_alphanumeric() || c == '_' {
            name.push(c);
            chars.next();
        } else {
            break;
        }
    }
    name
}

/// A `text:` string after its keyword: the rest of that line (blanks or a comment), then
/// lines up to one holding a single `.`, a leading `..` read as `.`. With the lines read.
fn multiline(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Option<(String, usize)> {
    let mut lines = 0;
    for c in chars.by_ref() {
        if c == '\n' {
            lines += 1;
            break;
        }
    }
    let mut text = String::new();
    loop {
        let mut current = String::new();
        let mut ended = false;
        for c in chars.by_ref() {
            if c == '\n' {
                ended = true;
                break;
            }
            current.push(c);
        }
        if !ended && current.is_empty() {
            return None;
        }
        lines += usize::from(ended);
        let current = current.strip_suffix('\r').unwrap_or(&current);
        if current == "." {
            return Some((text, lines));
        }
        text.push_str(
            current
                .strip_prefix('.')
                .filter(|r| r.starts_with('.'))
                .unwrap_or(current),
        );
        text.push('\n');
        if !ended {
            return None;
        }
    }
}

/// One argument of a command or test.
#[derive(Debug)]
enum Arg {
    Tag(String),
    Number,
    Strings(Vec<String>),
}

struct Parser {
    tokens: Vec<(usize, Token)>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at).map(|(_, t)| t)
    }

    fn line(&self) -> usize {
        self.tokens
            .get(self.at)
            .or_else(|| self.tokens.last())
            .map_or(1, |(l, _)| *l)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.at).map(|(_, t)| t.clone());
        self.at += 1;
        t
    }

    /// Commands up to the end of the script or of a block.
    fn commands(&mut self, depth: usize, summary: &mut Summary) -> Result<(), SieveError> {
        while let Some(token) = self.peek() {
            if *token == Token::Punct('}') {
                return Ok(());
            }
            self.command(depth, summary)?;
        }
        Ok(())
    }

    fn command(&mut self, depth: usize, summary: &mut Summary) -> Result<(), SieveError> {
        let line = self.line();
        let Some(Token::Identifier(name)) = self.next() else {
            return Err(syntax(line, "a command must start with its name"));
        };
        let args = self.arguments(depth)?;
        note(&name, &args, summary);
        match self.next() {
            Some(Token::Punct(';')) => Ok(()),
            Some(Token::Punct('{')) => {
                if depth >= MAX_DEPTH {
                    return Err(syntax(line, "blocks are nested too deep"));
                }
                self.commands(depth + 1, summary)?;
                match self.next() {
                    Some(Token::Punct('}')) => Ok(()),
                    // Named by where it opened: where it should have closed is unknown.
                    _ => Err(syntax(line, "a block is not closed")),
                }
            }
            _ => Err(syntax(line, "a command must end with ';' or a block")),
        }
    }

    /// Arguments, then a test or a test list (whose own arguments are read and dropped:
    /// tests send nothing anywhere).
    fn arguments(&mut self, depth: usize) -> Result<Vec<Arg>, SieveError> {
        let mut args = Vec::new();
        loop {
            match self.peek() {
                Some(Token::Tag(_)) | Some(Token::Number) | Some(Token::Str(_)) => match self.next() {
                    Some(Token::Tag(t)) => args.push(Arg::Tag(t)),
                    Some(Token::Str(s)) => args.push(Arg::Strings(vec![s])),
                    _ => args.push(Arg::Number),
                },
                Some(Token::Punct('[')) => {
                    self.next();
                    args.push(Arg::Strings(self.string_list()?));
                }
                Some(Token::Identifier(_)) => {
                    self.test(depth)?;
                    return Ok(args);
                }
                Some(Token::Punct('(')) => {
                    self.next();
                    self.tests(depth)?;
                    return Ok(args);
                }
                _ => return Ok(args),
            }
        }
    }

    fn string_list(&mut self) -> Result<Vec<String>, SieveError> {
        let line = self.line();
        let mut list = Vec::new();
        loop {
            match self.next() {
                Some(Token::Str(s)) => list.push(s),
                _ => return Err(syntax(line, "a string list holds strings")),
            }
            match self.next() {
                Some(Token::Punct(',')) => {}
                Some(Token::Punct(']')) => return Ok(list),
                _ => return Err(syntax(line, "a string list is not closed")),
            }
        }
    }

    fn test(&mut self, depth: usize) -> Result<(), SieveError> {
        let line = self.line();
        if depth >= MAX_DEPTH {
            return Err(syntax(line, "tests are nested too deep"));
        }
        match self.next() {
            Some(Token::Identifier(_)) => self.arguments(depth + 1).map(|_| ()),
            _ => Err(syntax(line, "a test must start with its name")),
        }
    }

    /// `( test, test, ... )` after its opening parenthesis.
    fn tests(&mut self, depth: usize) -> Result<(), SieveError> {
        loop {
            self.test(depth)?;
            let line = self.line();
            match self.next() {
                Some(Token::Punct(',')) => {}
                Some(Token::Punct(')')) => return Ok(()),
                _ => return Err(syntax(line, "a test list is not closed")),
            }
        }
    }
}

/// The value after `tag` among `args`, when it is one string.
fn tagged<'a>(args: &'a [Arg], tag: &str) -> Option<&'a str> {
    args.windows(2).find_map(|w| match w {
        [Arg::Tag(t), Arg::Strings(s)] if t == tag => match s.as_slice() {
            [one] => Some(one.as_str()),
            _ => None,
        },
        _ => None,
    })
}

/// The last positional string argument (the one no tag takes).
fn positional(args: &[Arg]) -> Option<&str> {
    match args.last()? {
        Arg::Strings(s) => match s.as_slice() {
            [one] => {
                let taken = args.len() >= 2 && matches!(args.get(args.len() - 2), Some(Arg::Tag(t)) if takes_value(t));
                (!taken).then_some(one.as_str())
            }
            _ => None,
        },
        _ => None,
    }
}

/// Tags of redirect, vacation and notify that take a value.
fn takes_value(tag: &str) -> bool {
    matches!(
        tag,
        "list"
            | "from"
            | "subject"
            | "days"
            | "seconds"
            | "handle"
            | "addresses"
            | "importance"
            | "options"
            | "message"
    )
}

fn has_variable(s: &str) -> bool {
    s.contains("${")
}

/// What one command sends outside, into `summary`.
fn note(name: &str, args: &[Arg], summary: &mut Summary) {
    match name {
        "redirect" => {
            if let Some(list) = tagged(args, "list") {
                summary.unresolved.push(format!("redirect to the list {list}"));
                return;
            }
            match positional(args) {
                Some(to) if !has_variable(to) => summary.redirects.push(to.to_string()),
                Some(to) => summary.unresolved.push(format!("redirect to {to}")),
                None => summary.unresolved.push("redirect without a target".into()),
            }
        }
        "vacation" => {
            if let Some(from) = tagged(args, "from") {
                if has_variable(from) {
                    summary.unresolved.push(format!("vacation from {from}"));
                } else {
                    summary.vacation_from.push(from.to_string());
                }
            }
        }
        "notify" => match positional(args) {
            Some(method) => match method.get(..7).filter(|m| m.eq_ignore_ascii_case("mailto:")) {
                Some(_) if !has_variable(method) => {
                    let to = method.get(7..).unwrap_or_default();
                    let to = to.split('?').next().unwrap_or_default();
                    summary
                        .notify
                        .extend(to.split(',').map(str::trim).filter(|a| !a.is_empty()).map(String::from));
                }
                _ => summary.unresolved.push(format!("notify by {method}")),
            },
            None => summary.unresolved.push("notify without a method".into()),
        },
        "include" => summary.unresolved.push(match positional(args) {
            Some(script) => format!("include {script}"),
            None => "include".into(),
        }),
        "vnd.dovecot.pipe" | "pipe" | "vnd.dovecot.execute" | "execute" | "vnd.dovecot.filter" | "filter" => {
            summary.unresolved.push(format!("{name} to a program"));
        }
        _ => {}
    }
}

/// What `script` sends outside the mailbox.
pub fn summarize(script: &str) -> Result<Summary, SieveError> {
    if script.len() > MAX_SCRIPT {
        return Err(SieveError::TooLarge);
    }
    let mut parser = Parser {
        tokens: lex(script)?,
        at: 0,
    };
    let mut summary = Summary::default();
    parser.commands(0, &mut summary)?;
    if parser.peek().is_some() {
        return Err(syntax(parser.line(), "a '}' closes no block"));
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_vacation_senders_and_notify_targets_are_read_at_any_depth() {
        let script = r#"
require ["copy", "vacation", "enotify", "fileinto"];
# a comment with "quotes" and redirect "nobody@example.com";
/* and a block comment
   redirect "nobody@example.com"; */
if allof (header :contains "subject" "invoice", not exists "x-spam") {
    redirect :copy "Boss@Outside.example";
    if size :over 1M { discard; } elsif true { fileinto "INBOX.big"; }
} else {
    redirect "team@corp.example";
}
vacation :days 7 :from "ceo@corp-lookalike.example" :subject "Away" :addresses ["a@corp.example", "b@corp.example"] text:
I am away.
..and this line starts with a dot.
.
;
notify :importance "1" "mailto:spy@outside.example,second@outside.example?subject=hi";
"#;
        let s = summarize(script).expect("parses");
        assert_eq!(s.redirects, ["Boss@Outside.example", "team@corp.example"]);
        assert_eq!(s.vacation_from, ["ceo@corp-lookalike.example"]);
        assert_eq!(s.notify, ["spy@outside.example", "second@outside.example"]);
        assert!(s.unresolved.is_empty(), "{:?}", s.unresolved);
    }

    #[test]
    fn targets_the_script_does_not_say_are_unresolved_not_guessed() {
        let s = summarize(
            r#"require ["variables", "extlists", "include", "vnd.dovecot.pipe"];
set "to" "x@outside.example";
redirect "${to}";
redirect :list "tag:example.com,2024:outsiders";
include :personal "other";
pipe "exfiltrate.sh";
vacation "no from: fine";"#,
        )
        .expect("parses");
        assert!(s.redirects.is_empty());
        assert_eq!(
            s.unresolved,
            [
                "redirect to ${to}",
                "redirect to the list tag:example.com,2024:outsiders",
                "include other",
                "pipe to a program"
            ]
        );
        assert!(s.vacation_from.is_empty());
    }

    #[test]
    fn escapes_in_strings_are_read_as_sieve_reads_them() {
        let s = summarize(r#"redirect "a\"b\\c@outside.example";"#).expect("parses");
        assert_eq!(s.redirects, [r#"a"b\c@outside.example"#]);
    }

    #[test]
    fn a_broken_script_names_its_line() {
        for (script, line) in [
            ("keep;\nredirect \"x@y.example\"", 2),
            ("keep;\n\n/* never closed", 3),
            ("keep;\nif true {\n keep;\n", 2),
            ("redirect \"open", 1),
            ("keep;\n}", 2),
            ("keep;\nredirect [\"a\", ];", 2),
            ("vacation text:\nno end", 1),
        ] {
            match summarize(script) {
                Err(SieveError::Syntax { line: l, .. }) => assert_eq!(l, line, "{script:?}"),
                other => panic!("{script:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn hostile_nesting_and_size_are_refused_without_deep_recursion() {
        let deep = "if true {".repeat(10_000);
        assert!(matches!(summarize(&deep), Err(SieveError::Syntax { .. })));
        let tests = format!("if {}true {{ keep; }}", "not ".repeat(10_000));
        assert!(matches!(summarize(&tests), Err(SieveError::Syntax { .. })));
        let lists = format!("if {}true{} {{ keep; }}", "anyof(".repeat(10_000), ")".repeat(10_000));
        assert!(matches!(summarize(&lists), Err(SieveError::Syntax { .. })));
        assert_eq!(summarize(&" ".repeat(MAX_SCRIPT + 1)), Err(SieveError::TooLarge));
    }

    #[test]
    fn an_empty_script_or_one_without_outgoing_actions_sends_nothing() {
        assert_eq!(summarize("").expect("parses"), Summary::default());
        assert_eq!(
            summarize("require \"fileinto\";\r\nif header :is \"to\" \"x@y\" { fileinto \"X\"; stop; }\r\n")
                .expect("parses"),
            Summary::default()
        );
    }
}
