//! PostgreSQL for tests: one server found or started per test process,
//! one database created (and dropped) per test.
//!
//! Where the server comes from, in order:
//! 1. `SWITCHYARD_TEST_DATABASE_URL` (any database on the server; the
//!    user must be allowed to create databases);
//! 2. PostgreSQL at 127.0.0.1:5432 as user `postgres`, when it answers;
//! 3. a throw-away cluster in the system's temporary directory
//!    (`switchyard-test-pg-<user>`; `initdb` + `pg_ctl`, found on PATH or
//!    under `/usr/lib/postgresql/*/bin`), started by the first test process
//!    that needs it and shared by the others (test runners start one
//!    process per test). It keeps running after the tests, for the next
//!    run; `pg_ctl -D <dir>/data stop` stops it.
//!
//! When none of these works, [`database`] says so loudly and returns
//! `None` (the test is skipped), except under `CI=true`, where it panics:
//! a CI run must never pass without the PostgreSQL tests.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU64, Ordering},
};

use sqlx::{Connection, Executor, PgConnection};
use tokio::sync::OnceCell;

/// A PostgreSQL server the tests may create databases on.
#[derive(Debug)]
struct Server {
    /// URL of its maintenance database (`…/postgres`).
    admin_url: String,
    /// `postgres://user@host:port`, without a database.
    base: String,
    /// How it was found (for messages).
    origin: String,
}

static SERVER: OnceCell<Option<Server>> = OnceCell::const_new();
static SEQ: AtomicU64 = AtomicU64::new(0);

/// A database of its own for one test: `url` connects to it. Drop it with
/// [`TestDatabase::drop_database`] at the end of the test (a test that
/// panics leaves it behind, named `sy_test_<pid>_<n>`, for inspection).
#[derive(Debug)]
pub struct TestDatabase {
    /// Connects to the test's database.
    pub url: String,
    name: String,
    admin_url: String,
}

impl TestDatabase {
    /// Drops the database (after closing every connection to it).
    pub async fn drop_database(self) {
        let mut admin = PgConnection::connect(&self.admin_url)
            .await
            .expect("connect to drop the test database");
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            )))
            .await
            .expect("drop the test database");
    }
}

impl TestDatabase {
    /// Hands the database to a guard that drops it when the guard is
    /// dropped (for fixtures that cannot await their teardown).
    pub fn drop_on_drop(self) -> DropOnDrop {
        DropOnDrop(Some(self))
    }
}

/// Drops its test database when dropped, on a thread of its own (a drop
/// cannot await).
#[derive(Debug)]
pub struct DropOnDrop(Option<TestDatabase>);

impl Drop for DropOnDrop {
    fn drop(&mut self) {
        let Some(db) = self.0.take() else { return };
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime to drop the test database")
                .block_on(db.drop_database());
        })
        .join();
        if dropped.is_err() && !std::thread::panicking() {
            panic!("the test database could not be dropped");
        }
    }
}

/// Whether the database at `url` answers a query.
async fn answers(url: &str) -> bool {
    match tokio::time::timeout(
        std::time::Duration::from_secs(5),
        PgConnection::connect(url),
    )
    .await
    {
        Ok(Ok(mut c)) => c.execute("SELECT 1").await.is_ok(),
        _ => false,
    }
}

/// `postgres://user@host:port` from a URL, and the URL of the same server's
/// `postgres` database.
fn split(url: &str) -> Option<(String, String)> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))?;
    let server = rest.split(['/', '?']).next()?;
    let base = format!("postgres://{server}");
    Some((base.clone(), format!("{base}/postgres")))
}

fn find_bin(name: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").into_iter().flat_map(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .collect::<Vec<_>>()
    });
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin").join(name));
    on_path.chain(debian).find(|p| p.is_file())
}

/// The shared throw-away cluster: started (once, under a lock file) or
/// found running.
async fn throwaway() -> Result<Server, String> {
    let initdb = find_bin("initdb").ok_or("no initdb on PATH or under /usr/lib/postgresql")?;
    let pg_ctl = find_bin("pg_ctl").ok_or("no pg_ctl on PATH or under /usr/lib/postgresql")?;
    let user = std::env::var("USER").unwrap_or_else(|_| "user".into());
    let root = std::env::temp_dir().join(format!("switchyard-test-pg-{user}"));
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    let lock = root.join("lock");
    let port_file = root.join("port");
    // One process starts it; the others wait for its port.
    for _ in 0..600 {
        if let Ok(port) = std::fs::read_to_string(&port_file) {
            let base = format!("postgres://postgres@127.0.0.1:{}", port.trim());
            if answers(&format!("{base}/postgres")).await {
                return Ok(Server {
                    admin_url: format!("{base}/postgres"),
                    base,
                    origin: format!("the throw-away cluster in {}", root.display()),
                });
            }
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock)
        {
            Ok(_) => {
                let started = start_cluster(&initdb, &pg_ctl, &root, &port_file);
                let _ = std::fs::remove_file(&lock);
                started?;
            }
            // Another process is starting it (or died doing so: a lock
            // older than a minute is taken over).
            Err(_) => {
                let stale = std::fs::metadata(&lock)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().unwrap_or_default().as_secs() > 60);
                if stale {
                    let _ = std::fs::remove_file(&lock);
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
    Err(format!(
        "the throw-away cluster in {} did not come up",
        root.display()
    ))
}

/// Whether this process runs as root (PostgreSQL refuses to).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            == Some("0")
    })
}

