//! A 3-node JetStream cluster on loopback: three nats-servers with the same
//! deploy/nats.conf, routes between every pair, each route through a proxy
//! of its own, so a test can SIGKILL any node, restart it on its store, or
//! cut one node off from the other two while clients still reach it.
use std::time::Duration;

use crate::{Mode, Nats, Proxy, free_port};

/// The cluster's name (`--cluster_name`).
pub const CLUSTER_NAME: &str = "saga";

pub struct NatsCluster {
    nodes: Vec<Nats>,
    /// `routes[i][j]`: the proxy node i dials to reach node j (none for i == j).
    routes: Vec<Vec<Option<Proxy>>>,
}

impl NatsCluster {
    /// Starts three nodes and waits until each listens for clients.
    pub async fn start() -> anyhow::Result<Self> {
        const N: usize = 3;
        let cluster_ports: Vec<u16> = (0..N).map(|_| free_port()).collect();
        let mut routes: Vec<Vec<Option<Proxy>>> = Vec::new();
        for i in 0..N {
            let mut row = Vec::new();
            for (j, port) in cluster_ports.iter().enumerate() {
                row.push(if i == j {
                    None
                } else {
                    Some(Proxy::start(*port).await?)
                });
            }
            routes.push(row);
        }
        let mut nodes = Vec::new();
        for (i, cluster_port) in cluster_ports.iter().enumerate() {
            let dial: Vec<String> = routes[i]
                .iter()
                .flatten()
                .map(|p| format!("\"nats://127.0.0.1:{}\"", p.port()))
                .collect();
            // Peers learn each other's route address from gossip; a dead
            // one keeps every route on its proxy, so a cut really cuts.
            let settings = format!(
                "server_name: {}\ncluster {{\n  name: {CLUSTER_NAME}\n  listen: \"127.0.0.1:{cluster_port}\"\n  advertise: \"127.0.0.1:1\"\n  routes: [{}]\n}}\n",
                node_name(i),
                dial.join(", ")
            );
            nodes.push(Nats::with_settings(free_port(), free_port(), settings)?);
        }
        // Start them side by side: a node waits for its routes' peers.
        let mut started = Vec::new();
        for mut node in nodes {
            started.push(tokio::task::spawn_blocking(move || {
                node.restart().map(|()| node)
            }));
        }
        let mut nodes = Vec::new();
        for node in started {
            nodes.push(node.await??);
        }
        Ok(NatsCluster { nodes, routes })
    }

    /// Every node's URL with the admin's login, comma-separated.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url().to_owned())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every node's URL without a login, comma-separated, for a service
    /// that brings its own (NATS_USER, NATS_PASSWORD).
    pub fn client_url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.client_url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `i`'s own client URL.
    pub fn node_url(&self, i: usize) -> &str {
        self.nodes[i].url()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The index of the node named `name` (`n1`..`n3`, as JetStream names a leader).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        (0..self.nodes.len()).find(|i| node_name(*i) == name)
    }

    /// SIGKILL node `i`.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        self.nodes[i].kill()
    }

    /// Starts node `i` again on its port and store.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.nodes[i].restart()
    }

    /// Has node `i` read `config` instead of its configuration
    /// ([`Nats::reload`]); its name, cluster and routes stay.
    pub fn reload(&mut self, i: usize, config: String) -> anyhow::Result<()> {
        self.nodes[i].reload(config)
    }

    pub fn is_running(&mut self, i: usize) -> bool {
        self.nodes[i].is_running()
    }

    /// Cuts (`Mode::Cut`) or heals (`Mode::Pass`) every route between node
    /// `i` and the other two; clients still reach every node.
    pub fn isolate(&self, i: usize, mode: Mode) {
        for (a, row) in self.routes.iter().enumerate() {
            for (b, proxy) in row.iter().enumerate() {
                if let Some(proxy) = proxy
                    && (a == i || b == i)
                {
                    proxy.set(mode);
                }
            }
        }
    }

    /// Waits until a client of the cluster sees a JetStream meta leader.
    pub async fn wait_for_jetstream(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let client = async_nats::ConnectOptions::with_user_and_password(
            "admin".into(),
            crate::password("admin"),
        )
        .connect(self.nodes[0].client_url())
        .await?;
        let js = async_nats::jetstream::new(client);
        loop {
            match js.query_account().await {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() > deadline => {
                    anyhow::bail!("no JetStream meta leader within {timeout:?}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

/// Node `i`'s server name.
pub fn node_name(i: usize) -> String {
    format!("n{}", i + 1)
}
