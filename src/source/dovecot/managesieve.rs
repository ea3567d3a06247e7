//! Reads a user's Sieve script from Dovecot over ManageSieve (RFC 5804), as the
//! reconciler's master user: Dovecot exports that a script was uploaded or activated, but
//! never its text, and the text is what says where mail is forwarded. No maintained Rust
//! ManageSieve client exists; the client needs five commands (STARTTLS, AUTHENTICATE
//! PLAIN, LISTSCRIPTS, GETSCRIPT, LOGOUT), written here over the reconciler's TLS setup.
//!
//! `Reader` reads the server's answers, bounded in line and literal size (a server is a
//! peer: nothing it sends may make mailhook allocate without limit or panic); fuzzed with
//! the `managesieve` target.

use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::reconcile::connect::{ImapStream, Security};
use super::sieve::MAX_SCRIPT;

/// Longest answer line read (capabilities, script names, a refusal's text).
const MAX_LINE: usize = 16 * 1024;
/// Most lines one answer may have (capabilities, one per script).
const MAX_LINES: usize = 4096;
/// Most bytes one answer may carry in all (a script and its status line).
const MAX_ANSWER: usize = MAX_SCRIPT + 64 * 1024;
/// Most tokens one line may have.
const MAX_TOKENS: usize = 64;

/// Where the ManageSieve service is and how to log in.
#[derive(Clone)]
pub struct SieveServer {
    /// host:port (Pigeonhole listens on 4190).
    pub addr: String,
    /// STARTTLS with the reconciler's trust, unless the reconciler itself goes in clear.
    pub security: Security,
    pub master_user: String,
    pub master_password: String,
    /// Deadline of the whole exchange.
    pub timeout: Duration,
}

impl std::fmt::Debug for SieveServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SieveServer")
            .field("addr", &self.addr)
            .field("master_user", &self.master_user)
            .finish_non_exhaustive()
    }
}

/// A script as the server has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    pub name: String,
    pub text: String,
    pub active: bool,
}

/// Why a script could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot reach the ManageSieve server at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the ManageSieve server at {addr} did not answer within {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error(
        "the ManageSieve server at {addr} does not offer STARTTLS: turn TLS on in Dovecot, or --dovecot-imap-tls none to send the master password in clear"
    )]
    NoStartTls { addr: String },
    #[error("TLS with the ManageSieve server at {addr} failed (its certificate is checked against {trust})")]
    Tls {
        addr: String,
        trust: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the ManageSieve server at {addr} refused {step}: {answer}")]
    Refused {
        addr: String,
        step: &'static str,
        answer: String,
    },
    #[error("the ManageSieve server at {addr} answered {step} in a way mailhook cannot read: {problem}")]
    Protocol {
        addr: String,
        step: &'static str,
        problem: ReadError,
    },
}

/// What was wrong with an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("the connection closed")]
    Closed,
    #[error("a line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("more than {MAX_LINES} lines")]
    TooManyLines,
    #[error("an answer larger than {MAX_ANSWER} bytes")]
    AnswerTooLarge,
    #[error("a line of more than {MAX_TOKENS} items")]
    TooManyTokens,
    #[error("a literal of {0} bytes, more than a script may have")]
    LiteralTooLarge(u64),
    #[error("an unterminated quoted string")]
    Unterminated,
    #[error("{0}")]
    Unexpected(String),
    #[error("reading: {0}")]
    Io(String),
}

/// One item of an answer line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    Atom(String),
    /// A quoted string or a literal.
    Text(Vec<u8>),
}

/// How an answer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Lines before the status line.
    pub lines: Vec<Vec<Token>>,
    /// True for OK; false for NO and BYE.
    pub ok: bool,
    /// The status line's text, if it had one.
    pub text: String,
}

/// Reads answers off a buffered stream, each within `MAX_ANSWER` bytes.
pub struct Reader<R> {
    inner: R,
    /// What the answer being read may still take.
    left: usize,
}

impl<R: AsyncBufRead + Unpin> Reader<R> {
    pub fn new(inner: R) -> Self {
        Reader {
            inner,
            left: MAX_ANSWER,
        }
    }

