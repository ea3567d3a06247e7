//! The messages one batch indexes, found by their folder's current name. Names point at
//! folder slots: a rename re-points the names it concerns (the folder's, and with the
//! hierarchy separator its subfolders' known to this batch) instead of rewriting every
//! message, so a batch of many renames costs in proportion to the names they move.

use std::collections::{BTreeMap, HashMap};

use super::index::{IndexedMessage, MessageKey};

/// Most folder names the renames of one batch may move, subfolders included. Each rename
/// moves at least one; a legitimate batch moves a handful. The bound keeps a batch that
/// renames a parent of many subfolders again and again from costing their product.
pub const MAX_RENAMED_FOLDERS: usize = super::MAX_NOTIFICATIONS;

#[derive(Debug, thiserror::Error)]
#[error("the renames of this batch move more than {limit} folder names (subfolders included)")]
pub struct TooManyRenames {
    pub limit: usize,
}

pub struct BatchIndex {
    separator: Option<char>,
    /// Folder name → its slot in `folders`.
    names: BTreeMap<String, usize>,
    /// Per slot: (UIDVALIDITY, UID) → message.
    folders: Vec<HashMap<(u32, u32), IndexedMessage>>,
    /// Names re-pointed and messages moved by renames so far: what renames cost.
    pub work: usize,
    /// Names moved by renames so far (held to `MAX_RENAMED_FOLDERS`).
    renamed: usize,
}

impl BatchIndex {
    pub fn new(separator: Option<char>) -> BatchIndex {
        BatchIndex {
            separator,
            names: BTreeMap::new(),
            folders: Vec::new(),
            work: 0,
            renamed: 0,
        }
    }

    pub fn get(&self, key: &MessageKey) -> Option<&IndexedMessage> {
        let slot = self.names.get(&key.folder)?;
        self.folders.get(*slot)?.get(&(key.uid_validity, key.uid))
    }

    pub fn insert(&mut self, key: &MessageKey, message: IndexedMessage) {
        let slot = match self.names.get(&key.folder) {
            Some(slot) => *slot,
            None => {
                self.folders.push(HashMap::new());
                let slot = self.folders.len() - 1;
                self.names.insert(key.folder.clone(), slot);
                slot
            }
        };
        if let Some(folder) = self.folders.get_mut(slot) {
            folder.insert((key.uid_validity, key.uid), message);
        }
    }

    pub fn remove(&mut self, key: &MessageKey) {
        if let Some(folder) = self.names.get(&key.folder).and_then(|s| self.folders.get_mut(*s)) {
            folder.remove(&(key.uid_validity, key.uid));
        }
    }

    /// The folder's messages are gone (its subfolders' are not, as in the store).
    pub fn clear_folder(&mut self, folder: &str) {
        if let Some(messages) = self.names.get(folder).and_then(|s| self.folders.get_mut(*s)) {
            messages.clear();
        }
    }

    /// `from` is now `to`, and with the separator `from<sep>x` is `to<sep>x`.
    pub fn rename(&mut self, from: &str, to: &str) -> Result<(), TooManyRenames> {
        let mut moves: Vec<(String, String)> = Vec::new();
        if self.names.contains_key(from) {
            moves.push((from.to_string(), to.to_string()));
        }
        if let Some(sep) = self.separator {
            let prefix = format!("{from}{sep}");
            let children = self
                .names
                .range(prefix.clone()..)
                .map(|(name, _)| name)
                .take_while(|name| name.starts_with(&prefix));
            for name in children {
                let rest = name.get(prefix.len()..).unwrap_or_default();
                moves.push((name.clone(), format!("{to}{sep}{rest}")));
            }
        }
        self.renamed += moves.len();
        if self.renamed > MAX_RENAMED_FOLDERS {
            return Err(TooManyRenames {
                limit: MAX_RENAMED_FOLDERS,
            });
        }
        // Every name is taken out before any is put back: `to` may lie under `from`.
        let taken: Vec<(String, usize)> = moves
            .into_iter()
            .filter_map(|(old, new)| self.names.remove(&old).map(|slot| (new, slot)))
            .collect();
        for (name, slot) in taken {
            self.work += 1;
            self.point(name, slot);
        }
        Ok(())
    }