/// A command for a PostgreSQL server binary: as root, run as the
/// `postgres` user (PostgreSQL refuses to run as root), the cluster's
/// directory handed to that user.
fn pg_command(bin: &Path, root: &Path) -> Result<Command, String> {
    if !is_root() {
        return Ok(Command::new(bin));
    }
    let ids = |flag: &str| -> Result<u32, String> {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .map_err(|e| e.to_string())?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| "running as root, and no postgres user to run PostgreSQL as".to_owned())
    };
    let (uid, gid) = (ids("-u")?, ids("-g")?);
    std::os::unix::fs::chown(root, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--"]).arg(bin);
    Ok(cmd)
}

fn start_cluster(
    initdb: &Path,
    pg_ctl: &Path,
    root: &Path,
    port_file: &Path,
) -> Result<(), String> {
    let data = root.join("data");
    let run = |cmd: &mut Command| -> Result<(), String> {
        let out = cmd.output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    };
    if !data.join("PG_VERSION").exists() {
        let _ = std::fs::remove_dir_all(&data);
        run(pg_command(initdb, root)?
            .args(["-U", "postgres", "--auth=trust", "-D"])
            .arg(&data))?;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    // A cluster left running on an old port is stopped first.
    let _ = pg_command(pg_ctl, root)?
        .arg("-D")
        .arg(&data)
        .args(["-m", "fast", "stop"])
        .output();
    run(pg_command(pg_ctl, root)?
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(root.join("log"))
        .args(["-w", "-o"])
        .arg(format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {}",
            root.display()
        ))
        .arg("start"))?;
    std::fs::write(port_file, port.to_string()).map_err(|e| e.to_string())
}

async fn find_server() -> Result<Server, String> {
    if let Ok(url) = std::env::var("SWITCHYARD_TEST_DATABASE_URL") {
        let (base, admin_url) =
            split(&url).ok_or("SWITCHYARD_TEST_DATABASE_URL is not a postgres:// URL")?;
        return if answers(&url).await {
            Ok(Server {
                admin_url: url,
                base,
                origin: "SWITCHYARD_TEST_DATABASE_URL".into(),
            })
        } else {
            let _ = admin_url;
            Err("SWITCHYARD_TEST_DATABASE_URL does not answer".into())
        };
    }
    let local = "postgres://postgres@127.0.0.1:5432/postgres";
    if answers(local).await {
        return Ok(Server {
            admin_url: local.into(),
            base: "postgres://postgres@127.0.0.1:5432".into(),
            origin: "PostgreSQL at 127.0.0.1:5432".into(),
        });
    }
    throwaway()
        .await
        .map_err(|e| format!("nothing answers at 127.0.0.1:5432, and no throw-away cluster: {e}"))
}

/// A fresh database for one test, or `None` (said loudly) when no
/// PostgreSQL can be reached or started; under `CI=true` that panics.
pub async fn database() -> Option<TestDatabase> {
    let server = SERVER
        .get_or_init(|| async {
            match find_server().await {
                Ok(s) => {
                    eprintln!("PostgreSQL tests use {}", s.origin);
                    Some(s)
                }
                Err(why) => {
                    if std::env::var("CI").is_ok_and(|v| v == "true") {
                        panic!("CI=true and no PostgreSQL for the tests: {why}");
                    }
                    eprintln!(
                        "\n*** SKIPPING PostgreSQL tests: {why}. Set SWITCHYARD_TEST_DATABASE_URL, \
                         run PostgreSQL at 127.0.0.1:5432 (user postgres), or install its server \
                         binaries (initdb, pg_ctl). ***\n"
                    );
                    None
                }
            }
        })
        .await
        .as_ref()?;
    let name = format!(
        "sy_test_{}_{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let mut admin = PgConnection::connect(&server.admin_url)
        .await
        .expect("connect to create a test database");
    admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .await
        .expect("create a test database");
    Some(TestDatabase {
        url: format!("{}/{name}", server.base),
        name,
        admin_url: server.admin_url.clone(),
    })
}