    fn spend(&mut self, n: usize) -> Result<(), ReadError> {
        self.left = self.left.checked_sub(n).ok_or(ReadError::AnswerTooLarge)?;
        Ok(())
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// One raw line, without its CRLF.
    async fn raw_line(&mut self) -> Result<Vec<u8>, ReadError> {
        let mut line = Vec::new();
        let limited = (&mut self.inner).take(MAX_LINE as u64 + 2);
        let mut limited = limited;
        let n = limited
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| ReadError::Io(e.to_string()))?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        if line.last() != Some(&b'\n') {
            return Err(if line.len() > MAX_LINE {
                ReadError::LineTooLong
            } else {
                ReadError::Closed
            });
        }
        self.spend(line.len())?;
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Ok(line)
    }

    /// One logical line: its tokens, literals read in.
    pub async fn line(&mut self) -> Result<Vec<Token>, ReadError> {
        let mut tokens = Vec::new();
        loop {
            let raw = self.raw_line().await?;
            let found = tokenize(&raw, &mut tokens)?;
            if tokens.len() > MAX_TOKENS {
                return Err(ReadError::TooManyTokens);
            }
            match found {
                None => return Ok(tokens),
                Some(len) => {
                    if len > MAX_SCRIPT as u64 + 1 {
                        return Err(ReadError::LiteralTooLarge(len));
                    }
                    let len = usize::try_from(len).map_err(|_| ReadError::LiteralTooLarge(len))?;
                    self.spend(len)?;
                    let mut text = vec![0; len];
                    self.inner
                        .read_exact(&mut text)
                        .await
                        .map_err(|e| ReadError::Io(e.to_string()))?;
                    tokens.push(Token::Text(text));
                }
            }
        }
    }

    /// Lines up to and including the status line (OK, NO or BYE).
    pub async fn answer(&mut self) -> Result<Answer, ReadError> {
        self.left = MAX_ANSWER;
        let mut lines = Vec::new();
        loop {
            let line = self.line().await?;
            if let Some(Token::Atom(a)) = line.first() {
                let status = a.to_ascii_uppercase();
                if matches!(status.as_str(), "OK" | "NO" | "BYE") {
                    let text = line
                        .iter()
                        .skip(1)
                        .filter_map(|t| match t {
                            Token::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
                            Token::Atom(_) => None,
                        })
                        .collect::<Vec<_>>()
                        .join(" ");
                    return Ok(Answer {
                        lines,
                        ok: status == "OK",
                        text,
                    });
                }
            }
            if lines.len() == MAX_LINES {
                return Err(ReadError::TooManyLines);
            }
            lines.push(line);
        }
    }
}

/// Adds the tokens of `raw` to `tokens`; returns the length of a literal that follows the
/// line (`{n}` or `{n+}` at its end). Pure.
pub fn tokenize(raw: &[u8], tokens: &mut Vec<Token>) -> Result<Option<u64>, ReadError> {
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b' ' => i += 1,
            b'"' => {
                let mut text = Vec::new();
                i += 1;
                loop {
                    match raw.get(i) {
                        None => return Err(ReadError::Unterminated),
                        Some(b'\\') => {
                            text.push(*raw.get(i + 1).ok_or(ReadError::Unterminated)?);
                            i += 2;
                        }
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(b) => {
                            text.push(*b);
                            i += 1;
                        }
                    }
                }
                tokens.push(Token::Text(text));
            }
            b'{' if raw.last() == Some(&b'}') => {
                let inner = raw.get(i + 1..raw.len() - 1).unwrap_or_default();
                let digits = inner.strip_suffix(b"+").unwrap_or(inner);
                let len = std::str::from_utf8(digits)
                    .ok()
                    .and_then(|d| d.parse::<u64>().ok())
                    .ok_or_else(|| ReadError::Unexpected("a literal's length is not a number".into()))?;
                return Ok(Some(len));
            }
            _ => {
                let start = i;
                while i < raw.len() && raw[i] != b' ' {
                    i += 1;
                }
                let atom = raw.get(start..i).unwrap_or_default();
                tokens.push(Token::Atom(String::from_utf8_lossy(atom).into_owned()));
            }
        }
    }
    Ok(None)
}

