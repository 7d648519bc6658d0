//! One `patchwire run` process on a configuration file the test rewrites: for what needs a
//! real process (SIGHUP, the file loaded again). Killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

/// A running `patchwire run --config <file>` on a free port (set by `PATCHWIRE__SERVER__LISTEN`,
/// so a reload reads that override again, as it reads the file).
pub struct Process {
    /// Where it listens.
    pub port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Process {
    /// Writes `toml` to `config.toml` in `dir` and starts the binary on it; returns once it
    /// serves (`/healthz`).
    pub async fn start(dir: &Path, toml: &str) -> Process {
        Process::start_with_open_files(dir, toml, None).await
    }

    /// [`Process::start`] with the open-file limit (`RLIMIT_NOFILE`, soft and hard) set for the
    /// process, as `ulimit -n` would.
    pub async fn start_with_open_files(
        dir: &Path,
        toml: &str,
        open_files: Option<(u64, u64)>,
    ) -> Process {
        let config = dir.join("config.toml");
        std::fs::write(&config, toml).expect("write the configuration");
        let port = super::free_port();
        let log = dir.join("patchwire.log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_patchwire"));
        if let Some((soft, hard)) = open_files {
            use std::os::unix::process::CommandExt as _;
            let limit = libc::rlimit {
                rlim_cur: soft as libc::rlim_t,
                rlim_max: hard as libc::rlim_t,
            };
            // SAFETY: `setrlimit` is async-signal-safe and touches only the child, between fork
            // and exec; `limit` is a plain value moved into the closure.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = command
            .args(["run", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .env("PATCHWIRE__SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("the patchwire binary starts");
        let process = Process {
            port,
            config,
            log,
            child: Some(child),
        };
        process.serving(Duration::from_secs(20)).await;
        process
    }

    async fn serving(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let client = reqwest::Client::new();
        loop {
            let answer = client
                .get(self.url("/healthz"))
                .timeout(Duration::from_secs(1))
                .send()
                .await;
            if matches!(&answer, Ok(r) if r.status() == 200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "patchwire not serving within {within:?}; its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `http://127.0.0.1:{port}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Replaces the configuration file with `toml` (the process reads it at its next reload).
    pub fn rewrite(&self, toml: &str) {
        std::fs::write(&self.config, toml).expect("rewrite the configuration");
    }

    /// Sends SIGHUP.
    pub fn hangup(&self) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -HUP failed");
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until its log contains `text`.
    pub async fn logged(&self, text: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "{text:?} not logged within {within:?}; the log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
