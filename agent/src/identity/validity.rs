//! Conversions between the clocks involved: `SystemTime` in our API, ASN.1
//! times in parsed certificates, and `time::OffsetDateTime` in rcgen.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::time::ASN1Time;

/// Certificates carry whole seconds; rounding here keeps the times we report
/// identical to the ones written into the certificate.
pub(crate) fn truncate_to_secs(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => UNIX_EPOCH,
    }
}

pub(crate) fn from_asn1(t: ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Human-readable UTC time for error messages.
pub(crate) fn display(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    match ASN1Time::from_timestamp(secs) {
        Ok(t) => t.to_string(),
        Err(_) => format!("{secs} seconds since the Unix epoch"),
    }
}

/// Sets an rcgen validity window. Both ends must be whole seconds (see
/// [`truncate_to_secs`]).
pub(crate) fn set_validity(params: &mut rcgen::CertificateParams, not_before: SystemTime, not_after: SystemTime) {
    // rcgen takes `time::OffsetDateTime`, which converts from `SystemTime`;
    // writing it this way avoids depending on the `time` crate by name.
    params.not_before = not_before.into();
    params.not_after = not_after.into();
}
