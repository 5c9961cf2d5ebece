//! `/metrics` is valid Prometheus text whose counters and histograms move
//! with traffic; `/health` and `/ready` answer as an orchestrator expects.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::Value;
use sluice_tests::sluice::{Site, base_url, eventually};

/// One sample: metric name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parses Prometheus text exposition format strictly: every line is a
/// comment (`# HELP`, `# TYPE`) or a sample of a declared family with
/// well-formed labels and a number; histogram buckets are cumulative and
/// end in `+Inf` = `_count`.
fn parse(text: &str) -> Vec<Sample> {
    let valid_name = |name: &str| {
        !name.is_empty()
            && name.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", number + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("TYPE"), Some(name), Some(kind)) => {
                    assert!(valid_name(name), "{}", at());
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "{}",
                        at()
                    );
                    types.insert(name.to_owned(), kind.to_owned());
                }
                (Some("HELP"), Some(name), _) => assert!(valid_name(name), "{}", at()),
                _ => panic!("unknown comment, {}", at()),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{}", at()));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other
                .parse()
                .unwrap_or_else(|_| panic!("bad value, {}", at())),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("{}", at()));
                let mut labels = BTreeMap::new();
                let mut rest = body;
                while !rest.is_empty() {
                    let (key, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("{}", at()));
                    assert!(valid_name(key), "label name, {}", at());
                    // The value runs to the first unescaped quote.
                    let mut end = None;
                    let mut escaped = false;
                    for (i, c) in after.char_indices() {
                        match (escaped, c) {
                            (false, '\\') => escaped = true,
                            (false, '"') => {
                                end = Some(i);
                                break;
                            }
                            _ => escaped = false,
                        }
                    }
                    let end = end.unwrap_or_else(|| panic!("unterminated label, {}", at()));
                    labels.insert(key.to_owned(), after[..end].to_owned());
                    rest = after[end + 1..].trim_start_matches(',');
                }
                (name, labels)
            }
        };
        assert!(valid_name(name), "{}", at());
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix).filter(|base| {
                    types
                        .get(*base)
                        .is_some_and(|t| t == "histogram" || t == "summary")
                })
            })
            .unwrap_or(name);
        assert!(
            types.contains_key(family),
            "no # TYPE for {family}, {}",
            at()
        );
        samples.push((name.to_owned(), labels, value));
    }
    // Histograms: cumulative buckets, +Inf equal to the count.
    for (family, kind) in &types {
        if kind != "histogram" {
            continue;
        }
        let mut series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
        for (name, labels, value) in &samples {
            if *name == format!("{family}_bucket") {
                let mut key = labels.clone();
                let le = key.remove("le").expect("a bucket has le");
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().expect("le is a number")
                };
                series.entry(key).or_default().push((le, *value));
            }
        }
        for (labels, mut buckets) in series {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{family}{labels:?} is cumulative"
            );
            let count = samples
                .iter()
                .find(|(n, l, _)| *n == format!("{family}_count") && *l == labels)
                .map(|s| s.2);
            assert_eq!(
                buckets.last().map(|b| b.0),
                Some(f64::INFINITY),
                "{family} ends in +Inf"
            );
            assert_eq!(
                buckets.last().map(|b| b.1),
                count,
                "{family}{labels:?}: +Inf = _count"
            );
        }
    }
    samples
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.2)
        .sum()
}

async fn scrape(base: &str) -> Vec<Sample> {
    let response = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("/metrics answers");
    assert_eq!(response.status().as_u16(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .expect("an ASCII content type")
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    parse(&response.text().await.expect("a text body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_move_with_traffic() {
    let site = Site::with_scripts(&["json-sensor"]);
    let running = site
        .start("[products.json-sensor]\nparams = { temp_max = \"30\" }")
        .await;
    let base = base_url(&running);
    let client = reqwest::Client::new();
    // The recorder is shared by every sluice in this process: compare deltas.
    let before = scrape(&base).await;
    let calls = |s: &[Sample]| {
        value(
            s,
            "sluice_script_calls_total",
            &[("product", "json-sensor")],
        )
    };
    let errors = |s: &[Sample]| {
        value(
            s,
            "sluice_script_errors_total",
            &[("product", "json-sensor")],
        )
    };
    let timed = |s: &[Sample]| {
        value(
            s,
            "sluice_script_call_seconds_count",
            &[("product", "json-sensor")],
        )
    };
    let ingested = |s: &[Sample]| value(s, "sluice_ingest_messages_total", &[]);
    let letters = |s: &[Sample]| value(s, "sluice_deadletters_total", &[]);
    for i in 0..5 {
        let body = format!(r#"{{"temperature": {}}}"#, 20 + i);
        let status = client
            .post(format!("{base}/api/v1/ingest/json-sensor/th-{i}"))
            .body(body)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status.as_u16(), 202);
    }
    let status = client
        .post(format!("{base}/api/v1/ingest/json-sensor/th-bad"))
        .body("not json")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 202);
    // Everything asserted below is waited for: each is recorded on its
    // own schedule (the dead letter by the effects task, the histogram
    // after the counter).
    let after = eventually(Duration::from_secs(10), "the counters to move", || async {
        let now = scrape(&base).await;
        (calls(&now) >= calls(&before) + 6.0
            && letters(&now) >= letters(&before) + 1.0
            && errors(&now) >= errors(&before) + 1.0
            && timed(&now) >= timed(&before) + 6.0
            && ingested(&now) >= ingested(&before) + 6.0)
            .then_some(now)
    })
    .await;
    // A batch of n messages is n samples: the histogram counts messages,
    // as the calls counter does.
    assert_eq!(
        timed(&after) - timed(&before),
        calls(&after) - calls(&before),
        "each message is timed in the histogram"
    );
    assert!(
        after
            .iter()
            .any(|(n, l, _)| n == "sluice_script_call_seconds_bucket"
                && l.get("product").map(String::as_str) == Some("json-sensor")
                && l.get("le").map(String::as_str) == Some("0.001")),
        "script time is a histogram with buckets"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_liveness_and_ready_lists_its_checks() {
    let site = Site::with_scripts(&["json-sensor"]);
    let running = site.start("").await;
    let base = base_url(&running);
    let health = reqwest::get(format!("{base}/health")).await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let ready = reqwest::get(format!("{base}/ready")).await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    assert_eq!(body["checks"][0]["name"], "bus memory");
    assert_eq!(body["checks"][0]["ready"], true);
    running.stop().await;
}
