//! A throwaway PostgreSQL server from the system's binaries (Debian's `postgresql` package):
//! `initdb` into a temporary directory, `postgres` on a free 127.0.0.1 port, stopped and
//! deleted when dropped. Missing binaries skip the test (fail under `CI=true`).
//!
//! PostgreSQL refuses to run as root: when the tests do, the server runs as the `postgres`
//! user (which the Debian package creates), or `nobody`, owning the temporary directory.

use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How durable the server is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `fsync = off`: fast, for tests (nothing here survives a machine crash anyway).
    Test,
    /// The defaults (`fsync`, `synchronous_commit` on): every commit on disk, for benchmarks.
    Durable,
}

/// A running server; stopped (immediate shutdown) and deleted when dropped.
pub struct TempPostgres {
    child: Option<Child>,
    port: u16,
    bin: PathBuf,
    run_as: Option<(u32, u32)>,
    dir: TempDir,
}

/// Where the server binaries are: `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/*/bin` holding `initdb`.
pub fn bin_dir() -> Option<PathBuf> {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|dir| dir.join("initdb").exists());
    if from_pg_config.is_some() {
        return from_pg_config;
    }
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, bin)| bin)
}

/// The uid and gid of `name` in `/etc/passwd`.
fn user(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&name) && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

impl TempPostgres {
    /// Starts a server, or `None` (skip) when PostgreSQL is not installed.
    pub fn start(durability: Durability) -> Option<TempPostgres> {
        let Some(bin) = bin_dir() else {
            return crate::skip(
                "PostgreSQL is not installed (Debian: apt-get install postgresql; its binaries \
                 are found with pg_config --bindir or under /usr/lib/postgresql/*/bin)",
            );
        };
        let dir = tempfile::Builder::new()
            .prefix("patchwire-pg-")
            .tempdir()
            .expect("a temporary directory for PostgreSQL");
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        let run_as = if root {
            let ids = user("postgres")
                .or_else(|| user("nobody"))
                .expect("running as root, a postgres or nobody user to run PostgreSQL as");
            std::os::unix::fs::chown(dir.path(), Some(ids.0), Some(ids.1))
                .expect("chown of PostgreSQL's directory");
            Some(ids)
        } else {
            None
        };
        let mut server = TempPostgres {
            child: None,
            port: free_port(),
            bin,
            run_as,
            dir,
        };
        let status = server
            .command("initdb")
            .arg("-D")
            .arg(server.data())
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .arg("--no-instructions")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("running initdb");
        assert!(
            status.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        // The port was free when picked; another process may bind it before PostgreSQL does
        // (then it exits at once, saying so): another port then.
        for _ in 0..5 {
            if server.spawn(durability) {
                return Some(server);
            }
            server.port = free_port();
        }
        panic!(
            "PostgreSQL found every port it was given taken: {}",
            std::fs::read_to_string(server.log_path()).unwrap_or_default()
        );
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid);
        }
        command
    }

    /// Starts the server and waits until it is ready; `false` when it exited because its port
    /// was taken meanwhile.
    fn spawn(&mut self, durability: Durability) -> bool {
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(self.data())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=200",
            ]);
        if durability == Durability::Test {
            command.args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]);
        }
        let log = std::fs::File::create(self.log_path()).expect("PostgreSQL's log file");
        let child = command
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting postgres");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // Asked on this server's own socket directory: another server on the same port
            // (one that took it first) is never mistaken for this one.
            let ready = self
                .command("pg_isready")
                .arg("-q")
                .arg("-h")
                .arg(self.dir.path())
                .arg("-p")
                .arg(self.port.to_string())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return true;
            }
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                if log.contains("Address already in use") {
                    self.child = None;
                    return false;
                }
                panic!(
                    "postgres exited ({status}) before it was ready: {}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL was not ready within 30 s: {}",
                std::fs::read_to_string(self.log_path()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `postgres://postgres@127.0.0.1:{port}/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The directory the server's files are in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGQUIT: immediate shutdown, the server's children exit with it.
            let _ = Command::new("kill")
                .args(["-QUIT", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