/// A string as a non-synchronizing literal: any name goes, nothing to escape.
fn literal(text: &str) -> String {
    format!("{{{}+}}\r\n{text}", text.len())
}

type Stream = BufReader<ImapStream>;

impl SieveServer {
    /// The script `name` of `user` (`None`: the active one), or `None` when there is no
    /// such script.
    pub async fn script(&self, user: &str, name: Option<&str>) -> Result<Option<Script>, FetchError> {
        match tokio::time::timeout(self.timeout, self.exchange(user, name)).await {
            Ok(result) => result,
            Err(_) => Err(FetchError::Timeout {
                addr: self.addr.clone(),
                after: self.timeout,
            }),
        }
    }

    fn protocol(&self, step: &'static str) -> impl FnOnce(ReadError) -> FetchError + '_ {
        move |problem| FetchError::Protocol {
            addr: self.addr.clone(),
            step,
            problem,
        }
    }

    async fn ask(&self, stream: &mut Reader<Stream>, step: &'static str, command: &str) -> Result<Answer, FetchError> {
        let inner = stream.inner.get_mut();
        inner
            .write_all(command.as_bytes())
            .await
            .map_err(|e| self.protocol(step)(ReadError::Io(e.to_string())))?;
        inner
            .flush()
            .await
            .map_err(|e| self.protocol(step)(ReadError::Io(e.to_string())))?;
        let answer = stream.answer().await.map_err(self.protocol(step))?;
        if !answer.ok {
            return Err(FetchError::Refused {
                addr: self.addr.clone(),
                step,
                answer: answer.text.chars().take(512).collect(),
            });
        }
        Ok(answer)
    }

    async fn exchange(&self, user: &str, name: Option<&str>) -> Result<Option<Script>, FetchError> {
        let tcp = TcpStream::connect(&self.addr)
            .await
            .map_err(|source| FetchError::Connect {
                addr: self.addr.clone(),
                source,
            })?;
        let mut stream = Reader::new(BufReader::new(ImapStream::Plain(tcp)));
        let greeting = stream.answer().await.map_err(self.protocol("the greeting"))?;
        let tls = match &self.security {
            Security::Implicit(tls) | Security::StartTls(tls) => Some(tls),
            Security::Plaintext => None,
        };
        if let Some(tls) = tls {
            let offered = greeting
                .lines
                .iter()
                .any(|l| matches!(l.first(), Some(Token::Text(t)) if t.eq_ignore_ascii_case(b"STARTTLS")));
            if !offered {
                return Err(FetchError::NoStartTls {
                    addr: self.addr.clone(),
                });
            }
            self.ask(&mut stream, "STARTTLS", "STARTTLS\r\n").await?;
            let ImapStream::Plain(tcp) = stream.into_inner().into_inner() else {
                return Err(self.protocol("STARTTLS")(ReadError::Unexpected("TLS twice".into())));
            };
            let tls_stream = tls.handshake(tcp).await.map_err(|source| FetchError::Tls {
                addr: self.addr.clone(),
                trust: tls.trust().to_string(),
                source,
            })?;
            stream = Reader::new(BufReader::new(ImapStream::Tls(Box::new(tls_stream))));
            // RFC 5804: the server says its capabilities again after TLS.
            stream
                .answer()
                .await
                .map_err(self.protocol("the capabilities after STARTTLS"))?;
        }
        let credentials = base64::engine::general_purpose::STANDARD
            .encode(format!("{user}\0{}\0{}", self.master_user, self.master_password));
        self.ask(
            &mut stream,
            "the master user's login",
            &format!("AUTHENTICATE \"PLAIN\" \"{credentials}\"\r\n"),
        )
        .await?;
        let listed = self.ask(&mut stream, "LISTSCRIPTS", "LISTSCRIPTS\r\n").await?;
        let scripts: Vec<(String, bool)> = listed
            .lines
            .iter()
            .filter_map(|l| match l.as_slice() {
                [Token::Text(n), rest @ ..] => Some((
                    String::from_utf8_lossy(n).into_owned(),
                    rest.iter()
                        .any(|t| matches!(t, Token::Atom(a) if a.eq_ignore_ascii_case("ACTIVE"))),
                )),
                _ => None,
            })
            .collect();
        let wanted = match name {
            Some(n) => scripts.iter().find(|(s, _)| s == n),
            None => scripts.iter().find(|(_, active)| *active),
        };
        let Some((name, active)) = wanted.cloned() else {
            let _ = self.ask(&mut stream, "LOGOUT", "LOGOUT\r\n").await;
            return Ok(None);
        };
        let got = self
            .ask(&mut stream, "GETSCRIPT", &format!("GETSCRIPT {}\r\n", literal(&name)))
            .await?;
        let text = got
            .lines
            .iter()
            .find_map(|l| match l.first() {
                Some(Token::Text(t)) => Some(String::from_utf8_lossy(t).into_owned()),
                _ => None,
            })
            .ok_or_else(|| self.protocol("GETSCRIPT")(ReadError::Unexpected("no script in the answer".into())))?;
        // The answer is in; a refused LOGOUT changes nothing.
        let _ = self.ask(&mut stream, "LOGOUT", "LOGOUT\r\n").await;
        Ok(Some(Script { name, text, active }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn answer(bytes: &[u8]) -> Result<Answer, ReadError> {
        Reader::new(BufReader::new(bytes)).answer().await
    }

    #[tokio::test]
    async fn answers_are_read_with_quoted_strings_and_literals() {
        let a = answer(b"\"IMPLEMENTATION\" \"Dovecot Pigeonhole\"\r\n\"STARTTLS\"\r\nOK \"ready\"\r\n")
            .await
            .expect("read");
        assert!(a.ok);
        assert_eq!(a.text, "ready");
        assert_eq!(a.lines.len(), 2);
        let s = answer(b"{22}\r\nredirect \"x@y.test\";\r\n\r\nOK \"Getscript completed.\"\r\n")
            .await
            .expect("read");
        assert_eq!(s.lines[0], vec![Token::Text(b"redirect \"x@y.test\";\r\n".to_vec())]);
        let l = answer(b"\"main\" ACTIVE\r\n\"a \\\"b\\\"\"\r\nOK\r\n")
            .await
            .expect("read");
        assert_eq!(
            l.lines,
            vec![
                vec![Token::Text(b"main".to_vec()), Token::Atom("ACTIVE".into())],
                vec![Token::Text(b"a \"b\"".to_vec())]
            ]
        );
        let no = answer(b"NO (NONEXISTENT) \"There is no script by that name\"\r\n")
            .await
            .expect("read");
        assert!(!no.ok);
        assert_eq!(no.text, "There is no script by that name");
    }

    #[tokio::test]
    async fn hostile_answers_are_refused_without_allocating() {
        assert_eq!(
            answer(b"{18446744073709551615}\r\n").await,
            Err(ReadError::LiteralTooLarge(u64::MAX))
        );
        let long = vec![b'a'; MAX_LINE + 10];
        assert_eq!(answer(&long).await, Err(ReadError::LineTooLong));
        assert_eq!(answer(b"\"open\r\n").await, Err(ReadError::Unterminated));
        assert!(answer(b"{5}\r\nab").await.is_err());
        assert_eq!(answer(b"").await, Err(ReadError::Closed));
        let many = "\"x\"\r\n".repeat(MAX_LINES + 1);
        assert_eq!(answer(many.as_bytes()).await, Err(ReadError::TooManyLines));
        let atoms = "a ".repeat(MAX_TOKENS + 1) + "\r\n";
        assert_eq!(answer(atoms.as_bytes()).await, Err(ReadError::TooManyTokens));
        // Literals chained on one line count against one answer's budget.
        let chunk = format!("{{{}}}\r\n{}", 512 * 1024, "x".repeat(512 * 1024));
        let chained = format!("\"a\" {}{}{}\r\nOK\r\n", chunk, chunk, chunk);
        assert_eq!(answer(chained.as_bytes()).await, Err(ReadError::AnswerTooLarge));
    }
}
