//! The checkpoint key: an ed25519 key in the C2SP signed-note encodings, so that the
//! checkpoints it signs open with Go's `sumdb/note` and any C2SP witness.
//!
//! The private key is the note "signer key" (`PRIVATE+KEY+name+keyid+base64`), kept in a
//! Secret; the name is the log's origin. The public key is the "verifier key"
//! (`name+keyid+base64`), which a verifier is given out of band.

use base64::Engine as _;
use signed_note::{Note, Signer as _};

use super::Hash;

/// Why a key or a checkpoint is refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "the audit key is not a signed-note signer key (PRIVATE+KEY+<name>+<keyid>+<base64>): make one with `mailhook audit keygen --origin <name>`"
    )]
    Format,
    #[error("cannot read the audit key file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the log origin {0:?} cannot name a key: use letters, digits, '.', '/', '-' and no '+' or spaces")]
    Origin(String),
    #[error("cannot sign the checkpoint: {0}")]
    Sign(String),
}

/// The signing half, with what verifiers need to know of it.
#[derive(Clone)]
pub struct Key {
    signer: signed_note::StandardSigner,
    vkey: String,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", self.vkey)
    }
}

const ALG_ED25519: u8 = 1;

impl Key {
    /// A key from its signer-key text (surrounding whitespace ignored).
    pub fn parse(skey: &str) -> Result<Key, KeyError> {
        let skey = skey.trim();
        let signer = signed_note::StandardSigner::new(skey).map_err(|_| KeyError::Format)?;
        // The public half is derived here: the signer does not expose it.
        // PRIVATE+KEY+name+keyid+base64: the base64 (which may hold '+') is the fifth part.
        let encoded = skey.splitn(5, '+').nth(4).ok_or(KeyError::Format)?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| KeyError::Format)?;
        let seed: [u8; 32] = raw.get(1..).and_then(|s| s.try_into().ok()).ok_or(KeyError::Format)?;
        let public = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key();
        let vkey = signed_note::new_ed25519_verifier_key(signer.name(), &public);
        Ok(Key { signer, vkey })
    }

    pub fn from_file(path: &std::path::Path) -> Result<Key, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Key::parse(&text)
    }

    /// A new key for the log `origin`: (signer key, verifier key).
    pub fn generate(origin: &str) -> Result<(String, String), KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Sign(e.to_string()))?;
        Key::encode(origin, &seed)
    }

    /// The key of the log `origin` whose ed25519 seed is `seed`.
    pub fn from_seed(origin: &str, seed: &[u8; 32]) -> Result<Key, KeyError> {
        let (skey, _) = Key::encode(origin, seed)?;
        Key::parse(&skey)
    }

    fn encode(origin: &str, seed: &[u8; 32]) -> Result<(String, String), KeyError> {
        if !signed_note::is_key_name_valid(origin) {
            return Err(KeyError::Origin(origin.into()));
        }
        let signing = ed25519_dalek::SigningKey::from_bytes(seed);
        let public = [&[ALG_ED25519][..], signing.verifying_key().as_bytes()].concat();
        let private = [&[ALG_ED25519][..], &seed[..]].concat();
        let skey = format!(
            "PRIVATE+KEY+{origin}+{:08x}+{}",
            signed_note::key_id(origin, &public),
            base64::engine::general_purpose::STANDARD.encode(private)
        );
        let vkey = signed_note::new_ed25519_verifier_key(origin, &signing.verifying_key());
        Ok((skey, vkey))
    }

    /// The log's origin (the key's name).
    pub fn origin(&self) -> &str {
        self.signer.name()
    }

    /// The verifier key, `name+keyid+base64`.
    pub fn vkey(&self) -> &str {
        &self.vkey
    }

    /// A C2SP checkpoint of the tree of `size` leaves with `root`, as a signed note.
    pub fn sign(&self, size: u64, root: Hash) -> Result<String, KeyError> {
        let checkpoint =
            tlog_tiles::Checkpoint::new(self.origin(), size, root, "").map_err(|e| KeyError::Sign(e.to_string()))?;
        let mut note = Note::new(&checkpoint.to_bytes(), &[]).map_err(|e| KeyError::Sign(e.to_string()))?;
        note.add_sigs(&[&self.signer])
            .map_err(|e| KeyError::Sign(e.to_string()))?;
        String::from_utf8(note.to_bytes()).map_err(|e| KeyError::Sign(e.to_string()))
    }
}

/// A checkpoint read back: what it says, once its signature checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

/// Why a checkpoint is not believed.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("the verifier key is not a signed-note verifier key (name+keyid+base64)")]
    Key,
    #[error("the checkpoint is not signed by {vkey}: {reason}")]
    Signature { vkey: String, reason: String },
    #[error("the checkpoint's text is not a C2SP tlog-checkpoint")]
    Malformed,
}

/// Opens a signed checkpoint with the verifier key `vkey`.
pub fn open(note: &str, vkey: &str) -> Result<Checkpoint, CheckpointError> {
    let verifier = signed_note::StandardVerifier::new(vkey).map_err(|_| CheckpointError::Key)?;
    let verifiers = signed_note::VerifierList::new(vec![Box::new(verifier)]);
    let parsed = Note::from_bytes(note.as_bytes()).map_err(|e| CheckpointError::Signature {
        vkey: vkey.into(),
        reason: e.to_string(),
    })?;
    parsed.verify(&verifiers).map_err(|e| CheckpointError::Signature {
        vkey: vkey.into(),
        reason: e.to_string(),
    })?;
    let checkpoint = tlog_tiles::Checkpoint::from_bytes(parsed.text()).map_err(|_| CheckpointError::Malformed)?;
    Ok(Checkpoint {
        origin: checkpoint.origin().to_string(),
        size: checkpoint.size(),
        root: *checkpoint.hash(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_signs_checkpoints_its_verifier_key_opens_and_no_other() {
        let (skey, vkey) = Key::generate("mailhook.example/audit").expect("generate");
        let key = Key::parse(&format!("{skey}\n")).expect("parse");
        assert_eq!(key.vkey(), vkey);
        assert_eq!(key.origin(), "mailhook.example/audit");
        let root = super::super::leaf_hash(b"x");
        let note = key.sign(7, root).expect("sign");
        assert!(note.starts_with("mailhook.example/audit\n7\n"), "{note}");
        let opened = open(&note, &vkey).expect("open");
        assert_eq!((opened.size, opened.root), (7, root));
        let (_, other) = Key::generate("mailhook.example/audit").expect("generate");
        assert!(open(&note, &other).is_err());
        let forged = note.replacen("\n7\n", "\n8\n", 1);
        assert!(open(&forged, &vkey).is_err());
    }

    #[test]
    fn a_bad_key_or_origin_is_refused_with_what_to_do() {
        let err = Key::parse("not a key").expect_err("refused").to_string();
        assert!(err.contains("mailhook audit keygen"), "{err}");
        assert!(Key::generate("has space").is_err());
        assert!(Key::generate("a+b").is_err());
    }
}
