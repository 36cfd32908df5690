//! The one load generator both systems get: closed-loop clients over tonic, each on its own
//! HTTP/2 connection, for a fixed time; every latency is kept for the percentiles.

use std::time::{Duration, Instant};

use cloister_crypto::identity::KeyedCert;
use cloister_proto::app::v1::CallRequest;
use cloister_proto::app::v1::app_client::AppClient;
use tonic::transport::Channel;

use crate::cpu;
use crate::etcdserverpb::PutRequest;
use crate::etcdserverpb::kv_client::KvClient;

/// What each request does.
#[derive(Clone)]
pub enum Workload {
    /// etcd: `KV.Put` of a fresh key with a value of this many bytes.
    EtcdPut { value_bytes: usize },
    /// Cloister: `App.Call` of the kv contract's `PUT /app/kv/{key}`, the same work.
    KvPut { value_bytes: usize },
    /// Cloister: `App.Call` of a 1-record reconcile ingest (`POST /app/ingest`).
    ReconcileIngest,
}

/// Whom the clients talk to, and as whom: the CA to pin and the client identities to present
/// (client `i` uses identity `i mod len`).
pub struct Target {
    pub ca_pem: Vec<u8>,
    pub identities: Vec<KeyedCert>,
}

/// How long a point's clients run: first uncounted, then measured.
#[derive(Clone, Copy)]
pub struct Timing {
    pub warmup: Duration,
    pub measured: Duration,
}

/// What one point measured.
pub struct Measured {
    pub requests: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub p999: Duration,
    pub max: Duration,
    /// Where the CPU went over the measured seconds; none where `/proc` could not be read.
    pub cpu: Option<cpu::Usage>,
}

impl Measured {
    pub fn per_second(&self) -> f64 {
        (self.requests - self.errors) as f64 / self.elapsed.as_secs_f64()
    }
}

enum Connection {
    Etcd(KvClient<Channel>),
    App(AppClient<Channel>),
}

/// Runs `clients` closed-loop clients for `timing`, client `i` connected to `urls[i mod len]`.
/// Failed requests are counted (and the first one printed), not retried. The CPU time of the
/// server processes `pids` is sampled as the measured seconds start and once every answer is in.
pub async fn drive(
    point: u32,
    target: &Target,
    pids: &[u32],
    urls: &[String],
    clients: usize,
    timing: Timing,
    workload: &Workload,
) -> anyhow::Result<Measured> {
    anyhow::ensure!(!urls.is_empty() && !target.identities.is_empty(), "nothing to connect to");
    let mut connections = Vec::with_capacity(clients);
    for i in 0..clients {
        let identity = &target.identities[i % target.identities.len()];
        let channel = cloister_client::grpc_channel(&urls[i % urls.len()], &target.ca_pem, Some(identity)).await?;
        connections.push(match workload {
            Workload::EtcdPut { .. } => Connection::Etcd(KvClient::new(channel)),
            _ => Connection::App(AppClient::new(channel)),
        });
    }
    let value = |bytes: usize| vec![b'v'; bytes];
    // The clients run for `warmup` first, uncounted (a fresh network, fresh connections and cold
    // caches would otherwise weigh on the first point of each network); then every answer that
    // comes in counts, until the clients stop sending at the deadline.
    let measured_from = Instant::now() + timing.warmup;
    let deadline = measured_from + timing.measured;
    let first_sample = {
        let pids = pids.to_vec();
        tokio::spawn(async move {
            tokio::time::sleep_until(measured_from.into()).await;
            cpu::Sample::take(&pids)
        })
    };
    let mut tasks = Vec::with_capacity(clients);
    for (i, mut connection) in connections.into_iter().enumerate() {
        let (etcd_value, kv_value) = match workload {
            Workload::EtcdPut { value_bytes } => (value(*value_bytes), Vec::new()),
            Workload::KvPut { value_bytes } => (Vec::new(), value(*value_bytes)),
            Workload::ReconcileIngest => (Vec::new(), Vec::new()),
        };
        let ingest = matches!(workload, Workload::ReconcileIngest);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut first_error = None;
            let mut n = 0u64;
            while Instant::now() < deadline {
                // Fresh keys and records at every point, on a network that earlier points wrote to.
                let key = format!("bench-{point:03}-{i:04}-{n:09}");
                let sent = Instant::now();
                let outcome = match &mut connection {
                    Connection::Etcd(kv) => {
                        kv.put(PutRequest { key: key.into_bytes(), value: etcd_value.clone() }).await.map(drop)
                    }
                    Connection::App(app) => {
                        let request = if ingest {
                            let body = format!(r#"{{"lei":"B{point:03}{i:04}{n:012}","nace":"C.{}"}}"#, n % 97);
                            CallRequest {
                                method: "POST".into(),
                                path: "/ingest".into(),
                                body: body.into_bytes(),
                                content_type: "application/json".into(),
                                ..Default::default()
                            }
                        } else {
                            CallRequest {
                                method: "PUT".into(),
                                path: format!("/kv/{key}"),
                                body: kv_value.clone(),
                                content_type: "application/octet-stream".into(),
                                ..Default::default()
                            }
                        };
                        app.call(request).await.map(drop)
                    }
                };
                // Latencies of answered requests only: a fast refusal would flatter the percentiles.
                match outcome {
                    _ if Instant::now() < measured_from => {}
                    Ok(()) => latencies.push(sent.elapsed()),
                    Err(status) => {
                        errors += 1;
                        first_error.get_or_insert(status);
                    }
                }
                n += 1;
            }
            (latencies, errors, first_error)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (mut l, e, first) = task.await?;
        latencies.append(&mut l);
        errors += e;
        if let Some(status) = first {
            eprintln!("    a request failed: {:?} {}", status.code(), status.message());
        }
    }
    let elapsed = measured_from.elapsed();
    let cpu = match (first_sample.await?, cpu::Sample::take(pids)) {
        (Ok(first), Ok(last)) => Some(first.until(&last, latencies.len() as u64)),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("    no CPU figures for this point: {e:#}");
            None
        }
    };
    latencies.sort_unstable();
    // Nearest rank: the smallest latency at least a fraction q of the answers did not exceed.
    let at = |q: f64| latencies.get(((latencies.len() as f64 * q).ceil() as usize).saturating_sub(1));
    Ok(Measured {
        requests: latencies.len() as u64 + errors,
        errors,
        elapsed,
        p50: at(0.50).copied().unwrap_or_default(),
        p99: at(0.99).copied().unwrap_or_default(),
        p999: at(0.999).copied().unwrap_or_default(),
        max: latencies.last().copied().unwrap_or_default(),
        cpu,
    })
}
