//! `chorus models`: the catalog with what is cached; `chorus models pull NAME`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use crate::resolve::{catalog, is_cached, resolve_at, ResolveError, Source};

/// Prints the catalog, cache state and sizes, then the hub repositories in the HF cache.
pub fn list(cache_dir: &Path) -> Result<(), ResolveError> {
    let catalog = catalog()?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:>9}  {:<7} {:<20} SOURCE",
        "NAME", "SIZE", "CACHED", "LICENSE"
    );
    for (name, entry) in &catalog.models {
        let cached = match &entry.source {
            Source::Pypi(_) => match is_cached(entry, cache_dir) {
                true => "yes",
                false => "no",
            },
            Source::Hf { .. } => "hub",
        };
        let source = match &entry.source {
            Source::Pypi(parts) => match parts.len() {
                1 => format!("pypi {}", parts[0].requirement),
                n => format!("pypi {} ({n} packages)", parts[0].requirement),
            },
            Source::Hf { repo, file } => format!("hf:{repo}:{file}"),
        };
        let default = if *name == catalog.default {
            " (default)"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "{:<24} {:>9}  {:<7} {:<20} {source}",
            name,
            megabytes(entry.size),
            cached,
            entry.license,
        );
        let _ = writeln!(out, "{:<24} {}{default}", "", entry.description);
        if let Some(terms) = &entry.terms {
            let _ = writeln!(out, "{:<24} terms: {terms}", "");
        }
    }
    let _ = writeln!(out, "\ncache: {}", cache_dir.display());
    let hub = hf_hub::Cache::from_env();
    let repos = hub_repos(hub.path());
    if !repos.is_empty() {
        let _ = writeln!(
            out,
            "\nin the hub cache ({}), usable as --model hf:ORG/REPO:",
            hub.path().display()
        );
        for (repo, size) in repos {
            let _ = writeln!(out, "  {repo:<40} {:>9}", megabytes(size));
        }
    }
    emit(&out);
    Ok(())
}

/// Fetches `name` (a catalog name or any `--model` form) and prints where it is.
pub fn pull(name: &str, cache_dir: &Path, revision: &str) -> Result<(), ResolveError> {
    let resolved = resolve_at(name, cache_dir, revision)?;
    emit(&format!("{}\n", resolved.path.display()));
    Ok(())
}

/// Writes to standard output; a reader that stopped reading (`| head`) is not an error.
pub fn emit(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
}

fn megabytes(bytes: u64) -> String {
    format!("{:.0} MB", bytes as f64 / 1e6)
}

/// `models--ORG--REPO` folders of the hub cache and the bytes of their blobs.
fn hub_repos(hub: &Path) -> Vec<(String, u64)> {
    let Ok(entries) = std::fs::read_dir(hub) else {
        return Vec::new();
    };
    let mut repos: Vec<(String, u64)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let folder = e.file_name().to_string_lossy().into_owned();
            let repo = folder.strip_prefix("models--")?.replacen("--", "/", 1);
            Some((repo, dir_size(&e.path().join("blobs"))))
        })
        .collect();
    repos.sort();
    repos
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
