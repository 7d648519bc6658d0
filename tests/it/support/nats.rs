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
        // The port was free when picked; another process may bind it first (then this server
        // exits at once): another port then.
        for _ in 0..5 {
            if server.spawn() {
                return Some(server);
            }
            server.port = super::free_port();
        }
        panic!(
            "nats-server found every port it was given taken:\n{}",
            server.log()
        );
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
        assert!(
            self.spawn(),
            "nats-server could not restart: port {} was taken meanwhile:\n{}",
            self.port,
            self.log()
        );
    }

    /// The name this server goes by, told in its INFO greeting: unique, so another server on
    /// its port is not taken for it.
    fn name(&self) -> String {
        let dir = self.dir.path().file_name().unwrap_or_default();
        format!("patchwire-test-{}", dir.to_string_lossy())
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    /// Starts the server and waits until it answers as itself; `false` when it exited first
    /// (its port was taken).
    fn spawn(&mut self) -> bool {
        let mut command = Command::new("nats-server");
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let child = command
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("--name")
            .arg(self.name())
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
        let name = self.name();
        while !ping(self.port, &name) {
            if let Some(child) = &mut self.child
                && matches!(child.try_wait(), Ok(Some(_)))
            {
                self.child = None;
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not answer PING within 10 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether the server named `name` answers the protocol's PING (it greets with INFO first,
/// which names it).
fn ping(port: u16, name: &str) -> bool {
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
    if reader.read_line(&mut line).is_err()
        || !line.starts_with("INFO")
        || !line.contains(&format!("\"server_name\":\"{name}\""))
    {
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
