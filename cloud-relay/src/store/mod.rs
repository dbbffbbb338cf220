//! The fleet store: what the relay must not forget when it restarts, shared by its replicas.
//!
//! # What is kept
//! One JSON body per `(kind, key)` row (see `migrations/0001_fleet_state.sql`):
//! - `device/<id>`: the device's spool streams (exactly-once positions), its status and latest
//!   telemetry with the gap accounting (`missing_reports`);
//! - `evidence/<id>`: its calibration windows, certificates and the threshold in force, per
//!   model (written only when a calibration window is filed: the big rows stay cold);
//! - `control/<id>`: its config documents, versions, last ack and tuned thresholds;
//! - `kv/overrides`, `kv/epochs`, `kv/rollouts`: operator overrides, config epochs, rollouts.
//!
//! # Who writes: one replica at a time
//! Every replica answers escalations (shared subscription) and the API. Exactly one, the
//! *writer*, holds the lease ([`Lease`]): it files telemetry, tunes, pushes thresholds, drives
//! rollouts and writes here. The others follow the store (rows with `rev` above the last they
//! saw, every `store.refresh_ms`) and take the lease when the writer's is gone:
//! - on PostgreSQL the lease is a session advisory lock held on a connection of its own, so it
//!   goes the moment the writer's process or connection dies; the next replica to try
//!   (every `store.lease_ms`) takes it;
//! - every batch a writer writes checks, in its transaction, that the lease's `epoch` is still
//!   the one it took (fencing): a writer that lost the lease without noticing cannot write,
//!   and steps down at its first refused batch;
//! - on SQLite the store is one file of one relay: the file is opened in exclusive locking
//!   mode, so a second relay on it is refused at start with a message saying replicas need
//!   PostgreSQL.
//!
//! # Nothing acknowledged is lost
//! A spooled record is acknowledged to the device only after the batch holding its effect
//! was committed ([`persist`]). A writer killed mid-batch loses only records the devices
//! still hold, and they send them again: the restarted (or the next) writer resumes each
//! stream where the store says, so nothing is counted missing that an earlier instance
//! received, and nothing is counted twice.
//!
//! # Backends
//! [`SqlStore`] runs both through sqlx's `Any` driver: the SQL is portable (the same
//! migrations, `ON CONFLICT … DO UPDATE`, `RETURNING`), so one code path is tested on both.
//! [`FleetStore`] is the seam another backend would implement.

pub mod persist;
pub mod replica;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, ConnectOptions, Connection, Row as _};
use thiserror::Error;
use tokio::sync::Mutex;

pub use persist::Persist;
pub use replica::Role;

/// Rows per `INSERT` statement (4 parameters each; SQLite allows 32,766).
const ROWS_PER_STATEMENT: usize = 500;

/// The PostgreSQL advisory-lock key of the writer's lease ("tierd" in ASCII).
const LEASE_KEY: i64 = 0x0074_6965_7264;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot open the fleet store {url}: {source}")]
    Open { url: String, source: sqlx::Error },
    #[error(
        "the fleet store {url} is in use by another relay (SQLite is one relay's store; run \
         replicas on PostgreSQL: store.url = \"postgres://…\")"
    )]
    InUse { url: String },
    #[error("cannot migrate the fleet store {url} to the current schema: {source}")]
    Migrate {
        url: String,
        source: sqlx::migrate::MigrateError,
    },
    #[error("store.url {0:?} must start with sqlite:// or postgres://")]
    Scheme(String),
    #[error("fleet store: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("the lease was taken over (epoch {held} is no longer current): this replica no longer writes")]
    Fenced { held: i64 },
    #[error("stored {kind}/{key} is unreadable: {reason}")]
    Corrupt {
        kind: String,
        key: String,
        reason: String,
    },
}

/// One stored row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub kind: Kind,
    pub key: String,
    pub body: String,
    /// The batch that wrote it (0 before it is written).
    pub rev: i64,
}

/// What a row holds (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Device,
    Evidence,
    Control,
    Kv,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Device => "device",
            Kind::Evidence => "evidence",
            Kind::Control => "control",
            Kind::Kv => "kv",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "device" => Kind::Device,
            "evidence" => Kind::Evidence,
            "control" => Kind::Control,
            "kv" => Kind::Kv,
            _ => return None,
        })
    }
}

