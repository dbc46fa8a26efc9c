//! The plugin's decision log: one line per decision, with the pod and the
//! reason, to stderr (which the runtime keeps in its own log) and, when the
//! config names a `logFile`, appended there.
//!
//! Each line is written with one `write` on a file opened `O_APPEND`, so
//! lines from plugins running at the same time for different pods do not
//! interleave. When the file grows past [`ROTATE_BYTES`] it is renamed to
//! `<file>.1` (replacing the previous one) and a new file is started.
//! Logging never fails the plugin.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Size at which the log file is rotated.
pub const ROTATE_BYTES: u64 = 8 << 20;

#[derive(Debug, Clone, Default)]
pub struct Log {
    file: Option<PathBuf>,
    /// Also write each line to stderr.
    stderr: bool,
}

/// Who a line is about.
#[derive(Debug, Clone, Default)]
pub struct Subject {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub container_id: String,
}

impl Log {
    pub fn new(file: Option<PathBuf>, stderr: bool) -> Self {
        Log { file, stderr }
    }

    /// `<time> <COMMAND> <ns>/<name> uid=<uid> container=<id>: <decision>: <reason>`
    pub fn decision(&self, command: &str, who: &Subject, decision: &str, reason: &str) {
        let line = format_line(SystemTime::now(), command, who, decision, reason);
        if self.stderr {
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
        if let Some(file) = &self.file {
            if let Err(e) = append(file, line.as_bytes()) {
                let _ = writeln!(std::io::stderr(), "sluice-cni: cannot write the log file {}: {e}", file.display());
            }
        }
    }
}

fn append(file: &Path, line: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir)?;
        }
    }
    if std::fs::metadata(file).is_ok_and(|m| m.len() >= ROTATE_BYTES) {
        let mut old = file.as_os_str().to_owned();
        old.push(".1");
        // Two plugins may race here; either way one rename wins and the
        // other line goes to whichever file is current.
        let _ = std::fs::rename(file, PathBuf::from(old));
    }
    let mut f = OpenOptions::new().create(true).append(true).open(file)?;
    f.write_all(line)
}

pub fn format_line(at: SystemTime, command: &str, who: &Subject, decision: &str, reason: &str) -> String {
    let dash = |s: &str| if s.is_empty() { "-".to_owned() } else { one_line(s) };
    format!(
        "{} {} {}/{} uid={} container={}: {}: {}\n",
        rfc3339(at),
        command,
        dash(&who.namespace),
        dash(&who.name),
        dash(&who.uid),
        dash(&who.container_id),
        decision,
        one_line(reason),
    )
}

/// Control characters (a newline in an agent's message, say) escaped, so a
/// line stays one line.
fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// `2026-12-02T18:38:34.123Z`.
pub fn rfc3339(at: SystemTime) -> String {
    let d = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, d.subsec_millis())
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_millis(951_782_400_123)), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(1_796_237_914)), "2026-12-02T18:58:34.000Z");
    }

    #[test]
    fn one_line_per_decision() {
        let who =
            Subject { namespace: "shop".into(), name: "web".into(), uid: String::new(), container_id: "c1".into() };
        let line = format_line(UNIX_EPOCH, "ADD", &who, "not meshed", "agent said:\nno\tway\u{7}");
        assert_eq!(
            line,
            "1970-01-01T00:00:00.000Z ADD shop/web uid=- container=c1: not meshed: agent said:\\nno\\tway\\u{7}\n"
        );
        assert_eq!(line.matches('\n').count(), 1);
    }

    #[test]
    fn appends_and_rotates() {
        let dir = std::env::temp_dir().join(format!("sluice-cni-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let file = dir.join("sub/plugin.log");
        let log = Log::new(Some(file.clone()), false);
        log.decision("DEL", &Subject::default(), "removed", "first");
        log.decision("DEL", &Subject::default(), "removed", "second");
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.contains("removed: second"));
        std::fs::write(&file, vec![b'x'; ROTATE_BYTES as usize]).unwrap();
        log.decision("DEL", &Subject::default(), "removed", "third");
        assert!(
            std::fs::read_to_string(&file).unwrap().starts_with("19")
                || std::fs::read_to_string(&file).unwrap().starts_with("20")
        );
        assert_eq!(std::fs::metadata(dir.join("sub/plugin.log.1")).unwrap().len(), ROTATE_BYTES);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