    /// Points `name` at `slot`. A name already in use keeps being found: the two folders
    /// merge, the renamed one's messages winning, the smaller merged into the larger (so
    /// no message is copied more than a logarithmic number of times).
    fn point(&mut self, name: String, slot: usize) {
        let Some(&existing) = self.names.get(&name) else {
            self.names.insert(name, slot);
            return;
        };
        if existing == slot {
            return;
        }
        let moved = self.folders.get_mut(slot).map(std::mem::take).unwrap_or_default();
        let there = self.folders.get_mut(existing).map(std::mem::take).unwrap_or_default();
        let merged = if moved.len() >= there.len() {
            self.work += there.len();
            let mut merged = moved;
            for (k, m) in there {
                merged.entry(k).or_insert(m);
            }
            merged
        } else {
            self.work += moved.len();
            let mut merged = there;
            merged.extend(moved);
            merged
        };
        if let Some(folder) = self.folders.get_mut(existing) {
            *folder = merged;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(folder: &str, uid: u32) -> MessageKey {
        MessageKey {
            user: "alice@example.test".into(),
            folder: folder.into(),
            uid_validity: 7,
            uid,
        }
    }

    fn message(id: u32) -> IndexedMessage {
        IndexedMessage {
            message_id: Some(format!("<{id}@example.test>")),
            ..Default::default()
        }
    }

    #[test]
    fn ten_thousand_renames_of_a_full_folder_cost_one_step_each() {
        let mut index = BatchIndex::new(Some('/'));
        const N: u32 = 10_000;
        for uid in 0..N {
            index.insert(&key("Projekte", uid), message(uid));
        }
        for i in 0..N {
            let (from, to) = if i % 2 == 0 {
                ("Projekte", "Archiv")
            } else {
                ("Archiv", "Projekte")
            };
            index.rename(from, to).expect("within the limit");
        }
        // Rewriting every message per rename (what it did before) is N * N = 10^8 steps.
        assert_eq!(index.work, N as usize);
        assert!(
            index.get(&key("Projekte", 42)).is_some(),
            "an even count ends where it began"
        );
        assert!(index.get(&key("Archiv", 42)).is_none());
    }

    #[test]
    fn subfolders_follow_and_names_in_use_merge() {
        let mut index = BatchIndex::new(Some('/'));
        index.insert(&key("A", 1), message(1));
        index.insert(&key("A/x", 2), message(2));
        index.insert(&key("A/x/y", 3), message(3));
        index.insert(&key("Ab", 4), message(4));
        index.insert(&key("B/x", 5), message(5));
        index.rename("A", "B").expect("renames");
        for (folder, uid) in [("B", 1), ("B/x", 2), ("B/x/y", 3), ("Ab", 4), ("B/x", 5)] {
            assert!(index.get(&key(folder, uid)).is_some(), "{folder} {uid}");
        }
        assert!(index.get(&key("A/x", 2)).is_none());
        // Into its own subfolder, as IMAP allows.
        index.rename("B", "B/old").expect("renames");
        assert!(index.get(&key("B/old/x/y", 3)).is_some());
        let mut flat = BatchIndex::new(None);
        flat.insert(&key("A/x", 1), message(1));
        flat.rename("A", "B").expect("renames");
        assert!(
            flat.get(&key("A/x", 1)).is_some(),
            "without a separator only the folder itself"
        );
    }

    #[test]
    fn a_parent_of_many_subfolders_renamed_again_and_again_is_refused_not_quadratic() {
        let mut index = BatchIndex::new(Some('/'));
        for uid in 0..10_000u32 {
            index.insert(&key(&format!("P/{uid}"), uid), message(uid));
        }
        let mut refused = None;
        for i in 0..10_000 {
            let (from, to) = if i % 2 == 0 { ("P", "Q") } else { ("Q", "P") };
            if let Err(e) = index.rename(from, to) {
                refused = Some((i, e));
                break;
            }
        }
        let (at, e) = refused.expect("refused");
        assert_eq!(e.limit, MAX_RENAMED_FOLDERS);
        assert_eq!(at, MAX_RENAMED_FOLDERS / 10_000, "at the rename past the limit");
        assert!(index.work <= MAX_RENAMED_FOLDERS, "the work stays within the bound");
    }
}
