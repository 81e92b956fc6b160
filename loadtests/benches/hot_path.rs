//! Native costs of the request path's CPU-heavy steps, where callgrind misleads (SHA-256
//! runs its portable code under valgrind) or where a step is too small to see in a load
//! run: the `response_schema` check of a 2 KiB answer, and the decision log's SHA-256 chain
//! hash of a record; and what reading a JSON pointer costs (model_version_pointer, shadow
//! comparisons), beside the `Value`-tree way it replaced.
//!
//! `cargo bench --bench hot_path` (criterion; HTML under target/criterion/)

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;

fn schema(c: &mut Criterion) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/schemas/recommendations.json"
    );
    let schema: serde_json::Value = match std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|s| serde_json::from_str(&s).map_err(|e| e.to_string()))
    {
        Ok(v) => v,
        Err(e) => panic!("{path}: {e}"),
    };
    let validator = match jsonschema::options_for::<breakwater::json_tape::Tape>().build(&schema) {
        Ok(v) => v,
        Err(e) => panic!("{path}: {e}"),
    };
    // The answer the mock serves at /recommend/2048 (the proxy benchmark's).
    let answer = loadtests::mock::recommendations("rec-v7", 2048);
    let mut group = c.benchmark_group("response_schema");
    group.throughput(Throughput::Bytes(answer.len() as u64));
    group.bench_function("check, 2 KiB recommendations answer", |b| {
        b.iter(|| breakwater::json_tape::check(&validator, black_box(answer.as_bytes())))
    });
    group.bench_function("parse only (simd-json tape), 2 KiB", |b| {
        b.iter(|| breakwater::json_tape::with_tape(black_box(answer.as_bytes()), |_| ()))
    });
    group.finish();
}

fn pointer(c: &mut Criterion) {
    let answer = loadtests::mock::recommendations("rec-v7", 2048);
    let candidate = loadtests::mock::recommendations("rec-v9", 2048);
    let (a, b) = (answer.as_bytes(), candidate.as_bytes());
    let mut group = c.benchmark_group("json_pointer");
    group.throughput(Throughput::Bytes(answer.len() as u64));
    // model_version_pointer, read on every answer of a route that sets it.
    group.bench_function("model version at /model/version: raw scan", |bench| {
        bench.iter(|| breakwater::json_pointer::raw_at(black_box(a), "/model/version"))
    });
    group.bench_function(
        "model version at /model/version: Value tree (before)",
        |bench| {
            bench.iter(|| {
                serde_json::from_slice::<serde_json::Value>(black_box(a))
                    .ok()
                    .and_then(|v| v.pointer("/model/version").cloned())
            })
        },
    );
    // A shadow comparison at /items of two answers from different model versions.
    group.bench_function("shadow agrees at /items: raw scan", |bench| {
        bench
            .iter(|| breakwater::json_pointer::agree_at(black_box(a), black_box(b), Some("/items")))
    });
    group.bench_function("shadow agrees at /items: Value trees (before)", |bench| {
        bench.iter(|| {
            let x = serde_json::from_slice::<serde_json::Value>(black_box(a)).ok();
            let y = serde_json::from_slice::<serde_json::Value>(black_box(b)).ok();
            matches!((x, y), (Some(x), Some(y)) if x.pointer("/items") == y.pointer("/items"))
        })
    });
    group.finish();
}

fn chain_hash(c: &mut Criterion) {
    // A decision record of typical size (a recommendations call with a fallback reason).
    let record = br#"{"v":1,"seq":18446,"ts_start":"2026-12-03T13:04:17.123456Z","ts_end":"2026-12-03T13:04:17.125012Z","request_id":"3f2b8c1e-9a4d-4e7b-b1c2-6d5e4f3a2b1c","route":"recommendations","method":"POST","path":"/v1/recommendations","outcome":"ai","status":200,"model_version":"rec-v7","upstream":"ai","attempts":1,"latency_ms":1.556,"breaker":"closed","canary":false,"prev_hash":"9b74c9897bac770ffc029102a200c5de8d6b2e8e2c9b2c9a7d3c4b5a69788796"}"#;
    let prev = "9b74c9897bac770ffc029102a200c5de8d6b2e8e2c9b2c9a7d3c4b5a69788796";
    let mut group = c.benchmark_group("decision_log");
    group.throughput(Throughput::Bytes(record.len() as u64));
    group.bench_function("sha-256 chain hash of a 420-byte record", |b| {
        b.iter_batched(
            || (),
            |()| breakwater::cli::chain_hash(black_box(prev), black_box(record)),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, schema, pointer, chain_hash);
criterion_main!(benches);