/// The writer's lease as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LeaseInfo {
    pub epoch: i64,
    pub holder: String,
    /// Where the holder's HTTP API is (`store.advertise_url`), for operator changes sent to
    /// another replica.
    pub api_url: String,
    pub since_ms: i64,
    /// Batches written so far.
    pub rev: i64,
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A fleet store: rows written in fenced batches, read back whole or since a revision, and
/// the writer's lease.
pub trait FleetStore: Send + Sync + std::fmt::Debug {
    /// Rows written after batch `rev` (0: all), oldest batch first.
    fn rows_since(&self, rev: i64) -> StoreFuture<'_, Vec<Row>>;
    /// Writes `rows` in one transaction if `epoch` is still the lease's epoch; returns the
    /// batch's revision, or [`StoreError::Fenced`].
    fn write(&self, epoch: i64, rows: Vec<Row>) -> StoreFuture<'_, i64>;
    /// Takes the lease if nobody holds it: `Some(epoch)` of the new term.
    fn try_lease<'a>(
        &'a self,
        holder: &'a str,
        api_url: &'a str,
        now_ms: i64,
    ) -> StoreFuture<'a, Option<i64>>;
    /// Whether the lease taken in `epoch` is still held.
    fn holds_lease(&self, epoch: i64) -> StoreFuture<'_, bool>;
    /// Gives the lease up (on shutdown), so another replica takes over at once.
    fn release_lease(&self) -> StoreFuture<'_, ()>;
    fn lease(&self) -> StoreFuture<'_, LeaseInfo>;
    /// Bytes the store takes (SQLite: the files; PostgreSQL: the tables), for the metrics.
    fn size_bytes(&self) -> StoreFuture<'_, Option<u64>>;
    /// `sqlite` or `postgres`.
    fn backend(&self) -> &'static str;
    /// Whether several replicas can share it.
    fn shared(&self) -> bool {
        self.backend() == "postgres"
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// The SQLite / PostgreSQL store (sqlx `Any`).
#[derive(Debug)]
pub struct SqlStore {
    pool: AnyPool,
    backend: Backend,
    /// The URL with any password masked (for messages).
    shown: String,
    url: String,
    /// PostgreSQL: the connection holding the advisory lock, while held.
    lock: Mutex<Option<AnyConnection>>,
    /// SQLite: the file, for its size.
    sqlite_path: Option<std::path::PathBuf>,
}

/// `url` with the password of `user:password@` replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

/// The SQLite file a `sqlite://` URL names.
fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite://")?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && path != ":memory:").then(|| std::path::PathBuf::from(path))
}

impl SqlStore {
    /// Opens (creating a SQLite file if needed) and migrates the store at `url`.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let shown = redact(url);
        let (backend, url) = if url.starts_with("sqlite://") || url.starts_with("sqlite:") {
            let url = if url.contains("mode=") {
                url.to_string()
            } else if url.contains('?') {
                format!("{url}&mode=rwc")
            } else {
                format!("{url}?mode=rwc")
            };
            (Backend::Sqlite, url)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_string())
        } else {
            return Err(StoreError::Scheme(shown));
        };
        let sqlite_path = sqlite_file(&url);
        if let Some(dir) = sqlite_path.as_ref().and_then(|p| p.parent()) {
            if !dir.as_os_str().is_empty() {
                let _ = std::fs::create_dir_all(dir);
            }
        }
        let options: AnyConnectOptions = url.parse().map_err(|source| StoreError::Open {
            url: shown.clone(),
            source,
        })?;
        let options = options.disable_statement_logging();
        if backend == Backend::Sqlite {
            // A probe first: a file another relay holds fails here with its own message (the
            // pool would only retry until it timed out).
            let mut probe = AnyConnection::connect_with(&options)
                .await
                .map_err(|source| open_error(&shown, source))?;
            sqlite_pragmas(&mut probe)
                .await
                .map_err(|source| open_error(&shown, source))?;
            let _ = probe.close().await;
        }
        let pool = match backend {
            // One connection in exclusive locking mode: the file is this relay's alone, and a
            // second relay on it fails at start instead of interleaving writes.
            Backend::Sqlite => AnyPoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .acquire_timeout(Duration::from_secs(10))
                .after_connect(|conn, _| Box::pin(sqlite_pragmas(conn))),
            Backend::Postgres => AnyPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(5)),
        }
        .connect_with(options)
        .await
        .map_err(|source| open_error(&shown, source))?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|source| match source {
                sqlx::migrate::MigrateError::Execute(e) if is_locked(&e) => {
                    StoreError::InUse { url: shown.clone() }
                }
                source => StoreError::Migrate {
                    url: shown.clone(),
                    source,
                },
            })?;
        Ok(SqlStore {
            pool,
            backend,
            shown,
            url,
            lock: Mutex::new(None),
            sqlite_path,
        })
    }

    /// The URL as messages show it (password masked).
    pub fn shown(&self) -> &str {
        &self.shown
    }
}

