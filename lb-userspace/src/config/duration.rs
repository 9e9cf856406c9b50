//! Durations in the config: "30s", "500ms", "5m", "1h", or a bare number of seconds.

use std::time::Duration;

use serde::{de, Deserialize, Deserializer};

/// Parses "30s", "500ms", "5m", "1h", or a bare number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let d = match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    };
    Some(d)
}

/// A duration field; serde_yaml reports errors raised here at the enclosing map, so the message
/// names the key itself.
pub fn duration_field<'de, D: Deserializer<'de>>(d: D, key: &str) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Num(u64),
        Str(String),
    }
    match Raw::deserialize(d)? {
        Raw::Num(n) => Ok(Duration::from_secs(n)),
        Raw::Str(s) => parse_duration(&s).ok_or_else(|| {
            de::Error::custom(format!(
                "{key}: {s:?} is not a duration like \"30s\", \"500ms\", \"5m\""
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("10"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("5 parsecs"), None);
    }
}
