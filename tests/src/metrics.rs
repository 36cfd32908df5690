//! Reading a node's `/node/metrics` the way a Prometheus server would: parsed by an OpenMetrics
//! parser, which refuses an exposition that breaks the format.

use cloister_client::Client;

pub type Exposition =
    openmetrics_parser::MetricsExposition<openmetrics_parser::OpenMetricsType, openmetrics_parser::OpenMetricsValue>;

/// Scrapes `/node/metrics` without a client certificate and parses it with an OpenMetrics parser.
pub async fn scrape(anonymous: &Client) -> (String, Exposition) {
    let reply = anonymous.get("/node/metrics").await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let text = reply.text();
    let parsed = openmetrics_parser::openmetrics::parse_openmetrics(&text)
        .unwrap_or_else(|e| panic!("the exposition does not parse: {e:?}\n{text}"));
    (text, parsed)
}

/// The sum of a family's samples whose labels include `labels`: a counter's or gauge's value, or
/// a histogram's count; 0 for a family that has none.
pub fn value(exposition: &Exposition, family: &str, labels: &[(&str, &str)]) -> f64 {
    use openmetrics_parser::OpenMetricsValue;
    // A family with no samples yet is left out of the exposition.
    let Some(family) = exposition.families.get(family) else { return 0.0 };
    family
        .iter_samples()
        .filter(|s| {
            let set = s.get_labelset().unwrap();
            labels.iter().all(|(k, v)| set.get_label_value(k) == Some(*v))
        })
        .map(|s| match &s.value {
            OpenMetricsValue::Counter(c) => c.value.as_f64(),
            OpenMetricsValue::Gauge(n) | OpenMetricsValue::Unknown(n) => n.as_f64(),
            OpenMetricsValue::Histogram(h) => h.count.unwrap_or(0) as f64,
            other => panic!("unexpected sample {other:?}"),
        })
        .sum()
}
