//! Kubernetes quantity strings and RFC 3339 timestamps, the two scalar encodings of the metrics APIs.

/// A non-negative value as a Kubernetes quantity in milli-units (`"3"`, `"2500m"`). The HPA works in milli-units,
/// so finer values are rounded; NaN and negative values become `"0"` (the API must never carry them).
pub fn quantity(v: f64) -> String {
    let milli = if v.is_finite() && v > 0.0 {
        (v * 1000.0).round().min(i64::MAX as f64) as i64
    } else if v == f64::INFINITY {
        i64::MAX
    } else {
        0
    };
    if milli % 1000 == 0 {
        (milli / 1000).to_string()
    } else {
        format!("{milli}m")
    }
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`. Hand-written (Howard Hinnant's civil-from-days, a dozen lines) rather
/// than pulling a date crate into the adapter for one format.
pub fn rfc3339(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let secs = unix_secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_are_milli_units_never_nan_or_negative() {
        assert_eq!(quantity(3.0), "3");
        assert_eq!(quantity(2.5), "2500m");
        assert_eq!(quantity(0.25), "250m");
        assert_eq!(quantity(0.0004), "0");
        assert_eq!(quantity(0.0006), "1m");
        assert_eq!(quantity(f64::NAN), "0");
        assert_eq!(quantity(-1.0), "0");
        assert_eq!(quantity(12.0), "12");
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        // The reference's example instant.
        assert_eq!(rfc3339(1_795_514_400), "2026-11-24T10:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
