//! Which entries `tart prune` and automatic pruning delete (§6 of the spec). Selection is kept
//! pure so the ordering rules can be tested without a filesystem.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::SystemTime;

/// Space available to unprivileged users on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: statvfs fills the zeroed struct we pass; the path is NUL-terminated.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// Something that can be pruned: a local VM or an OCI cache entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate<K> {
    pub key: K,
    pub accessed: SystemTime,
    pub allocated_bytes: u64,
}

/// `--older-than`: everything last used at or before `cutoff`.
pub fn older_than<K: Clone>(candidates: &[Candidate<K>], cutoff: SystemTime) -> Vec<K> {
    candidates
        .iter()
        .filter(|c| c.accessed <= cutoff)
        .map(|c| c.key.clone())
        .collect()
}

/// `--space-budget`: walk from the most recently used; keep an entry if it still fits in what
/// is left of the budget, otherwise delete it and go on, so smaller older entries can still fit.
pub fn over_budget<K: Clone>(candidates: &[Candidate<K>], budget_bytes: u64) -> Vec<K> {
    let mut newest_first: Vec<&Candidate<K>> = candidates.iter().collect();
    newest_first.sort_by_key(|c| std::cmp::Reverse(c.accessed));
    let mut remaining = budget_bytes;
    let mut doomed = Vec::new();
    for candidate in newest_first {
        if candidate.allocated_bytes <= remaining {
            remaining -= candidate.allocated_bytes;
        } else {
            doomed.push(candidate.key.clone());
        }
    }
    doomed
}

/// Automatic pruning before a pull or after a clone: when `required` bytes do not fit in
/// `free`, delete least recently used entries until enough is reclaimed. Nothing is deleted
/// when even deleting everything could not make room: that would lose caches for nothing.
pub fn to_reclaim<K: Clone>(candidates: &[Candidate<K>], required: u64, free: u64) -> Vec<K> {
    if required < free {
        return Vec::new();
    }
    let need = required - free;
    let total: u64 = candidates.iter().map(|c| c.allocated_bytes).sum();
    if total < need {
        return Vec::new();
    }
    let mut oldest_first: Vec<&Candidate<K>> = candidates.iter().collect();
    oldest_first.sort_by_key(|c| c.accessed);
    let mut reclaimed = 0u64;
    let mut doomed = Vec::new();
    for candidate in oldest_first {
        if reclaimed > need {
            break;
        }
        reclaimed += candidate.allocated_bytes;
        doomed.push(candidate.key.clone());
    }
    doomed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn candidate(key: &'static str, age_days: u64, gib: u64) -> Candidate<&'static str> {
        Candidate {
            key,
            accessed: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000 - age_days * 86_400),
            allocated_bytes: gib << 30,
        }
    }

    fn sorted(mut keys: Vec<&'static str>) -> Vec<&'static str> {
        keys.sort();
        keys
    }

    #[test]
    fn older_than_includes_the_boundary() {
        let all = [candidate("new", 1, 1), candidate("edge", 7, 1), candidate("old", 30, 1)];
        let cutoff = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000 - 7 * 86_400);
        assert_eq!(sorted(older_than(&all, cutoff)), ["edge", "old"]);
    }

    #[test]
    fn budget_keeps_newest_and_lets_small_old_entries_fit() {
        let all = [
            candidate("old-small", 30, 2),
            candidate("newest", 1, 5),
            candidate("middle-big", 10, 8),
            candidate("older", 20, 4),
        ];
        // Budget 10 GiB: newest (5) fits, middle-big (8) does not, older (4) fits, old-small (2) no longer does.
        assert_eq!(sorted(over_budget(&all, 10 << 30)), ["middle-big", "old-small"]);
        assert_eq!(
            sorted(over_budget(&all, 0)),
            ["middle-big", "newest", "old-small", "older"]
        );
        assert!(over_budget(&all, 100 << 30).is_empty());
    }

    #[test]
    fn reclaim_deletes_oldest_first_until_enough() {
        let all = [candidate("a", 1, 4), candidate("b", 5, 4), candidate("c", 9, 4)];
        assert!(to_reclaim(&all, 1 << 30, 2 << 30).is_empty(), "fits already");
        assert_eq!(to_reclaim(&all, 5 << 30, 2 << 30), ["c"]);
        assert_eq!(to_reclaim(&all, 8 << 30, 2 << 30), ["c", "b"]);
        assert!(
            to_reclaim(&all, 20 << 30, 2 << 30).is_empty(),
            "cannot make room: keep everything"
        );
    }
}
