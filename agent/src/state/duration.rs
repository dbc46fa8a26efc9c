//! Durations written the way Kubernetes and Istio users already write them
//! (`90s`, `10m`, `24h`, `1h30m`), so values can be copied from mesh configs.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Serializer;

const UNITS: &[(&str, u64)] = &[("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];

/// Parses `<number><unit>` segments, largest unit first, each unit at most
/// once. Bare numbers are rejected: `90` could mean seconds or minutes, and a
/// cert lifetime off by a factor of 60 is a bad surprise.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration; expected e.g. 90s, 10m, 24h or 1h30m".into());
    }
    let mut rest = text;
    let mut total_ms: u64 = 0;
    // Index into UNITS of the last unit seen; units must strictly decrease.
    let mut last_unit: Option<usize> = None;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!(
                "invalid duration {text:?}: expected a number at {rest:?}; use e.g. 90s, 10m, 24h or 1h30m"
            ));
        }
        let (number, after) = rest.split_at(digits);
        let unit_len = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(unit_len);
        if unit.is_empty() {
            return Err(format!("invalid duration {text:?}: missing unit after {number}; use h, m, s or ms"));
        }
        let Some(index) = UNITS.iter().position(|(name, _)| *name == unit) else {
            return Err(format!("invalid duration {text:?}: unknown unit {unit:?}; use h, m, s or ms"));
        };
        if last_unit.is_some_and(|last| index <= last) {
            return Err(format!("invalid duration {text:?}: units must go from largest to smallest, each once"));
        }
        last_unit = Some(index);
        let overflow = || format!("invalid duration {text:?}: too large");
        let value: u64 = number.parse().map_err(|_| overflow())?;
        let ms = value.checked_mul(UNITS[index].1).ok_or_else(overflow)?;
        total_ms = total_ms.checked_add(ms).ok_or_else(overflow)?;
        rest = after;
    }
    Ok(Duration::from_millis(total_ms))
}

/// The inverse of [`parse`], so that config dumps round-trip.
pub fn format(duration: Duration) -> String {
    let mut ms = duration.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, size) in UNITS {
        let size = u128::from(*size);
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    out
}

pub(crate) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as 90s, 10m, 24h or 1h30m")
        }

        fn visit_str<E: de::Error>(self, value: &str) -> Result<Duration, E> {
            parse(value).map_err(E::custom)
        }

        // YAML turns `certTtl: 90` into an integer; say why that is refused
        // rather than serde's generic "invalid type".
        fn visit_u64<E: de::Error>(self, value: u64) -> Result<Duration, E> {
            Err(E::custom(format!("invalid duration {value}: missing unit; write e.g. {value}s or {value}m")))
        }

        fn visit_i64<E: de::Error>(self, value: i64) -> Result<Duration, E> {
            Err(E::custom(format!("invalid duration {value}: durations are positive and need a unit, e.g. 90s")))
        }
    }

    deserializer.deserialize_any(DurationVisitor)
}

pub(crate) fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format(*duration))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_common_forms() {
        assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse("1h0m5s"), Ok(Duration::from_secs(3_605)));
        assert_eq!(parse("1500ms"), Ok(Duration::from_millis(1_500)));
    }

    #[test]
    fn rejects_ambiguous_or_malformed() {
        for bad in ["", "90", "h", "1x", "1m1h", "1h1h", "-5s", "1.5h", "1 h", "99999999999999999999h"] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(parse("90").unwrap_err().contains("missing unit"));
    }

    #[test]
    fn format_round_trips() {
        for text in ["90s", "10m", "24h", "1h30m", "1h0m5s", "1s500ms", "0s"] {
            let parsed = parse(text).unwrap();
            assert_eq!(parse(&format(parsed)), Ok(parsed), "{text}");
        }
        assert_eq!(format(Duration::from_secs(5_400)), "1h30m");
    }
}
