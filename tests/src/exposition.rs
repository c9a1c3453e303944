//! The Prometheus text exposition format read back: what a test or a benchmark scrapes from a
//! `/metrics` endpoint (the operator's admin endpoint, the API server's), as samples it can sum
//! by name and labels. Enough for the names and label values these programs export (no escaped
//! quotes inside label values); not a general parser.

use std::collections::BTreeMap;

/// One sample line: metric name, labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct ExposedSample {
    /// The metric name, with its `_total`/`_count`/`_bucket` suffix.
    pub name: String,
    /// Label names to values.
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

impl ExposedSample {
    /// The value of label `name`, or "" when the sample has none.
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// Every sample of `text`; comment lines and lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<ExposedSample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (head, value) = line.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match head.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}')?;
                    let labels = inner
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .filter_map(|pair| {
                            let (k, v) = pair.split_once('=')?;
                            Some((k.to_owned(), v.trim_matches('"').to_owned()))
                        })
                        .collect();
                    (name.to_owned(), labels)
                }
                None => (head.to_owned(), BTreeMap::new()),
            };
            Some(ExposedSample {
                name,
                labels,
                value,
            })
        })
        .collect()
}

/// The sum of the samples named `name` whose labels include every pair of `labels` (0 when
/// there are none).
pub fn sum(samples: &[ExposedSample], name: &str, labels: &[(&str, &str)]) -> f64 {
    exported_sum(samples, name, labels).unwrap_or(0.0)
}

/// Like [`sum`], but `None` when no sample matches: the metric is not exported (with those
/// labels), which a sum of 0 cannot tell from an exported 0.
pub fn exported_sum(samples: &[ExposedSample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == *v))
        .map(|s| s.value)
        .reduce(|total, value| total + value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_samples_by_name_and_labels() {
        let text = "# HELP calls AWS calls.\n# TYPE calls counter\n\
                    calls{operation=\"GetPolicy\",outcome=\"ok\"} 3\n\
                    calls{operation=\"GetPolicy\",outcome=\"NoSuchEntity\"} 2\n\
                    calls{operation=\"CreatePolicy\",outcome=\"ok\"} 1\n\
                    leader 1\n";
        let samples = parse(text);
        assert_eq!(samples.len(), 4);
        assert_eq!(sum(&samples, "calls", &[]), 6.0);
        assert_eq!(sum(&samples, "calls", &[("operation", "GetPolicy")]), 5.0);
        assert_eq!(
            sum(
                &samples,
                "calls",
                &[("operation", "GetPolicy"), ("outcome", "ok")]
            ),
            3.0
        );
        assert_eq!(sum(&samples, "leader", &[]), 1.0);
        assert_eq!(exported_sum(&samples, "leader", &[]), Some(1.0));
        assert_eq!(
            exported_sum(&samples, "calls", &[("outcome", "ok")]),
            Some(4.0)
        );
        assert_eq!(sum(&samples, "absent", &[]), 0.0);
        assert_eq!(exported_sum(&samples, "absent", &[]), None);
        assert_eq!(
            exported_sum(&samples, "calls", &[("outcome", "Throttling")]),
            None
        );
        assert_eq!(samples[1].label("outcome"), "NoSuchEntity");
        assert_eq!(samples[3].label("outcome"), "");
    }
}
