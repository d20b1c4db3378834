//! Locating the real default model for tests.

#![allow(dead_code)]

use std::path::PathBuf;

/// `CHORUS_TEST_MODEL`, or the default model in the workspace's model cache (the test
/// script fetches it first with `chorus --download-only`).
pub fn model_path() -> PathBuf {
    if let Ok(p) = std::env::var("CHORUS_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../models/cache/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "the default model is not cached at {}: run `cargo run --release -- --download-only` first",
        p.display()
    );
    p
}

/// A file of the reference data (copied into `tests/reference/` from the project's
/// `shared/reference/`, so the test does not depend on anything outside the repository).
pub fn reference(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("reference file is JSON")
}
