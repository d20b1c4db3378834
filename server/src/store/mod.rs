//! Storage: stored Responses in an embedded SQLite database under `--state-dir`.
//!
//! - One file, `chorus.sqlite3`, in WAL mode with `synchronous = FULL`: a commit is on disk
//!   before the call returns, so a response is durable before its client hears it ended.
//! - A response's row is written once, whole, after it ended; a crash mid-generation
//!   leaves no row, never half of one.
//! - Schema changes are the numbered files in `migrations/`, applied in order at open and
//!   recorded in `PRAGMA user_version`; a database from a newer chorus is refused.
//! - Retention: rows unused for `--store-max-age` hours go, and beyond
//!   `--store-max-responses` rows or `--store-max-mb` of them the least recently used go
//!   first. Chaining on a response marks its whole chain used.
//!
//! One connection behind a mutex: SQLite has one writer at a time anyway, and every call
//! is short. Callers run it off the async runtime.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

/// The migrations, in order; `PRAGMA user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_responses.sql"),
    include_str!("migrations/0002_response_bytes.sql"),
];

/// The database file inside `--state-dir`.
pub const FILE_NAME: &str = "chorus.sqlite3";

/// How long a statement waits for another connection's lock (another server on the
/// same --state-dir) before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("response {0:?} is not stored")]
    NotFound(String),
    #[error("response {id:?} continues {missing:?}, which is no longer stored")]
    BrokenChain { id: String, missing: String },
    #[error(
        "the store at {path} has schema version {found}, newer than this chorus knows ({known})"
    )]
    NewerSchema {
        path: PathBuf,
        found: usize,
        known: usize,
    },
    #[error("could not create {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store: a lock holder panicked")]
    Poisoned,
    #[error("store: response {0:?} continues itself (the file was edited or damaged)")]
    Loop(String),
}

/// How long rows are kept.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Rows unused for longer go (`None`: kept however old).
    pub max_age: Option<Duration>,
    /// Most rows; beyond, the least recently used go.
    pub max_rows: usize,
    /// Most bytes of rows (their input and response JSON); beyond, the least recently
    /// used go (`None`: no budget).
    pub max_bytes: Option<u64>,
}

impl Retention {
    /// `used_at` of the oldest row still within its age as of `now` (`None`: no age
    /// limit).
    fn cutoff(&self, now: u64) -> Option<i64> {
        self.max_age
            .map(|age| now.saturating_sub(age.as_secs()) as i64)
    }
}

/// One stored response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub id: String,
    pub previous_response_id: Option<String>,
    pub created_at: u64,
    /// JSON array of the request's own input items.
    pub input: String,
    /// JSON of the response object.
    pub response: String,
}

impl Row {
    /// The bytes it takes against `--store-max-mb`.
    pub fn bytes(&self) -> usize {
        self.input.len() + self.response.len()
    }
}

/// One turn of a stored conversation, as a continuation reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub id: String,
    pub previous_response_id: Option<String>,
    /// JSON array of the request's own input items.
    pub input: String,
    /// JSON array of the response's output items.
    pub output: String,
}

pub struct Store {
    db: Mutex<Db>,
    retention: Retention,
    path: PathBuf,
}

struct Db {
    conn: Connection,
}

impl Store {
    /// Opens (creating when absent) the store in `dir` and brings its schema up to date.
    pub fn open(dir: &Path, retention: Retention) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(FILE_NAME);
        let mut conn = Connection::open(&path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        wal(&conn)?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        migrate(&mut conn, &path)?;
        let store = Self {
            db: Mutex::new(Db { conn }),
            retention,
            path,
        };
        store.evict(now())?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rows stored now (by every server sharing the file).
    pub fn len(&self) -> Result<usize, StoreError> {
        count(&self.db()?.conn)
    }

    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }

