//! What `response_schema` costs per answer: parsing a ~2.6 KiB recommendations answer, and
//! parsing plus validating it against a schema, as breakwater's comply layer does.
//!
//! `cargo run -p loadtests --release --example schema_cost -- config/schemas/recommendations.json`

use std::time::Instant;

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "config/schemas/recommendations.json".into());
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| path.clone())?)?;
    let validator =
        jsonschema::validator_for(&schema).map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
    let items: Vec<String> = (0..40)
        .map(|i| {
            format!(r#"{{"course":"COURSE-{i:03}","score":0.{i:02},"reason":"similar students"}}"#)
        })
        .collect();
    let answer = format!(
        r#"{{"model":{{"version":"rec-v7"}},"items":[{}]}}"#,
        items.join(",")
    );
    let bytes = answer.as_bytes();
    println!("answer: {} bytes", bytes.len());
    let n = 50_000;
    for (label, validate) in [("parse", false), ("parse + validate", true)] {
        let start = Instant::now();
        let mut valid = 0;
        for _ in 0..n {
            let v: serde_json::Value = serde_json::from_slice(std::hint::black_box(bytes))?;
            if !validate || validator.validate(&v).is_ok() {
                valid += 1;
            }
        }
        let per = start.elapsed().as_secs_f64() * 1e6 / n as f64;
        println!("{label}: {per:.1} us per answer ({valid}/{n} valid)");
    }
    Ok(())
}
