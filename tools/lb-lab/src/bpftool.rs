//! Reading pinned maps with `bpftool`, a reader independent of cidlb's own (aya) map code:
//! tests compare what cidlb reports with what the kernel's maps hold.

use std::{collections::BTreeMap, path::Path, process::Command};

use serde_json::Value;

/// A little-endian integer from bpftool's raw form (`["0x01", "0x00", ...]`) or its BTF-formatted
/// form (a number).
fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::Array(bytes) => {
            let mut out = 0u64;
            for (i, b) in bytes.iter().enumerate().take(8) {
                let b = u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok()?;
                out |= u64::from(b) << (8 * i);
            }
            Some(out)
        }
        _ => None,
    }
}

/// Sums a pinned per-CPU array of `u64` over the CPUs: index → sum, from
/// `bpftool -j map dump pinned PATH`.
pub fn percpu_u64_sums(path: &Path) -> Result<BTreeMap<u32, u64>, String> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(path)
        .output()
        .map_err(|e| format!("spawn bpftool (apt-get install bpftool): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "bpftool map dump pinned {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    parse_percpu_u64_dump(&String::from_utf8_lossy(&out.stdout))
        .map_err(|e| format!("bpftool map dump pinned {}: {e}", path.display()))
}

/// The parsing half of [`percpu_u64_sums`].
pub fn parse_percpu_u64_dump(text: &str) -> Result<BTreeMap<u32, u64>, String> {
    let dump: Value = serde_json::from_str(text).map_err(|e| format!("bad JSON ({e})"))?;
    let entries = dump.as_array().ok_or("not a JSON array")?;
    let mut sums = BTreeMap::new();
    for e in entries {
        let key = int(&e["key"]).ok_or_else(|| format!("entry without a key: {e}"))?;
        let values = e["values"]
            .as_array()
            .ok_or_else(|| format!("entry without per-CPU values: {e}"))?;
        let mut sum = 0u64;
        for v in values {
            sum += int(&v["value"]).ok_or_else(|| format!("bad per-CPU value: {v}"))?;
        }
        sums.insert(key as u32, sum);
    }
    Ok(sums)
}

#[cfg(test)]
mod tests {
    #[test]
    fn raw_and_formatted_dumps() {
        let raw = r#"[{"key":["0x02","0x00","0x00","0x00"],"values":[
            {"cpu":0,"value":["0x01","0x01","0x00","0x00","0x00","0x00","0x00","0x00"]},
            {"cpu":1,"value":["0x02","0x00","0x00","0x00","0x00","0x00","0x00","0x00"]}]}]"#;
        assert_eq!(
            super::parse_percpu_u64_dump(raw).unwrap(),
            [(2, 257 + 2)].into()
        );
        let btf = r#"[{"key":5,"values":[{"cpu":0,"value":7},{"cpu":1,"value":8}]}]"#;
        assert_eq!(super::parse_percpu_u64_dump(btf).unwrap(), [(5, 15)].into());
    }
}