    /// Writes `row` in one durable transaction, marks the rows in `chain` (the
    /// responses it continues) used, and applies retention.
    pub fn insert(&self, row: &Row, chain: &[String]) -> Result<(), StoreError> {
        let now = now();
        let mut db = self.db()?;
        // Immediate: the write lock from the start, so that the rows counted for
        // retention are the file's, whatever another server on this --state-dir did.
        let tx = db
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO responses
                 (id, previous_response_id, created_at, used_at, input, response, bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                row.id,
                row.previous_response_id,
                row.created_at as i64,
                now as i64,
                row.input,
                row.response,
                row.bytes() as i64
            ],
        )?;
        // Rows past their age go before the chain is marked used: a chain read just
        // before it expired is not brought back for another period.
        evict_old(&tx, self.retention, now)?;
        {
            let mut touch = tx.prepare_cached("UPDATE responses SET used_at = ?1 WHERE id = ?2")?;
            for id in chain {
                touch.execute(params![now as i64, id])?;
            }
        }
        evict_in(&tx, self.retention, now, Some(&row.id))?;
        tx.commit()?;
        Ok(())
    }

    /// The row `id`, unless it is past its age (gone, though not yet deleted: only a
    /// write deletes, and an idle server writes nothing).
    pub fn get(&self, id: &str) -> Result<Row, StoreError> {
        let db = self.db()?;
        db.conn
            .query_row(
                "SELECT id, previous_response_id, created_at, input, response
                 FROM responses WHERE id = ?1 AND used_at >= ?2",
                params![id, self.retention.cutoff(now()).unwrap_or(0)],
                read_row,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(id.to_string()))
    }

    /// The conversation that ends with `id`: its turns from the first to `id`. Only each
    /// row's input and the output items of its response are read (by SQLite, in place):
    /// the rest of a stored response (echoed request fields, which a client may make
    /// large) costs a continuation nothing.
    ///
    /// The walk is bounded by the rows there are: a chain that loops (a file edited by
    /// hand) is an error, not a query that never ends while holding the store.
    pub fn chain(&self, id: &str) -> Result<Vec<Turn>, StoreError> {
        let db = self.db()?;
        let mut query = db.conn.prepare_cached(
            "WITH RECURSIVE chain(id, previous_response_id, depth) AS (
                 SELECT id, previous_response_id, 0 FROM responses
                 WHERE id = ?1 AND used_at >= ?2
                 UNION ALL
                 SELECT r.id, r.previous_response_id, c.depth + 1
                 FROM responses r JOIN chain c ON r.id = c.previous_response_id
                 WHERE r.used_at >= ?2 AND c.depth <= (SELECT count(*) FROM responses)
             )
             SELECT c.id, c.previous_response_id, r.input,
                    coalesce(json_extract(r.response, '$.output'), '[]')
             FROM chain c JOIN responses r ON r.id = c.id ORDER BY c.depth DESC",
        )?;
        let turns = query
            .query_map(
                params![id, self.retention.cutoff(now()).unwrap_or(0)],
                |r| {
                    Ok(Turn {
                        id: r.get(0)?,
                        previous_response_id: r.get(1)?,
                        input: r.get(2)?,
                        output: r.get(3)?,
                    })
                },
            )?
            .collect::<Result<Vec<Turn>, _>>()?;
        let Some(first) = turns.first() else {
            return Err(StoreError::NotFound(id.to_string()));
        };
        let mut seen = std::collections::HashSet::new();
        if let Some(again) = turns.iter().find(|t| !seen.insert(t.id.as_str())) {
            return Err(StoreError::Loop(again.id.clone()));
        }
        if let Some(missing) = &first.previous_response_id {
            return Err(StoreError::BrokenChain {
                id: first.id.clone(),
                missing: missing.clone(),
            });
        }
        Ok(turns)
    }

    /// Deletes `id`; false when it was not stored.
    pub fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let db = self.db()?;
        let n = db
            .conn
            .execute("DELETE FROM responses WHERE id = ?1", [id])?;
        Ok(n > 0)
    }

    /// Applies retention as of `now` (unix seconds).
    pub fn evict(&self, now: u64) -> Result<(), StoreError> {
        let mut db = self.db()?;
        let tx = db
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        evict_in(&tx, self.retention, now, None)?;
        tx.commit()?;
        Ok(())
    }

    fn db(&self) -> Result<MutexGuard<'_, Db>, StoreError> {
        self.db.lock().map_err(|_| StoreError::Poisoned)
    }
}

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        id: r.get(0)?,
        previous_response_id: r.get(1)?,
        created_at: r.get::<_, i64>(2)?.max(0) as u64,
        input: r.get(3)?,
        response: r.get(4)?,
    })
}