/// Exclusive locking (one relay per file), WAL, and a commit that survives a power cut (an
/// acknowledged record must).
async fn sqlite_pragmas(conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
    for pragma in [
        "PRAGMA busy_timeout = 2000",
        "PRAGMA locking_mode = EXCLUSIVE",
        "PRAGMA journal_mode = WAL",
        "PRAGMA synchronous = FULL",
    ] {
        sqlx::query(pragma).execute(&mut *conn).await?;
    }
    // Takes the lock now, not at the first batch (a fresh file has no table yet).
    sqlx::query("CREATE TABLE IF NOT EXISTS _tierd_lock (x INTEGER)")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

fn is_locked(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.message().contains("database is locked"))
}

fn open_error(shown: &str, source: sqlx::Error) -> StoreError {
    if is_locked(&source) {
        StoreError::InUse {
            url: shown.to_string(),
        }
    } else {
        StoreError::Open {
            url: shown.to_string(),
            source,
        }
    }
}

fn placeholders(rows: usize) -> String {
    let mut s = String::with_capacity(rows * 20);
    for i in 0..rows {
        if i > 0 {
            s.push(',');
        }
        let b = i * 4;
        s.push_str(&format!("(${},${},${},${})", b + 1, b + 2, b + 3, b + 4));
    }
    s
}

