//! A real `nats-server -js` (Debian's `nats-server`) on a free loopback port, with JetStream
//! storing in a temporary directory that survives a restart. Missing binary: the test skips
//! with a message, except under `CI=true` where it fails.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A running NATS server with JetStream; killed when dropped.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    /// A configuration file passed with `-c`, if any.
    config: Option<std::path::PathBuf>,
}

impl NatsServer {
    /// Starts a server, or `None` (skip) when `nats-server` is missing.
    pub fn start() -> Option<NatsServer> {
        NatsServer::start_with("")
    }

    /// Starts a server with `config` (nats-server's configuration syntax, e.g.
    /// `max_payload: 2048`) besides the usual flags, or `None` (skip) when it is missing.
    pub fn start_with(config: &str) -> Option<NatsServer> {
        if Command::new("nats-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            let why = "nats-server is not installed (Debian: apt-get install nats-server)";
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true and {why}"
            );
            eprintln!("SKIP: {why}");
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir for nats");
        let config = (!config.is_empty()).then(|| {
            let path = dir.path().join("nats.conf");
            std::fs::write(&path, config).expect("writing nats.conf");
            path
        });
        let mut server = NatsServer {
            child: None,
            port: super::free_port(),
            dir,
            config,
        };
        server.spawn();
        Some(server)
    }

    /// `nats://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL); what JetStream stored on disk survives.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let mut command = Command::new("nats-server");
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let child = command
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(self.dir.path().join("store"))
            .arg("-l")
            .arg(self.dir.path().join("nats.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ping(self.port) {
            assert!(
                Instant::now() < deadline,
                "nats-server did not answer PING within 10 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether the server answers the protocol's PING (it greets with INFO first).
fn ping(port: u16) -> bool {
    use std::io::{BufRead, BufReader, Write};
    let Ok(mut tcp) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_millis(500)));
    let Ok(clone) = tcp.try_clone() else {
        return false;
    };
    let mut reader = BufReader::new(clone);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() || !line.starts_with("INFO") {
        return false;
    }
    if tcp
        .write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\n")
        .is_err()
    {
        return false;
    }
    line.clear();
    reader.read_line(&mut line).is_ok() && line.starts_with("PONG")
}