/// Applies retention inside a write transaction (the one that stored `new`, if any). The
/// rows are counted in the file, not in this process: other servers may share it. Rows
/// used in the same second go in the order they were written (`rowid`), and `new` never
/// goes: its client is being handed its id.
fn evict_in(
    conn: &Connection,
    retention: Retention,
    now: u64,
    new: Option<&str>,
) -> Result<(), StoreError> {
    evict_old(conn, retention, now)?;
    let rows = count(conn)?;
    if rows > retention.max_rows {
        conn.execute(
            "DELETE FROM responses WHERE id IN
                 (SELECT id FROM responses WHERE id IS NOT ?2 ORDER BY used_at, rowid LIMIT ?1)",
            params![(rows - retention.max_rows) as i64, new],
        )?;
    }
    let Some(max_bytes) = retention.max_bytes else {
        return Ok(());
    };
    let over = stored_bytes(conn)?.saturating_sub(max_bytes);
    if over > 0 {
        // The least recently used rows until `over` bytes are freed: each row whose
        // older rows free less than that.
        conn.execute(
            "DELETE FROM responses WHERE id IN (
                 SELECT id FROM (
                     SELECT id, bytes,
                            sum(bytes) OVER (ORDER BY used_at, rowid) AS freed
                     FROM responses WHERE id IS NOT ?2
                 ) WHERE freed - bytes < ?1
             )",
            params![over as i64, new],
        )?;
    }
    Ok(())
}

/// Deletes the rows past `--store-max-age` as of `now`.
fn evict_old(conn: &Connection, retention: Retention, now: u64) -> Result<(), StoreError> {
    if let Some(cutoff) = retention.cutoff(now) {
        conn.execute("DELETE FROM responses WHERE used_at < ?1", [cutoff])?;
    }
    Ok(())
}

/// Bytes of the rows stored now (their input and response JSON).
fn stored_bytes(conn: &Connection) -> Result<u64, StoreError> {
    let bytes: i64 = conn.query_row("SELECT bytes FROM totals WHERE id = 0", [], |r| r.get(0))?;
    Ok(bytes.max(0) as u64)
}

fn count(conn: &Connection) -> Result<usize, StoreError> {
    let rows: i64 = conn.query_row("SELECT COUNT(*) FROM responses", [], |r| r.get(0))?;
    Ok(rows.max(0) as usize)
}

/// Puts the file in WAL mode. Switching a new file's mode takes its exclusive lock, and
/// SQLite answers "busy" at once, without its busy handler, while another server opening
/// the same file holds it: try again for as long as the busy timeout.
fn wal(conn: &Connection) -> Result<(), StoreError> {
    let start = std::time::Instant::now();
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && start.elapsed() < BUSY_TIMEOUT =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            done => return Ok(done?),
        }
    }
}

/// Applies the migrations this database has not seen, each in its own transaction. The
/// version is read inside the transaction that holds the write lock, so two servers
/// starting on one fresh --state-dir do not both apply a migration.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let version = version.max(0) as usize;
        if version > MIGRATIONS.len() {
            return Err(StoreError::NewerSchema {
                path: path.to_path_buf(),
                found: version,
                known: MIGRATIONS.len(),
            });
        }
        let Some(sql) = MIGRATIONS.get(version) else {
            return Ok(());
        };
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (version + 1) as i64)?;
        tx.commit()?;
        tracing::info!(path = %path.display(), version = version + 1, "store migrated");
    }
}

