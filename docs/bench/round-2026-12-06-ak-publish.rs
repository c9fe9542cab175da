//! Round ak's publish microbenchmark (docs/bench/round-2026-12-06-ak.md):
//! one JetStream file stream on a nats-server with `sync_interval: always`,
//! groups of `k` messages sent at a fixed rate three ways: `plain` (one
//! publish and one PubAck each, all in flight), `atomic` (one atomic batch,
//! `allow_atomic`, as the relay sends them) and `fast` (a fast-ingest batch,
//! `allow_batched`, nats-server 2.14+, through the `jetstream-extra` crate).
//! A pull consumer on the same stream times each message from its send to
//! its delivery. Prints nats-server's CPU per message (from /proc), this
//! process's (publisher and consumer), and the latencies.
//!
//! Not part of the workspace (it would bring a second async-nats). To run it,
//! make a crate of its own with this file as `src/main.rs` and:
//!
//! ```toml
//! [dependencies]
//! async-nats = "0.48"        # the version jetstream-extra 0.3.0 builds on
//! jetstream-extra = "0.3.0"
//! tokio = { version = "1", features = ["full"] }
//! bytes = "1"
//! futures = "0.3"
//! serde_json = "1"
//! ```
//!
//! then, with a nats-server started from a config holding
//! `jetstream { store_dir: ..., sync_interval: always }`:
//!
//! ```sh
//! NATS=127.0.0.1:14222 NATS_PID=$(pgrep -f nats-server) \
//!     target/release/fi atomic|plain|fast K GROUPS GROUPS_PER_SEC
//! ```
use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use jetstream_extra::batch_publish_fast::FastPublishExt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn cpu_ticks(pid: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args[1].clone();
    let k: usize = args[2].parse().unwrap();
    let groups: usize = args[3].parse().unwrap();
    let rate: f64 = args[4].parse().unwrap();
    let url = std::env::var("NATS").unwrap();
    let pid = std::env::var("NATS_PID").unwrap();
    let client = async_nats::connect(&url).await.unwrap();
    let js = jetstream::new(client.clone());
    let name = format!("FI{}", now_ns());
    let cfg = serde_json::json!({"name": name, "subjects": [format!("{name}.>")], "storage": "file",
        "retention": "limits", "num_replicas": 1, "allow_atomic": true, "allow_batched": true,
        "duplicate_window": 120_000_000_000u64});
    let r = client
        .request(
            format!("$JS.API.STREAM.CREATE.{name}"),
            cfg.to_string().into(),
        )
        .await
        .unwrap();
    let body = String::from_utf8_lossy(&r.payload).to_string();
    assert!(!body.contains("\"error\""), "{body}");
    let stream = js.get_stream(&name).await.unwrap();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("c".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    let total = k * groups;
    let recv = tokio::spawn(async move {
        let mut msgs = consumer.messages().await.unwrap();
        let mut lat = Vec::with_capacity(total);
        while lat.len() < total {
            let m = msgs.next().await.unwrap().unwrap();
            let sent: u64 = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
            lat.push((now_ns() - sent) as f64 / 1e6);
            m.ack().await.unwrap();
        }
        lat
    });
    let subject = format!("{name}.x");
    let gap = Duration::from_secs_f64(1.0 / rate);
    let t0 = cpu_ticks(&pid);
    let c0 = cpu_ticks("self");
    let start = Instant::now();
    let mut ack_lat = Vec::new();
    let mut idn = 0u64;
    for g in 0..groups {
        let due = start + gap * g as u32;
        tokio::time::sleep_until(due.into()).await;
        let t = Instant::now();
        let mut hdrs = Vec::new();
        for _ in 0..k {
            idn += 1;
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", format!("{name}-{idn}").as_str());
            hdrs.push(h);
        }
        match mode.as_str() {
            "plain" => {
                let mut futs = Vec::new();
                for h in hdrs {
                    futs.push(
                        js.publish_with_headers(
                            subject.clone(),
                            h,
                            Bytes::from(now_ns().to_string()),
                        )
                        .await
                        .unwrap(),
                    );
                }
                for f in futs {
                    f.await.unwrap();
                }
            }
            "atomic" => {
                let n = hdrs.len();
                let bid = format!("b{}", now_ns());
                for (i, mut h) in hdrs.into_iter().enumerate() {
                    h.insert("Nats-Batch-Id", bid.as_str());
                    h.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
                    if i + 1 == n {
                        h.insert("Nats-Batch-Commit", "1");
                        js.publish_with_headers(
                            subject.clone(),
                            h,
                            Bytes::from(now_ns().to_string()),
                        )
                        .await
                        .unwrap()
                        .await
                        .unwrap();
                    } else {
                        client
                            .publish_with_headers(
                                subject.clone(),
                                h,
                                Bytes::from(now_ns().to_string()),
                            )
                            .await
                            .unwrap();
                    }
                }
            }
            "fast" => {
                let mut b = js.fast_publish().flow(64).build().unwrap();
                let n = hdrs.len();
                for (i, h) in hdrs.into_iter().enumerate() {
                    let m = async_nats::jetstream::message::OutboundMessage {
                        subject: subject.clone().into(),
                        payload: Bytes::from(now_ns().to_string()),
                        headers: Some(h),
                    };
                    if i + 1 == n {
                        b.commit_message(m).await.unwrap();
                        break;
                    } else {
                        b.add_message(m).await.unwrap();
                    }
                }
            }
            _ => panic!(),
        }
        ack_lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let lat = tokio::time::timeout(Duration::from_secs(30), recv)
        .await
        .unwrap()
        .unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    let t1 = cpu_ticks(&pid);
    let c1 = cpu_ticks("self");
    let q = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[((v.len() as f64 - 1.0) * p) as usize]
    };
    let mut lat = lat;
    let mut ack_lat = ack_lat;
    println!(
        "{mode} k={k} groups={groups} rate={rate}/s: nats cpu {:.3} client {:.3} ms/msg; deliver p50 {:.2} p99 {:.2} ms; group ack p50 {:.2} p99 {:.2} ms; {:.1}s",
        (t1 - t0) as f64 * 10.0 / total as f64,
        (c1 - c0) as f64 * 10.0 / total as f64,
        q(&mut lat, 0.5),
        q(&mut lat, 0.99),
        q(&mut ack_lat, 0.5),
        q(&mut ack_lat, 0.99),
        elapsed
    );
}
