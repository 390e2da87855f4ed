//! Metadata-context queries: which of an export's contexts a LIST or SET
//! query names.

use crate::nbd::consts::*;

/// The contexts selected for transmission, with the ids we gave them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetaSelection {
    /// Export the selection was made for.
    pub export: String,
    /// `base:allocation`, if selected: its id.
    pub allocation: Option<u32>,
    /// `qemu:dirty-bitmap:<name>`, if selected: its id.
    pub dirty: Option<u32>,
}

impl MetaSelection {
    /// Whether any context is selected.
    pub fn is_empty(&self) -> bool {
        self.allocation.is_none() && self.dirty.is_none()
    }
}

/// Id of the `base:allocation` context.
pub const ALLOCATION_ID: u32 = 1;
/// Id of the dirty bitmap context.
pub const DIRTY_ID: u32 = 2;

/// The id we use for an available context name.
pub fn context_id(name: &str) -> u32 {
    if name == BASE_ALLOCATION {
        ALLOCATION_ID
    } else {
        DIRTY_ID
    }
}

/// Contexts of `available` matched by `queries` in a LIST (wildcards
/// `base:`, `qemu:`, `qemu:dirty-bitmap:`; no query lists everything).
pub fn match_list<'a>(available: &'a [String], queries: &[String]) -> Vec<&'a str> {
    if queries.is_empty() {
        return available.iter().map(String::as_str).collect();
    }
    let mut out: Vec<&str> = Vec::new();
    for q in queries {
        for name in available {
            let hit = name == q
                || (q == "base:" && name.starts_with("base:"))
                || (q == "qemu:" && name.starts_with("qemu:"))
                || (q == QEMU_DIRTY_BITMAP && name.starts_with(QEMU_DIRTY_BITMAP));
            if hit && !out.contains(&name.as_str()) {
                out.push(name);
            }
        }
    }
    out
}

/// Contexts of `available` named exactly by `queries` in a SET (wildcards
/// are ignored there).
pub fn match_set<'a>(available: &'a [String], queries: &[String]) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for q in queries {
        if let Some(name) = available.iter().find(|n| *n == q) {
            if !out.contains(&name.as_str()) {
                out.push(name);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn avail() -> Vec<String> {
        vec![
            BASE_ALLOCATION.to_string(),
            format!("{QEMU_DIRTY_BITMAP}b1"),
        ]
    }

    #[test]
    fn list_wildcards() {
        let a = avail();
        assert_eq!(match_list(&a, &[]).len(), 2);
        assert_eq!(match_list(&a, &["base:".into()]), vec![BASE_ALLOCATION]);
        assert_eq!(
            match_list(&a, &["qemu:".into()]),
            vec!["qemu:dirty-bitmap:b1"]
        );
        assert!(match_list(&a, &["x-foo:bar".into()]).is_empty());
    }

    #[test]
    fn set_is_exact() {
        let a = avail();
        assert!(match_set(&a, &["base:".into()]).is_empty());
        assert_eq!(
            match_set(&a, &[BASE_ALLOCATION.into(), BASE_ALLOCATION.into()]),
            vec![BASE_ALLOCATION]
        );
    }
}