fn now() -> u64 {
    crate::openai::unix_now()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh state folder, removed when the test ends.
    struct TempDir(PathBuf);

    impl std::ops::Deref for TempDir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!(
            "chorus-store-{name}-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let _ = std::fs::remove_dir_all(&d);
        TempDir(d)
    }

    fn keep(max_rows: usize) -> Retention {
        Retention {
            max_age: None,
            max_rows,
            max_bytes: None,
        }
    }

    fn row(id: &str, previous: Option<&str>) -> Row {
        Row {
            id: id.into(),
            previous_response_id: previous.map(Into::into),
            created_at: 1,
            input: "[]".into(),
            response: format!("{{\"id\":\"{id}\",\"output\":[{{\"n\":\"{id}\"}}]}}"),
        }
    }

    /// Two servers on one --state-dir: both open a fresh file at once (the schema is
    /// made once), and retention counts the file's rows, not what one server believes
    /// (it deleted the response just stored, when the other had deleted the rest).
    #[test]
    fn two_servers_share_a_state_dir() {
        let d = dir("shared");
        let opened: Vec<Store> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| Store::open(&d, keep(5))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect()
        });
        let (a, b) = (&opened[0], &opened[1]);
        for i in 0..5 {
            a.insert(&row(&format!("r{i}"), None), &[]).unwrap();
        }
        for i in 0..5 {
            assert!(b.delete(&format!("r{i}")).unwrap());
        }
        a.insert(&row("new", None), &[]).unwrap();
        assert_eq!(b.get("new").unwrap(), row("new", None));
        assert_eq!(a.len().unwrap(), 1);
    }

    #[test]
    fn chains_read_from_first_turn_to_last() {
        let d = dir("chain");
        let store = Store::open(&d, keep(100)).unwrap();
        store.insert(&row("a", None), &[]).unwrap();
        store.insert(&row("b", Some("a")), &["a".into()]).unwrap();
        store
            .insert(&row("c", Some("b")), &["a".into(), "b".into()])
            .unwrap();
        let ids: Vec<String> = store
            .chain("c")
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
        let turn = &store.chain("b").unwrap()[1];
        assert_eq!(
            (turn.input.as_str(), turn.output.as_str()),
            ("[]", r#"[{"n":"b"}]"#)
        );
        assert_eq!(store.get("b").unwrap(), row("b", Some("a")));
        assert!(matches!(store.chain("x"), Err(StoreError::NotFound(_))));
        // Deleting a middle turn breaks the chains through it, by name.
        assert!(store.delete("b").unwrap());
        assert!(!store.delete("b").unwrap());
        match store.chain("c") {
            Err(StoreError::BrokenChain { id, missing }) => {
                assert_eq!((id.as_str(), missing.as_str()), ("c", "b"));
            }
            other => panic!("expected a broken chain, got {other:?}"),
        }
        assert_eq!(store.len().unwrap(), 2);
    }

    #[test]
    fn rows_survive_reopening_and_the_schema_is_versioned() {
        let d = dir("reopen");
        {
            let store = Store::open(&d, keep(100)).unwrap();
            store.insert(&row("a", None), &[]).unwrap();
        }
        let store = Store::open(&d, keep(100)).unwrap();
        assert_eq!(store.get("a").unwrap().id, "a");
        assert_eq!(store.len().unwrap(), 1);
        drop(store);
        // A database from a newer chorus is refused, not misread.
        let conn = Connection::open(d.join(FILE_NAME)).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(
            Store::open(&d, keep(100)),
            Err(StoreError::NewerSchema { found: 99, .. })
        ));
    }

    /// A store written before sizes were kept (schema 1) gets its rows' sizes and their
    /// sum when it is opened.
    #[test]
    fn an_older_store_is_migrated_with_its_sizes() {
        let d = dir("migrate");
        std::fs::create_dir_all(&*d).unwrap();
        {
            let conn = Connection::open(d.join(FILE_NAME)).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO responses (id, created_at, used_at, input, response)
                 VALUES ('old', 1, 1, '[]', '{\"id\":\"old\"}')",
                [],
            )
            .unwrap();
        }
        let store = Store::open(&d, keep(100)).unwrap();
        assert_eq!(store.get("old").unwrap().bytes(), 2 + 12);
        assert_eq!(stored_bytes(&store.db().unwrap().conn).unwrap(), 14);
    }

    /// Beyond the byte budget the least recently used rows go until the rest fit; the
    /// row just written stays, and the running total follows inserts and deletes.
    #[test]
    fn the_byte_budget_evicts_the_least_recently_used() {
        let d = dir("bytes");
        let sized = |id: &str, n: usize| Row {
            input: format!("[\"{}\"]", "x".repeat(n)),
            ..row(id, None)
        };
        let budget = |max_bytes| Retention {
            max_bytes: Some(max_bytes),
            ..keep(100)
        };
        let store = Store::open(&d, budget(10_000)).unwrap();
        for id in ["a", "b", "c", "d"] {
            store.insert(&sized(id, 3_000), &[]).unwrap();
        }
        // 4 rows of ~3 KB in 10 KB: the oldest went.
        assert!(store.get("a").is_err());
        for id in ["b", "c", "d"] {
            assert!(store.get(id).is_ok(), "{id}");
        }
        let total = |s: &Store| stored_bytes(&s.db().unwrap().conn).unwrap();
        let expected: usize = ["b", "c", "d"]
            .map(|id| sized(id, 3_000).bytes())
            .iter()
            .sum();
        assert_eq!(total(&store), expected as u64);
        // One row larger than the whole budget stays alone.
        store.insert(&sized("big", 20_000), &[]).unwrap();
        assert_eq!(store.len().unwrap(), 1);
        assert!(store.get("big").is_ok());
        assert!(store.delete("big").unwrap());
        assert_eq!(total(&store), 0);
    }

    #[test]
    fn retention_evicts_the_least_recently_used() {
        let d = dir("evict");
        let store = Store::open(&d, keep(3)).unwrap();
        store.insert(&row("a", None), &[]).unwrap();
        store.insert(&row("b", None), &[]).unwrap();
        store.insert(&row("c", None), &[]).unwrap();
        {
            // `a` used later than `b` and `c`.
            let db = store.db().unwrap();
            db.conn
                .execute(
                    "UPDATE responses SET used_at = used_at - 10 WHERE id != 'a'",
                    [],
                )
                .unwrap();
        }
        store.insert(&row("d", None), &[]).unwrap();
        assert_eq!(store.len().unwrap(), 3);
        assert!(store.get("a").is_ok());
        assert!(store.get("d").is_ok());
        assert_eq!(
            [store.get("b").is_ok(), store.get("c").is_ok()]
                .iter()
                .filter(|&&kept| kept)
                .count(),
            1
        );

        // Used in the same second: the one written last stays, however long ago its
        // request began (a long answer finishing after a short one was evicted by its
        // own write, its id already sent).
        let d = dir("evict-tie");
        let store = Store::open(&d, keep(1)).unwrap();
        let long = Row {
            created_at: 1,
            ..row("long", None)
        };
        let short = Row {
            created_at: 2,
            ..row("short", None)
        };
        store.insert(&short, &[]).unwrap();
        store.insert(&long, &[]).unwrap();
        assert!(store.get("long").is_ok());
        assert!(store.get("short").is_err());
        assert_eq!(store.len().unwrap(), 1);

        let d = dir("age");
        let aged = Store::open(
            &d,
            Retention {
                max_age: Some(Duration::from_secs(3600)),
                max_rows: 100,
                max_bytes: None,
            },
        )
        .unwrap();
        aged.insert(&row("old", None), &[]).unwrap();
        aged.insert(&row("new", None), &[]).unwrap();
        {
            let db = aged.db().unwrap();
            db.conn
                .execute(
                    "UPDATE responses SET used_at = used_at - 7200 WHERE id = 'old'",
                    [],
                )
                .unwrap();
        }
        // Past its age a row is gone before anything deletes it: not read, not continued,
        // and continuing it does not bring it back.
        assert!(matches!(aged.get("old"), Err(StoreError::NotFound(_))));
        assert!(matches!(aged.chain("old"), Err(StoreError::NotFound(_))));
        aged.insert(&row("next", Some("old")), &["old".into()])
            .unwrap();
        assert!(matches!(aged.get("old"), Err(StoreError::NotFound(_))));
        assert!(matches!(
            aged.chain("next"),
            Err(StoreError::BrokenChain { .. })
        ));
        aged.evict(now()).unwrap();
        assert!(aged.get("new").is_ok());
        assert_eq!(aged.len().unwrap(), 2);
    }

    /// Rows that continue each other in a loop (only an edit of the file makes them):
    /// the walk ends, as an error, and the store still serves the other rows.
    #[test]
    fn a_chain_that_loops_is_an_error_not_a_hang() {
        let d = dir("loop");
        let store = Store::open(&d, keep(100)).unwrap();
        store.insert(&row("a", None), &[]).unwrap();
        store.insert(&row("b", Some("a")), &["a".into()]).unwrap();
        store.insert(&row("other", None), &[]).unwrap();
        {
            let db = store.db().unwrap();
            db.conn
                .execute(
                    "UPDATE responses SET previous_response_id = 'b' WHERE id = 'a'",
                    [],
                )
                .unwrap();
        }
        assert!(matches!(store.chain("b"), Err(StoreError::Loop(_))));
        assert!(store.get("other").is_ok());
        assert_eq!(store.chain("other").unwrap().len(), 1);
    }

    #[test]
    fn a_duplicate_id_is_an_error_and_changes_nothing() {
        let d = dir("dup");
        let store = Store::open(&d, keep(10)).unwrap();
        store.insert(&row("a", None), &[]).unwrap();
        assert!(store.insert(&row("a", None), &[]).is_err());
        assert_eq!(store.len().unwrap(), 1);
    }
}
