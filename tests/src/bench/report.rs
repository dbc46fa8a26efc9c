//! The result table: one row per figure, direct beside Sluice, with the
//! target and whether it was met. A miss is reported, never an error.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub metric: String,
    pub direct: String,
    pub sluice: String,
    /// sluice/direct ("0.41x") or, for latency, the added microseconds.
    pub compare: String,
    pub target: String,
    /// "PASS", "MISS" or "-" (no target).
    pub result: String,
}

/// How a figure is held against its target.
pub enum Target {
    /// sluice/direct must be at least this.
    RatioAtLeast(f64),
    /// sluice - direct must be at most this (microseconds).
    AddedAtMost(f64),
    /// The sluice figure alone must be at most this.
    AtMost(f64, &'static str),
    /// The sluice figure alone must be at least this; no ratio shown.
    AtLeast(f64, &'static str),
    /// No target; show the added microseconds.
    Added,
    /// No target; show the ratio.
    None,
}

pub fn verdict(ok: bool) -> String {
    if ok { "PASS" } else { "MISS" }.into()
}

/// A row comparing a direct and a sluice figure; `prec` decimals.
pub fn compare(metric: &str, direct: f64, sluice: f64, prec: usize, target: Target) -> Row {
    let ratio = sluice / direct;
    let added = sluice - direct;
    let (compare, target, result) = match target {
        Target::RatioAtLeast(t) => (format!("{ratio:.2}x"), format!(">= {t:.2}x"), verdict(ratio >= t)),
        Target::AddedAtMost(t) => (format!("+{added:.1} us"), format!("<= +{t:.0} us"), verdict(added <= t)),
        Target::AtMost(t, unit) => (format!("{ratio:.2}x"), format!("<= {t} {unit}"), verdict(sluice <= t)),
        Target::AtLeast(t, unit) => ("-".into(), format!(">= {t} {unit}"), verdict(sluice >= t)),
        Target::Added => (format!("+{added:.1} us"), "-".into(), "-".into()),
        Target::None => (format!("{ratio:.2}x"), "-".into(), "-".into()),
    };
    Row {
        metric: metric.into(),
        direct: format!("{direct:.prec$}"),
        sluice: format!("{sluice:.prec$}"),
        compare,
        target,
        result,
    }
}

/// A row with a sluice figure only (the agents' own cost); `shown` is the
/// cell text, `value` what is held against `at_most`.
pub fn agent_only(metric: &str, shown: String, value: f64, at_most: Option<(f64, &str)>) -> Row {
    let (target, result) = match at_most {
        Some((t, unit)) => (format!("<= {t} {unit}"), verdict(value <= t)),
        None => ("-".into(), "-".into()),
    };
    Row { metric: metric.into(), direct: "-".into(), sluice: shown, compare: "-".into(), target, result }
}

/// The rows as an aligned markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let header = ["metric", "direct", "sluice", "ratio / added", "target", "result"];
    let cells: Vec<Vec<&str>> =
        rows.iter().map(|r| vec![r.metric.as_str(), &r.direct, &r.sluice, &r.compare, &r.target, &r.result]).collect();
    table(&header, &cells)
}

/// An aligned markdown table of any width: the first column (the metric)
/// left-aligned, the others right-aligned. Short rows are padded.
pub fn table<S: AsRef<str>>(header: &[&str], rows: &[Vec<S>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, s) in width.iter_mut().zip(r) {
            *w = (*w).max(s.as_ref().chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| -> String {
        let mut s = String::from("|");
        for (i, w) in width.iter().enumerate() {
            let cell = cells.next().unwrap_or("");
            if i == 0 {
                s += &format!(" {cell:<w$} |");
            } else {
                s += &format!(" {cell:>w$} |");
            }
        }
        s + "\n"
    };
    let mut out = line(&mut header.iter().copied());
    out += "|";
    for (i, w) in width.iter().enumerate() {
        let dashes = "-".repeat(w.saturating_sub(1));
        out += &if i == 0 { format!(" -{dashes} |") } else { format!(" {dashes}: |") };
    }
    out += "\n";
    for r in rows {
        out += &line(&mut r.iter().map(AsRef::as_ref));
    }
    out
}
