//! The webhook outbox a test runs on: an SQLite file in a temporary directory, or a throwaway
//! PostgreSQL server (skipped when PostgreSQL is not installed, failed under `CI=true`).

use std::path::Path;
use std::sync::Arc;

use patchwire::sinks::webhook::outbox::Outbox;
use patchwire::sinks::webhook::outbox::postgres::PostgresOutbox;
use patchwire::sinks::webhook::outbox::sqlite::SqliteOutbox;
use patchwire_test_data::postgres::{Durability, TempPostgres};
use tempfile::TempDir;

/// One store for one test; whatever it holds lives as long as it (restarts of the app within
/// a test find their outbox again).
pub struct TestStore {
    dir: TempDir,
    postgres: Option<TempPostgres>,
}

impl TestStore {
    /// An SQLite file (not created until the app opens it).
    pub fn sqlite() -> TestStore {
        TestStore {
            dir: tempfile::tempdir().unwrap(),
            postgres: None,
        }
    }

    /// A PostgreSQL server of its own, or `None` (skip) without PostgreSQL.
    pub fn postgres() -> Option<TestStore> {
        Some(TestStore {
            dir: tempfile::tempdir().unwrap(),
            postgres: Some(TempPostgres::start(Durability::Test)?),
        })
    }

    /// The `[webhooks]` keys that name it.
    pub fn toml(&self) -> String {
        match &self.postgres {
            None => format!(
                "database = \"{}\"\n",
                self.dir.path().join("outbox.db").display()
            ),
            Some(pg) => format!("store = \"{}\"\n", pg.url()),
        }
    }

    /// An empty outbox of its own, opened by the test itself: an in-memory SQLite database,
    /// or a new database on the PostgreSQL server.
    pub async fn open_fresh(&self) -> Arc<dyn Outbox> {
        match self.fresh_database().await {
            None => Arc::new(SqliteOutbox::open(Path::new(":memory:")).await.unwrap()),
            Some(url) => Arc::new(PostgresOutbox::open(&url, 8, "test").await.unwrap()),
        }
    }

    /// A new, empty database on the PostgreSQL server (its URL); `None` for SQLite.
    pub async fn fresh_database(&self) -> Option<String> {
        let pg = self.postgres.as_ref()?;
        let name = format!("t{:08x}", rand::random::<u32>());
        let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        Some(format!("{}/{name}", pg.url().trim_end_matches("/postgres")))
    }

    /// The PostgreSQL server's URL (the database `toml` names); `None` for SQLite.
    pub fn postgres_url(&self) -> Option<String> {
        self.postgres.as_ref().map(|pg| pg.url())
    }

    /// Where an SQLite store's file is (what `toml` names).
    pub fn sqlite_path(&self) -> std::path::PathBuf {
        self.dir.path().join("outbox.db")
    }

    /// Whether other processes could share it (claims are then written to the store).
    pub fn is_shared(&self) -> bool {
        self.postgres.is_some()
    }
}

/// Runs each named `async fn(TestStore)` twice, as `name::sqlite` and `name::postgres`.
#[macro_export]
macro_rules! on_both_stores {
    ($($(#[$meta:meta])* $name:ident),* $(,)?) => {
        $(
            $(#[$meta])*
            mod $name {
                #[tokio::test]
                async fn sqlite() {
                    super::$name($crate::support::store::TestStore::sqlite()).await;
                }

                #[tokio::test]
                async fn postgres() {
                    if let Some(store) = $crate::support::store::TestStore::postgres() {
                        super::$name(store).await;
                    }
                }
            }
        )*
    };
}
