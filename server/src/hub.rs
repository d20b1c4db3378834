//! Models on the HF hub, through the hf-hub crate: its cache layout (`HF_HOME`), its
//! progress bars, a token from `HF_TOKEN` or the cache's token file, and no network at
//! all when `HF_HUB_OFFLINE` is set (then a file must already be in the cache).

use std::path::PathBuf;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::resolve::ResolveError;

/// Files of an HF checkpoint besides the weights; the first two are required.
const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
const OPTIONAL: [&str; 3] = [
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
];
const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";

/// `HF_HUB_OFFLINE` as huggingface_hub reads it.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// Fetches (or finds in the cache) a safetensors checkpoint; returns its snapshot
/// directory, which holds every file the loader reads.
pub fn fetch_checkpoint(repo: &str, revision: &str) -> Result<PathBuf, ResolveError> {
    let hub = Hub::new(repo, revision)?;
    let config = hub.get(REQUIRED[0])?;
    for file in &REQUIRED[1..] {
        hub.get(file)?;
    }
    for file in OPTIONAL {
        // Absent from many repositories; the loader has defaults.
        let _ = hub.get(file);
    }
    match hub.get(INDEX) {
        Ok(index) => {
            let text =
                std::fs::read_to_string(&index).map_err(|e| ResolveError::Io(index.clone(), e))?;
            let index: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ResolveError::Hub(format!("{repo}/{INDEX}: {e}")))?;
            for shard in chorus_model::hf::index_shards(&index).unwrap_or_default() {
                hub.get(&shard)?;
            }
        }
        Err(_) => {
            hub.get(SINGLE)?;
        }
    }
    config
        .parent()
        .map(PathBuf::from)
        .ok_or_else(|| ResolveError::Hub(format!("{repo}: odd cache path {}", config.display())))
}

/// Fetches (or finds in the cache) one file of a repository.
pub fn fetch_file(repo: &str, file: &str, revision: &str) -> Result<PathBuf, ResolveError> {
    Hub::new(repo, revision)?.get(file)
}

struct Hub {
    repo: Repo,
    cache: Cache,
    api: Option<hf_hub::api::sync::ApiRepo>,
}

impl Hub {
    fn new(repo: &str, revision: &str) -> Result<Self, ResolveError> {
        if repo.split('/').count() != 2 || repo.split('/').any(str::is_empty) {
            return Err(ResolveError::Hub(format!(
                "`{repo}` is not a hub repository name (ORG/REPO)"
            )));
        }
        let repo = Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string());
        let cache = Cache::from_env();
        let api = match offline() {
            true => None,
            false => {
                let token = std::env::var("HF_TOKEN")
                    .ok()
                    .filter(|t| !t.is_empty())
                    .or_else(|| cache.token());
                let api = ApiBuilder::from_env()
                    .with_token(token)
                    .with_progress(true)
                    .build()
                    .map_err(|e| ResolveError::Hub(format!("hub client: {e}")))?;
                Some(api.repo(repo.clone()))
            }
        };
        Ok(Self { repo, cache, api })
    }

    fn get(&self, file: &str) -> Result<PathBuf, ResolveError> {
        let name = self.repo.url();
        match &self.api {
            Some(api) => api
                .get(file)
                .map_err(|e| ResolveError::Hub(format!("{name}/{file}: {e}"))),
            None => self.cache.repo(self.repo.clone()).get(file).ok_or_else(|| {
                ResolveError::Hub(format!(
                    "HF_HUB_OFFLINE is set and {name}/{file} (revision {}) is not in the hub cache at {}",
                    self.repo.revision(),
                    self.cache.path().display()
                ))
            }),
        }
    }
}
