//! A real `redis-server` on a free loopback port, started and stopped by the test. Missing
//! binary: the test skips with a message, except under `CI=true` where it fails.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A running Redis server; killed when dropped.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
}

impl RedisServer {
    /// Starts a server with persistence off, or `None` (skip) when `redis-server` is missing.
    pub fn start() -> Option<RedisServer> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            let why = "redis-server is not installed (Debian: apt-get install redis-server)";
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true and {why}"
            );
            eprintln!("SKIP: {why}");
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir for redis");
        let port = super::free_port();
        let mut server = RedisServer {
            child: None,
            port,
            dir,
        };
        // The port was free when picked; another process may bind it first (then this server
        // exits at once): another port then.
        for _ in 0..5 {
            if server.spawn() {
                return Some(server);
            }
            server.port = super::free_port();
        }
        panic!("redis-server found every port it was given taken");
    }

    /// `redis://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL): clients see their connections drop.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the server stops answering while its connections stay open (a hung or
    /// partitioned Redis); its data survives.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .expect("kill runs");
            assert!(status.success(), "kill {signal} redis-server failed");
        }
    }

    /// Starts it again on the same port with no data (persistence is off).
    pub fn restart_empty(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "redis-server could not restart: port {} was taken meanwhile",
            self.port
        );
    }

    /// Where it keeps its log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Starts the server and waits until it answers; `false` when it exited first (its port
    /// was taken). It must answer as itself: another server on its port is not it.
    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server");
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ping(self.port, pid) {
            if let Some(child) = &mut self.child
                && matches!(child.try_wait(), Ok(Some(_)))
            {
                self.child = None;
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether the server on `port` answers, and is process `pid` (`INFO server`'s `process_id`).
fn ping(port: u16, pid: u32) -> bool {
    use std::io::{BufRead, BufReader, Read, Write};
    let Ok(mut tcp) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_millis(500)));
    if tcp.write_all(b"INFO server\r\n").is_err() {
        return false;
    }
    let mut reader = BufReader::new(tcp);
    let mut header = String::new();
    let Some(len) = reader
        .read_line(&mut header)
        .ok()
        .and_then(|_| header.trim().strip_prefix('$')?.parse::<usize>().ok())
    else {
        return false;
    };
    let mut body = vec![0; len];
    reader.read_exact(&mut body).is_ok()
        && String::from_utf8_lossy(&body)
            .lines()
            .any(|line| line.trim() == format!("process_id:{pid}"))
}
