//! Output in the shapes that tools parsing Tart (Packer, the GitLab executor) expect.

use std::time::{Duration, SystemTime};

/// Tart's "plain" TextTable: cells left-aligned and padded to the widest in their column,
/// separated by one space, the whole text trimmed at the end.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let lines: Vec<String> = std::iter::once(&header)
        .chain(rows)
        .map(|row| {
            row.iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    lines.join("\n").trim_end().to_owned()
}

/// Like Foundation's `RelativeDateTimeFormatter` in full style: "2 hours ago".
pub fn relative_time(then: SystemTime, now: SystemTime) -> String {
    let (seconds, past) = match now.duration_since(then) {
        Ok(ago) => (ago.as_secs(), true),
        Err(err) => (err.duration().as_secs(), false),
    };
    const UNITS: [(&str, u64); 7] = [
        ("year", 365 * 86_400),
        ("month", 30 * 86_400),
        ("week", 7 * 86_400),
        ("day", 86_400),
        ("hour", 3_600),
        ("minute", 60),
        ("second", 1),
    ];
    let (unit, size) = UNITS
        .iter()
        .copied()
        .find(|&(_, size)| seconds >= size)
        .unwrap_or(("second", 1));
    let count = seconds / size;
    let plural = if count == 1 { "" } else { "s" };
    if past && seconds > 0 {
        format!("{count} {unit}{plural} ago")
    } else {
        format!("in {count} {unit}{plural}")
    }
}

/// ISO 8601 in UTC without fractions, as Swift's `ISO8601DateFormatter` writes it.
pub fn iso8601(when: SystemTime) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    time::OffsetDateTime::from(when)
        .format(format)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

pub fn days(n: u64) -> Duration {
    Duration::from_secs(n * 86_400)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_pads_columns_and_trims_the_end() {
        let text = table(&["A", "Long"], &[vec!["wide cell".into(), "x".into()]]);
        assert_eq!(text, "A         Long\nwide cell x");
    }

    #[test]
    fn relative_times_read_like_foundation() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000_000);
        let ago = |s| relative_time(now - Duration::from_secs(s), now);
        assert_eq!(ago(0), "in 0 seconds");
        assert_eq!(ago(1), "1 second ago");
        assert_eq!(ago(59), "59 seconds ago");
        assert_eq!(ago(7_200), "2 hours ago");
        assert_eq!(ago(86_400), "1 day ago");
        assert_eq!(ago(15 * 86_400), "2 weeks ago");
        assert_eq!(ago(400 * 86_400), "1 year ago");
    }

    #[test]
    fn iso8601_is_utc_seconds() {
        let when = SystemTime::UNIX_EPOCH + Duration::from_secs(1_778_622_318);
        assert_eq!(iso8601(when), "2026-05-12T21:45:18Z");
    }
}
