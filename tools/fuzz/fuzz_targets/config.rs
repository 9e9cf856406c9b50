//! The config parser and its validation: any text gives a config or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(cfg) = cidlb::config::Config::parse(text, std::path::Path::new("fuzz.yaml")) {
            // What `cidlb run` derives from a config must not panic either.
            let _ = cfg.dp_config();
            let _ = cidlb::plan::reverse::reverse_entries(&cfg);
        }
    }
});
