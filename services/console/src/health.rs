//! The health page's figures: sampled every few seconds from the order
//! service's counts, each service's metrics endpoint and dead-letter list,
//! and kept for the last minutes only (in memory, for the chart; a restart
//! starts the chart again, nothing else is lost).
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use contracts::order::v1::{CountOrdersRequest, OrderStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, explain};

/// Samples kept: ten minutes at the default two seconds.
const KEPT: usize = 300;

/// One service's figures at one moment.
#[derive(Debug, Clone, Default)]
pub struct ServiceFigures {
    pub name: &'static str,
    /// Outbox rows not yet published, and the age of the oldest, from metrics.
    pub outbox_backlog: Option<f64>,
    pub oldest_unsent_secs: Option<f64>,
    /// Redeliveries and dead letters parked since the service started.
    pub redeliveries: Option<f64>,
    pub parked_total: Option<f64>,
    /// Dead letters waiting now (its DeadLetters API; 1000 means at least).
    pub dead_letters: Option<usize>,
    /// What could not be read, if anything.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub at: chrono::DateTime<chrono::Utc>,
    /// Orders by status, in OrderStatus order, and how many are stuck.
    pub counts: Option<Vec<(OrderStatus, u64)>>,
    pub stuck: Option<u64>,
    pub counts_problem: Option<String>,
    pub services: Vec<ServiceFigures>,
}

impl Sample {
    pub fn count(&self, status: OrderStatus) -> Option<u64> {
        self.counts
            .as_ref()?
            .iter()
            .find(|(s, _)| *s == status)
            .map(|(_, n)| *n)
    }
}

/// The samples of the last minutes, oldest first.
#[derive(Clone, Default)]
pub struct History(Arc<Mutex<VecDeque<Sample>>>);

impl History {
    pub fn samples(&self) -> Vec<Sample> {
        self.0
            .lock()
            .expect("history lock")
            .iter()
            .cloned()
            .collect()
    }

    fn push(&self, sample: Sample) {
        let mut samples = self.0.lock().expect("history lock");
        if samples.len() == KEPT {
            samples.pop_front();
        }
        samples.push_back(sample);
    }
}

/// Per second between two samples, of a count that only grows.
pub fn rate(older: &Sample, newer: &Sample, status: OrderStatus) -> Option<f64> {
    let seconds = (newer.at - older.at).num_milliseconds() as f64 / 1000.0;
    let (a, b) = (older.count(status)?, newer.count(status)?);
    (seconds > 0.0).then(|| b.saturating_sub(a) as f64 / seconds)
}

/// Samples until `shutdown`.
pub async fn sample(
    backend: Backend,
    history: History,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let (sample, counting_took) = take(&backend).await;
        history.push(sample);
        tokio::select! {
            _ = tokio::time::sleep(choreo::db::next_count_in(every, counting_took)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// One sample, and how long the order service took to count its orders
/// (zero when it did not answer): the count reads every order, so the
/// sampler waits longer once it takes long ([`choreo::db::next_count_in`]).
async fn take(backend: &Backend) -> (Sample, Duration) {
    let at = chrono::Utc::now();
    let mut order = backend.order.clone();
    let (counted, counting_took) =
        choreo::db::timed_count(order.count_orders(CountOrdersRequest {})).await;
    let counted = counted.map(|r| r.into_inner());
    let (counts, stuck, counts_problem) = match counted {
        Ok(answer) => (
            Some(
                answer
                    .counts
                    .iter()
                    .map(|c| (c.status(), c.count))
                    .collect(),
            ),
            Some(answer.stuck),
            None,
        ),
        Err(status) => (None, None, Some(explain("order counts", &status))),
    };
    let services = futures::future::join_all(backend.services.iter().map(|service| async move {
        let mut figures = ServiceFigures {
            name: service.name,
            ..Default::default()
        };
        if let Some(url) = &service.metrics_url {
            match scrape(url).await {
                Ok(text) => {
                    // A counter appears at its first increment: absent is zero.
                    let read = |name| metric(&text, name).or(Some(0.0));
                    figures.outbox_backlog = read("saga_outbox_backlog");
                    figures.oldest_unsent_secs = read("saga_outbox_oldest_unsent_age_seconds");
                    figures.redeliveries = read("saga_redeliveries_total");
                    figures.parked_total = read("saga_dead_letters_total");
                }
                Err(e) => figures.problems.push(format!("metrics at {url}: {e}")),
            }
        }
        match service
            .dead_letters
            .clone()
            .list_dead_letters(choreo::proto::ListDeadLettersRequest { limit: 1000 })
            .await
        {
            Ok(listed) => figures.dead_letters = Some(listed.into_inner().dead_letters.len()),
            Err(status) => figures.problems.push(explain("dead letters", &status)),
        }
        figures
    }))
    .await;
    let sample = Sample {
        at,
        counts,
        stuck,
        counts_problem,
        services,
    };
    (sample, counting_took)
}

/// The sum over every label set of metric `name` in Prometheus text, or
/// `None` when the endpoint does not report it.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue; // another metric whose name starts with this one
        }
        let value = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let Some(value) = value {
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

/// GET an `http://host:port/path` URL's body (metrics endpoints speak plain HTTP/1).
async fn scrape(url: &str) -> anyhow::Result<String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("only http:// metrics URLs are read"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let connect = tokio::net::TcpStream::connect(host);
    let mut stream = tokio::time::timeout(Duration::from_secs(2), connect)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within 2 s"))??;
    stream
        .write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        (&mut stream).take(16 << 20).read_to_end(&mut response),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the answer took over 5 s"))??;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    anyhow::ensure!(
        head.starts_with("HTTP/1.") && head.split(' ').nth(1) == Some("200"),
        "answered {}",
        head.lines().next().unwrap_or("nothing")
    );
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::metric;

    #[test]
    fn a_metric_is_summed_over_its_label_sets_and_absent_when_not_reported() {
        let text = "# TYPE saga_outbox_backlog gauge\n\
                    saga_outbox_backlog 3\n\
                    saga_outbox_backlog_other 100\n\
                    saga_redeliveries_total{event_type=\"order.created\"} 2\n\
                    saga_redeliveries_total{event_type=\"other\"} 5\n";
        assert_eq!(metric(text, "saga_outbox_backlog"), Some(3.0));
        assert_eq!(metric(text, "saga_redeliveries_total"), Some(7.0));
        assert_eq!(metric(text, "saga_dead_letters_total"), None);
    }
}
