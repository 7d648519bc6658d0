//! Real patchwire processes forming a cluster on a real `redis-server`: each node is the
//! binary on its own port with the same configuration file, told apart by environment
//! overrides (its listen address, its node id, and a User-Agent naming it, so the mock
//! upstream can tell which node polled).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio::time::Instant;

use super::redis::RedisServer;

/// One node: the binary, restartable with the same identity.
pub struct Node {
    /// Its id (`cluster.node_id`).
    pub name: String,
    /// The port it listens on.
    pub port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    restarts: usize,
}

impl Node {
    /// Starts node `name` on `config`.
    pub fn start(name: &str, config: &Path, dir: &Path) -> Node {
        let mut node = Node {
            name: name.to_owned(),
            port: super::free_port(),
            config: config.to_owned(),
            log: dir.join(format!("{name}.log")),
            child: None,
            restarts: 0,
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        // Each run of the node logs to its own file, so a test can read what one run said.
        let log = std::fs::File::create(self.log_path(self.restarts)).expect("node log file");
        let child = Command::new(env!("CARGO_BIN_EXE_patchwire"))
            .args(["run", "--config"])
            .arg(&self.config)
            .env_remove("RUST_LOG")
            .env(
                "PATCHWIRE__SERVER__LISTEN",
                format!("127.0.0.1:{}", self.port),
            )
            .env("PATCHWIRE__CLUSTER__NODE_ID", &self.name)
            .env("PATCHWIRE__UPSTREAM__USER_AGENT", self.user_agent())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the patchwire binary starts");
        self.child = Some(child);
    }

    fn log_path(&self, run: usize) -> PathBuf {
        self.log.with_extension(format!("{run}.log"))
    }

    /// The User-Agent this node polls with.
    pub fn user_agent(&self) -> String {
        format!("patchwire-node-{}", self.name)
    }

    /// `http://127.0.0.1:{port}`.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The URL of stream `name` on this node.
    pub fn stream_url(&self, name: &str) -> String {
        format!("{}/streams/{name}", self.base())
    }

    /// Waits until `/readyz` answers 200 (Redis reached, log followed).
    pub async fn ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let client = reqwest::Client::new();
        loop {
            let answer = client
                .get(format!("{}/readyz", self.base()))
                .timeout(Duration::from_secs(1))
                .send()
                .await;
            if matches!(&answer, Ok(r) if r.status() == 200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {} not ready within {within:?}; its log:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `/healthz` answers 200: the process serves HTTP (Redis may not answer yet).
    pub async fn live(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let client = reqwest::Client::new();
        loop {
            let answer = client
                .get(format!("{}/healthz", self.base()))
                .timeout(Duration::from_secs(1))
                .send()
                .await;
            if matches!(&answer, Ok(r) if r.status() == 200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {} not serving within {within:?}; its log:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What `/readyz` answers now.
    pub async fn readyz(&self) -> u16 {
        reqwest::Client::new()
            .get(format!("{}/readyz", self.base()))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .map_or(0, |r| r.status().as_u16())
    }

    /// What the node logged in its current run.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path(self.restarts)).unwrap_or_default()
    }

    fn pid(&self) -> String {
        self.child
            .as_ref()
            .map(|c| c.id().to_string())
            .expect("the node is running")
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} failed");
    }

    /// SIGKILL: the process dies without releasing anything.
    pub fn kill(&mut self) {
        self.signal("-KILL");
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the process to exit.
    pub fn stop(&mut self) {
        self.signal("-TERM");
        if let Some(mut child) = self.child.take() {
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "node {} did not stop on SIGTERM",
                    self.name
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGSTOP: the process is paused (a long GC pause, a VM migration, a partition).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Reloads the node's configuration file (`SIGHUP`) and waits until it says it did;
    /// fails the test if it refused the file.
    pub async fn reload(&self, within: Duration) {
        const DONE: &str = "configuration reloaded";
        const REFUSED: &str = "configuration reload refused";
        let count = |text: &str| self.log().matches(text).count();
        let (done, refused) = (count(DONE), count(REFUSED));
        self.signal("-HUP");
        let deadline = Instant::now() + within;
        while count(DONE) == done {
            assert!(
                count(REFUSED) == refused,
                "node {} refused the configuration; its log:\n{}",
                self.name,
                self.log()
            );
            assert!(
                Instant::now() < deadline,
                "node {} did not reload within {within:?}; its log:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the node again (same id, same port).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the node first");
        self.restarts += 1;
        self.spawn();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A paused process must be resumed to die promptly.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A Redis server and nodes sharing one configuration file.
pub struct TestCluster {
    /// The Redis server.
    pub redis: RedisServer,
    /// The nodes, in start order.
    pub nodes: Vec<Node>,
    dir: TempDir,
    config: PathBuf,
}

impl TestCluster {
    /// Starts Redis (`None`: skipped, redis-server missing) and writes `config`, in which
    /// `{redis}` stands for the Redis URL.
    pub fn new(config: &str) -> Option<TestCluster> {
        let redis = RedisServer::start()?;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("patchwire.toml");
        std::fs::write(&path, config.replace("{redis}", &redis.url())).expect("config file");
        Some(TestCluster {
            redis,
            nodes: Vec::new(),
            dir,
            config: path,
        })
    }

    /// Starts nodes `names` and waits until each is ready.
    pub async fn start(&mut self, names: &[&str]) {
        for name in names {
            let node = Node::start(name, &self.config, self.dir.path());
            self.nodes.push(node);
        }
        for node in &self.nodes {
            node.ready(Duration::from_secs(20)).await;
        }
    }

    /// The node named `name`.
    pub fn node(&mut self, name: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .expect("a node of that name")
    }

    /// Writes the shared configuration file again (`{redis}` stands for the Redis URL); each
    /// node reads it when reloaded.
    pub fn rewrite(&self, config: &str) {
        std::fs::write(&self.config, config.replace("{redis}", &self.redis.url()))
            .expect("config file");
    }

    /// Every node's log, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- {} ---\n{}", n.name, n.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