impl FleetStore for SqlStore {
    fn rows_since(&self, rev: i64) -> StoreFuture<'_, Vec<Row>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT kind, key, body, rev FROM state WHERE rev > $1 ORDER BY rev, kind, key",
            )
            .bind(rev)
            .fetch_all(&self.pool)
            .await?;
            rows.into_iter()
                .map(|r| {
                    let kind: String = r.try_get(0)?;
                    let key: String = r.try_get(1)?;
                    let body: String = r.try_get(2)?;
                    let rev: i64 = r.try_get(3)?;
                    let kind = Kind::parse(&kind).ok_or_else(|| StoreError::Corrupt {
                        kind: kind.clone(),
                        key: key.clone(),
                        reason: "unknown kind".into(),
                    })?;
                    Ok(Row {
                        kind,
                        key,
                        body,
                        rev,
                    })
                })
                .collect()
        })
    }

    fn write(&self, epoch: i64, rows: Vec<Row>) -> StoreFuture<'_, i64> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await?;
            // Fencing: the batch's revision comes from the lease row, and only while the
            // lease is still ours (the row lock also orders concurrent writers).
            let rev: Option<i64> = sqlx::query_scalar(
                "UPDATE lease SET rev = rev + 1 WHERE id = 1 AND epoch = $1 RETURNING rev",
            )
            .bind(epoch)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(rev) = rev else {
                return Err(StoreError::Fenced { held: epoch });
            };
            for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                let sql = format!(
                    "INSERT INTO state (kind, key, body, rev) VALUES {} \
                     ON CONFLICT (kind, key) DO UPDATE SET body = excluded.body, rev = excluded.rev",
                    placeholders(chunk.len())
                );
                let mut q = sqlx::query(&sql);
                for r in chunk {
                    q = q
                        .bind(r.kind.as_str())
                        .bind(r.key.as_str())
                        .bind(r.body.as_str())
                        .bind(rev);
                }
                q.execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(rev)
        })
    }

    fn try_lease<'a>(
        &'a self,
        holder: &'a str,
        api_url: &'a str,
        now_ms: i64,
    ) -> StoreFuture<'a, Option<i64>> {
        Box::pin(async move {
            let mut lock = self.lock.lock().await;
            if self.backend == Backend::Postgres {
                if lock.is_none() {
                    let conn = AnyConnection::connect(&self.url).await?;
                    *lock = Some(conn);
                }
                let Some(conn) = lock.as_mut() else {
                    return Ok(None);
                };
                let taken: Result<bool, sqlx::Error> =
                    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                        .bind(LEASE_KEY)
                        .fetch_one(&mut *conn)
                        .await;
                match taken {
                    Ok(true) => {}
                    Ok(false) => return Ok(None),
                    Err(e) => {
                        *lock = None;
                        return Err(e.into());
                    }
                }
            }
            let epoch: i64 = sqlx::query_scalar(
                "UPDATE lease SET epoch = epoch + 1, holder = $1, api_url = $2, since_ms = $3 \
                 WHERE id = 1 RETURNING epoch",
            )
            .bind(holder)
            .bind(api_url)
            .bind(now_ms)
            .fetch_one(&self.pool)
            .await?;
            Ok(Some(epoch))
        })
    }

    fn holds_lease(&self, epoch: i64) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            if self.backend == Backend::Postgres {
                let mut lock = self.lock.lock().await;
                let Some(conn) = lock.as_mut() else {
                    return Ok(false);
                };
                if conn.ping().await.is_err() {
                    // The session (and with it the advisory lock) is gone.
                    *lock = None;
                    return Ok(false);
                }
            }
            let current: i64 = sqlx::query_scalar("SELECT epoch FROM lease WHERE id = 1")
                .fetch_one(&self.pool)
                .await?;
            Ok(current == epoch)
        })
    }

    fn release_lease(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let mut lock = self.lock.lock().await;
            if let Some(conn) = lock.take() {
                let _ = conn.close().await;
            }
            Ok(())
        })
    }

    fn lease(&self) -> StoreFuture<'_, LeaseInfo> {
        Box::pin(async move {
            let r =
                sqlx::query("SELECT epoch, holder, api_url, since_ms, rev FROM lease WHERE id = 1")
                    .fetch_one(&self.pool)
                    .await?;
            Ok(LeaseInfo {
                epoch: r.try_get(0)?,
                holder: r.try_get(1)?,
                api_url: r.try_get(2)?,
                since_ms: r.try_get(3)?,
                rev: r.try_get(4)?,
            })
        })
    }

    fn size_bytes(&self) -> StoreFuture<'_, Option<u64>> {
        Box::pin(async move {
            match self.backend {
                Backend::Sqlite => Ok(self.sqlite_path.as_ref().map(|p| {
                    ["", "-wal", "-shm"]
                        .iter()
                        .filter_map(|s| {
                            let mut f = p.clone().into_os_string();
                            f.push(s);
                            std::fs::metadata(f).ok().map(|m| m.len())
                        })
                        .sum()
                })),
                Backend::Postgres => {
                    let n: i64 = sqlx::query_scalar(
                        "SELECT (pg_total_relation_size('state') + pg_total_relation_size('lease'))::BIGINT",
                    )
                    .fetch_one(&self.pool)
                    .await?;
                    Ok(u64::try_from(n).ok())
                }
            }
        })
    }

    fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: Kind, key: &str, body: &str) -> Row {
        Row {
            kind,
            key: key.into(),
            body: body.into(),
            rev: 0,
        }
    }

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            redact("postgres://tierd:s3cret@db:5432/fleet"),
            "postgres://tierd:***@db:5432/fleet"
        );
        assert_eq!(redact("sqlite:///var/lib/x.db"), "sqlite:///var/lib/x.db");
    }

    #[tokio::test]
    async fn batches_are_fenced_and_followed_by_revision() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/fleet.db", dir.path().display());
        let store = SqlStore::open(&url).await.unwrap();
        let epoch = store.try_lease("a", "http://a", 1).await.unwrap().unwrap();
        let r1 = store
            .write(
                epoch,
                vec![row(Kind::Device, "d1", "{}"), row(Kind::Kv, "epochs", "{}")],
            )
            .await
            .unwrap();
        let r2 = store
            .write(epoch, vec![row(Kind::Device, "d1", "{\"x\":1}")])
            .await
            .unwrap();
        assert!(r2 > r1);
        let all = store.rows_since(0).await.unwrap();
        assert_eq!(all.len(), 2);
        let newer = store.rows_since(r1).await.unwrap();
        assert_eq!(newer.len(), 1);
        assert_eq!(newer[0].body, "{\"x\":1}");
        // A new term fences the old one.
        let next = store.try_lease("b", "http://b", 2).await.unwrap().unwrap();
        assert!(next > epoch);
        assert!(matches!(
            store
                .write(epoch, vec![row(Kind::Device, "d2", "{}")])
                .await,
            Err(StoreError::Fenced { .. })
        ));
        assert!(!store.holds_lease(epoch).await.unwrap());
        assert_eq!(store.lease().await.unwrap().holder, "b");
        drop(store);
        // Reopened: the rows are there.
        let store = SqlStore::open(&url).await.unwrap();
        assert_eq!(store.rows_since(0).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_second_relay_on_one_sqlite_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/fleet.db", dir.path().display());
        let _first = SqlStore::open(&url).await.unwrap();
        let second = SqlStore::open(&url).await;
        assert!(
            matches!(second, Err(StoreError::InUse { .. })),
            "{second:?}"
        );
    }

    #[test]
    fn unknown_schemes_are_refused() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let e = rt.block_on(SqlStore::open("mysql://x")).unwrap_err();
        assert!(e.to_string().contains("sqlite:// or postgres://"), "{e}");
    }
}
